"""Variance-exploding processes (α = 1): the Score-SDE geometric VE and EDM's σ = t."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import GaussianProcess, as_time

__all__ = ["EDM", "VE"]


class _AlphaOne(GaussianProcess):
    def log_alpha(self, t: float | Tensor) -> Tensor:
        return torch.zeros_like(as_time(t))

    def alpha(self, t: float | Tensor) -> Tensor:
        return torch.ones_like(as_time(t))

    def d_alpha(self, t: float | Tensor) -> Tensor:
        return torch.zeros_like(as_time(t))

    def model_time(self, t: float | Tensor) -> Tensor:
        # VE / EDM networks are conditioned on the noise level σ itself
        return self.sigma(t)


class VE(_AlphaOne):
    """Score-SDE variance exploding: σ_t = σ_min·(σ_max/σ_min)^t on t ∈ [0, 1] (Song et al. 2021).

    The network receives σ_t. Defaults are the CIFAR-10 NCSN++ values.
    """

    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        t_min: float = 0.0,
        t_max: float = 1.0,
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def log_sigma(self, t: float | Tensor) -> Tensor:
        return math.log(self.sigma_min) + as_time(t) * self._log_ratio

    def d_sigma(self, t: float | Tensor) -> Tensor:
        return self.sigma(t) * self._log_ratio

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        return (-as_time(lam) - math.log(self.sigma_min)) / self._log_ratio

    def _repr_fields(self) -> dict[str, object]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, **super()._repr_fields()}


class EDM(_AlphaOne):
    """EDM (Karras et al. 2022): α = 1, σ_t = t on [σ_min, σ_max]; the network receives σ."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = self.sigma_min, self.sigma_max

    def log_sigma(self, t: float | Tensor) -> Tensor:
        return torch.log(as_time(t))

    def sigma(self, t: float | Tensor) -> Tensor:
        return as_time(t).clone()

    def d_sigma(self, t: float | Tensor) -> Tensor:
        return torch.ones_like(as_time(t))

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        return torch.exp(-as_time(lam))

    def _repr_fields(self) -> dict[str, object]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}
