"""Sample a model trained on one Gaussian path on another: the scale-time change of variables.

Two Gaussian paths A and B with x^A = α^A·x_0 + σ^A·ε and x^B = α^B·x_0 + σ^B·ε carry the same
information at times of equal half-log-SNR λ: if λ_A(t_A) = λ_B(t_B) then
x^A_{t_A} = c·x^B_{t_B} with c = α^A(t_A)/α^B(t_B) = σ^A(t_A)/σ^B(t_B), so E[x_0 | x^B_{t_B}] and
E[ε | x^B_{t_B}] are the A-model's predictions at (c·x, t_A) (Kingma et al. 2021, VDM: paths
with the same SNR are equivalent up to a rescaling of x; Shaul et al. 2023's scale-time
transformation; flow_matching's ScheduleTransformedModel does this for velocities). Because
diffsolve's solvers consume (x̂_0, ε̂), which are invariant under the change, re-timing is exact:
no ODE is altered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .denoiser import DenoiserWrapper, EvalPoint, Prediction
from .processes.base import GaussianProcess, as_time

__all__ = ["Retimed"]


@dataclass(frozen=True)
class RetimedPoint(EvalPoint):
    """An evaluation point of process B carrying the model's own point on A and the scale c."""

    inner: EvalPoint | None = None
    scale: float = 1.0


class Retimed(DenoiserWrapper):
    """A Denoiser trained on ``model.process`` (A) presented as a Denoiser on ``process`` (B).

    For a query (x, t_B): t_A = t_of_lambda_A(λ_B(t_B)), c = σ_A(t_A)/σ_B(t_B) (equal to α_A/α_B,
    and defined where α = 0 too), and the result is the A-model's (x̂_0, ε̂) at (c·x, t_A).
    Evaluation points are built once per grid time (host float64), so a sampling loop pays one
    scalar multiply per call. NFE is the wrapped model's.

    Args:
        model: a Denoiser (or wrapper, e.g. CFG) on process A.
        process: the process B to sample on. Its λ range must lie inside A's
            [λ_A(t_max), λ_A(t_min)]; a time outside raises ValueError.

    Example: ``ds.sample(Retimed(flow_model, ds.VPCosine()), x_T, "dpmpp_2m", nfe=10)``.
    """

    def __init__(self, model: Any, process: GaussianProcess):
        super().__init__(model)
        if not isinstance(process, GaussianProcess):
            raise TypeError(f"process must be a GaussianProcess, got {type(process).__name__}")
        self.source: GaussianProcess = model.process
        self.process = process
        src = self.source
        self._lam_lo = float(src.lambda_(src.t_max))
        self._lam_hi = float(src.lambda_(src.t_min))

    def source_time(self, t: float | Tensor) -> Tensor:
        """t_A with λ_A(t_A) = λ_B(t), float64; ValueError outside A's λ range."""
        lam = self.process.lambda_(as_time(t))
        tol = 1e-9 * max(1.0, abs(self._lam_lo), abs(self._lam_hi))
        finite = torch.isfinite(lam)
        out_lo = lam < self._lam_lo - tol
        out_hi = lam > self._lam_hi + tol
        if bool((out_lo | out_hi).any()):
            bad = float(lam[out_lo | out_hi].reshape(-1)[0])
            raise ValueError(
                f"Retimed: λ = {bad:.6g} on {self.process!r} is outside the λ range "
                f"[{self._lam_lo:.6g}, {self._lam_hi:.6g}] of the model's {self.source!r}"
            )
        src = self.source
        t_a = src.t_of_lambda(torch.where(finite, lam, torch.zeros_like(lam)))
        # λ = −∞ (α = 0) maps to A's t_max, which then has λ = −∞ too (checked above)
        t_a = torch.where(finite, t_a, torch.full_like(t_a, src.t_max))
        return t_a.clamp(src.t_min, src.t_max)

    def point(self, t: float | Tensor, like: Tensor) -> RetimedPoint:
        proc = self.process
        t64 = as_time(t)
        t_a = self.source_time(t64)
        inner = self.model.point(t_a, like)
        sigma = float(proc.sigma(t64))
        scale = inner.sigma / sigma
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"Retimed: no finite scale at t = {float(t64)} (σ = {sigma})")
        return RetimedPoint(
            t=float(t64),
            alpha=float(proc.alpha(t64)),
            sigma=sigma,
            d_alpha=float(proc.d_alpha(t64)),
            d_sigma=float(proc.d_sigma(t64)),
            t_in=inner.t_in,
            inner=inner,
            scale=scale,
        )

    def __call__(self, x: Tensor, t: float | Tensor | EvalPoint, **cond: Any) -> Prediction:
        point = (
            t
            if isinstance(t, RetimedPoint)
            else self.point(t.t if isinstance(t, EvalPoint) else t, x)
        )
        assert point.inner is not None
        return self.model(point.scale * x, point.inner, **cond)

    def __repr__(self) -> str:
        return f"Retimed({self.model!r}, {self.process!r})"
