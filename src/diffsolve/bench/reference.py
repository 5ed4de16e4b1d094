"""Exact references: the probability-flow ODE solved in float64 at tight tolerance.

The PF-ODE of a Gaussian path, in the α-scaled state x̃ = x/α and the noise level ρ = σ/α
(Karras et al. 2022, eq. 4 after their change of variables), is

    dx̃/dρ = (x̃ − x̂_0(α·x̃, t(ρ))) / ρ = ε̂,

which is smooth and free of the path's own time scale. It is integrated here in u = log ρ
(dx̃/du = ρ·ε̂) by scipy's DOP853 (8th order, adaptive) at rtol = atol = 1e-12 by default.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..processes.base import GaussianProcess
from .gmm import GaussianMixture

__all__ = ["exact_x0_at", "solve_pf_ode"]


def _rho_to_ab(process: GaussianProcess, rho: float) -> tuple[float, float]:
    t = float(process.t_of_rho(rho))
    return float(process.alpha(t)), float(process.sigma(t))


def solve_pf_ode(
    gmm: GaussianMixture,
    process: GaussianProcess,
    x: Tensor,
    t_from: float,
    t_to: float,
    rtol: float = 1e-12,
    atol: float = 1e-12,
) -> Tensor:
    """x at ``t_to`` on the PF-ODE through x at ``t_from`` (float64, same shape as x).

    Both times must lie in the process's range (σ > 0). α and σ at intermediate noise levels are
    evaluated exactly through the process; the mixture's posterior mean is exact.
    """
    from scipy.integrate import solve_ivp

    a0, s0 = float(process.alpha(t_from)), float(process.sigma(t_from))
    a1, s1 = float(process.alpha(t_to)), float(process.sigma(t_to))
    u0, u1 = math.log(s0 / a0), math.log(s1 / a1)
    if u0 == u1:
        return x.to(torch.float64).clone()
    shape = x.shape
    xt = (x.to(torch.float64) / a0).reshape(-1).numpy()

    def rhs(u: float, y: np.ndarray) -> np.ndarray:
        rho = math.exp(u)
        a, s = _rho_to_ab(process, rho)
        xs = torch.from_numpy(y).reshape(shape) * a
        x0 = gmm.x0_mean(xs, a, s)
        eps = (xs - a * x0) / s
        return (rho * eps).reshape(-1).numpy()

    sol = solve_ivp(rhs, (u0, u1), xt, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape) * a1


def exact_x0_at(gmm: GaussianMixture, process: GaussianProcess, x: Tensor, t: float) -> Tensor:
    """x̂_0 of the exact model at (x, t): the standard endpoint of a run whose last σ is at t."""
    return gmm.x0_mean(x.to(torch.float64), float(process.alpha(t)), float(process.sigma(t)))
