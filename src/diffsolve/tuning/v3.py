"""DPM-Solver-v3's empirical model statistics (EMS) of the user's model, their file, and the
tuned solver built on them (``ds.tune(model, x_calib, nfe, method="v3")``).

The statistics (Zheng et al., NeurIPS 2023, §3.1–3.2), per element of a sample and per λ of a
grid, with N = σ·ε̂ − l·x and f = N/α:

    l_λ = argmin E‖∇_x N‖²_F  = E[diag(∇_x(σ·ε̂))]                       (eq. 6)
    (s_λ, b_λ) = argmin E‖f^{(1)} − s·f − b‖²                            (eq. 8)

where f^{(1)} = d f/dλ along the probability-flow ODE through x_λ, and x_λ = α·x_0 + σ·ε ~ q_λ
(x_0 from the data, or from a converged run of the model when no data is given).

Estimators (:func:`compute_statistics`; no autograd, any network):

* diag(J) by Hutchinson's diagonal estimator E_v[v ⊙ J·v] with Rademacher v (Bekas et al.
  2007; unbiased, and exact for a diagonal J), J·v by a central difference in x with step δ·σ;
* f^{(1)} by a central difference along the ODE: x̃ = x/α moves by dx̃/dλ = −e^{−λ}·ε̂, so
  f(λ ± δ) is evaluated at α_{λ±δ}·(x̃ ∓ δ·e^{−λ}·ε̂); l(λ ± δ) = l ± δ·l' with l' from the l grid
  (second-order differences);
* (s, b) by the per-element least-squares line of f^{(1)} on f over the samples, with a ridge
  κ = ridge·(mean Var f + mean f̄²) on s (a deterministic f, as for one Gaussian, gives s = 0,
  b = E f^{(1)});
* common random numbers (the same x_0, ε and v at every λ), so the estimates are smooth in λ.

Cost: 5 network evaluations per sample and λ (2 for l, 3 for s and b), plus the sampling run
when no data is given; ``stats.info`` records calls, evaluations and seconds.

The file is a safetensors file (float64 ``lam``, ``l``, ``s``, ``b``) whose metadata hold the
format, its version, a SHA-256 digest of tensors and body, and the body (JSON): the sample
shape, the process signature (:func:`~.tuned.process_signature`), how the statistics were made
and, for a tuned solver, its options and NFE. Loading validates all of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..processes.base import GaussianProcess, as_time
from ..solvers.dpm_solver_v3 import DPMSolverV3
from .tuned import TunedFileError, _prediction_of, _same_process, process_signature

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "StatisticsFileError",
    "TunedV3",
    "V3Statistics",
    "compute_statistics",
    "is_v3_file",
    "load_statistics",
    "load_v3",
    "tune_v3",
]

FORMAT = "diffsolve-v3-statistics"
FORMAT_VERSION = 1
_F64 = torch.float64
_TENSORS = ("lam", "l", "s", "b")
_SOLVER_KEYS = ("order", "predictor_pseudo", "corrector", "corrector_pseudo", "lower_order_final")


class StatisticsFileError(TunedFileError):
    """A statistics file that is corrupted, of another format or version, or made for another
    process or sample shape (also raised when a solver meets a model of another process)."""


@dataclass(frozen=True, eq=False)
class V3Statistics:
    """DPM-Solver-v3's statistics on a λ grid: ``lam`` (n,) strictly increasing, ``l``, ``s``,
    ``b`` (n, *shape) (shape () for scalar statistics), all float64 on the CPU. ``signature``:
    the process they were computed for (checked by the solver and on load); ``info``: how (and
    at what cost) they were computed."""

    lam: Tensor
    l: Tensor
    s: Tensor
    b: Tensor
    signature: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k in _TENSORS:
            v = getattr(self, k)
            if not isinstance(v, Tensor):
                raise ValueError(f"statistics: {k} must be a tensor, got {type(v).__name__}")
            object.__setattr__(self, k, v.detach().to(device="cpu", dtype=_F64))
        lam = self.lam
        if lam.ndim != 1 or lam.numel() < 2:
            raise ValueError(f"statistics: lam must be 1-D with ≥ 2 points, got {tuple(lam.shape)}")
        if not bool(torch.isfinite(lam).all()) or not bool((lam[1:] > lam[:-1]).all()):
            raise ValueError("statistics: lam must be finite and strictly increasing")
        for k in ("l", "s", "b"):
            v = getattr(self, k)
            if v.ndim < 1 or v.shape[0] != lam.numel() or v.shape[1:] != self.l.shape[1:]:
                raise ValueError(
                    f"statistics: {k} has shape {tuple(v.shape)}; expected ({lam.numel()}, *shape) "
                    f"with the shape of l {tuple(self.l.shape)}"
                )
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"statistics: {k} has non-finite values")

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-sample shape the statistics are for (() for scalar statistics)."""
        return tuple(self.l.shape[1:])

    @classmethod
    def degenerate(
        cls, lam: Tensor, shape: tuple[int, ...] = (), process: GaussianProcess | None = None
    ) -> V3Statistics:
        """l = 1, s = b = 0 on ``lam``: DPM-Solver-v3 is then DPM-Solver++ (the identity test)."""
        lam = torch.as_tensor(lam, dtype=_F64)
        one = torch.ones(lam.numel(), *shape, dtype=_F64)
        sig = process_signature(process) if process is not None else {}
        return cls(lam, one, 0 * one, 0 * one, sig, {"method": "degenerate"})

    def check(self, process: GaussianProcess) -> None:
        """Raise :class:`StatisticsFileError` unless made for ``process`` (when recorded)."""
        if self.signature and not _same_process(self.signature, process_signature(process)):
            raise StatisticsFileError(
                "these DPM-Solver-v3 statistics were made for another process "
                f"({self.signature['class']}, t in [{self.signature['t_min']}, "
                f"{self.signature['t_max']}]), not {process!r}"
            )

    def save(self, path: str | Path) -> Path:
        """Write the versioned safetensors file (module docstring)."""
        return _write(self, path, None)


# -- computing them ----------------------------------------------------------------------------
def _lambda_grid(process: GaussianProcess, lambdas: Tensor | int | None) -> Tensor:
    lo = float(process.lambda_(as_time(process.t_max_finite)))
    hi = float(process.lambda_(as_time(process.t_min)))
    if lambdas is None:
        lambdas = 120
    if isinstance(lambdas, bool):
        raise ValueError(f"lambdas must be a count or a tensor of λ's, got {lambdas!r}")
    if isinstance(lambdas, int):
        if lambdas < 2:
            raise ValueError(f"lambdas must be ≥ 2 points, got {lambdas}")
        return torch.linspace(lo, hi, lambdas, dtype=_F64)
    lam = torch.as_tensor(lambdas, dtype=_F64).reshape(-1)
    if lam.numel() < 2 or not bool(torch.isfinite(lam).all()):
        raise ValueError("lambdas must hold ≥ 2 finite values")
    if not bool((lam[1:] > lam[:-1]).all()):
        raise ValueError("lambdas must be strictly increasing")
    tol = 1e-9 * (1 + max(abs(lo), abs(hi)))
    if float(lam[0]) < lo - tol or float(lam[-1]) > hi + tol:
        raise ValueError(
            f"lambdas must lie in the process's range [{lo:.6g}, {hi:.6g}] "
            f"(t from t_max_finite to t_min), got [{float(lam[0]):.6g}, {float(lam[-1]):.6g}]"
        )
    return lam.clamp(lo, hi)


def _rows(cond: Mapping[str, Any], idx: Tensor, repeat: int = 1) -> dict[str, Any]:
    out = {}
    for k, v in cond.items():
        if isinstance(v, Tensor) and v.ndim > 0:
            v = v[idx]
            out[k] = v.repeat(repeat, *([1] * (v.ndim - 1))) if repeat > 1 else v
        else:
            out[k] = v
    return out


def compute_statistics(
    model: Any,
    x0: Tensor | None = None,
    lambdas: Tensor | int | None = None,
    cond: Mapping[str, Any] | None = None,
    *,
    samples: int = 256,
    probes: int = 1,
    delta: float | None = None,
    ridge: float = 1e-4,
    batch_size: int = 1024,
    seed: int = 0,
    rtol: float = 1e-6,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> V3Statistics:
    """The empirical model statistics l, s, b of ``model`` on a λ grid (module docstring).

    Args:
        model: a :class:`~diffsolve.Denoiser` (or a guidance wrapper of one: the statistics
            depend on the guidance scale).
        x0: data (B, *shape) in the model's data scale; None: ``samples`` samples of a
            converged run of the model (``rk45`` at ``rtol`` from the prior, seeded by
            ``seed``; needs ``model.sample_shape``).
        lambdas: the λ grid, increasing, inside the process's [λ(t_max_finite), λ(t_min)];
            or a count of points uniform in λ over that whole range (default 120).
        cond: the network's conditioning, batch-first rows aligned with x0 (or with the
            generated samples).
        probes: Rademacher probes (and noises ε) per data point.
        delta: the finite-difference step: δ in λ and δ·σ in x (default 1e-3 for a float64
            network, else 3e-2: near σ_min the rounding of x̂_0, relative to |x|, dominates).
        ridge: relative ridge on s (see the module docstring).
        batch_size: rows per network call (a doubled batch for l).
        progress: ``progress(phase, i, total, nan)`` after each λ of each phase.

    Returns:
        :class:`V3Statistics`; ``info`` holds the cost: network ``calls``, per-sample
        ``evaluations``, ``seconds`` (and the sampling run's when no data is given).
    """
    process: GaussianProcess = model.process
    cond = dict(cond or {})
    if isinstance(probes, bool) or int(probes) != probes or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(ridge, (int, float)) and ridge >= 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite number ≥ 0, got {ridge!r}")
    lam = _lambda_grid(process, lambdas)
    start = time.perf_counter()
    info: dict[str, Any] = {"method": "dpm_solver_v3 EMS", "source": "data"}
    if x0 is None:
        shape = getattr(model, "sample_shape", None)
        if shape is None:
            raise ValueError(
                "compute_statistics without data needs model.sample_shape to draw samples"
            )
        if isinstance(samples, bool) or int(samples) != samples or samples < 2:
            raise ValueError(f"samples must be an integer ≥ 2, got {samples!r}")
        from ..sample import sample

        x_T = process.prior(
            (int(samples), *shape), generator=torch.Generator().manual_seed(seed), dtype=_F64
        )
        with torch.no_grad():
            x0, run = sample(model, x_T, "rk45", rtol=rtol, atol=rtol, cond=cond, return_info=True)
        info.update(source="model", sampling_nfe=run.nfe, sampling_seconds=run.seconds)
    if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.ndim < 2:
        raise ValueError("x0 must be a floating-point tensor of data (B, *shape) with B ≥ 2")
    if x0.shape[0] < 2:
        raise ValueError(f"x0 needs at least 2 data points, got {x0.shape[0]}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 has non-finite values")
    for k, v in cond.items():
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] != x0.shape[0]:
            raise ValueError(f"conditioning {k!r} has batch {v.shape[0]}, x0 has {x0.shape[0]}")
    dtype = torch.float32 if x0.dtype in (torch.float16, torch.bfloat16) else x0.dtype
    x0 = x0.to(dtype)
    net_dtype = getattr(model, "net_dtype", None) or getattr(
        getattr(model, "model", None), "net_dtype", None
    )
    if delta is None:
        delta = 1e-3 if (net_dtype or dtype) == _F64 else 3e-2
    if not (isinstance(delta, (int, float)) and 0 < delta < 0.5):
        raise ValueError(f"delta must be a number in (0, 0.5), got {delta!r}")
    kind = _prediction_of(model) or "eps"
    n_lam, k_data = lam.numel(), x0.shape[0]
    total = k_data * probes
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn((total, *x0.shape[1:]), generator=gen, dtype=_F64).to(dtype)
    vs = (2 * torch.randint(0, 2, (total, *x0.shape[1:]), generator=gen) - 1).to(dtype)
    rows = torch.arange(total) % k_data
    chunks = [torch.arange(total)[i : i + batch_size] for i in range(0, total, batch_size)]

    lam_lo, lam_hi = float(lam[0]), float(lam[-1])
    lo_all = float(process.lambda_(as_time(process.t_max_finite)))
    hi_all = float(process.lambda_(as_time(process.t_min)))
    lam_m = (lam - delta).clamp(min(lo_all, lam_lo), None)
    lam_p = (lam + delta).clamp(None, max(hi_all, lam_hi))
    ts = process.t_of_lambda(torch.cat([lam, lam_m, lam_p]))
    t0, tm, tp = ts[:n_lam], ts[n_lam : 2 * n_lam], ts[2 * n_lam :]
    calls = 0

    def coef(t: Tensor) -> tuple[float, float]:
        return float(process.alpha(t)), float(process.sigma(t))

    def sig_eps(x: Tensor, t: Tensor, a: float, s: float, c: dict[str, Any]) -> Tensor:
        nonlocal calls
        calls += 1
        pred = model(x, model.point(t, x), **c)
        return s * pred.eps if kind == "eps" else x - a * pred.x0

    # -- l: Hutchinson's diagonal of J = ∇_x(σ·ε̂), J·v by central differences -------------------
    l_vals = torch.empty(n_lam, *x0.shape[1:], dtype=_F64)
    with torch.no_grad():
        for m in range(n_lam):
            a, s = coef(t0[m])
            acc = torch.zeros(x0.shape[1:], dtype=_F64)
            for ch in chunks:
                x = a * x0[rows[ch]] + s * noise[ch]
                v, h = vs[ch], delta * s
                both = sig_eps(
                    torch.cat([x + h * v, x - h * v]), t0[m], a, s, _rows(cond, rows[ch], 2)
                )
                jv = (both[: len(ch)] - both[len(ch) :]) / (2 * h)
                acc += (v * jv).sum(0).to(_F64)
            l_vals[m] = acc / total
            if progress is not None:
                progress("statistics l", m + 1, n_lam, float("nan"))
    lam_np = lam.numpy()
    if n_lam >= 3:
        dl = torch.from_numpy(np.gradient(l_vals.numpy(), lam_np, axis=0, edge_order=2))
    else:
        dl = ((l_vals[1] - l_vals[0]) / (lam[1] - lam[0])).expand_as(l_vals).clone()

    # -- s, b: least squares of f' on f, f' by central differences along the ODE -------------
    s_vals = torch.empty_like(l_vals)
    b_vals = torch.empty_like(l_vals)
    with torch.no_grad():
        for m in range(n_lam):
            a, s = coef(t0[m])
            am, sm = coef(tm[m])
            ap, sp = coef(tp[m])
            dm, dp = float(lam_m[m] - lam[m]), float(lam_p[m] - lam[m])
            lm = l_vals[m].to(dtype)
            dlm = dl[m].to(dtype)
            shift: tuple[Tensor, Tensor] | None = None  # the first chunk's means
            acc = torch.zeros(4, *x0.shape[1:], dtype=_F64)  # Σu, Σw, Σu², Σuw
            for ch in chunks:
                c = _rows(cond, rows[ch])
                x = a * x0[rows[ch]] + s * noise[ch]
                ne = sig_eps(x, t0[m], a, s, c)
                f = (ne - lm * x) / a
                xt, dxt = x / a, -ne / a  # x̃ and dx̃/dλ = −e^{−λ}·ε̂ = −σ·ε̂/α
                xm, xp = am * (xt + dm * dxt), ap * (xt + dp * dxt)
                fm = (sig_eps(xm, tm[m], am, sm, c) - (lm + dm * dlm) * xm) / am
                fp = (sig_eps(xp, tp[m], ap, sp, c) - (lm + dp * dlm) * xp) / ap
                df = ((fp - fm) / (dp - dm)).to(_F64)
                f = f.to(_F64)
                if shift is None:  # shifted sums: stable variances
                    shift = (f.mean(0), df.mean(0))
                u, w = f - shift[0], df - shift[1]
                acc += torch.stack([u.sum(0), w.sum(0), (u * u).sum(0), (u * w).sum(0)])
            assert shift is not None
            mu_u, mu_w = acc[0] / total, acc[1] / total
            var = (acc[2] / total - mu_u * mu_u).clamp_min(0)
            cov = acc[3] / total - mu_u * mu_w
            fbar, dfbar = shift[0] + mu_u, shift[1] + mu_w
            kappa = ridge * float(var.mean() + (fbar * fbar).mean()) + 1e-300
            s_vals[m] = cov / (var + kappa)
            b_vals[m] = dfbar - s_vals[m] * fbar
            if progress is not None:
                progress("statistics s, b", m + 1, n_lam, float("nan"))
    info.update(
        calls=calls,
        evaluations=5 * total * n_lam,
        seconds=time.perf_counter() - start,
        samples=int(k_data),
        probes=int(probes),
        lambdas=int(n_lam),
        delta=float(delta),
        ridge=float(ridge),
        prediction=kind,
    )
    return V3Statistics(lam, l_vals, s_vals, b_vals, process_signature(process), info)


# -- the tuned solver --------------------------------------------------------------------------
@dataclass(frozen=True)
class TunedV3(DPMSolverV3):
    """DPM-Solver-v3 on the statistics of one model, for a budget of ``nfe`` calls (its own
    NFE, like every tuned solver: ``ds.sample(model, x_T, solver=tuned)``; the schedule is still
    the caller's). ``save``/:func:`load_v3` keep it; ``info`` records how it was made."""

    nfe: int = 0
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def validate(self) -> None:
        super().validate()
        if isinstance(self.nfe, bool) or int(self.nfe) != self.nfe or self.nfe < 1:
            raise ValueError(f"TunedV3: nfe must be a positive integer, got {self.nfe!r}")
        if self.statistics is None:
            raise ValueError("TunedV3 needs statistics (use dpm_solver_v3 without them)")

    @property
    def planned_nfe(self) -> int | None:
        return int(self.nfe)

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        if nfe != self.nfe:
            raise ValueError(f"this tuned solver makes {self.nfe} network calls; nfe={nfe} given")
        return super().budget(nfe, clean_end)

    def save(self, path: str | Path) -> Path:
        """Write the statistics file with this solver's options and NFE."""
        opts = {k: getattr(self, k) for k in _SOLVER_KEYS}
        return _write(self.statistics, path, {**opts, "nfe": int(self.nfe), "info": self.info})


def tune_v3(
    model: Any,
    x_calib: Tensor,
    nfe: int,
    *,
    cond: Mapping[str, Any] | None = None,
    target: Tensor | None = None,
    order: int = 3,
    corrector: bool = True,
    rtol: float = 1e-6,
    lambdas: Tensor | int | None = None,
    probes: int = 1,
    seed: int = 0,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> TunedV3:
    """DPM-Solver-v3 tuned to ``model``: the statistics of the model's own samples (the
    converged run from the calibration noise ``x_calib``, or ``target`` if given), then the
    solver for ``nfe`` calls. ``info`` holds the statistics' cost and the calibration error to
    the converged run (relative RMSE over the batch, and the median per-sample relative error)
    without and with the statistics."""
    from ..sample import sample
    from .teacher import teacher

    if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if not isinstance(x_calib, Tensor) or not x_calib.is_floating_point() or x_calib.ndim < 2:
        raise ValueError("x_calib must be a floating-point tensor of prior samples (B, ...)")
    cond = dict(cond or {})
    start = time.perf_counter()
    data = target if target is not None else teacher(model, x_calib, cond=cond, rtol=rtol)
    if data.shape != x_calib.shape:
        raise ValueError(
            f"target shape {tuple(data.shape)} does not match x {tuple(x_calib.shape)}"
        )
    stats = compute_statistics(
        model, data, lambdas, cond, probes=probes, seed=seed, progress=progress
    )
    plain = DPMSolverV3(order=order, corrector=corrector)
    tuned = TunedV3(statistics=stats, order=order, corrector=corrector, nfe=int(nfe))
    with torch.no_grad():
        before = sample(model, x_calib, plain, nfe=int(nfe), cond=cond)
        after = sample(model, x_calib, tuned, cond=cond)
    assert isinstance(before, Tensor) and isinstance(after, Tensor)
    ref = data.to(_F64)

    def err(x: Tensor) -> float:
        return float((x.to(_F64) - ref).norm() / ref.norm())

    def median(x: Tensor) -> float:  # robust to the few samples that end in another mode
        d = (x.to(_F64) - ref).reshape(ref.shape[0], -1).norm(dim=1)
        return float((d / ref.reshape(ref.shape[0], -1).norm(dim=1)).median())

    info = {
        "method": "v3",
        "nfe": int(nfe),
        "order": order,
        "corrector": corrector,
        "calib_samples": int(x_calib.shape[0]),
        "calib_rel_rmse_before": err(before),
        "calib_rel_rmse_after": err(after),
        "calib_median_rel_err_before": median(before),
        "calib_median_rel_err_after": median(after),
        "statistics": dict(stats.info),
        "seconds": time.perf_counter() - start,
    }
    if not math.isfinite(err(after)):
        from .tune import TuningError

        raise TuningError("DPM-Solver-v3 with these statistics gives a non-finite sample")
    return TunedV3(statistics=stats, order=order, corrector=corrector, nfe=int(nfe), info=info)


# -- the file ----------------------------------------------------------------------------------
def _digest(tensors: Mapping[str, Tensor], body: str) -> str:
    h = hashlib.sha256(body.encode())
    for k in _TENSORS:
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _write(stats: V3Statistics, path: str | Path, solver: dict[str, Any] | None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: getattr(stats, k).contiguous() for k in _TENSORS}
    body = json.dumps(
        {"shape": list(stats.shape), "signature": stats.signature, "info": stats.info,
         "solver": solver},
        sort_keys=True,
    )  # fmt: skip
    meta = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "sha256": _digest(tensors, body),
        "body": body,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def _read(path: str | Path) -> tuple[V3Statistics, dict[str, Any] | None]:
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error type, OSError, ...
        raise StatisticsFileError(
            f"{path}: not a readable DPM-Solver-v3 statistics file ({e})"
        ) from None
    if meta.get("format") != FORMAT:
        raise StatisticsFileError(f"{path}: not a {FORMAT} file")
    if meta.get("version") != str(FORMAT_VERSION):
        raise StatisticsFileError(
            f"{path}: format version {meta.get('version')!r}, this diffsolve reads {FORMAT_VERSION}"
        )
    missing = [k for k in _TENSORS if k not in tensors]
    if missing or "body" not in meta:
        raise StatisticsFileError(f"{path}: malformed file (missing {missing or ['body']})")
    tensors = {k: v.to(_F64) for k, v in tensors.items()}
    if _digest(tensors, meta["body"]) != meta.get("sha256"):
        raise StatisticsFileError(
            f"{path}: checksum mismatch (the file is corrupted or was edited)"
        )
    try:
        body = json.loads(meta["body"])
        stats = V3Statistics(
            tensors["lam"], tensors["l"], tensors["s"], tensors["b"],
            dict(body.get("signature") or {}), dict(body.get("info") or {}),
        )  # fmt: skip
        if list(stats.shape) != list(body["shape"]):
            raise ValueError(f"shape {stats.shape} does not match the recorded {body['shape']}")
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise StatisticsFileError(f"{path}: malformed body ({e})") from None
    solver = body.get("solver")
    return stats, solver if isinstance(solver, dict) else None


def _validate(path: str | Path, stats: V3Statistics, model: Any, process: Any, shape: Any) -> None:
    if model is not None:
        process = model.process
        if shape is None:
            shape = getattr(model, "sample_shape", None)
    if process is not None:
        try:
            stats.check(process)
        except StatisticsFileError as e:
            raise StatisticsFileError(f"{path}: {e}") from None
    if shape is not None and stats.shape not in ((), tuple(shape)):
        raise StatisticsFileError(
            f"{path}: statistics for samples of shape {stats.shape}, not {tuple(shape)}"
        )


def is_v3_file(path: str | Path) -> bool:
    """Whether ``path`` is a DPM-Solver-v3 statistics file (by its format tag; not validated)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def load_statistics(
    path: str | Path,
    model: Any = None,
    *,
    process: GaussianProcess | None = None,
    shape: tuple[int, ...] | None = None,
) -> V3Statistics:
    """Read statistics written by :meth:`V3Statistics.save` (or :meth:`TunedV3.save`),
    validated: format, version, checksum and, when given, the ``model``'s (or ``process``'s)
    process and the sample ``shape`` (default: ``model.sample_shape``). Raises
    :class:`StatisticsFileError` naming the file and the problem."""
    stats, _ = _read(path)
    _validate(path, stats, model, process, shape)
    return stats


def load_v3(
    path: str | Path,
    model: Any = None,
    *,
    nfe: int | None = None,
    process: GaussianProcess | None = None,
    shape: tuple[int, ...] | None = None,
) -> TunedV3:
    """Read a tuned DPM-Solver-v3 written by :meth:`TunedV3.save`, validated as
    :func:`load_statistics` and, when given, against the ``nfe`` it must have."""
    stats, solver = _read(path)
    if solver is None:
        raise StatisticsFileError(
            f"{path}: holds statistics only (no solver); use load_statistics and "
            "DPMSolverV3(statistics=...)"
        )
    _validate(path, stats, model, process, shape)
    try:
        opts = {k: solver[k] for k in _SOLVER_KEYS}
        tuned = TunedV3(statistics=stats, nfe=solver["nfe"], info=dict(solver.get("info") or {}),
                        **opts)  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise StatisticsFileError(f"{path}: malformed solver options ({e})") from None
    if nfe is not None and nfe != tuned.nfe:
        raise StatisticsFileError(f"{path}: tuned for nfe={tuned.nfe}, not nfe={nfe}")
    return tuned
