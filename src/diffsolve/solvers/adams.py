"""Adams–Bashforth multistep methods in ρ = σ/α: LMS, iPNDM and DEIS.

On y = x/α the PF-ODE is dy/dρ = ε̂ (Karras et al. 2022, eq. 4); a step integrates a polynomial
through the last k ε̂'s: the row x_{i+1} = (α_{i+1}/α_i)·x_i + Σ_j α_{i+1}·c_{ij}·ε̂_{i−j} (newest
first). Warm-up orders 1, 2, …; the step to σ = 0 returns x̂_0; ``euler_at_final``: the last step
Euler in ρ (DDIM). Derivations and peer notes: docs/solvers-multistep.md#lms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .base import FinalOrders, Grid, alias, check_order, register
from .engine import Row, RowSolver, StepRule

__all__ = ["DEIS", "IPNDM", "LMS", "finite_start", "lagrange_integral_weights", "lagrange_table"]

_IPNDM = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def finite_start(grid: Grid, name: str) -> Grid:
    """``grid`` with its first time moved to ``process.t_max_finite`` where α = 0 there (flow
    matching's t = 1): the run starts where σ/α is finite, as the logsnr and karras schedules do."""
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


def lagrange_table(
    u: np.ndarray, w: np.ndarray, nodes: np.ndarray, orders: np.ndarray | None = None
) -> np.ndarray:
    """c[i, j] = Σ_q w[i, q]·ℓ_j(u[i, q]) ≈ ∫ ℓ_j(u(ρ)) dρ (DEIS, Zhang & Chen 2023, eq. 12) for
    many steps at once, shape (n, k): u the interpolation variable at each step's quadrature
    points and w their weights in ρ, (n, Q); ``nodes`` each step's Lagrange nodes in u, newest
    first, (n, k), of which step i uses the first ``orders[i]`` (default all; c = 0 beyond)."""
    n, k = nodes.shape
    live = np.arange(k) < (np.full(n, k) if orders is None else np.asarray(orders))[:, None]
    d = np.where(live[:, :, None], u[:, None, :] - nodes[:, :, None], 1.0)  # (step, m, q)
    num = d.prod(axis=1, keepdims=True) / d  # Π_{m≠j}: quadrature points are never nodes
    pair = live[:, :, None] & live[:, None, :] & ~np.eye(k, dtype=bool)  # (step, j, m): ℓ_j ∋ m
    den = np.where(pair, nodes[:, :, None] - nodes[:, None, :], 1.0).prod(axis=2)
    out = (num * w[:, None, :]).sum(axis=2) / den
    return np.where(live, out, 0.0)


@lru_cache(maxsize=8)
def _gauss_legendre(n: int, pieces: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite n-point Gauss–Legendre rule on [0, 1], ``pieces`` equal panels: points and
    weights, exact for polynomials of degree < 2n."""
    x, wx = np.polynomial.legendre.leggauss(n)
    f = (np.arange(pieces)[:, None] + (x[None] + 1.0) / 2.0).ravel() / pieces
    return f, np.tile(wx, pieces) / (2.0 * pieces)


def lagrange_integral_weights(nodes: np.ndarray, a: float, b: float) -> np.ndarray:
    """∫_a^b ℓ_j(s) ds for the Lagrange basis ℓ_j on ``nodes`` (float64; exact: the basis has
    degree k − 1 and the Gauss–Legendre rule used is exact to degree 2·(k//2 + 1) − 1)."""
    f, wf = _gauss_legendre(len(nodes) // 2 + 1, 1)
    nodes = np.asarray(nodes, dtype=np.float64)
    return lagrange_table(a + (b - a) * f[None], (b - a) * wf[None], nodes[None])[0]


def _lagrange(
    rho: np.ndarray, orders: list[int], var: Any = None, u_grid: Any = None, quad: Any = None
) -> list[list[float]]:
    """c_{ij} = ∫_{ρ_i}^{ρ_{i+1}} ℓ_j(u(ρ)) dρ of steps i = 0, 1, … of order ``orders[i]`` (ℓ_j on
    u(ρ_i), u(ρ_{i−1}), …) in one pass: ``var`` maps ρ to u on float64 tensors (None: u = ρ,
    exact), ``u_grid`` is u at the grid points, ``quad`` (points, panels) the rule."""
    n, k = len(orders), max(orders)
    f, wf = _gauss_legendre(*(quad or (k // 2 + 1, 1)))
    d = rho[1 : n + 1, None] - rho[:n, None]
    q, w = rho[:n, None] + d * f, d * wf

    def u_of(r: np.ndarray) -> np.ndarray:
        return r if var is None else var(torch.from_numpy(np.ascontiguousarray(r))).numpy()

    u, at = u_of(q.ravel()).reshape(q.shape), u_of(rho[:n]) if u_grid is None else u_grid
    nodes = at[np.maximum(np.arange(n)[:, None] - np.arange(k), 0)]  # clamped: masked by order
    return lagrange_table(u, w, nodes, np.asarray(orders)).tolist()


@dataclass(frozen=True)
class _RhoAdams(RowSolver):
    """The rows of an Adams method in ρ (module docstring); subclasses give c_{ij}."""

    default_schedule: ClassVar[str] = "karras"
    max_order: ClassVar[int] = 4
    if TYPE_CHECKING:  # a field of each subclass, declared there to keep their field order
        euler_at_final: bool

    def validate(self) -> None:
        check_order(self.name, range(1, self.max_order + 1), order=self.order)
        lower = getattr(self, "lower_order_final", False)
        FinalOrders.of(self.name, lower, 15, self.euler_at_final)  # type checks

    def _orders(self, grid: Grid, steps: int) -> list[int]:
        # DEIS' lower_order_final (diffusers' threshold, 15), only without a clean end
        lower = getattr(self, "lower_order_final", False) and not grid.clean_end
        rule, n = FinalOrders.of(self.name, lower, 15, self.euler_at_final), grid.steps
        return [min(self.order, i + 1, rule.cap(i, n)) for i in range(steps)]

    def _table(self, grid: Grid, rho: np.ndarray, orders: list[int]) -> list[list[float]]:
        """c_{ij} of steps 0…len(orders) − 1: Lagrange in ρ, exact (lms)."""
        return _lagrange(rho, orders)

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        grid = finite_start(grid, self.name)
        rho = (grid.sigma / grid.alpha).numpy()
        if not np.isfinite(rho[0]):
            raise ValueError(
                f"{self.name} integrates in σ/α, which is infinite at t={float(grid.t[0])} "
                f"({grid.process!r}); start below it (e.g. schedule='karras' or t_max < 1)"
            )
        t, alpha = grid.lists("t", "alpha")
        last = grid.steps - int(grid.clean_end)  # then the step to σ = 0: x̂_0
        orders = self._orders(grid, last)
        table = self._table(grid, rho, orders) if last else []
        out = []
        for i, (k, c) in enumerate(zip(orders, table)):
            row = Row(alpha[i + 1] / alpha[i], (), tuple([alpha[i + 1] * cj for cj in c[:k]]))
            out.append(StepRule((t[i],), (), row))  # positional: a NamedTuple's fast path
        return (*out, StepRule((t[last],))) if grid.clean_end else tuple(out)


@register
@dataclass(frozen=True)
class LMS(_RhoAdams):
    """Linear multistep in ρ (k-diffusion ``sample_lms``; DEIS ρAB, Zhang & Chen 2023, eq. 14):
    c_{ij} = ∫_{ρ_i}^{ρ_{i+1}} ℓ_j(ρ) dρ, ℓ_j the Lagrange basis on ρ_i, ρ_{i−1}, …, exactly.
    ``order`` 1–4 (default 4, as k-diffusion). Shapes: x (B, ...)."""

    order: int = 4  # type: ignore[assignment]
    euler_at_final: bool = False
    name: ClassVar[str] = "lms"
    description: ClassVar[str] = "linear multistep in σ/α, exact Lagrange weights (k-diffusion)"


@register
@dataclass(frozen=True)
class IPNDM(_RhoAdams):
    """iPNDM (Zhang & Chen 2023, App. "iPNDM"): c_{ij} = (ρ_{i+1} − ρ_i)·[1], [3, −1]/2,
    [23, −16, 5]/12, [55, −59, 37, −9]/24, the equal-step Adams–Bashforth weights, on any grid
    (exact on equal steps in ρ only). ``order`` 1–4 (default 4). Shapes: x (B, ...)."""

    order: int = 4  # type: ignore[assignment]
    euler_at_final: bool = False
    name: ClassVar[str] = "ipndm"
    description: ClassVar[str] = "improved PNDM: fixed-weight Adams–Bashforth in σ/α (DEIS paper)"

    def _table(self, grid: Grid, rho: np.ndarray, orders: list[int]) -> list[list[float]]:
        d = (rho[1:] - rho[:-1]).tolist()
        return [[d[i] * w for w in _IPNDM[k - 1]] for i, k in enumerate(orders)]


@register
@dataclass(frozen=True)
class DEIS(_RhoAdams):
    """DEIS multistep (Zhang & Chen 2023, eq. 12 with ρ = σ/α): ε̂ extrapolated by a Lagrange
    polynomial in a variable u over the last k steps,

        x_{i+1} = (α_{i+1}/α_i)·x_i + α_{i+1}·Σ_j c_{ij}·ε̂_{i−j},
        c_{ij} = ∫_{ρ_i}^{ρ_{i+1}} ℓ_j(u(ρ)) dρ,

    ``variant`` ``"tab"`` (u = t, the paper's tAB-DEIS; 8×16-point Gauss–Legendre in float64),
    ``"rhoab"`` (u = ρ: ``lms``) or ``"logrho"`` (u = log ρ, diffusers' ``DEISMultistepScheduler``).
    ``order`` 1–3 (default 3); ``lower_order_final`` as diffusers (runs under 15 steps without a
    clean end). Shapes: x (B, ...). Notes: docs/solvers-multistep.md#deis."""

    order: int = 3  # type: ignore[assignment]
    variant: str = "tab"
    lower_order_final: bool = True
    euler_at_final: bool = False
    name: ClassVar[str] = "deis"
    description: ClassVar[str] = "DEIS multistep: exponential integrator, Lagrange ε̂ in t/ρ/log ρ"
    default_schedule: ClassVar[str] = "quadratic"
    max_order: ClassVar[int] = 3

    def validate(self) -> None:
        super().validate()
        if self.variant not in ("tab", "rhoab", "logrho"):
            raise ValueError(f"unknown variant {self.variant!r}; valid: tab, rhoab, logrho")

    def _table(self, grid: Grid, rho: np.ndarray, orders: list[int]) -> list[list[float]]:
        if self.variant == "rhoab":
            return _lagrange(rho, orders)
        if self.variant == "logrho":
            return _lagrange(rho, orders, torch.log, quad=(16, 8))
        return _lagrange(rho, orders, grid.process.t_of_rho, grid.t.numpy(), (16, 8))  # u = t


alias(
    "ipndm_v",
    "lms",
    "iPNDM-v: variable-step iPNDM, whose weights are the exact Lagrange (lms) ones",
)
