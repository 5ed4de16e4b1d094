"""Variance-preserving processes (α_t² + σ_t² = 1): discrete tables, linear β(t), cosine."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .base import GaussianProcess, _interp, as_time, log1mexp

__all__ = ["VPCosine", "VPDiscrete", "VPLinear"]


def _log_alpha_of_lambda(lam: Tensor) -> Tensor:
    # α² = 1 / (1 + e^{−2λ}) on a VP path
    return -0.5 * torch.nn.functional.softplus(-2.0 * lam)


def _log1mexp_np(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # both branches are evaluated
        return np.where(x > -math.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def _host(v: Tensor) -> bool:
    # a CPU float64 value outside autograd: a plan's few dozen host times, where numpy costs
    # ~1 µs an operation and a torch kernel ~3–5 (every host caller takes this same path, so
    # α, σ and λ agree bit for bit however they are asked for)
    return v.device.type == "cpu" and v.dtype == torch.float64 and not v.requires_grad


def _np(v: np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(v, dtype=np.float64))


class _VP(GaussianProcess):
    def log_sigma(self, t: float | Tensor) -> Tensor:
        la = self.log_alpha(t)
        if _host(la):
            return _np(0.5 * _log1mexp_np(2.0 * la.numpy()))
        return 0.5 * log1mexp(2.0 * la)

    def alpha(self, t: float | Tensor) -> Tensor:
        la = self.log_alpha(t)
        return _np(np.exp(la.numpy())) if _host(la) else torch.exp(la)

    def sigma(self, t: float | Tensor) -> Tensor:
        ls = self.log_sigma(t)
        return _np(np.exp(ls.numpy())) if _host(ls) else torch.exp(ls)

    def lambda_(self, t: float | Tensor) -> Tensor:
        la = self.log_alpha(t)  # once: a table lookup on discrete processes
        if _host(la):
            a = la.numpy()
            return _np(a - 0.5 * _log1mexp_np(2.0 * a))
        return la - 0.5 * log1mexp(2.0 * la)

    def coefficients(self, t: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        la = self.log_alpha(t)
        if _host(la):
            a = la.numpy()
            s = 0.5 * _log1mexp_np(2.0 * a)
            return _np(np.exp(a)), _np(np.exp(s)), _np(a - s)
        ls = 0.5 * log1mexp(2.0 * la)
        return torch.exp(la), torch.exp(ls), la - ls

    def d_log_alpha(self, t: float | Tensor) -> Tensor:
        raise NotImplementedError

    def drift_coef(self, t: float | Tensor) -> Tensor:
        return self.d_log_alpha(t)

    def diffusion_sq(self, t: float | Tensor) -> Tensor:
        # σ² = 1 − α² ⇒ g² = dσ²/dt − 2f·σ² = −2f(α² + σ²) = −2f (the base class's general form)
        return -2.0 * self.d_log_alpha(t)

    def d_alpha(self, t: float | Tensor) -> Tensor:
        return self.alpha(t) * self.d_log_alpha(t)

    def d_sigma(self, t: float | Tensor) -> Tensor:
        # σ = sqrt(1 − α²) ⇒ σ' = −α·α'/σ
        a = self.alpha(t)
        return -a * self.d_alpha(t) / self.sigma(t)

    def prior_std(self) -> float:
        # x_T ~ N(0, α_T²·Var x_0 + σ_T²) = N(0, I) for unit-variance data: the standard prior
        return 1.0


class VPDiscrete(_VP):
    """Discrete-time VP (DDPM / Stable Diffusion) from a table of ᾱ_n, n = 0 … N−1.

    Continuous in t by the DPM-Solver convention (Lu et al. 2022, App. D): grid index n sits at
    t_n = (n+1)/N and log α_t is piecewise linear in t between grid points, so t_min = 1/N and
    t_max = 1. The network receives the fractional index N·t − 1 (0 … N−1).

    Args:
        alphas_cumprod: ᾱ table, shape (N,), decreasing.
    """

    def __init__(self, alphas_cumprod: Tensor | np.ndarray | list[float]):
        ac = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D table with at least 2 entries")
        if not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1)")
        self.alphas_cumprod = ac
        self.num_train_steps = n = ac.numel()
        self._t = torch.arange(1, n + 1, dtype=torch.float64) / n
        self._log_alpha = 0.5 * torch.log(ac)
        self._neg_log_alpha = -self._log_alpha  # increasing: t_of_lambda's table
        self.t_min = 1.0 / n
        self.t_max = 1.0

    @classmethod
    def from_betas(
        cls,
        kind: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        steps: int = 1000,
    ) -> VPDiscrete:
        """Build from a named β schedule, as diffusers' ``beta_schedule`` does.

        ``linear`` (DDPM: 1e-4 … 0.02), ``scaled_linear`` (Stable Diffusion: linear in √β,
        0.00085 … 0.012) or ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021 cosine, β ≤ 0.999).
        """
        if kind == "linear":
            betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":

            def abar(u: np.ndarray) -> np.ndarray:
                return np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

            i = np.arange(steps, dtype=np.float64)
            betas = np.minimum(1 - abar((i + 1) / steps) / abar(i / steps), 0.999)
        else:
            raise ValueError(
                f"unknown beta schedule {kind!r}; valid: 'linear', 'scaled_linear', "
                "'squaredcos_cap_v2'"
            )
        return cls(np.cumprod(1.0 - betas))

    def log_alpha(self, t: float | Tensor) -> Tensor:
        return _interp(as_time(t), self._t, self._log_alpha)

    def d_log_alpha(self, t: float | Tensor) -> Tensor:
        # the slope of the segment holding t (a grid point: the one below it); numpy, as in
        # _interp: the plan's SDE rows look this up on a few dozen host times
        tn, tp, la = as_time(t).detach().numpy(), self._t.numpy(), self._log_alpha.numpy()
        j = np.searchsorted(tp, np.minimum(np.maximum(tn, tp[0]), tp[-1]))
        j = np.minimum(np.maximum(j, 1), len(tp) - 1)
        return torch.from_numpy(np.asarray((la[j] - la[j - 1]) / (tp[j] - tp[j - 1])))

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        lam = as_time(lam)
        if _host(lam):  # a schedule's host λ's: −log α = softplus(−2λ)/2, the scalings in numpy
            # (exact: the same numbers as −(−0.5·softplus(−2.0·λ)) below, one torch kernel)
            sp = torch.nn.functional.softplus(_np(-2.0 * lam.numpy()))
            return _interp(_np(0.5 * sp.numpy()), self._neg_log_alpha, self._t)
        log_a = _log_alpha_of_lambda(lam)
        # log α decreases in t: interpolate on the flipped table
        return _interp(-log_a, self._neg_log_alpha, self._t)

    def t_of_rho(self, rho: float | Tensor) -> Tensor:
        rho = as_time(rho)
        if _host(rho):  # t_of_lambda(−log ρ)'s numbers: −2·(−log ρ) = 2·log ρ exactly, one kernel
            sp = torch.nn.functional.softplus(_np(2.0 * torch.log(rho).numpy()))
            return _interp(_np(0.5 * sp.numpy()), self._neg_log_alpha, self._t)
        return super().t_of_rho(rho)

    def model_time(self, t: float | Tensor) -> Tensor:
        t = as_time(t)
        if _host(t):  # a plan's evaluation times: numpy, the same float64 arithmetic
            return _np(t.numpy() * self.num_train_steps - 1.0)
        return t * self.num_train_steps - 1.0

    def time_of_index(self, index: Tensor | np.ndarray | list[int]) -> Tensor:
        """Process time of discrete timestep indices (diffusers' ``timesteps``)."""
        return (as_time(np.asarray(index, dtype=np.float64)) + 1.0) / self.num_train_steps

    def _repr_fields(self) -> dict[str, object]:
        return {"num_train_steps": self.num_train_steps}


class VPLinear(_VP):
    """Continuous VP with linear β(t) = β₀ + t(β₁ − β₀) (Song et al. 2021, Score SDE).

    log α_t = −(β₁ − β₀)t²/4 − β₀t/2; the inverse of λ is closed-form (DPM-Solver, App. D).
    """

    def __init__(
        self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0
    ):
        if not 0 < beta_min < beta_max:
            raise ValueError("need 0 < beta_min < beta_max")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def log_alpha(self, t: float | Tensor) -> Tensor:
        t = as_time(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def d_log_alpha(self, t: float | Tensor) -> Tensor:
        t = as_time(t)
        return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        lam = as_time(lam)
        b0, db = self.beta_min, self.beta_max - self.beta_min
        tmp = 2.0 * db * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        return tmp / (torch.sqrt(b0**2 + tmp) + b0) / db

    def _repr_fields(self) -> dict[str, object]:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, **super()._repr_fields()}


class VPCosine(_VP):
    """Continuous cosine VP (Nichol & Dhariwal 2021): α_t = cos(π/2·(t+s)/(1+s)) / cos(π/2·s/(1+s)).

    t_max defaults to 0.9946 (DPM-Solver's choice, where λ ≈ −5.1) because α → 0 at t = 1.
    """

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        self.s = float(s)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._log_a0 = math.log(math.cos(math.pi / 2 * self.s / (1 + self.s)))

    def log_alpha(self, t: float | Tensor) -> Tensor:
        t = as_time(t)
        return torch.log(torch.cos(math.pi / 2 * (t + self.s) / (1 + self.s))) - self._log_a0

    def d_log_alpha(self, t: float | Tensor) -> Tensor:
        t = as_time(t)
        k = math.pi / 2 / (1 + self.s)
        return -k * torch.tan(k * (t + self.s))

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        log_a = _log_alpha_of_lambda(as_time(lam))
        return 2 * (1 + self.s) / math.pi * torch.arccos(torch.exp(log_a + self._log_a0)) - self.s

    def _repr_fields(self) -> dict[str, object]:
        return {"s": self.s, **super()._repr_fields()}
