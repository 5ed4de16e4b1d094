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

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .base import FinalOrders, Grid, alias, register
from .engine import Row, RowSolver, StepRule

__all__ = ["DEIS", "IPNDM", "LMS", "finite_start", "lagrange_integral_weights", "lagrange_table"]

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


def lagrange_table(u: np.ndarray, w: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """∫ ℓ_j(u(ρ)) dρ for many steps at once, by the quadrature (ρ_q, w_q) of each step.

    Args:
        u: the interpolation variable at each step's quadrature points, shape (n, Q).
        w: the quadrature weights in ρ, shape (n, Q).
        nodes: each step's Lagrange nodes in u, newest first, shape (n, k).

    Returns:
        c, shape (n, k): c[i, j] = Σ_q w[i, q]·ℓ_j(u[i, q]) (DEIS, Zhang & Chen 2023, eq. 12).
    """
    k = nodes.shape[1]
    out = np.empty(nodes.shape)
    for j in range(k):
        basis = w.copy()
        for m in range(k):
            if m != j:
                basis *= (u - nodes[:, m, None]) / (nodes[:, j, None] - nodes[:, m, None])
        out[:, j] = basis.sum(axis=1)
    return out


@lru_cache(maxsize=8)
def _leggauss(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def gauss_legendre(a: np.ndarray, b: np.ndarray, n: int, pieces: int = 1) -> tuple[np.ndarray, ...]:
    """Composite n-point Gauss–Legendre rules on [a_i, b_i] (``pieces`` equal panels each):
    points and weights, shape (len(a), pieces·n); exact for polynomials of degree < 2n."""
    x, wx = _leggauss(n)
    f = (np.arange(pieces)[:, None] + (x[None] + 1.0) / 2.0).ravel() / pieces  # in [0, 1]
    wf = np.tile(wx, pieces) / (2.0 * pieces)
    d = (b - a)[:, None]
    return a[:, None] + d * f[None], d * wf[None]


def lagrange_integral_weights(nodes: np.ndarray, a: float, b: float) -> np.ndarray:
    """∫_a^b ℓ_j(s) ds for the Lagrange basis ℓ_j on ``nodes`` (float64; exact: the basis has
    degree k − 1 and the Gauss–Legendre rule used is exact to degree 2·(k//2 + 1) − 1)."""
    nodes = np.asarray(nodes, dtype=np.float64)
    q, w = gauss_legendre(np.array([a], dtype=np.float64), np.array([b], dtype=np.float64),
                          len(nodes) // 2 + 1)  # fmt: skip
    return lagrange_table(q, w, nodes[None])[0]


@dataclass(frozen=True)
class _RhoAdams(RowSolver):
    """The rows of an Adams method in ρ (module docstring); subclasses give c_{ij}."""

    default_schedule: ClassVar[str] = "karras"
    if TYPE_CHECKING:  # a field of each subclass, declared there to keep their field order
        euler_at_final: bool

    def _check_order(self, order: int) -> None:
        if order not in (1, 2, 3, 4):
            raise ValueError(f"order must be 1, 2, 3 or 4, got {order!r}")
        FinalOrders.of(self.name, False, 0, self.euler_at_final)  # type check

    def _coefficients(self, grid: Grid, rho: np.ndarray, i: int, k: int) -> tuple[float, ...]:
        raise NotImplementedError

    def _table(self, grid: Grid, rho: np.ndarray, steps: list[int], orders: list[int]) -> list:
        """c_{ij} of every step in ``steps`` (of order ``orders``): one call per step here;
        the Lagrange methods compute all steps of one order at once."""
        return [self._coefficients(grid, rho, i, k) for i, k in zip(steps, orders)]

    def _lagrange(
        self,
        rho: np.ndarray,
        steps: list[int],
        orders: list[int],
        var: Any,
        quad: tuple[int, int],
        u_grid: np.ndarray | None = None,
    ) -> list:
        """Lagrange-in-``var`` weights (``var(ρ) -> u`` on arrays; ``u_grid``: u at the grid
        points, if known exactly) for all steps, grouped by order: one evaluation of ``var``
        over every quadrature point of the run."""
        out: list = [None] * len(steps)
        if not steps:
            return out
        idx, ks = np.asarray(steps), np.asarray(orders)
        q, w = gauss_legendre(rho[idx], rho[idx + 1], *quad)
        u_all = var(q.ravel()).reshape(q.shape)
        u_rho = u_grid if u_grid is not None else var(rho[: idx[-1] + 1])
        for k in set(orders):
            sel = np.flatnonzero(ks == k)
            nodes = u_rho[idx[sel, None] - np.arange(k)[None]]
            for r, c in zip(sel.tolist(), lagrange_table(u_all[sel], w[sel], nodes).tolist()):
                out[r] = tuple(c)
        return out

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
        steps = [i for i in range(grid.steps) if not grid.is_final(i)]
        table = iter(self._table(grid, rho, steps, [self._order_at(grid, i) for i in steps]))
        out = []
        for i in range(grid.steps):
            if grid.is_final(i):
                out.append(StepRule((t[i],)))
                continue
            c = next(table)
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

    def _table(self, grid: Grid, rho: np.ndarray, steps: list[int], orders: list[int]) -> list:
        return self._lagrange(rho, steps, orders, lambda r: r, (max(orders, default=1) // 2 + 1, 1))


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

    def _table(self, grid: Grid, rho: np.ndarray, steps: list[int], orders: list[int]) -> list:
        if self.variant == "rhoab":  # polynomial in ρ: an exact Gauss–Legendre rule
            return self._lagrange(rho, steps, orders, lambda r: r, (self.order // 2 + 1, 1))
        u_grid = None
        var: Callable[[np.ndarray], np.ndarray]
        if self.variant == "logrho":
            var = np.log
        else:  # tab: u = t(ρ), the process's inverse map over every quadrature point at once
            process, u_grid = grid.process, grid.t.numpy()

            def t_of_rho(r: np.ndarray) -> np.ndarray:
                return process.t_of_rho(torch.from_numpy(np.ascontiguousarray(r))).numpy()

            var = t_of_rho

        # order 1 is ∫ dρ exactly; higher orders: composite 8×16-point Gauss–Legendre in ρ
        hi = [n for n, k in enumerate(orders) if k > 1]
        found = self._lagrange(
            rho, [steps[n] for n in hi], [orders[n] for n in hi], var, (16, 8), u_grid
        )
        weights = iter(found)
        return [(rho[i + 1] - rho[i],) if k == 1 else next(weights) for i, k in zip(steps, orders)]


alias(
    "ipndm_v",
    "lms",
    "iPNDM-v: variable-step iPNDM, whose weights are the exact Lagrange (lms) ones",
)
