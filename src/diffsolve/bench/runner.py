"""The benchmark runner: every solver × NFE × schedule against the exact PF-ODE solution.

For one analytic model (a Gaussian mixture with an exact Denoiser) on one process, a batch of
x_T is drawn from a fixed seed (float64) and every configuration is run with
``ds.sample(..., nfe=n, return_info=True)``. Each run gets two errors (relative RMSE over the
batch, :func:`~diffsolve.bench.metrics.rel_rmse`):

- ``err_continued``: against the exact ODE solution from the run's first time continued to
  σ = 0 (the reference continues to ρ = σ/α = 1e-8, where the mixture's x̂_0 differs from its
  σ → 0 limit by O(ρ²/λ_min(S)) ≈ 1e-14, and returns x̂_0 there);
- ``err_standard``: against the "standard endpoint": the exact solution at the run's last
  evaluated time, then the exact x̂_0 there — what a sampler that ends with x̂_0 at its last
  σ > 0 can at best deliver (k-diffusion, EDM, diffusers' ``final_sigmas_type="zero"``);
- ``err_tmin``: against one reference for every run, the exact solution at the process's data
  end t_min ended the standard way (x̂_0 there): what the network's own ODE gives where it was
  never trained below σ_min (a discrete-time process), the truth ``ds.tune``'s teacher uses.

``err_continued_median`` and ``err_tmin_median`` are the median per-sample relative errors
against the same two truths: a mixture trajectory near a boundary between components can end
at another component under one sampler and not another, and one such sample sets the RMSE of a
batch (on heldout48 + SD at NFE 10 the RMSE is 0.017 or 0.17 depending on one sample), so a
rule is judged on the median, which follows the bulk.

Reference states are cached per start time: an exact state at time t is reused for every run
that ends there, and a new end time is reached from the nearest cached state above it (each
segment solved at 1e-12, so chaining costs nothing in accuracy).

Peers (diffusers, k-diffusion; ``diffsolve.bench.peers``) get the same two errors on their own
grids; where one has an equivalent here, ours runs on exactly that grid (``times=grid``) so the
ratio ours/peer compares the same algorithm on the same schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..processes import EDM, VE, FlowMatching, GaussianProcess, VPCosine, VPDiscrete, VPLinear
from ..sample import sample
from ..solvers.base import get_solver, solvers
from .gmm import GaussianMixture, get_gmm
from .metrics import per_sample_rel_err, rel_rmse
from .reference import check_reference, exact_x0_at, solve_exact

__all__ = [
    "DEFAULT_NFES",
    "PROCESSES",
    "BenchResult",
    "ExactReference",
    "default_solvers",
    "get_process",
    "run_benchmark",
    "tuned_solvers",
]

DEFAULT_NFES = (4, 5, 6, 8, 10, 12, 15, 20, 25)

PROCESSES: dict[str, tuple[Callable[[], GaussianProcess], str]] = {
    "sd": (
        lambda: VPDiscrete.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012),
        "Stable Diffusion: discrete VP, scaled-linear β 0.00085…0.012, 1000 steps",
    ),
    "ddpm": (
        lambda: VPDiscrete.from_betas("linear", beta_start=1e-4, beta_end=0.02),
        "DDPM: discrete VP, linear β 1e-4…0.02, 1000 steps",
    ),
    "vp-linear": (VPLinear, "continuous VP, linear β(t) 0.1…20 (Score SDE), t ∈ [1e-3, 1]"),
    "vp-cosine": (VPCosine, "continuous cosine VP (Nichol & Dhariwal), t ∈ [1e-3, 0.9946]"),
    "ve": (VE, "variance exploding, σ geometric 0.01…50 (Score SDE)"),
    "edm": (EDM, "EDM: α = 1, σ = t ∈ [0.002, 80]"),
    "flow": (FlowMatching, "flow matching / rectified flow: α = 1 − t, σ = t"),
}


def get_process(name: str | GaussianProcess) -> GaussianProcess:
    """A benchmark process by name (``PROCESSES``) or an object (passed through)."""
    if isinstance(name, GaussianProcess):
        return name
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; valid: {', '.join(PROCESSES)}")
    return PROCESSES[name][0]()


def default_solvers() -> list[str]:
    """``auto``, then every registered deterministic solver that takes an NFE budget (not
    ``stochastic``, not ``adaptive``), aliases that duplicate another name dropped."""
    out: list[str] = []
    seen: list[Any] = []
    # canonical names (a class's own) before aliases, so "euler" is kept rather than "ddim"
    names = sorted(solvers(), key=lambda n: get_solver(n).name != n)
    for name in names:
        obj = get_solver(name)
        if obj.stochastic or getattr(obj, "adaptive", False) or obj in seen:
            continue
        seen.append(obj)
        out.append(name)
    return ["auto", *out]


def _key(t: float) -> float:
    return round(float(t), 14)


class ExactReference:
    """Exact PF-ODE states of one (model, process, x_T), cached per (start time, end time).

    ``at(t_start, t)`` is the exact x at ``t`` on the trajectory through x_T at ``t_start``
    (``t = 0``: the clean end, x̂_0 at σ = 0); ``standard(t_start, t_last)`` is the exact x̂_0 at
    ``t_last``. ``solves`` counts integrator calls.
    """

    def __init__(
        self,
        gmm: GaussianMixture,
        process: GaussianProcess,
        x_T: Tensor,
        method: str = "dop853",
        rtol: float = 1e-12,
    ):
        self.gmm, self.process, self.method, self.rtol = gmm, process, method, rtol
        self.x_T = x_T.to(torch.float64)
        self._states: dict[float, dict[float, Tensor]] = {}
        self.solves = 0

    def at(self, t_start: float, t: float) -> Tensor:
        traj = self._states.setdefault(_key(t_start), {_key(t_start): self.x_T})
        k = _key(t)
        if k not in traj:
            # nearest cached state above t (never the clean end, which has no time > 0)
            above = min(s for s in traj if s >= k and s > 0)
            self.solves += 1
            traj[k] = solve_exact(
                self.gmm,
                self.process,
                traj[above],
                above,
                float(t),
                self.method,
                rtol=self.rtol,
                atol=self.rtol,
            )
        return traj[k]

    def continued(self, t_start: float) -> Tensor:
        return self.at(t_start, 0.0)

    def standard(self, t_start: float, t_last: float) -> Tensor:
        return exact_x0_at(self.gmm, self.process, self.at(t_start, t_last), float(t_last))

    def errors(self, x: Tensor, t_start: float, t_last: float) -> dict[str, float]:
        """The errors of a clean sample x from a run over [t_start … t_last, σ = 0].

        The reference is always the trajectory of x_T from the process's own start: x_T is a
        sample of the prior there, so a run that starts lower (diffusers' "leading" spacing,
        a narrowed ``sigma_max``) carries its start error in every number.
        """
        del t_start  # reported in the row; the exact answer does not depend on it
        anchor = float(self.process.t_max_finite)
        std = self.standard(anchor, t_last)
        per = per_sample_rel_err(x, std)
        tmin = self.standard(anchor, float(self.process.t_min))
        cont = self.continued(anchor)
        return {
            "err_continued": rel_rmse(x, cont),
            "err_continued_median": float(per_sample_rel_err(x, cont).median()),
            "err_tmin": rel_rmse(x, tmin),
            "err_tmin_median": float(per_sample_rel_err(x, tmin).median()),
            "err_standard": rel_rmse(x, std),
            "err_standard_median": float(per.median()),
            "err_standard_max": float(per.max()),
        }


@dataclass
class BenchResult:
    """Rows (one per run, JSON-ready dicts) and the run's metadata."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"meta": _clean(self.meta), "rows": [_clean(r) for r in self.rows]}


def _clean(v: Any) -> Any:
    # strict JSON: NaN/Inf become null, tuples lists
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(u) for k, u in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(u) for u in v]
    return v


def _empty_errors() -> dict[str, float | None]:
    return dict.fromkeys(
        (
            "err_continued",
            "err_continued_median",
            "err_tmin",
            "err_tmin_median",
            "err_standard",
            "err_standard_median",
            "err_standard_max",
        )
    )


def _run_ours(
    ref: ExactReference,
    model: Denoiser,
    x_T: Tensor,
    solver: Any,
    options: dict[str, Any],
    **how: Any,
) -> dict[str, Any]:
    try:
        x, info = sample(model, x_T, solver, return_info=True, **how, **options)
    except (ValueError, FloatingPointError, RuntimeError) as e:
        return {**_empty_errors(), "nfe_used": None, "seconds": None, "error": str(e)}
    t = info.times
    return {
        **ref.errors(x, float(t[0]), float(t[-2])),
        "nfe_used": info.nfe,
        "seconds": info.seconds,
        "t_start": float(t[0]),
        "t_last": float(t[-2]),
        "error": None,
    }


def tuned_solvers(
    tuned: Sequence[Any], model: Any, model_name: str, seed: int
) -> list[tuple[str, Any, dict[str, Any]]]:
    """Tuned solvers for a benchmark, each validated against the benchmark's model before any
    work: ``(label, solver, record)`` per item of ``tuned`` (paths of files written by
    ``Tuned.save`` / ``diffsolve tune``, or :class:`~diffsolve.tuning.Tuned` objects).

    The label is ``tuned:<method>`` (`` (w=…)`` added for a file tuned under guidance); the
    record (the row's ``tuned`` field) names the file, the method and how it was calibrated.
    A file made for another process or prediction type, or by ``diffsolve tune`` for another
    model, raises :class:`~diffsolve.tuning.TunedFileError`; one calibrated on the noise of
    this ``seed`` raises ``ValueError`` (a benchmark never scores on the calibration noise).
    """
    from ..tuning import Tuned, TunedFileError, load_tuned

    out: list[tuple[str, Any, dict[str, Any]]] = []
    for item in tuned:
        if isinstance(item, Tuned):
            obj, source = item, None
            obj.check_model(model)
        else:
            obj, source = load_tuned(item, model=model), str(item)
        cal = dict(obj.info.get("calibration") or {})
        where = source or "tuned solver"
        if cal.get("model") not in (None, model_name):
            raise TunedFileError(
                f"{where}: tuned for the model {cal['model']!r}, not {model_name!r}"
            )
        if cal.get("noise_seed") is not None and int(cal["noise_seed"]) == int(seed):
            raise ValueError(
                f"{where}: calibrated on the noise of seed {seed}, the benchmark's own x_T; "
                "run the benchmark with another --seed"
            )
        method = str(obj.info.get("method", "?"))
        label = f"tuned:{method}"
        w = cal.get("guidance")
        if w is not None and float(w) != 1.0:
            label += f" (w={float(w):g})"
        record = {"file": source, "method": method, "nfe": obj.nfe, "calibration": cal}
        out.append((label, obj, record))
    return out


def _tuned_row(label: str, solver: Any, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "diffsolve",
        "label": label,
        "library": "diffsolve",
        "solver": "tuned",
        "options": {},
        "schedule": "tuned",
        "nfe": int(solver.nfe),
        "tuned": record,
    }


def prediction_for(process: GaussianProcess) -> str:
    """The exact model's output type: velocity on flow paths (where α = 0 at t = 1), else ε."""
    return "velocity" if isinstance(process, FlowMatching) else "eps"


def run_benchmark(
    model: str | GaussianMixture = "gmm64",
    process: str | GaussianProcess = "sd",
    solver_names: Sequence[str] | None = None,
    nfes: Sequence[int] = DEFAULT_NFES,
    schedules: Sequence[str] | None = None,
    batch: int = 64,
    seed: int = 0,
    peers: bool = False,
    prediction: str | None = None,
    check: bool = False,
    progress: Callable[[str], None] | None = None,
    peer_labels: Sequence[str] | None = None,
    tuned: Sequence[Any] = (),
) -> BenchResult:
    """Run the exact benchmark.

    Args:
        model: ``gmm2d`` | ``gmm64`` | ``gmm3072`` or a mixture.
        process: a name of ``PROCESSES`` or a process object.
        solver_names: solver names (default: :func:`default_solvers`), each with default options.
        nfes: NFE budgets.
        schedules: schedule names; None runs each solver on its own default schedule.
        batch, seed: x_T ~ prior, (batch, *shape) float64 from ``torch.Generator().manual_seed``.
        peers: add diffusers / k-diffusion peers (``diffsolve.bench.peers``) where installed.
        prediction: the exact network's output type (default: :func:`prediction_for`).
        check: cross-check the continued reference (DOP853 vs Dormand–Prince, tolerance halving)
            on the first 8 samples and store the relative differences in
            ``meta["reference_check"]``.
        progress: called with a short message before each configuration.
        peer_labels: run only the peer configurations with these labels (default: all).
        tuned: tuned solvers (files written by ``diffsolve tune`` / ``Tuned.save``, or
            ``Tuned`` objects; :func:`tuned_solvers`), validated before any work; each adds a
            row ``tuned:<method>`` at its own NFE, on this benchmark's x_T.

    Returns:
        :class:`BenchResult`; each row has ``kind`` (``diffsolve`` | ``peer``), ``label``,
        ``library``, ``solver``, ``options``, ``schedule``, ``nfe`` (requested), ``nfe_used``,
        ``err_continued``, ``err_tmin`` (+ their per-sample medians), ``err_standard`` (+ per-sample
        median / max),
        ``seconds``, ``error``;
        peer rows add ``ours`` (the same algorithm on the peer's grid) and ``ratio_standard`` /
        ``ratio_continued`` = ours / peer.
    """
    gmm = get_gmm(model) if isinstance(model, str) else model
    proc = get_process(process)
    proc_name = process if isinstance(process, str) else repr(process)
    pred = prediction or prediction_for(proc)
    den = gmm.denoiser(proc, pred)
    names = list(solver_names) if solver_names is not None else default_solvers()
    for name in names:
        if name != "auto":
            get_solver(name)  # unknown names fail here, before any work
    tuned_list = tuned_solvers(tuned, den, gmm.name, seed)
    gen = torch.Generator().manual_seed(seed)
    x_T = proc.prior((batch, *gmm.shape), generator=gen, dtype=torch.float64)
    ref = ExactReference(gmm, proc, x_T)
    say = progress or (lambda _msg: None)
    started = time.perf_counter()

    rows: list[dict[str, Any]] = []
    for name in names:
        sched_list: list[str | None] = list(schedules) if schedules else [None]
        for sched in sched_list:
            if name == "auto":
                sched_name = sched if sched is not None else "auto"
            else:
                sched_name = sched if sched is not None else get_solver(name).default_schedule
            label = name if sched is None else f"{name} ({sched})"
            for n in nfes:
                say(f"{label} nfe={n}")
                how: dict[str, Any] = {"nfe": int(n)}
                if sched is not None:
                    how["schedule"] = sched
                res = _run_ours(ref, den, x_T, name, {}, **how)
                rows.append(
                    {
                        "kind": "diffsolve",
                        "label": label,
                        "library": "diffsolve",
                        "solver": name,
                        "options": {},
                        "schedule": sched_name,
                        "nfe": int(n),
                        **res,
                    }
                )
    for label, obj, record in tuned_list:
        say(f"{label} nfe={obj.nfe}")
        res = _run_ours(ref, den, x_T, obj, {}, nfe=obj.nfe)
        rows.append({**_tuned_row(label, obj, record), **res})

    peer_note = None
    if peers:
        peer_note = _run_peers(rows, ref, den, x_T, proc, nfes, say, peer_labels)

    meta: dict[str, Any] = {
        "model": gmm.name,
        "dim": gmm.dim,
        "process": proc_name,
        "process_repr": repr(proc),
        "prediction": pred,
        "batch": batch,
        "seed": seed,
        "nfes": [int(n) for n in nfes],
        "solvers": names,
        "schedules": list(schedules) if schedules else None,
        "reference": {"method": "DOP853 in log(σ/α)", "rtol": ref.rtol, "solves": ref.solves},
        "peers": peer_note,
        "tuned": [record for _, _, record in tuned_list],
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    if check:
        say("checking the reference")
        # the integrators' accuracy, not the batch, is under test: 8 samples keep it to seconds
        meta["reference_check"] = check_reference(gmm, proc, x_T[:8], 0.0, t_from=proc.t_max)
    return BenchResult(rows, meta)


def peer_row(
    cfg: Any,
    nfe: int,
    run: Callable[[], Any],
    score: Callable[[Any], dict[str, Any]],
    empty: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Any]:
    """One benchmark row for a peer configuration at one NFE, and the peer's result.

    ``run()`` runs the peer (a :class:`~diffsolve.bench.peers.PeerResult`), ``score(result)``
    gives the row's metrics; a peer's own failure becomes the row's ``error`` (with ``empty``'s
    metric fields) and the result None, so one broken configuration never stops a benchmark.
    """
    row: dict[str, Any] = {
        "kind": "peer",
        "label": cfg.label,
        "library": cfg.library,
        "solver": cfg.algorithm,
        "options": {},
        "schedule": cfg.spacing,
        "nfe": int(nfe),
    }
    # a peer's own failure, whatever it raises, is a result, not a crash
    return scored_row(row, run, score, lambda res: res.nfe, empty, Exception)


def peer_rows(
    rows: list[dict[str, Any]],
    nfes: Sequence[int],
    say: Callable[[str], None],
    configs_of: Callable[[Any], Sequence[Any]],
    run: Callable[[Any, Any, int], Any],
    score: Callable[[Any], dict[str, Any]],
) -> dict[str, Any]:
    """Append one :func:`peer_row` per (peer configuration, NFE) to ``rows``.

    ``configs_of(peers)`` lists the configurations from :mod:`diffsolve.bench.peers` and
    ``run(peers, cfg, nfe)`` runs one; returns the benchmark's ``meta["peers"]`` note (which
    libraries were available).
    """
    from . import peers as peer_mod

    have = peer_mod.available()
    for cfg in configs_of(peer_mod):
        for k in nfes:
            say(f"{cfg.label} nfe={k}")
            row, _ = peer_row(cfg, k, partial(run, peer_mod, cfg, int(k)), score)
            rows.append(row)
    missing = [k for k, v in have.items() if not v]
    return {"available": have, "note": ("missing: " + ", ".join(missing)) if missing else None}


def scored_row(
    row: dict[str, Any],
    run: Callable[[], Any],
    score: Callable[[Any], dict[str, Any]],
    nfe_of: Callable[[Any], int],
    empty: dict[str, Any] | None = None,
    failures: type[BaseException] | tuple[type[BaseException], ...] = (
        ValueError,
        RuntimeError,
        FloatingPointError,
    ),
) -> tuple[dict[str, Any], Any]:
    """``row`` completed by one timed run: ``run()``'s result scored by ``score`` with
    ``nfe_used`` (``nfe_of(result)``), ``seconds`` and ``error``; a ``failures`` exception becomes
    the row's ``error`` (with ``empty``'s metric fields) and the result None."""
    t0 = time.perf_counter()
    try:
        res = run()
        metrics = score(res)
    except failures as e:
        return {**row, **(empty or {}), "nfe_used": None, "seconds": None, "error": repr(e)}, None
    seconds = time.perf_counter() - t0
    return {**row, **metrics, "nfe_used": int(nfe_of(res)), "seconds": seconds, "error": None}, res


def _peer_errors(ref: ExactReference, res: Any) -> dict[str, Any]:
    grid = res.grid.to(torch.float64)
    t_start, t_last = float(grid[0]), float(grid[-1])
    return {**ref.errors(res.x, t_start, t_last), "t_start": t_start, "t_last": t_last}


def _run_peers(
    rows: list[dict[str, Any]],
    ref: ExactReference,
    den: Denoiser,
    x_T: Tensor,
    proc: GaussianProcess,
    nfes: Sequence[int],
    say: Callable[[str], None],
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    from . import peers as peer_mod

    have = peer_mod.available()
    configs = peer_mod.peer_configs(proc)
    if labels is not None:
        unknown = sorted(set(labels) - {c.label for c in configs})
        if unknown:
            raise ValueError(f"unknown peer label(s) {unknown}")
        configs = [c for c in configs if c.label in set(labels)]
    for cfg in configs:
        for n in nfes:
            say(f"{cfg.label} nfe={n}")
            row, res = peer_row(
                cfg,
                n,
                partial(peer_mod.run_peer, cfg, den, x_T, int(n)),
                partial(_peer_errors, ref),
                _empty_errors(),
            )
            row.update(ours=None, ratio_standard=None, ratio_continued=None)
            if res is not None and cfg.ours is not None:
                name, opts = cfg.ours
                ours = _run_ours(ref, den, x_T, name, dict(opts), times=res.grid.to(torch.float64))
                row["ours"] = {"solver": name, "options": dict(opts), **ours}
                for k in ("standard", "continued"):
                    a, b = ours[f"err_{k}"], row[f"err_{k}"]
                    if a is not None and b:
                        row[f"ratio_{k}"] = a / b
            rows.append(row)
    return {"available": have, "configs": [asdict(c) for c in configs]}
