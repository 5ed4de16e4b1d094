"""Exact references: the probability-flow ODE solved in float64 at tight tolerance.

The PF-ODE of a Gaussian path, in the α-scaled state x̃ = x/α and the noise level ρ = σ/α
(Karras et al. 2022, eq. 4 after their change of variables), is

    dx̃/dρ = (x̃ − x̂_0(α·x̃, t(ρ))) / ρ = ε̂,

which is smooth and free of the path's own time scale. It is integrated here in u = log ρ
(dx̃/du = ρ·ε̂ = x̃ − x̂_0) by scipy's DOP853 (8th order, adaptive) at rtol = atol = 1e-12 by
default.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..processes.base import GaussianProcess
from .gmm import GaussianMixture

__all__ = ["exact_x0_at", "solve_pf_ode"]


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

    ``t_to = 0`` means the clean end σ = 0: the ODE is continued to ρ = 1e-8 (beyond any grid's
    last point; the mixture's x̂_0 has no linear term in ρ, so x̂_0 there is σ = 0 to ~1e-16) and
    x̂_0 is returned. Because E[x_0 | x_t] depends on x_t only through (x_t/α, ρ), the mixture is
    evaluated at (x̃, α = 1, σ = ρ): no inversion of the process's time map is involved.
    """
    from scipy.integrate import solve_ivp

    a0, rho0 = float(process.alpha(t_from)), float(process.rho(t_from))
    clean = t_to == 0
    a1, rho1 = (
        (1.0, _CLEAN_RHO) if clean else (float(process.alpha(t_to)), float(process.rho(t_to)))
    )
    shape = x.shape
    y0 = x.to(torch.float64) / a0
    if rho0 != rho1:

        def rhs(u: float, y: np.ndarray) -> np.ndarray:
            # dx̃/d log ρ = ρ·ε̂ = x̃ − x̂_0(x̃; ρ)
            xs = torch.from_numpy(y).reshape(shape)
            return (xs - gmm.x0_mean(xs, 1.0, math.exp(u))).reshape(-1).numpy()

        sol = solve_ivp(
            rhs,
            (math.log(rho0), math.log(rho1)),
            y0.reshape(-1).numpy(),
            method="DOP853",
            rtol=rtol,
            atol=atol,
        )
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        y0 = torch.from_numpy(sol.y[:, -1]).reshape(shape)
    if clean:
        return gmm.x0_mean(y0, 1.0, _CLEAN_RHO)
    return y0 * a1


_CLEAN_RHO = 1e-8


def exact_x0_at(gmm: GaussianMixture, process: GaussianProcess, x: Tensor, t: float) -> Tensor:
    """x̂_0 of the exact model at (x, t): the standard endpoint of a run whose last σ is at t."""
    return gmm.x0_mean(x.to(torch.float64), float(process.alpha(t)), float(process.sigma(t)))
