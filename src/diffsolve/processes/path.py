"""General Gaussian paths from user functions, and the named flow-matching paths.

``GaussianPath`` takes α_t and σ_t as functions of a float64 time tensor (noise at larger t, as
everywhere in diffsolve); derivatives come by autograd unless given, and λ_t is inverted by the
base class's bisection unless an inverse is given. ``FlowPath`` provides the schedulers of the
flow-matching literature in closed form, re-timed to this library's convention (data at t = 0;
the papers put data at t = 1, i.e. their t is our 1 − t):

==================  ==================================  ============================================
name                α_t, σ_t                            source
==================  ==================================  ============================================
``linear``          1 − t, t                            rectified flow (Liu et al. 2023); cond-OT
                                                        with σ_min = 0 (Lipman et al. 2023)
``cond-ot``         1 − t, σ_min + (1 − σ_min)·t        Lipman et al. 2023, eq. 20; the
(``kinetic-optimal``)                                   kinetic-optimal Gaussian path in high
                                                        dimension (Shaul et al. 2023)
``cosine``          cos(πt/2), sin(πt/2)                one-sided trig interpolant (Albergo et al.
                                                        2023); flow_matching's CosineScheduler
``polynomial``      (1 − t)ⁿ, 1 − (1 − t)ⁿ              flow_matching's PolynomialConvexScheduler
                                                        (α = tⁿ with data at t = 1)
==================  ==================================  ============================================

Where α vanishes at t_max (λ = −∞), grids uniform in λ or σ/α start at ``t_max_finite``: the
time where λ = −λ(t_min), which for the linear and cosine paths is 1 − t_min (FlowMatching's
convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TypedDict

import torch
from torch import Tensor

from .base import GaussianProcess, as_time

__all__ = ["FLOW_PATHS", "FlowPath", "GaussianPath"]

TimeFn = Callable[[Tensor], Tensor]

# α_t/σ_t below this ratio at t_max counts as α = 0 there (cos(π/2) rounds to 6e-17, not 0)
_ZERO_SNR = 1e-12


def _call(fn: TimeFn, t: Tensor) -> Tensor:
    out = fn(t)
    if not isinstance(out, Tensor):
        out = torch.as_tensor(out, dtype=torch.float64)
    return torch.broadcast_to(out.to(torch.float64), t.shape)


class GaussianPath(GaussianProcess):
    """The Gaussian path x_t = α(t)·x_0 + σ(t)·ε for user-given α(t) and σ(t).

    Args:
        alpha, sigma: functions of a float64 tensor t (any shape) returning tensors of the same
            shape. Write them with torch operations so derivatives can be taken by autograd,
            or pass ``d_alpha`` / ``d_sigma``.
        d_alpha, d_sigma: optional closed-form derivatives dα/dt and dσ/dt.
        t_of_lambda: optional closed-form inverse of λ_t = log(α_t/σ_t) (default: bisection).
        t_min, t_max: the data-side end (σ > 0 there) and the noise end (α may vanish there).
        t_max_finite: where λ-uniform grids start if α(t_max) = 0 (default: where
            λ = −λ(t_min)).
        name: a label for ``repr``.

    At construction λ is checked to be strictly decreasing on 2049 points of [t_min, t_max]
    (α > 0 except possibly at t_max, σ > 0), and the derivatives to be computable; a ValueError
    says what failed.
    """

    def __init__(
        self,
        alpha: TimeFn,
        sigma: TimeFn,
        d_alpha: TimeFn | None = None,
        d_sigma: TimeFn | None = None,
        *,
        t_of_lambda: TimeFn | None = None,
        t_min: float = 1e-3,
        t_max: float = 1.0,
        t_max_finite: float | None = None,
        name: str = "custom",
    ):
        if not (math.isfinite(t_min) and math.isfinite(t_max) and t_min < t_max):
            raise ValueError(f"need finite t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self._alpha_fn, self._sigma_fn = alpha, sigma
        self._d_alpha_fn, self._d_sigma_fn = d_alpha, d_sigma
        self._t_of_lambda_fn = t_of_lambda
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.name = name
        self._validate()
        self._t_max_finite = self._find_t_max_finite(t_max_finite)

    # -- the path ----------------------------------------------------------------------------
    def alpha(self, t: float | Tensor) -> Tensor:
        return _call(self._alpha_fn, as_time(t))

    def sigma(self, t: float | Tensor) -> Tensor:
        return _call(self._sigma_fn, as_time(t))

    def log_alpha(self, t: float | Tensor) -> Tensor:
        return torch.log(self.alpha(t))

    def log_sigma(self, t: float | Tensor) -> Tensor:
        return torch.log(self.sigma(t))

    def d_alpha(self, t: float | Tensor) -> Tensor:
        if self._d_alpha_fn is not None:
            return _call(self._d_alpha_fn, as_time(t))
        return self._autograd(self.alpha, t)

    def d_sigma(self, t: float | Tensor) -> Tensor:
        if self._d_sigma_fn is not None:
            return _call(self._d_sigma_fn, as_time(t))
        return self._autograd(self.sigma, t)

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        if self._t_of_lambda_fn is not None:
            return _call(self._t_of_lambda_fn, as_time(lam))
        return super().t_of_lambda(lam)

    @property
    def t_max_finite(self) -> float:
        return self._t_max_finite

    def prior_std(self) -> float:
        # x_{t_max} = α·x_0 + σ·ε has this std for unit-variance data
        a, s = float(self.alpha(self.t_max)), float(self.sigma(self.t_max))
        return math.hypot(a, s)

    # -- checks ------------------------------------------------------------------------------
    def _validate(self) -> None:
        what = f"{type(self).__name__}({self.name})"
        t = torch.linspace(self.t_min, self.t_max, 2049, dtype=torch.float64)
        try:
            a, s = self.alpha(t), self.sigma(t)
        except Exception as exc:  # the user's functions: report what they did
            raise ValueError(
                f"{what}: alpha(t)/sigma(t) failed on a float64 tensor: {exc}"
            ) from exc
        if not (torch.isfinite(a).all() and torch.isfinite(s).all()):
            raise ValueError(f"{what}: alpha or sigma is not finite on [t_min, t_max]")
        if not bool((a[:-1] > 0).all()) or float(a[-1]) < 0:
            raise ValueError(f"{what}: alpha must be > 0 on [t_min, t_max) (and ≥ 0 at t_max)")
        if not bool((s > 0).all()):
            raise ValueError(f"{what}: sigma must be > 0 on [t_min, t_max]")
        lam = torch.log(a) - torch.log(s)
        bad = ~(lam[1:] < lam[:-1])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"{what}: λ = log(α/σ) must be strictly decreasing in t, but λ({float(t[i]):.6g})"
                f" = {float(lam[i]):.6g} ≤ λ({float(t[i + 1]):.6g}) = {float(lam[i + 1]):.6g}"
            )
        probe = t[1:-1:256]
        for nm, fn in (("d_alpha", self.d_alpha), ("d_sigma", self.d_sigma)):
            try:
                d = fn(probe)
            except Exception as exc:
                raise ValueError(
                    f"{what}: {nm} by autograd failed ({exc}); write alpha/sigma with torch "
                    f"operations or pass {nm}="
                ) from exc
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"{what}: {nm} is not finite inside (t_min, t_max)")

    def _find_t_max_finite(self, given: float | None) -> float:
        if given is not None:
            if not self.t_min < given <= self.t_max:
                raise ValueError(f"t_max_finite must lie in (t_min, t_max], got {given}")
            if float(self.alpha(given)) <= _ZERO_SNR * float(self.sigma(given)):
                raise ValueError(f"α vanishes at t_max_finite = {given}")
            return float(given)
        if float(self.alpha(self.t_max)) > _ZERO_SNR * float(self.sigma(self.t_max)):
            return self.t_max
        lam_min = float(self.lambda_(self.t_min))
        if lam_min <= 0:
            raise ValueError(
                f"α vanishes at t_max and λ(t_min) = {lam_min:.4g} ≤ 0: give t_max_finite="
            )
        return float(self.t_of_lambda(-lam_min))

    def _repr_fields(self) -> dict[str, object]:
        return {"name": self.name, **super()._repr_fields()}


# -- named flow-matching paths ----------------------------------------------------------------
class _ClosedForms(TypedDict):
    """A named path's closed forms: GaussianPath's keyword arguments."""

    alpha: TimeFn
    sigma: TimeFn
    d_alpha: TimeFn
    d_sigma: TimeFn
    t_of_lambda: TimeFn


def _cond_ot(sigma_min: float) -> _ClosedForms:
    s0 = sigma_min

    def t_of_lambda(lam: Tensor) -> Tensor:
        # σ/α = e^{−λ} solved for t, multiplied through by q = e^{λ} so that λ = −∞ gives t = 1
        q = torch.exp(lam)
        return (1.0 - s0 * q) / (1.0 + (1.0 - s0) * q)

    return {
        "alpha": lambda t: 1.0 - t,
        "sigma": lambda t: s0 + (1.0 - s0) * t,
        "d_alpha": lambda t: -torch.ones_like(t),
        "d_sigma": lambda t: torch.full_like(t, 1.0 - s0),
        "t_of_lambda": t_of_lambda if s0 > 0 else lambda lam: torch.sigmoid(-lam),
    }


def _cosine() -> _ClosedForms:
    k = math.pi / 2
    # sin(k·(1 − t)) is exactly 0 at t = 1 and accurate near it (cos(k·t) rounds to 6e-17)
    return {
        "alpha": lambda t: torch.sin(k * (1.0 - t)),
        "sigma": lambda t: torch.sin(k * t),
        "d_alpha": lambda t: -k * torch.sin(k * t),
        "d_sigma": lambda t: k * torch.sin(k * (1.0 - t)),
        "t_of_lambda": lambda lam: torch.atan(torch.exp(-lam)) / k,
    }


def _polynomial(n: float) -> _ClosedForms:
    return {
        "alpha": lambda t: (1.0 - t) ** n,
        "sigma": lambda t: -torch.expm1(n * torch.log1p(-t)),
        "d_alpha": lambda t: -n * (1.0 - t) ** (n - 1.0),
        "d_sigma": lambda t: n * (1.0 - t) ** (n - 1.0),
        # α = sigmoid(λ) on a convex path (α + σ = 1) ⇒ t = 1 − sigmoid(λ)^{1/n}
        "t_of_lambda": lambda lam: -torch.expm1(torch.nn.functional.logsigmoid(lam) / n),
    }


FLOW_PATHS = ("linear", "cond-ot", "kinetic-optimal", "cosine", "polynomial")


class FlowPath(GaussianPath):
    """A named flow-matching path in closed form (table in the module docstring).

    Args:
        name: ``linear``, ``cond-ot`` (alias ``kinetic-optimal``), ``cosine`` or ``polynomial``.
        n: exponent of ``polynomial`` (n = 1 is ``linear``).
        sigma_min: σ at the data end of ``cond-ot`` (Lipman et al. use small values, e.g. 1e-4;
            0 is ``linear``). With σ_min > 0, λ is finite at t = 0 and ``t_min`` defaults to 0.
        t_min: data-side end (default 1e-3, or 0 for cond-OT with σ_min > 0).
        t_max: noise end (default 1, where α = 0 and sampling starts at ``t_max_finite``).

    The network receives t (pass ``time_map`` to the Denoiser for models trained with data at
    t = 1: ``time_map=lambda t: 1 - t``). As with FlowMatching, α = 0 at t = 1, so only a
    velocity model can be evaluated there (uniform-in-t grids); for ``polynomial`` with n ≠ 1
    the velocity itself vanishes (n > 1) or diverges (n < 1) at t = 1, so start at
    ``t_max_finite`` (the logsnr and karras schedules do) or set ``t_max < 1``.

    Kinetic optimality (Shaul et al. 2023, "On kinetic optimal probability paths for generative
    models", ICML): among Gaussian paths the kinetic energy depends on the data only through a
    1-D data-separation function of the SNR, which tends to 1 when n/√d → 0; the optimal path is
    then cond-OT. The data-dependent kinetic-optimal paths (estimated separation function) are not
    provided here.
    """

    def __init__(
        self,
        name: str = "linear",
        *,
        n: float = 2.0,
        sigma_min: float = 0.0,
        t_min: float | None = None,
        t_max: float = 1.0,
    ):
        if name not in FLOW_PATHS:
            raise ValueError(f"unknown flow path {name!r}; valid: {', '.join(FLOW_PATHS)}")
        if not n > 0:
            raise ValueError(f"polynomial exponent n must be positive, got {n}")
        if not 0 <= sigma_min < 1:
            raise ValueError(f"sigma_min must lie in [0, 1), got {sigma_min}")
        if name == "kinetic-optimal":
            name = "cond-ot"
        self.n = float(n)
        self.sigma_min = float(sigma_min) if name == "cond-ot" else 0.0
        if name in ("linear", "cond-ot"):
            fns = _cond_ot(self.sigma_min)
        elif name == "cosine":
            fns = _cosine()
        else:
            fns = _polynomial(self.n)
        if t_min is None:
            t_min = 0.0 if self.sigma_min > 0 else 1e-3
        if not 0 <= t_min < t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        super().__init__(**fns, t_min=t_min, t_max=t_max, name=name)

    def __reduce__(self):
        # the closed forms are closures: pickle by the constructor arguments
        kw = {"n": self.n, "sigma_min": self.sigma_min, "t_min": self.t_min, "t_max": self.t_max}
        return (partial(FlowPath, self.name, **kw), ())

    def _repr_fields(self) -> dict[str, object]:
        extra: dict[str, object] = {}
        if self.name == "polynomial":
            extra["n"] = self.n
        if self.name == "cond-ot":
            extra["sigma_min"] = self.sigma_min
        return {**super()._repr_fields(), **extra}
