"""The stochastic benchmark: distribution distances to the exact mixture, SDE next to ODE.

An SDE sampler has no single exact answer per x_T, so it is judged by the law of its samples:
sliced Wasserstein-2 and MMD (:mod:`diffsolve.bench.metrics`) between the sampler's output and
an independent set of exact mixture samples, and the mean log-likelihood of the samples under
the true density. Every row uses the same x_T; stochastic rows draw their noise from one seeded
:class:`~diffsolve.noise.NoiseSource`. Two reference rows frame the table: ``exact`` (a second
independent set of mixture samples: the Monte-Carlo floor of both distances, and the true mean
log-likelihood) and the ODE solvers (the ODE–SDE gap, papers/extras.md §13).

**The noise floor.** Every score is one draw of a statistic of n samples (sliced W2 is
tail-dominated: its spread between independent exact sets is comparable to its mean), so the
exact row is measured over ``exact_draws`` independent exact sets: its value is their mean and
``<metric>_band`` is 2 standard deviations of one draw, the Monte-Carlo noise of any row. The
reports rank only differences larger than that band: every row within the band of the best score
at an NFE is marked best (a tie), and a row inside the exact band is indistinguishable from
exact sampling at this n.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from ..noise import NoiseSource
from ..sample import sample
from ..solvers.base import get_solver, solvers
from .gmm import GaussianMixture, get_gmm
from .metrics import mean_log_likelihood, mmd_rbf, sliced_w2
from .runner import BenchResult, get_process, peer_rows, prediction_for, scored_row

__all__ = ["DEFAULT_SDE_NFES", "ODE_BASELINES", "SDE_EXTRAS", "run_stochastic_benchmark"]

DEFAULT_SDE_NFES = (10, 20, 50, 100)
ODE_BASELINES = ("auto", "dpmpp_2m", "euler")
# stochastic settings of solvers that are deterministic by default: label → (solver, options)
SDE_EXTRAS: dict[str, tuple[str, dict[str, Any]]] = {
    "heun (EDM churn)": ("heun", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    "sa_solver (τ = 1)": ("sa_solver", {"tau": 1.0}),
}
# samplers that need a process of their own kind (they are skipped elsewhere)
_NEEDS = {"mrs": "MeanReverting", "dlg": "VE"}


def default_sde_solvers(process: Any) -> list[str]:
    """Every registered stochastic solver that runs on ``process`` with an NFE budget."""
    out = []
    for name in solvers():
        obj = get_solver(name)
        if not obj.stochastic or getattr(obj, "adaptive", False) or get_solver(name).name != name:
            continue
        need = _NEEDS.get(name)
        if need is not None and type(process).__name__ != need:
            continue
        out.append(name)
    return out


def _metrics(gmm: GaussianMixture, x: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    x = x.to(torch.float64).reshape(x.shape[0], -1)
    return {
        "sw2": sliced_w2(x, exact),
        "mmd": mmd_rbf(x, exact),
        "loglik": mean_log_likelihood(gmm, x.reshape(x.shape[0], *gmm.shape)),
    }


def run_stochastic_benchmark(
    model: str | GaussianMixture = "gmm2d",
    process: str | Any = "sd",
    solver_names: Sequence[str] | None = None,
    nfes: Sequence[int] = DEFAULT_SDE_NFES,
    n: int = 2048,
    seed: int = 0,
    ode: Sequence[str] = ODE_BASELINES,
    extras: bool = True,
    peers: bool = False,
    progress: Callable[[str], None] | None = None,
    exact_draws: int = 8,
) -> BenchResult:
    """Run every SDE sampler (and the ODE baselines, and the peers' SDE samplers) at each NFE.

    Args:
        model, process: as :func:`~diffsolve.bench.runner.run_benchmark`.
        solver_names: stochastic solvers (default: every registered one that fits the process).
        nfes: NFE budgets.
        n: samples per configuration (and in each exact set).
        seed: x_T from ``manual_seed(seed)``, solver noise from ``seed + 1``, the reference
            exact set from ``seed + 2`` and the exact row's sets from ``seed + 3``.
        ode: deterministic solvers run alongside (the ODE–SDE gap).
        extras: add :data:`SDE_EXTRAS` (EDM churn, SA-Solver τ = 1).
        peers: add diffusers / k-diffusion SDE samplers (``bench.peers``) where installed.
        progress: called with a short message before each configuration.
        exact_draws: independent exact sets (n samples each) for the exact row (≥ 2): its
            metrics are their mean and ``<metric>_band`` 2 standard deviations of one draw
            (module docstring).

    Returns:
        :class:`~diffsolve.bench.runner.BenchResult`; rows have ``kind`` (``exact`` | ``ode`` |
        ``sde`` | ``peer``), ``label``, ``library``, ``solver``, ``options``, ``nfe``,
        ``nfe_used``, ``sw2``, ``mmd``, ``loglik``, ``seconds``, ``error``; the exact rows
        also ``sw2_band``, ``mmd_band``, ``loglik_band`` and ``draws``.
    """
    if int(exact_draws) != exact_draws or exact_draws < 2:
        raise ValueError(f"exact_draws must be an integer >= 2, got {exact_draws!r}")
    gmm = get_gmm(model) if isinstance(model, str) else model
    proc = get_process(process)
    den = gmm.denoiser(proc, prediction_for(proc))
    names = list(solver_names) if solver_names is not None else default_sde_solvers(proc)
    configs: list[tuple[str, str, str, dict[str, Any]]] = [("ode", name, name, {}) for name in ode]
    configs += [("sde", name, name, {}) for name in names]
    if extras:
        configs += [("sde", label, s, o) for label, (s, o) in SDE_EXTRAS.items()]
    for _, _, s, o in configs:
        if s != "auto":
            get_solver(s, **o)  # unknown names and options fail before any work
    say = progress or (lambda _msg: None)
    x_T = proc.prior(
        (n, *gmm.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    exact = gmm.sample(n, torch.Generator().manual_seed(seed + 2)).reshape(n, -1)
    started = time.perf_counter()
    floor_gen = torch.Generator().manual_seed(seed + 3)
    draws = [_metrics(gmm, gmm.sample(n, floor_gen), exact) for _ in range(int(exact_draws))]
    floor: dict[str, Any] = {"draws": int(exact_draws)}
    for key in draws[0]:
        vals = torch.tensor([d[key] for d in draws], dtype=torch.float64)
        floor[key] = float(vals.mean())
        floor[f"{key}_band"] = 2.0 * float(vals.std())
    rows: list[dict[str, Any]] = []
    base: dict[str, Any] = {"library": "exact", "solver": "exact", "options": {}, "nfe_used": None}
    ex = {"kind": "exact", "label": "exact samples", "seconds": None, "error": None, **base}
    for k in nfes:
        rows.append({**ex, "nfe": int(k), **floor})

    for kind, label, name, opts in configs:
        for k in nfes:
            say(f"{label} nfe={k}")
            row: dict[str, Any] = {
                "kind": kind,
                "label": label,
                "library": "diffsolve",
                "solver": name,
                "options": opts,
                "nfe": int(k),
            }
            noise = NoiseSource(torch.Generator().manual_seed(seed + 1))
            run = partial(sample, den, x_T, name, nfe=int(k), noise=noise, return_info=True, **opts)
            done, _ = scored_row(
                row, run, lambda res: _metrics(gmm, res[0], exact), lambda res: res[1].nfe
            )
            rows.append(done)

    note = None
    if peers:
        note = peer_rows(
            rows,
            nfes,
            say,
            lambda peers_mod: peers_mod.stochastic_peer_configs(proc),
            lambda peers_mod, cfg, k: peers_mod.run_stochastic_peer(
                cfg, den, x_T, k, seed=seed + 1
            ),
            lambda res: _metrics(gmm, res.x, exact),
        )
    meta = {
        "model": gmm.name,
        "dim": gmm.dim,
        "process": process if isinstance(process, str) else repr(proc),
        "process_repr": repr(proc),
        "n": n,
        "seed": seed,
        "exact_draws": int(exact_draws),
        "nfes": [int(k) for k in nfes],
        "solvers": names,
        "ode": list(ode),
        "peers": note,
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    return BenchResult(rows, meta)
