"""The benchmark on the shipped trained networks (``digits-vp``, ``digits-flow``).

A trained network has no closed-form answer, so each sample is compared with the same network's
own probability-flow ODE solution from the same x_T, computed by ``rk45`` at a tight tolerance
(the "RMSE to the converged sample" of the DPM-Solver-v3 and UniPC papers), and the samples'
FD-digits (:func:`diffsolve.bench.digits.fd_digits`) measures what a user sees. Every row uses the
same x_T and the same class labels (balanced, 0–9, no guidance). The peers run on the same
network through the same conditioning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..sample import sample
from ..solvers.base import get_solver
from .metrics import per_sample_rel_err, rel_rmse
from .runner import BenchResult, _tuned_row, peer_rows, scored_row, tuned_solvers

__all__ = ["NETWORK_NFES", "NETWORK_SOLVERS", "run_network_benchmark"]

NETWORK_NFES = (5, 10, 20)
NETWORK_SOLVERS = (
    "auto",
    "euler",
    "dpmpp_2m",
    "dpmpp_3m",
    "unipc",
    "dpm_solver",
    "deis",
    "ipndm",
    "lms",
    "heun",
    "dpmpp_2s",
)


class _Labelled(torch.nn.Module):
    """The network with its class labels bound, so peers that call ``net(x, t)`` condition too."""

    def __init__(self, net: torch.nn.Module, labels: Tensor):
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t, label=self.labels[: x.shape[0]])


def run_network_benchmark(
    name: str = "digits-vp",
    solver_names: Sequence[str] | None = None,
    nfes: Sequence[int] = NETWORK_NFES,
    schedules: Sequence[str] | None = None,
    n: int = 256,
    seed: int = 0,
    peers: bool = False,
    rtol: float = 1e-6,
    progress: Callable[[str], None] | None = None,
    tuned: Sequence[Any] = (),
) -> BenchResult:
    """Every solver × NFE on a shipped network, against its converged ODE solution.

    Args:
        name: ``digits-vp`` or ``digits-flow`` (:func:`diffsolve.nets.available`).
        solver_names: solvers (default :data:`NETWORK_SOLVERS`), each with default options.
        nfes: NFE budgets.
        schedules: schedule names; None runs each solver on its own default.
        n: samples (labels ``arange(n) % 10``).
        seed: x_T ~ prior from ``manual_seed(seed)``.
        peers: add diffusers / k-diffusion configurations (``bench.peers``) where installed.
        rtol: the converged reference's rk45 tolerance (atol = rtol / 10).
        progress: called with a short message before each configuration.
        tuned: tuned solvers (files or ``Tuned`` objects;
            :func:`~diffsolve.bench.runner.tuned_solvers`), validated against the network before
            any work; each adds a row ``tuned:<method>`` at its own NFE, on this x_T.

    Returns:
        :class:`~diffsolve.bench.runner.BenchResult` whose rows follow the exact benchmark's
        (``err_standard`` = relative RMSE to the converged sample; ``err_continued`` None) plus
        ``fd`` (FD-digits of the samples).
    """
    from .. import nets
    from .digits import fd_digits

    net, process, info = nets.load(name)
    if info.prediction is None or process is None:
        raise ValueError(f"{name} is not a generative network")
    names = list(solver_names) if solver_names is not None else list(NETWORK_SOLVERS)
    for s in names:
        if s != "auto":
            get_solver(s)  # unknown names fail before any work
    labels = torch.arange(n) % 10
    model = Denoiser(_Labelled(net, labels), process, info.prediction, sample_shape=(1, 8, 8))
    tuned_list = tuned_solvers(tuned, model, name, seed)
    say = progress or (lambda _msg: None)
    gen = torch.Generator().manual_seed(seed)
    x_T = process.prior((n, 1, 8, 8), generator=gen, dtype=torch.float32)
    started = time.perf_counter()
    say("converged reference (rk45)")
    ref, ref_info = sample(model, x_T, "rk45", rtol=rtol, atol=rtol / 10, return_info=True)
    ref_fd = fd_digits(ref)

    rows: list[dict[str, Any]] = []

    def score(x: Tensor) -> dict[str, Any]:
        per = per_sample_rel_err(x, ref)
        return {
            "err_standard": rel_rmse(x, ref),
            "err_continued": None,
            "err_standard_median": float(per.median()),
            "err_standard_max": float(per.max()),
            "fd": fd_digits(x),
        }

    for s in names:
        for sched in list(schedules) if schedules else [None]:
            label = s if sched is None else f"{s} ({sched})"
            if s == "auto":
                sched_name = sched or "auto"
            else:
                sched_name = sched or get_solver(s).default_schedule
            for k in nfes:
                say(f"{label} nfe={k}")
                row: dict[str, Any] = {
                    "kind": "diffsolve",
                    "label": label,
                    "library": "diffsolve",
                    "solver": s,
                }
                row.update(options={}, schedule=sched_name, nfe=int(k))
                how: dict[str, Any] = {"nfe": int(k)}
                if sched is not None:
                    how["schedule"] = sched
                run = partial(sample, model, x_T, s, return_info=True, **how)
                done, _ = scored_row(row, run, lambda res: score(res[0]), lambda res: res[1].nfe)
                rows.append(done)
    for label, obj, record in tuned_list:
        say(f"{label} nfe={obj.nfe}")
        run = partial(sample, model, x_T, obj, nfe=obj.nfe, return_info=True)
        row = _tuned_row(label, obj, record)
        done, _ = scored_row(row, run, lambda res: score(res[0]), lambda res: res[1].nfe)
        rows.append(done)

    note = None
    if peers:
        note = peer_rows(
            rows,
            nfes,
            say,
            lambda peers_mod: peers_mod.peer_configs(process),
            lambda peers_mod, cfg, k: peers_mod.run_peer(cfg, model, x_T, k),
            lambda res: score(res.x.to(x_T.dtype)),
        )
    meta = {
        "model": name,
        "dim": 64,
        "process": repr(process),
        "process_repr": repr(process),
        "prediction": info.prediction,
        "batch": n,
        "seed": seed,
        "nfes": [int(k) for k in nfes],
        "solvers": names,
        "schedules": list(schedules) if schedules else None,
        "reference": {"method": "rk45", "rtol": rtol, "nfe": ref_info.nfe, "fd": ref_fd},
        "peers": note,
        "tuned": [record for _, _, record in tuned_list],
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    return BenchResult(rows, meta)
