"""Flow matching / rectified flow: α_t = 1 − t, σ_t = t (Lipman et al. 2023; Liu et al. 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import GaussianProcess, as_time

__all__ = ["FlowMatching"]


class FlowMatching(GaussianProcess):
    """The linear (cond-OT) path x_t = (1 − t)·x_0 + t·ε, noise at t = 1.

    ``shift`` is the SD3 / Flux timestep shift t ↦ s·t / (1 + (s − 1)·t) applied to uniform-in-t
    grids (Esser et al. 2024, eq. 23; Flux's ``exp(μ)`` shift is the same map with s = e^μ).
    α vanishes at t = 1, so λ = −∞ there: grids uniform in λ or in σ/α start from
    ``t_max_finite = 1 − t_min`` instead, as diffusers does with flow sigmas.

    The network receives t (pass ``time_map`` to the Denoiser for 1000·t style models).
    """

    def __init__(self, shift: float = 1.0, t_min: float = 1e-3, t_max: float = 1.0):
        if shift <= 0:
            raise ValueError("shift must be positive")
        if not 0 < t_min < t_max <= 1:
            raise ValueError("need 0 < t_min < t_max <= 1")
        self.shift = float(shift)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def log_alpha(self, t: float | Tensor) -> Tensor:
        return torch.log1p(-as_time(t))

    def log_sigma(self, t: float | Tensor) -> Tensor:
        return torch.log(as_time(t))

    def alpha(self, t: float | Tensor) -> Tensor:
        return 1.0 - as_time(t)

    def sigma(self, t: float | Tensor) -> Tensor:
        return as_time(t).clone()

    def d_alpha(self, t: float | Tensor) -> Tensor:
        return -torch.ones_like(as_time(t))

    def d_sigma(self, t: float | Tensor) -> Tensor:
        return torch.ones_like(as_time(t))

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        # σ/α = t/(1−t) = e^{−λ}  ⇒  t = sigmoid(−λ)
        return torch.sigmoid(-as_time(lam))

    def shift_time(self, t: Tensor) -> Tensor:
        s = self.shift
        return s * t / (1.0 + (s - 1.0) * t)

    @property
    def t_max_finite(self) -> float:
        return min(self.t_max, 1.0 - self.t_min)

    def prior_std(self) -> float:
        # x_1 = ε exactly; for t_max < 1 the data term (1 − t_max)·x_0 is neglected
        return math.sqrt(float(self.sigma(self.t_max)) ** 2 + float(self.alpha(self.t_max)) ** 2)

    def _repr_fields(self) -> dict[str, object]:
        return {"shift": self.shift, **super()._repr_fields()}
