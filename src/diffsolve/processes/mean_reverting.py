"""Mean-reverting SDE (IR-SDE, Luo et al. 2023): a Gaussian path in y = x − μ.

The forward SDE dx = θ_t·(μ − x) dt + g_t dw with g_t² = 2λ²·θ_t (stationary std λ) pulls x
from the clean image x_0 toward the degraded image μ. With θ̄_t = ∫_0^t θ_s ds its marginal is

    x_t − μ = α_t·(x_0 − μ) + σ_t·ε,   α_t = e^{−θ̄_t},   σ_t = λ·sqrt(1 − e^{−2θ̄_t}),

(Luo et al. 2023): the Gaussian path of the library in y = x − μ. So every solver runs on
it unchanged, in y::

    proc = MeanReverting(lam=50 / 255)                 # IR-SDE: cosine θ, T = 100, eps = 0.005
    model = ds.Denoiser(net, proc, prediction="eps")   # net(x, t_index, mu=...) as IR-SDE's
    x_T = proc.prior(lq.shape, generator=g, mu=lq)     # μ + λ·z, μ = the degraded image lq
    x0 = ds.sample(model, x_T, "mrs", nfe=10, cond={"mu": lq})

The convention that makes that work:

* μ is conditioning: ``ds.sample(model, x_T, cond={"mu": mu})`` with μ shaped like x_T (the key
  is ``cond_key``). ``x_T = process.prior(shape, mu=mu)`` is IR-SDE's start μ + λ·z.
* ``sample`` passes the solver y = x − μ and adds μ back at the end (callbacks see y, and the
  x̂_0 that solvers and Denoiser wrappers such as thresholding see is x̂_0 − μ).
* The Denoiser hands the network x = y + μ (and μ itself in ``cond``) and maps its output to the
  path in y (:meth:`MeanReverting.to_path`): ``eps``, ``score`` and ``velocity`` (dx/dt = dy/dt)
  are the same in x and y; ``x0`` becomes x̂_0 − μ; ``v`` is the MRS velocity
  v = λ·α_t·ε − (σ_t/λ)·(x_0 − μ) (Li et al. 2025; λ·v of the unit-variance path y/λ, equal to
  the usual α·ε − σ·x_0 when λ = 1).
* Wrappers need nothing special: with CFG put μ in ``uncond`` too (``uncond={"labels": null,
  "mu": mu}``); the doubled call then shifts each half by its own μ.

Time: t = n/T for IR-SDE's discrete index n = 0 … T (the network receives n = T·t, fractional
between grid points), so t_max = 1 and t_min = 1/T (the first trained index; IR-SDE never uses
n = 0). θ is IR-SDE's table θ_n (``constant``, ``linear``, ``cosine``, exactly as the official
code builds them), θ̄_n = dt·Σ_{j=1}^{n} θ_j with dt chosen so that e^{−θ̄_T} = ``eps``, and θ̄
is piecewise linear in t between grid points (θ piecewise constant), as VPDiscrete does with
log α.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import GaussianProcess, _interp, as_time, log1mexp
from .vp import _log_alpha_of_lambda

__all__ = ["THETA_SCHEDULES", "MeanReverting", "theta_table"]

THETA_SCHEDULES = ("cosine", "linear", "constant")


def theta_table(kind: str, steps: int = 100) -> np.ndarray:
    """IR-SDE's θ_n, n = 0 … ``steps`` (float64), as ``IRSDE._initialize`` builds them.

    ``constant``: θ_n = 1; ``linear``: linspace(0.1, 20)/(steps + 1) scaled as DDPM's β;
    ``cosine``: θ_n = 1 − ᾱ_{n+1}/ᾱ_0 of the Nichol–Dhariwal cosine over steps + 2 points.
    """
    n = steps + 1
    if kind == "constant":
        return np.ones(n, dtype=np.float64)
    if kind == "linear":
        scale = 1000.0 / n
        return np.linspace(scale * 1e-4, scale * 0.02, n, dtype=np.float64)
    if kind == "cosine":
        m = steps + 2
        u = np.linspace(0.0, m, m + 1, dtype=np.float64) / m
        abar = np.cos((u + 0.008) / 1.008 * math.pi * 0.5) ** 2
        return 1.0 - (abar / abar[0])[1:-1]
    raise ValueError(f"unknown theta schedule {kind!r}; valid: {', '.join(THETA_SCHEDULES)}")


class MeanReverting(GaussianProcess):
    """IR-SDE's mean-reverting process as a Gaussian path in x − μ (see the module docstring).

    Args:
        lam: stationary standard deviation λ (IR-SDE's ``max_sigma``; 50/255 for images in
            [0, 1] in the official configurations).
        theta: ``cosine`` (default), ``linear`` or ``constant``, or a table θ_0 … θ_T.
        steps: T, the number of discrete training steps (100 in IR-SDE).
        eps: e^{−θ̄_T}, the signal left at t_max (0.005 in the official configurations).
        cond_key: the ``cond`` key holding μ.
        t_min: smallest evaluated time (default 1/T, the first trained index).
    """

    def __init__(
        self,
        lam: float = 50 / 255,
        theta: str | np.ndarray | Tensor = "cosine",
        steps: int = 100,
        eps: float = 0.005,
        cond_key: str = "mu",
        t_min: float | None = None,
    ):
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam!r}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
        if isinstance(theta, str):
            self.schedule = theta
            table = theta_table(theta, steps)
        else:
            self.schedule = "table"
            table = np.asarray(theta, dtype=np.float64)
            steps = table.size - 1
        if table.ndim != 1 or steps < 1 or not bool((table[1:] > 0).all()):
            raise ValueError("theta must be a 1-D table θ_0 … θ_T (T ≥ 1) with θ_n > 0 for n ≥ 1")
        self.lam, self.eps, self.steps = float(lam), float(eps), int(steps)
        self.cond_key = cond_key
        # official: thetas_cumsum = cumsum(θ) − θ_0 and dt = −log(eps)/thetas_cumsum[T]
        cum = np.cumsum(table) - table[0]
        self.dt = -math.log(self.eps) / cum[-1]
        self._tbar = torch.from_numpy(cum * self.dt)  # θ̄ at t_n = n/T, θ̄_0 = 0
        self._t = torch.arange(self.steps + 1, dtype=torch.float64) / self.steps
        self.t_min = 1.0 / self.steps if t_min is None else float(t_min)
        self.t_max = 1.0
        if not 0 < self.t_min < self.t_max:
            raise ValueError(f"t_min must lie in (0, 1), got {self.t_min!r}")

    # -- the path ------------------------------------------------------------------------------
    def theta_bar(self, t: float | Tensor) -> Tensor:
        """θ̄_t = ∫_0^t θ (float64); α_t = e^{−θ̄_t}."""
        return _interp(as_time(t), self._t, self._tbar)

    def theta(self, t: float | Tensor) -> Tensor:
        """θ_t = dθ̄/dt, the mean-reversion rate (piecewise constant; right-continuous)."""
        t = as_time(t)
        idx = torch.searchsorted(self._t, t.clamp(self._t[0], self._t[-1])).clamp(1, self.steps)
        return (self._tbar[idx] - self._tbar[idx - 1]) / (self._t[idx] - self._t[idx - 1])

    def log_alpha(self, t: float | Tensor) -> Tensor:
        return -self.theta_bar(t)

    def log_sigma(self, t: float | Tensor) -> Tensor:
        return math.log(self.lam) + 0.5 * log1mexp(-2.0 * self.theta_bar(t))

    def d_alpha(self, t: float | Tensor) -> Tensor:
        return -self.theta(t) * self.alpha(t)

    def d_sigma(self, t: float | Tensor) -> Tensor:
        # σ² = λ²(1 − α²) ⇒ σ' = −λ²·α·α'/σ = λ²·θ·α²/σ
        a = self.alpha(t)
        return self.lam**2 * self.theta(t) * a * a / self.sigma(t)

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        # α²/(1 − α²) = λ_∞²·e^{2λ}: the VP relation in λ + log λ_∞, then θ̄ → t on the table
        tbar = -_log_alpha_of_lambda(as_time(lam) + math.log(self.lam))
        return _interp(tbar, self._tbar, self._t)

    def model_time(self, t: float | Tensor) -> Tensor:
        return as_time(t) * self.steps

    def prior_std(self) -> float:
        # IR-SDE starts from μ + λ·z (its stationary law), ignoring the e^{−θ̄_T} residual signal
        return self.lam

    def prior(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        mu: Tensor | None = None,
    ) -> Tensor:
        """IR-SDE's start x_T = μ + λ·z (z ~ N(0, I), shape ``shape``); λ·z if ``mu`` is None."""
        y = super().prior(shape, generator=generator, device=device, dtype=dtype)
        return y if mu is None else y + mu.to(device=y.device, dtype=y.dtype)

    # -- the x − μ convention --------------------------------------------------------------------
    def offset(self, cond: Mapping[str, Any]) -> Tensor:
        """μ from the sampling conditioning (``cond[cond_key]``)."""
        if self.cond_key not in cond:
            raise ValueError(
                f"MeanReverting needs μ (the degraded image, shaped like x): pass "
                f"cond={{{self.cond_key!r}: mu}} to sample"
            )
        return torch.as_tensor(cond[self.cond_key])

    def to_path(
        self, out: Tensor, y: Tensor, mu: Tensor, alpha: float, sigma: float, prediction: str
    ) -> Tensor:
        """A network output made for x (network input y + μ) → the same prediction on the path
        in y, as the Denoiser's conversions read it: x̂_0 − μ for ``x0``; for ``v``,
        v_std = α·ε − σ·y_0 = ((α² + σ²)/λ)·v + α·σ·(1/λ² − 1)·y; others unchanged."""
        if prediction == "x0":
            return out - mu.to(out)
        if prediction == "v":
            lam = self.lam
            return ((alpha**2 + sigma**2) / lam) * out + (alpha * sigma * (1 / lam**2 - 1)) * y
        return out

    def from_path(
        self, out: Tensor, y: Tensor, mu: Tensor, alpha: float, sigma: float, prediction: str
    ) -> Tensor:
        """The inverse of :meth:`to_path` (what an exact network for x outputs)."""
        if prediction == "x0":
            return out + mu.to(out)
        if prediction == "v":
            lam = self.lam
            std = out - (alpha * sigma * (1 / lam**2 - 1)) * y
            return (lam / (alpha**2 + sigma**2)) * std
        return out

    def _repr_fields(self) -> dict[str, object]:
        return {
            "lam": self.lam,
            "theta": self.schedule,
            "steps": self.steps,
            "eps": self.eps,
            "cond_key": self.cond_key,
        }
