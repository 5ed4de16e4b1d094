"""Stochastic interpolants with a Gaussian base (Albergo, Boffi & Vanden-Eijnden 2023).

The one-sided interpolant x_τ = a(τ)·z + b(τ)·x_1 between a Gaussian base z (τ = 0) and the data
x_1 (τ = 1) is, in this library's time t = 1 − τ (data at t = 0), the Gaussian path
x_t = α_t·x_0 + σ_t·ε with α_t = b(1 − t), σ_t = a(1 − t). For any diffusion coefficient
ε(t) ≥ 0 their generative SDEs (forward dX = (b + ε·s)dτ + sqrt(2ε)dW, backward
dX = (b − ε·s)dτ + sqrt(2ε)dW̄), written in t,

    dx = [f_t·x − ½(g_t² + 2ε(t))·∇log p_t(x)] dt + sqrt(2ε(t)) dw̄      (t decreasing)

share the marginals of the path; in diffsolve's reverse-SDE family
dx = [f x − ½(g² + γ²)∇log p] dt + γ dw̄ this is γ_t² = 2ε(t). ε = 0 is the probability-flow
ODE, and ε = g²/2 (= a·(a·ḃ/b − ȧ) with dots d/dτ) the reverse SDE of Song et al. 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import GaussianProcess, as_time
from .path import FLOW_PATHS, FlowPath, GaussianPath
from .vp import VPLinear

__all__ = ["StochasticInterpolant"]

Epsilon = float | Callable[[Tensor], Tensor] | None


def _make_path(
    path: str | GaussianProcess | tuple[Callable, Callable], **options
) -> GaussianProcess:
    if isinstance(path, GaussianProcess):
        if options:
            raise ValueError(f"path options {sorted(options)} need a path name, not an object")
        return path
    if isinstance(path, tuple):
        if len(path) != 2 or not all(callable(f) for f in path):
            raise ValueError("a path given as a tuple must be (alpha_fn, sigma_fn)")
        return GaussianPath(*path, **options)
    if path == "vp":
        return VPLinear(**options)
    if path in FLOW_PATHS:
        return FlowPath(path, **options)
    raise ValueError(
        f"unknown path {path!r}; valid: {', '.join((*FLOW_PATHS, 'vp'))}, a GaussianProcess, "
        "or an (alpha, sigma) pair of functions"
    )


class StochasticInterpolant(GaussianProcess):
    """A Gaussian path with a user diffusion coefficient ε(t) for the SDE samplers.

    All path quantities (α, σ, λ, derivatives, inverse, model time, prior) are those of ``path``;
    what this class adds is ``gamma_sq(t) = 2ε(t)``, the reverse-time diffusion that
    diffsolve's SDE samplers use (module docstring).

    Args:
        path: a flow-path name (``linear``, ``cond-ot``/``kinetic-optimal``, ``cosine``,
            ``polynomial``: see :class:`FlowPath`), ``vp`` (linear-β VP, :class:`VPLinear`), any
            :class:`GaussianProcess`, or an ``(alpha, sigma)`` pair of functions of t
            (:class:`GaussianPath`). Noise is at t = 1 (Albergo et al.'s τ = 1 − t).
        epsilon: ε(t) ≥ 0, a number or a function of a float64 tensor t in this library's
            time; ``None`` (default) means ε = g_t²/2, the standard reverse SDE. ε = 0 makes the
            SDE samplers integrate the probability-flow ODE.
        **options: passed to the path's constructor when ``path`` is a name or a pair
            (e.g. ``n=3`` for ``polynomial``, ``t_min=...``).
    """

    def __init__(
        self,
        path: str | GaussianProcess | tuple[Callable, Callable] = "linear",
        epsilon: Epsilon = None,
        **options,
    ):
        self.path = _make_path(path, **options)
        self.t_min, self.t_max = self.path.t_min, self.path.t_max
        if epsilon is not None and not callable(epsilon):
            epsilon = float(epsilon)
            if not (math.isfinite(epsilon) and epsilon >= 0):
                raise ValueError(f"epsilon must be finite and ≥ 0, got {epsilon}")
        self.epsilon = epsilon
        if callable(epsilon):
            t = torch.linspace(self.t_min, self.t_max, 257, dtype=torch.float64)
            e = self.gamma_sq(t)
            if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
                raise ValueError("epsilon(t) must be finite and ≥ 0 on [t_min, t_max]")

    # -- the user diffusion ------------------------------------------------------------------
    def gamma_sq(self, t: float | Tensor) -> Tensor:
        """γ_t² = 2ε(t) (ε = None: g_t², the reverse SDE of the path)."""
        t = as_time(t)
        eps = self.epsilon
        if eps is None:
            return self.path.diffusion_sq(t)
        if callable(eps):
            out = eps(t)
            out = out if isinstance(out, Tensor) else torch.as_tensor(out, dtype=torch.float64)
            return 2.0 * torch.broadcast_to(out.to(torch.float64), t.shape)
        return torch.full_like(t, 2.0 * eps)

    # -- the path, delegated -----------------------------------------------------------------
    def __getattr__(self, name: str):
        # anything else the wrapped process offers (VPDiscrete.time_of_index, a mean-reverting
        # path's offset, ...) is reached through the interpolant too
        if name == "path":
            raise AttributeError(name)
        return getattr(self.path, name)

    def log_alpha(self, t: float | Tensor) -> Tensor:
        return self.path.log_alpha(t)

    def offset(self, cond):
        return self.path.offset(cond)

    def to_path(self, out, y, mu, alpha, sigma, prediction):
        return self.path.to_path(out, y, mu, alpha, sigma, prediction)

    def log_sigma(self, t: float | Tensor) -> Tensor:
        return self.path.log_sigma(t)

    def alpha(self, t: float | Tensor) -> Tensor:
        return self.path.alpha(t)

    def sigma(self, t: float | Tensor) -> Tensor:
        return self.path.sigma(t)

    def lambda_(self, t: float | Tensor) -> Tensor:
        return self.path.lambda_(t)

    def d_alpha(self, t: float | Tensor) -> Tensor:
        return self.path.d_alpha(t)

    def d_sigma(self, t: float | Tensor) -> Tensor:
        return self.path.d_sigma(t)

    def drift_coef(self, t: float | Tensor) -> Tensor:
        return self.path.drift_coef(t)

    def diffusion_sq(self, t: float | Tensor) -> Tensor:
        return self.path.diffusion_sq(t)

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        return self.path.t_of_lambda(lam)

    def model_time(self, t: float | Tensor) -> Tensor:
        return self.path.model_time(t)

    def shift_time(self, t: Tensor) -> Tensor:
        return self.path.shift_time(t)

    @property
    def t_max_finite(self) -> float:
        return self.path.t_max_finite

    def prior_std(self) -> float:
        return self.path.prior_std()

    def _repr_fields(self) -> dict[str, object]:
        eps = self.epsilon
        shown = eps if eps is None or isinstance(eps, float) else getattr(eps, "__name__", "fn")
        return {"path": self.path, "epsilon": shown}
