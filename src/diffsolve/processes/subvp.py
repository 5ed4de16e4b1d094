"""The sub-VP SDE of Score SDE (Song et al. 2021, §3.4; score_sde_pytorch ``subVPSDE``).

With the VP's linear β(t) = β₀ + t·(β₁ − β₀) and B(t) = ∫₀ᵗ β = β₀t + ½(β₁ − β₀)t², the forward
SDE dx = −½β(t)·x dt + sqrt(β(t)·(1 − e^{−2B(t)})) dw has marginals x_t = α_t·x_0 + σ_t·ε with

    α_t = e^{−B/2},   σ_t = 1 − e^{−B}   (the std, not the variance, is 1 − e^{−B}).

σ_t² ≤ 1 − α_t² (the VP variance) everywhere: the path is "sub" variance-preserving.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GaussianProcess, as_time

__all__ = ["SubVP"]


class SubVP(GaussianProcess):
    """Score-SDE sub-VP with linear β: α_t = e^{−B(t)/2}, σ_t = 1 − e^{−B(t)}.

    Defaults are the paper's (β₀ = 0.1, β₁ = 20, sampling from t = 1 down to t_min = 1e-3).
    λ_t = −B/2 − log(1 − e^{−B}) has the closed-form inverse B(λ) = 2·asinh(e^{−λ}/2)
    (solve e^{λ}·(1 − u²) = u for u = α), then t = 2B / (β₀ + sqrt(β₀² + 2(β₁ − β₀)·B)).
    The forward diffusion g_t² = β(t)·(1 − e^{−2B}) follows from the marginals
    (``diffusion_sq``, derived in the base class).
    """

    def __init__(
        self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0
    ):
        if not 0 < beta_min < beta_max:
            raise ValueError("need 0 < beta_min < beta_max")
        if not 0 < t_min < t_max:
            raise ValueError("need 0 < t_min < t_max (σ = 0 at t = 0)")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def beta(self, t: float | Tensor) -> Tensor:
        """β(t) = β₀ + t·(β₁ − β₀)."""
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def int_beta(self, t: float | Tensor) -> Tensor:
        """B(t) = ∫₀ᵗ β(s) ds."""
        t = as_time(t)
        return t * self.beta_min + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def log_alpha(self, t: float | Tensor) -> Tensor:
        return -0.5 * self.int_beta(t)

    def log_sigma(self, t: float | Tensor) -> Tensor:
        return torch.log(self.sigma(t))

    def alpha(self, t: float | Tensor) -> Tensor:
        return torch.exp(-0.5 * self.int_beta(t))

    def sigma(self, t: float | Tensor) -> Tensor:
        return -torch.expm1(-self.int_beta(t))

    def d_alpha(self, t: float | Tensor) -> Tensor:
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t: float | Tensor) -> Tensor:
        # σ = 1 − e^{−B} ⇒ σ' = β·e^{−B}
        return self.beta(t) * torch.exp(-self.int_beta(t))

    def drift_coef(self, t: float | Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def t_of_lambda(self, lam: float | Tensor) -> Tensor:
        big_b = 2.0 * torch.asinh(0.5 * torch.exp(-as_time(lam)))
        b0, db = self.beta_min, self.beta_max - self.beta_min
        # root of ½·db·t² + b0·t − B = 0, written without cancellation
        return 2.0 * big_b / (b0 + torch.sqrt(b0 * b0 + 2.0 * db * big_b))

    def prior_std(self) -> float:
        # Score SDE samples the sub-VP prior as N(0, I) (α_T² + σ_T² = 1 − O(e^{−B(T)}))
        return 1.0

    def _repr_fields(self) -> dict[str, object]:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, **super()._repr_fields()}
