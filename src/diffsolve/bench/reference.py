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

from ..integrate import dormand_prince, max_norm
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


# -- a second, independent integrator ---------------------------------------------------------
def dopri5(
    f,
    u0: float,
    u1: float,
    y0: Tensor,
    rtol: float = 1e-12,
    atol: float = 1e-12,
    max_steps: int = 200_000,
) -> tuple[Tensor, int]:
    """Integrate dy/du = f(u, y) from u0 to u1 by adaptive Dormand–Prince 5(4) in float64.

    The project's integrator (:func:`diffsolve.integrate.dormand_prince`) with the error in the
    max norm, scaled by atol + rtol·max(|y_n|, |y_{n+1}|), and the classical step-size rule
    h' = h·clip(0.9·err^{−1/5}, 0.2, 5) (Hairer, Nørsett & Wanner, Solving ODEs I, §II.4).
    Returns y(u1) and the number of f evaluations.
    """
    sol = dormand_prince(
        f,
        u0,
        u1,
        y0.to(torch.float64),
        rtol=rtol,
        atol=atol,
        norm=max_norm,
        max_steps=max_steps,
        name="dopri5",
    )
    return sol.y, sol.nfev


def _x_space_front(
    gmm: GaussianMixture, process: GaussianProcess, x: Tensor, t_from: float, t_to: float
) -> Tensor:
    """The PF-ODE dx/dt = α'·x̂_0 + σ'·ε̂ in x and t, for a start where α = 0 (flow matching's
    t = 1, where x/α and log ρ are singular but x itself is regular). DOP853 at 1e-12."""
    from scipy.integrate import solve_ivp

    shape = x.shape

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        xs = torch.from_numpy(y).reshape(shape)
        a, s = float(process.alpha(t)), float(process.sigma(t))
        x0 = gmm.x0_mean(xs, a, s)
        eps = (xs - a * x0) / s
        out = float(process.d_alpha(t)) * x0 + float(process.d_sigma(t)) * eps
        return out.reshape(-1).numpy()

    sol = solve_ivp(
        rhs,
        (t_from, t_to),
        x.to(torch.float64).reshape(-1).numpy(),
        "DOP853",
        rtol=1e-12,
        atol=1e-12,
    )
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


def solve_exact(
    gmm: GaussianMixture,
    process: GaussianProcess,
    x: Tensor,
    t_from: float,
    t_to: float,
    method: str = "dop853",
    rtol: float = 1e-12,
    atol: float = 1e-12,
) -> Tensor:
    """Like :func:`solve_pf_ode` (``t_to = 0``: the clean end), with a choice of integrator.

    ``method="dop853"`` is scipy's DOP853 (:func:`solve_pf_ode`); ``method="dopri5"`` is the
    project's own Dormand–Prince 5(4) (:func:`dopri5`) on the same equation
    dx̃/d log ρ = x̃ − x̂_0(x̃; ρ), an independent check. A start where α = 0 (flow matching at
    t = 1) is first integrated in x-space to the process's ``t_max_finite``.
    """
    if method not in ("dop853", "dopri5"):
        raise ValueError(f"unknown method {method!r}; valid: 'dop853', 'dopri5'")
    x = x.to(torch.float64)
    if float(process.alpha(t_from)) == 0.0:
        t_mid = process.t_max_finite if t_to == 0 else max(process.t_max_finite, t_to)
        x = _x_space_front(gmm, process, x, t_from, t_mid)
        t_from = t_mid
    if method == "dop853":
        return solve_pf_ode(gmm, process, x, t_from, t_to, rtol=rtol, atol=atol)
    a0, rho0 = float(process.alpha(t_from)), float(process.rho(t_from))
    clean = t_to == 0
    a1, rho1 = (
        (1.0, _CLEAN_RHO) if clean else (float(process.alpha(t_to)), float(process.rho(t_to)))
    )

    def f(u: float, y: Tensor) -> Tensor:
        return y - gmm.x0_mean(y, 1.0, math.exp(u))

    y, _ = dopri5(f, math.log(rho0), math.log(rho1), x / a0, rtol=rtol, atol=atol)
    if clean:
        return gmm.x0_mean(y, 1.0, _CLEAN_RHO)
    return y * a1


def check_reference(
    gmm: GaussianMixture,
    process: GaussianProcess,
    x: Tensor,
    t_to: float = 0.0,
    t_from: float | None = None,
    rtol: float = 1e-12,
) -> dict[str, float]:
    """Cross-check the exact reference: relative differences ‖a − b‖/‖b‖ between

    - ``agreement``: DOP853 and the project's Dormand–Prince 5(4), both at ``rtol``;
    - ``halving``: DOP853 at ``rtol`` and at ``rtol/2``;
    - ``halving_dopri5``: the same for Dormand–Prince.

    All three should be ≲ 1e-10 for the benchmark's references to be exact to its printed digits.
    """
    t0 = process.t_max if t_from is None else t_from

    def solve(method: str, tol: float) -> Tensor:
        return solve_exact(gmm, process, x, t0, t_to, method=method, rtol=tol, atol=tol)

    def rel(a: Tensor, b: Tensor) -> float:
        return float((a - b).norm() / b.norm())

    ref = solve("dop853", rtol)
    own = solve("dopri5", rtol)
    return {
        "agreement": rel(own, ref),
        "halving": rel(solve("dop853", rtol / 2), ref),
        "halving_dopri5": rel(solve("dopri5", rtol / 2), own),
    }
