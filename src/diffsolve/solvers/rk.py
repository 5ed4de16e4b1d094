"""Explicit Runge–Kutta methods on the probability-flow ODE, as Butcher tableaux on one engine.

The ODE is written for the α-scaled state y = x/α against the noise level ρ = σ/α
(Karras et al. 2022, eq. 4 after the change of variables):

* ``variable="sigma"``:  dy/dρ = ε̂ = (y − x̂_0)/ρ       (k-diffusion's σ-space; EDM's Heun)
* ``variable="lambda"``: dy/du = y − x̂_0,  u = log ρ = −λ (uniform in the half-log-SNR)

An s-stage method makes s network calls per step. The step to σ = 0 is the usual first-order
jump to x̂_0 (1 NFE). Budgets that are not 1 + s·k are filled with Euler steps at the noise end,
where the field is smoothest, so ``nfe=`` is met exactly; the order is then that of the tableau
only asymptotically.

Both fields are linear in ε̂: with w_j = 1 (sigma) or w_j = ρ_j (lambda), k_j = w_j·ε̂_j, so on
x = α·y stage j of a step from ρ_0 (α_0) is the row x_j = (α_j/α_0)·x + α_j·Σ_l Δ·a_jl·w_l·ε̂_l
and the update x' = (α_1/α_0)·x + α_1·Σ_l Δ·b_l·w_l·ε̂_l (Δ the step in the chosen variable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Grid, alias, register
from .engine import Row, RowSolver, StepRule

__all__ = ["RK", "TABLEAUX", "Tableau"]


@dataclass(frozen=True)
class Tableau:
    """A Butcher tableau (A strictly lower triangular, b, c) of classical order ``order``."""

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int

    @property
    def stages(self) -> int:
        return len(self.b)


TABLEAUX: dict[str, Tableau] = {
    "euler": Tableau(((),), (1.0,), (0.0,), 1),
    "heun2": Tableau(((), (1.0,)), (0.5, 0.5), (0.0, 1.0), 2),
    "midpoint": Tableau(((), (0.5,)), (0.0, 1.0), (0.0, 0.5), 2),
    "ralston2": Tableau(((), (2 / 3,)), (0.25, 0.75), (0.0, 2 / 3), 2),
    "kutta3": Tableau(((), (0.5,), (-1.0, 2.0)), (1 / 6, 2 / 3, 1 / 6), (0.0, 0.5, 1.0), 3),
    "heun3": Tableau(((), (1 / 3,), (0.0, 2 / 3)), (0.25, 0.0, 0.75), (0.0, 1 / 3, 2 / 3), 3),
    "ralston3": Tableau(((), (0.5,), (0.0, 0.75)), (2 / 9, 1 / 3, 4 / 9), (0.0, 0.5, 0.75), 3),
    "ssprk3": Tableau(((), (1.0,), (0.25, 0.25)), (1 / 6, 1 / 6, 2 / 3), (0.0, 1.0, 0.5), 3),
    "rk4": Tableau(
        ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        (1 / 6, 1 / 3, 1 / 3, 1 / 6),
        (0.0, 0.5, 0.5, 1.0),
        4,
    ),
    "rk38": Tableau(
        ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
        (1 / 8, 3 / 8, 3 / 8, 1 / 8),
        (0.0, 1 / 3, 2 / 3, 1.0),
        4,
    ),
}

VARIABLES = ("lambda", "sigma")


@register
@dataclass(frozen=True)
class RK(RowSolver):
    """Explicit Runge–Kutta on the PF-ODE in ρ = σ/α or in λ (module docstring).

    Options:
        tableau: one of ``TABLEAUX`` (``rk4`` by default).
        variable: ``"sigma"`` (default; at few NFE it is much more accurate than ``"lambda"``,
            whose explicit stages overshoot at the wide early steps) or ``"lambda"``.

    Step (y = x/α, Δ the step in the chosen variable): k_i = f(y + Δ·Σ_j a_ij·k_j, v + c_i·Δ),
    y' = y + Δ·Σ_i b_i·k_i (Butcher 2016, §23). Order = the tableau's.
    """

    tableau: str = "rk4"
    variable: str = "sigma"
    name: ClassVar[str] = "rk"
    description: ClassVar[str] = "explicit Runge–Kutta (Butcher tableaux) on the PF-ODE in σ/α or λ"
    default_schedule: ClassVar[str] = "karras"

    def validate(self) -> None:
        if self.tableau not in TABLEAUX:
            raise ValueError(f"unknown tableau {self.tableau!r}; valid: {', '.join(TABLEAUX)}")
        if self.variable not in VARIABLES:
            raise ValueError(f"unknown variable {self.variable!r}; valid: {', '.join(VARIABLES)}")

    @property
    def _tab(self) -> Tableau:
        return TABLEAUX[self.tableau]

    @property
    def order(self) -> int:
        return self._tab.order

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        """The tableau's stages on every step, then the jump to σ = 0 (one call)."""
        s = self._tab.stages
        return (s,) * (steps - 1) + (1,) if clean_end else (s,) * steps

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        """⌊B/s⌋ full steps after (B mod s) Euler fillers spend B = nfe − (jump) exactly."""
        s = self._tab.stages
        left = nfe - (1 if clean_end else 0)
        if left < 1 and not clean_end:
            raise ValueError("final='tmin' needs at least one network call per step")
        full, fillers = divmod(left, s)
        return (1,) * fillers + (s,) * full + ((1,) if clean_end else ())

    def stage_plan(
        self, r0: float, r1: float, n_stage: int
    ) -> tuple[list[float], tuple[tuple[float, ...], ...], tuple[float, ...]]:
        """Stage noise levels ρ and the step-scaled weights Δ·a_ij, Δ·b_i of one step from ρ_0
        to ρ_1 (an ``n_stage`` of 1 is an Euler filler)."""
        tab = self._tab if n_stage > 1 else TABLEAUX["euler"]
        lam_var = self.variable == "lambda"
        v0, v1 = (math.log(r0), math.log(r1)) if lam_var else (r0, r1)
        delta = v1 - v0
        rhos = []
        for c in tab.c:
            v = v0 + c * delta
            rhos.append(r0 if c == 0.0 else r1 if c == 1.0 else math.exp(v) if lam_var else v)
        a = tuple(tuple(delta * w for w in row) for row in tab.a)
        return rhos, a, tuple(delta * w for w in tab.b)

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        s, proc = self._tab.stages, grid.process
        t, alpha, sigma = grid.t.tolist(), grid.alpha.tolist(), grid.sigma.tolist()
        rho = (grid.sigma / grid.alpha).tolist()
        plans: list[tuple[list[float], tuple[tuple[float, ...], ...], tuple[float, ...]] | None]
        plans, inner = [], []  # per step (ρ's, Δ·a, Δ·b); the stage ρ's off the grid
        for i, k in enumerate(calls):
            if k not in ((1,) if grid.is_final(i) else (1, s)):
                raise ValueError(f"rk: step {i} cannot make {k} network calls")
            if grid.is_final(i):
                plans.append(None)
                continue
            made = self.stage_plan(rho[i], rho[i + 1], k)
            plans.append(made)
            inner += [r for r in made[0] if r not in (rho[i], rho[i + 1])]
        # the stage points off the grid, in one pass: t(ρ) and α there
        at: dict[float, tuple[float, float, float]] = {}
        if inner:
            tt = proc.t_of_rho(torch.tensor(inner, dtype=torch.float64))
            vals = zip(tt.tolist(), proc.alpha(tt).tolist(), proc.sigma(tt).tolist())
            at = dict(zip(inner, vals))
        lam_var = self.variable == "lambda"
        out = []
        for i, plan in enumerate(plans):
            if plan is None:
                out.append(StepRule((t[i],)))
                continue
            rhos, a, b = plan
            # grid points are taken as they are: no round trip through t_of_rho
            ends = {rho[j]: (t[j], alpha[j], sigma[j]) for j in (i, i + 1)}
            pts = [ends[r] if r in ends else at[r] for r in rhos]
            # k_l = w_l·ε̂_l: w = ρ at the point (lambda) or 1 (sigma)
            w = [p[2] / p[1] if lam_var else 1.0 for p in pts]
            stages = tuple(_row(alpha[i], p[1], row, w) for p, row in zip(pts[1:], a[1:]))
            update = _row(alpha[i], alpha[i + 1], b, w)
            out.append(StepRule(tuple(p[0] for p in pts), stages, update))
        return tuple(out)


def _row(alpha_0: float, alpha_j: float, coefs: tuple[float, ...], w: list[float]) -> Row:
    """x_j = (α_j/α_0)·x + α_j·Σ_l coefs_l·w_l·ε̂_l over the step's calls l (oldest first), as
    a row over the evaluations newest first."""
    return Row(alpha_j / alpha_0, eps=tuple(alpha_j * c * wl for c, wl in zip(coefs, w))[::-1])


alias("rk4", "rk", "classical 4th-order Runge–Kutta in σ/α", tableau="rk4")
