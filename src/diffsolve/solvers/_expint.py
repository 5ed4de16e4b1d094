"""Shared maths of exponential integrators, in float64 on the host: z^k·φ_k(z) = e^z −
Σ_{j<k} z^j/j! by the closed form for |z| ≥ 1 and the Taylor series below; the noise form
h^k·φ_k(h) (``phi_noise_float``) and the data form h^k·φ_k(−h) (``phi_data_float``; h = +∞ is
fine for k = 1).
Details: docs/solvers-singlestep.md#φ-functions."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["extrapolate_to_zero", "phi_data_float", "phi_noise_float", "zphi_float"]

_SERIES_TERMS = 30


def zphi_float(k: int, z: float) -> float:
    """z^k·φ_k(z) = e^z − Σ_{j<k} z^j/j! on a Python float, stable for small |z|."""
    if k == 0:
        return math.exp(z)
    if abs(z) < 1:
        term = z**k / math.factorial(k)
        total = term
        for j in range(k + 1, k + _SERIES_TERMS):
            term *= z / j
            if (new := total + term) == total:  # converged to the last bit (|z| < 1: terms shrink)
                break
            total = new
        return total
    if z == math.inf:
        return math.inf
    return math.expm1(z) - sum(z**j / math.factorial(j) for j in range(1, k))


def phi_data_float(k: int, h: float) -> float:
    """h^k·φ_k(−h), the data-form (x̂_0) weights: h·φ_1(−h) = 1 − e^{−h}, … (h = +∞ ok for k=1)."""
    if k == 1:
        return -math.expm1(-h)
    return (-1) ** k * zphi_float(k, -h)


def phi_noise_float(k: int, h: float) -> float:
    """h^k·φ_k(h), the noise-form (ε̂) weights: h·φ_1(h) = e^h − 1, …"""
    return zphi_float(k, h)


def extrapolate_to_zero(rhos: list[float], values: list[Tensor]) -> Tensor:
    """Extrapolate ``values`` (x̂_0 at noise levels ρ = σ/α along a trajectory) to ρ = 0 at no
    network call: x̂_0 is even in ρ on the exact path, so the constant term of a fit in
    {1, ρ², ρ⁴} (up to 3 points), error O(ρ⁶) (docs/solvers-singlestep.md#extrapolate_to_zero).
    """
    k = min(len(rhos), 3)
    r = torch.tensor(rhos[:k], dtype=torch.float64)
    basis = torch.stack([torch.ones_like(r), r**2, r**4][:k], dim=1)  # (k points, k functions)
    w = torch.linalg.inv(basis)[0].tolist()  # constant term = first row of the inverse
    out = values[0] * w[0]
    for wj, v in zip(w[1:], values[1:k]):
        out = out + wj * v
    return out
