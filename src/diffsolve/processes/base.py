"""The Gaussian path every process shares: x_t = α_t·x_0 + σ_t·ε.

All process maths runs in float64 on the host (numbers that depend only on the time grid);
sample tensors never pass through here. Time ``t`` increases toward noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["GaussianProcess", "as_time"]

_F64 = torch.float64


def as_time(t: float | Tensor | np.ndarray) -> Tensor:
    """A time (or times: a tensor or numpy array) as a float64 CPU tensor."""
    return torch.as_tensor(t, dtype=_F64, device="cpu")


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (xp increasing), extrapolating the end segments."""
    if not (x.requires_grad or fp.requires_grad) and x.device.type == xp.device.type == "cpu":
        # a plan evaluates tables on a few dozen host times: numpy costs ~1 µs an operation
        # where a torch kernel launch costs ~5, and the plan's set-up is mostly these lookups
        xn, xpn, fpn = x.numpy(), xp.numpy(), fp.numpy()
        if xpn[0] <= xn.min() and xn.max() <= xpn[-1]:  # inside the table: numpy's own loop
            return torch.from_numpy(np.asarray(np.interp(xn, xpn, fpn), dtype=fpn.dtype))
        j = np.searchsorted(xpn, np.minimum(np.maximum(xn, xpn[0]), xpn[-1]))
        j = np.minimum(np.maximum(j, 1), len(xpn) - 1)
        x0, y0 = xpn[j - 1], fpn[j - 1]
        y = y0 + (fpn[j] - y0) * (xn - x0) / (xpn[j] - x0)
        return torch.from_numpy(np.asarray(y, dtype=fpn.dtype))
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1])).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class GaussianProcess:
    """A forward process with Gaussian marginals x_t = α_t·x_0 + σ_t·ε.

    Subclasses define ``log_alpha`` and ``log_sigma`` (float64) and, where they can, their time
    derivatives and an analytic ``t_of_lambda``. Everything else is derived here:
    λ_t = log α_t − log σ_t (the half-log-SNR, decreasing in t) and the EDM-style noise level
    ρ_t = σ_t/α_t = e^{−λ_t}.

    Attributes:
        t_min: smallest time the network may be evaluated at (σ > 0 there).
        t_max: the noise end, where sampling starts.
    """

    t_min: float
    t_max: float

    # -- to be provided by subclasses -------------------------------------------------------
    def log_alpha(self, t: float | Tensor) -> Tensor:
        raise NotImplementedError

    def log_sigma(self, t: float | Tensor) -> Tensor:
        raise NotImplementedError

    # -- derived quantities ------------------------------------------------------------------
    def alpha(self, t: float | Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: float | Tensor) -> Tensor:
        return torch.exp(self.log_sigma(t))

    def lambda_(self, t: float | Tensor) -> Tensor:
        """Half-log-SNR λ_t = log α_t − log σ_t (float64)."""
        return self.log_alpha(t) - self.log_sigma(t)

    def coefficients(self, t: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(α_t, σ_t, λ_t): what a plan needs of every grid and evaluation time. A process whose
        coefficients share one costly evaluation (a table lookup) computes it once here."""
        return self.alpha(t), self.sigma(t), self.lambda_(t)  # processes override the shortcut

    def rho(self, t: float | Tensor) -> Tensor:
        """EDM / k-diffusion noise level σ_t/α_t = e^{−λ_t}."""
        return torch.exp(-self.lambda_(t))

    def rho_range(self) -> tuple[float, float]:
        """(ρ at t_min, ρ at t_max_finite): the noise levels every schedule spans, kept for
        the process's current time range (schedules ask for them on every plan)."""
        key = (self.t_min, self.t_max_finite)
        kept = self.__dict__.get("_rho_range")
        if kept is None or kept[0] != key:
            kept = (key, (float(self.rho(key[0])), float(self.rho(key[1]))))
            self.__dict__["_rho_range"] = kept
        return kept[1]

    def d_alpha(self, t: float | Tensor) -> Tensor:
        """dα/dt; by autograd unless a subclass gives it in closed form."""
        return self._autograd(self.alpha, t)

    def d_sigma(self, t: float | Tensor) -> Tensor:
        """dσ/dt; by autograd unless a subclass gives it in closed form."""
        return self._autograd(self.sigma, t)

    def drift_coef(self, t: float | Tensor) -> Tensor:
        """f_t = dlog α/dt, the linear drift of the forward SDE dx = f_t·x dt + g_t dw."""
        return self.d_alpha(t) / self.alpha(t)

    def diffusion_sq(self, t: float | Tensor) -> Tensor:
        """g_t² of the forward SDE with these marginals: dσ²/dt − 2 f_t σ_t² = −2σ_t²·dλ/dt.

        The reverse-time SDEs sharing the marginals are
        dx = [f_t x − ½(g_t² + γ_t²)·∇log p_t] dt + γ_t dw̄ for any γ_t ≥ 0 (γ = 0: the
        probability-flow ODE; γ = g: the reverse SDE of Song et al. 2021, eq. 6).
        """
        s = self.sigma(t)
        return 2.0 * s * self.d_sigma(t) - 2.0 * self.drift_coef(t) * s * s

    def offset(self, cond: Mapping[str, Any]) -> Tensor | None:
        """The centre μ of a path in y = x − μ, read from the sampling conditioning; None (the
        default) for paths centred at 0. Mean-reverting processes return their μ, and the loop
        and the Denoiser then run every solver on y unchanged."""
        return None

    def to_path(
        self, out: Tensor, y: Tensor, mu: Tensor, alpha: float, sigma: float, prediction: str
    ) -> Tensor:
        """A network output made for x = y + μ → the same prediction on the path in y (the
        identity for paths centred at 0; see :meth:`offset`)."""
        return out

    def gamma_sq(self, t: float | Tensor) -> Tensor:
        """γ_t², the default reverse-time diffusion of this process's SDE samplers (g_t² here).

        Stochastic interpolants override it with their user diffusion coefficient 2ε(t).
        """
        return self.diffusion_sq(t)

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        """Inverse of λ_t by float64 bisection (subclasses override with closed forms)."""
        lam = as_time(lam)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(200):  # interval shrinks to float64 resolution well before 200 halvings
            mid = 0.5 * (lo + hi)
            above = self.lambda_(mid) > lam  # λ decreasing: λ(mid) > target ⇒ t is larger
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def t_of_rho(self, rho: float | Tensor) -> Tensor:
        """Inverse of ρ_t = σ_t/α_t."""
        return self.t_of_lambda(-torch.log(as_time(rho)))

    def model_time(self, t: float | Tensor) -> Tensor:
        """What the network receives as its time input (default: t itself)."""
        return as_time(t)

    def shift_time(self, t: Tensor) -> Tensor:
        """Warp applied to uniform-in-t grids (identity; flow matching uses the SD3 shift)."""
        return t

    @property
    def t_max_finite(self) -> float:
        """Largest time with a finite λ (t_max unless α vanishes there, as in flow matching)."""
        return self.t_max

    def prior_std(self) -> float:
        """Standard deviation of the prior x_{t_max} ~ N(0, std²·I)."""
        return float(self.sigma(self.t_max))

    def prior(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw x at t_max, in the process's own scale (shape ``shape``)."""
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return noise * self.prior_std()

    def check_times(self, t: Tensor, what: str = "times") -> None:
        """Raise ValueError unless ``t`` is strictly decreasing and inside [t_min, t_max]."""
        t = as_time(t)
        if t.ndim != 1 or t.numel() == 0:
            raise ValueError(f"{what} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
        tn = t.detach().numpy()  # host checks in numpy: a few µs less per plan than torch's
        if not np.isfinite(tn).all():
            raise ValueError(f"{what} contains NaN or Inf: {t.tolist()}")
        if tn.size > 1 and not (tn[1:] < tn[:-1]).all():
            raise ValueError(f"{what} must be strictly decreasing (noise → data), got {t.tolist()}")
        tol = 1e-9 * max(1.0, abs(self.t_max))
        lo, hi = float(tn[-1]), float(tn[0])  # strictly decreasing: its ends
        if lo < self.t_min - tol or hi > self.t_max + tol:
            raise ValueError(
                f"{what} must lie in [t_min, t_max] = [{self.t_min}, {self.t_max}] of "
                f"{type(self).__name__}, got values in [{lo}, {hi}]"
            )

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({fields})"

    def _repr_fields(self) -> dict[str, object]:
        return {"t_min": self.t_min, "t_max": self.t_max}

    @staticmethod
    def _autograd(fn: Callable[[Tensor], Tensor], t: float | Tensor) -> Tensor:
        t = as_time(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = fn(t)
            (g,) = torch.autograd.grad(y.sum(), t)
        return g.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^{x}) for x < 0, stable at both ends."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
