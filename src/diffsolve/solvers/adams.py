"""Adams–Bashforth multistep methods in ρ = σ/α: LMS, DEIS-ρAB and iPNDM.

On the α-scaled state y = x/α the PF-ODE is dy/dρ = ε̂ (Karras et al. 2022, eq. 4). An
Adams–Bashforth step integrates a polynomial through the last k values of ε̂:

    y_{i+1} = y_i + Σ_{j<k} c_{ij}·ε̂_{i−j},

i.e. the row (:mod:`.engine`) x_{i+1} = (α_{i+1}/α_i)·x_i + Σ_j α_{i+1}·c_{ij}·ε̂_{i−j} over ε̂
newest first, built once per grid in float64.

* ``lms`` (k-diffusion ``sample_lms``; DEIS ρAB, Zhang & Chen 2023, eq. 14): c_{ij} = ∫ ℓ_j(ρ) dρ
  over [ρ_i, ρ_{i+1}], ℓ_j the Lagrange basis on the past nodes ρ_i, ρ_{i−1}, …, integrated
  exactly (float64 polynomials). Variable steps; order k.
* ``ipndm`` (Zhang & Chen 2023, App. "iPNDM"): the fixed equal-step weights [1], [3, −1]/2,
  [23, −16, 5]/12, [55, −59, 37, −9]/24 times the step ρ_{i+1} − ρ_i; exact only on equal steps
  in ρ, which schedules never give, so its order on a real grid is measured, not assumed.

A grid that starts where α = 0 (flow matching's t = 1: the uniform and quadratic schedules
there) starts at ``process.t_max_finite`` instead, where σ/α is finite, as the logsnr and karras
schedules do. Warm-up uses the orders 1, 2, … as history accumulates. The step to σ = 0 returns x̂_0.
``euler_at_final`` (all three): the last step is first order, y_{i+1} = y_i + (ρ_{i+1} − ρ_i)·ε̂_i
(Euler in ρ, i.e. DDIM), at any step count (:class:`~diffsolve.solvers.base.FinalOrders`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from .base import FinalOrders, Grid, alias, register
from .engine import Row, RowSolver, StepRule

__all__ = ["DEIS", "IPNDM", "LMS", "finite_start", "lagrange_integral_weights"]

_IPNDM = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def finite_start(grid: Grid, name: str) -> Grid:
    """``grid`` with its first time moved to ``process.t_max_finite`` where α = 0 there (flow
    matching's t = 1, λ = −∞): the run starts where σ/α and the score are finite, as the
    logsnr, karras and trailing-uniform schedules do (x_T is then read as the sample there;
    on flow paths α(t_max_finite) = t_min, so the mismatch is of order t_min)."""
    if float(grid.alpha[0]) != 0.0:
        return grid
    start = float(grid.process.t_max_finite)
    t = grid.t[:-1] if grid.clean_end else grid.t
    if t.numel() > 1 and float(t[1]) >= start:
        raise ValueError(
            f"{name}: α = 0 at the first time t = {float(t[0])!r}, and the next time "
            f"{float(t[1])!r} is not below t_max_finite = {start!r}, where the run must start; "
            "use fewer steps or times that start at t_max_finite"
        )
    t = t.clone()
    t[0] = start
    return Grid.build(grid.process, t, grid.clean_end, grid.nfe)


def lagrange_integral_weights(nodes: np.ndarray, a: float, b: float) -> np.ndarray:
    """∫_a^b ℓ_j(s) ds for the Lagrange basis ℓ_j on ``nodes`` (float64, exact)."""
    w = np.empty(len(nodes))
    for j, nj in enumerate(nodes):
        poly = np.array([1.0])
        for m, nm in enumerate(nodes):
            if m != j:
                poly = P.polymul(poly, np.array([-nm, 1.0]) / (nj - nm))
        integ = P.polyint(poly)
        w[j] = P.polyval(b, integ) - P.polyval(a, integ)
    return w


@dataclass(frozen=True)
class _RhoAdams(RowSolver):
    """The rows of an Adams method in ρ (module docstring); subclasses give c_{ij}."""

    default_schedule: ClassVar[str] = "karras"

    def _check_order(self, order: int) -> None:
        if order not in (1, 2, 3, 4):
            raise ValueError(f"order must be 1, 2, 3 or 4, got {order!r}")
        FinalOrders.of(self.name, False, 0, self.euler_at_final)  # type check

    def _coefficients(self, grid: Grid, rho: np.ndarray, i: int, k: int) -> tuple[float, ...]:
        raise NotImplementedError

    def _order_at(self, grid: Grid, i: int) -> int:
        # euler_at_final: Euler in ρ on the last step (FinalOrders; no lower_order_final here)
        cap = FinalOrders.of(self.name, False, 0, self.euler_at_final).cap(i, grid.steps)
        return min(self.order, i + 1, cap)

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        grid = finite_start(grid, self.name)
        rho = (grid.sigma / grid.alpha).numpy()
        if not np.isfinite(rho[0]):
            raise ValueError(
                f"{self.name} integrates in σ/α, which is infinite at t={float(grid.t[0])} "
                f"({grid.process!r}); start below it (e.g. schedule='karras' or t_max < 1)"
            )
        t, alpha = grid.t.tolist(), grid.alpha.tolist()
        out = []
        for i in range(grid.steps):
            if grid.is_final(i):
                out.append(StepRule((t[i],)))
                continue
            c = self._coefficients(grid, rho, i, self._order_at(grid, i))
            row = Row(alpha[i + 1] / alpha[i], eps=tuple(alpha[i + 1] * cj for cj in c))
            out.append(StepRule((t[i],), update=row))
        return tuple(out)


@register
@dataclass(frozen=True)
class LMS(_RhoAdams):
    """Linear multistep in ρ with exact Lagrange weights (k-diffusion ``sample_lms``, DEIS ρAB).

    Option ``order`` (1–4, default 4, as k-diffusion). See the module docstring.
    """

    order: int = 4  # type: ignore[assignment]
    euler_at_final: bool = False
    name: ClassVar[str] = "lms"
    description: ClassVar[str] = "linear multistep in σ/α, exact Lagrange weights (k-diffusion)"

    def validate(self) -> None:
        self._check_order(self.order)

    def _coefficients(self, grid: Grid, rho: np.ndarray, i: int, k: int) -> tuple[float, ...]:
        nodes = rho[i - np.arange(k)]
        return tuple(lagrange_integral_weights(nodes, rho[i], rho[i + 1]).tolist())


@register
@dataclass(frozen=True)
class IPNDM(_RhoAdams):
    """iPNDM: Adams–Bashforth in ρ with fixed equal-step weights (module docstring).

    Option ``order`` (1–4, default 4, as the DEIS code and k-diffusion's successors).
    """

    order: int = 4  # type: ignore[assignment]
    euler_at_final: bool = False
    name: ClassVar[str] = "ipndm"
    description: ClassVar[str] = "improved PNDM: fixed-weight Adams–Bashforth in σ/α (DEIS paper)"

    def validate(self) -> None:
        self._check_order(self.order)

    def _coefficients(self, grid: Grid, rho: np.ndarray, i: int, k: int) -> tuple[float, ...]:
        d = rho[i + 1] - rho[i]
        return tuple(d * w for w in _IPNDM[k - 1])


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)


@register
@dataclass(frozen=True)
class DEIS(_RhoAdams):
    """DEIS multistep (Zhang & Chen 2023): the exponential integrator with ε̂ extrapolated by a
    Lagrange polynomial in a chosen variable u over the last k steps,

        x_{i+1} = (α_{i+1}/α_i)·x_i + α_{i+1}·Σ_j c_{ij}·ε̂_{i−j},
        c_{ij} = ∫_{ρ_i}^{ρ_{i+1}} ℓ_j(u(ρ)) dρ,

    (their eq. 12 after the change of variable ρ = σ/α = e^{−λ}), with ``variant``:

    * ``"tab"`` — u = t, the paper's tAB-DEIS (its default, with the quadratic t-grid);
      weights by 8×16-point Gauss–Legendre quadrature in float64 (the official code uses a
      10⁴-point Riemann sum);
    * ``"rhoab"`` — u = ρ, ρAB-DEIS (identical to ``lms``);
    * ``"logrho"`` — u = log ρ, diffusers' ``DEISMultistepScheduler`` (solver_type "logrho").

    ``order`` 1–3 (default 3, the paper's ``ab_order``); warm-up with lower orders; on the step
    to σ = 0, x̂_0. With ``lower_order_final`` (diffusers' rule) the last steps of a short
    run without a clean end use order ≤ steps left, for runs under 15 steps.
    """

    order: int = 3  # type: ignore[assignment]
    variant: str = "tab"
    lower_order_final: bool = True
    euler_at_final: bool = False
    name: ClassVar[str] = "deis"
    description: ClassVar[str] = "DEIS multistep: exponential integrator, Lagrange ε̂ in t/ρ/log ρ"
    default_schedule: ClassVar[str] = "quadratic"

    def validate(self) -> None:
        if self.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {self.order!r}")
        if self.variant not in ("tab", "rhoab", "logrho"):
            raise ValueError(f"unknown variant {self.variant!r}; valid: tab, rhoab, logrho")
        FinalOrders.of("deis", self.lower_order_final, 15, self.euler_at_final)

    def _order_at(self, grid: Grid, i: int) -> int:
        # diffusers' DEIS threshold, and only without a clean end (the step to σ = 0 is x̂_0)
        lof = self.lower_order_final and not grid.clean_end
        rule = FinalOrders.of("deis", lof, 15, self.euler_at_final)
        return min(self.order, i + 1, rule.cap(i, grid.steps))

    def _coefficients(self, grid: Grid, rho: np.ndarray, i: int, k: int) -> tuple[float, ...]:
        if self.variant == "rhoab" or k == 1:
            nodes = rho[i - np.arange(k)]
            return tuple(lagrange_integral_weights(nodes, rho[i], rho[i + 1]).tolist())
        # composite Gauss–Legendre in ρ over [ρ_i, ρ_{i+1}]
        edges = np.linspace(rho[i], rho[i + 1], 9)
        mid, half = (edges[1:] + edges[:-1]) / 2, (edges[1:] - edges[:-1]) / 2
        q = (mid[:, None] + half[:, None] * _GL_NODES[None]).ravel()
        wq = (half[:, None] * _GL_WEIGHTS[None]).ravel()
        if self.variant == "logrho":
            u, nodes = np.log(q), np.log(rho[i - np.arange(k)])
        else:
            u = grid.process.t_of_rho(torch.from_numpy(q)).numpy()
            nodes = grid.t.numpy()[i - np.arange(k)]
        out = []
        for j in range(k):
            basis = np.ones_like(u)
            for m in range(k):
                if m != j:
                    basis = basis * (u - nodes[m]) / (nodes[j] - nodes[m])
            out.append(float(wq @ basis))
        return tuple(out)


alias(
    "ipndm_v",
    "lms",
    "iPNDM-v: variable-step iPNDM, whose weights are the exact Lagrange (lms) ones",
)
