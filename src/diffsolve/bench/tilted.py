"""The exact reward-tilted mixture: p(x)·exp(λ·r(x)) for a Gaussian reward is again a mixture.

With r(x) = −‖x − y‖²/(2τ²) and c = λ/τ², each component N(m_k, Σ_k) becomes N(m'_k, Σ'_k),
Σ'_k = (Σ_k⁻¹ + c·I)⁻¹ (eigenvalues Λ/(1 + cΛ), same eigenvectors), m'_k = Σ'_k(Σ_k⁻¹m_k + c·y),
with weight ∝ w_k·N(y; m_k, Σ_k + I/c) (the product of two Gaussian densities). Steering
methods (FK, SVDD) are measured against it: mean reward, component weights, distances.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .gmm import GaussianMixture

__all__ = ["gaussian_reward", "mean_reward", "tilted"]


def gaussian_reward(y: Tensor, tau: float):
    """r(x) = −‖x − y‖²/(2τ²) on samples (B, ...) → (B,)."""
    y = y.reshape(-1)

    def reward(x: Tensor) -> Tensor:
        d = x.reshape(x.shape[0], -1) - y.to(x.dtype)
        return -(d * d).sum(dim=1) / (2 * tau**2)

    return reward


def _eig(mix: GaussianMixture, v: Tensor) -> Tensor:
    """v (K, D) or (D,) in each component's eigenbasis (K, D)."""
    if mix.eigvecs is None:
        return v.expand(mix.means.shape)
    return torch.einsum("kdj,kd->kj", mix.eigvecs, v.expand(mix.means.shape))


def tilted(mix: GaussianMixture, y: Tensor, tau: float, scale: float = 1.0) -> GaussianMixture:
    """The mixture proportional to mix(x)·exp(scale·r(x)), r = :func:`gaussian_reward`."""
    c = scale / tau**2
    f64 = torch.float64
    lam = mix.eigvals.to(f64)
    y = y.reshape(-1).to(f64)
    m_e, y_e = _eig(mix, mix.means.to(f64)), _eig(mix, y)
    lam_t = lam / (1 + c * lam)
    mean_e = lam_t * (m_e / lam + c * y_e)
    if mix.eigvecs is None:
        means = mean_e
    else:
        means = torch.einsum("kdj,kj->kd", mix.eigvecs.to(f64), mean_e)
    var = lam + 1 / c  # N(y; m_k, Σ_k + I/c) in the eigenbasis
    logn = -0.5 * (((y_e - m_e) ** 2 / var) + torch.log(2 * math.pi * var)).sum(dim=1)
    logw = torch.log(mix.weights.to(f64)) + logn
    w = torch.softmax(logw, dim=0)
    return GaussianMixture(w, means, lam_t, mix.eigvecs, mix.shape, f"{mix.name}-tilted")


def mean_reward(mix: GaussianMixture, y: Tensor, tau: float) -> float:
    """E[r(x)] under ``mix`` exactly: −Σ_k w_k(‖m_k − y‖² + tr Σ_k)/(2τ²)."""
    d2 = ((mix.means.to(torch.float64) - y.reshape(-1).to(torch.float64)) ** 2).sum(dim=1)
    tr = mix.eigvals.to(torch.float64).sum(dim=1)
    return float(-(mix.weights.to(torch.float64) * (d2 + tr)).sum() / (2 * tau**2))
