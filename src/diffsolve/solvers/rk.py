"""Explicit Runge–Kutta methods on the probability-flow ODE, as Butcher tableaux on the engine
(and the rows of EDM's Heun, ``heun2`` in σ/α). Details: docs/solvers-singlestep.md#rk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Grid, alias, register
from .engine import Row, RowSolver, StepRule, known
from .singlestep import check_calls, singlestep_calls

__all__ = ["RK", "TABLEAUX", "Tableau", "filled_budget", "tableau_rules"]


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


@register
@dataclass(frozen=True)
class RK(RowSolver):
    """Explicit Runge–Kutta on the PF-ODE of y = x/α: dy/dρ = ε̂ in ρ = σ/α (``variable=
    "sigma"``, default) or dy/du = ρ·ε̂ in u = log ρ = −λ (``"lambda"``). With Δ the step in the
    variable v, k_i = f(y + Δ·Σ_j a_ij·k_j, v + c_i·Δ), y' = y + Δ·Σ_i b_i·k_i (Butcher 2016,
    §23): linear in ε̂, so each stage and the update is a row. ``tableau``: one of ``TABLEAUX``
    (``rk4`` by default). s stages make s calls a step, the step to σ = 0 one (x̂_0); budgets
    not 1 + s·k are filled with Euler steps at the noise end. Order = the tableau's. Shapes:
    x (B, ...).
    """

    tableau: str = "rk4"
    variable: str = "sigma"
    name: ClassVar[str] = "rk"
    description: ClassVar[str] = "explicit Runge–Kutta (Butcher tableaux) on the PF-ODE in σ/α or λ"
    default_schedule: ClassVar[str] = "karras"

    def validate(self) -> None:
        if self.tableau not in TABLEAUX:
            raise ValueError(f"unknown tableau {self.tableau!r}; valid: {', '.join(TABLEAUX)}")
        if self.variable not in ("lambda", "sigma"):
            raise ValueError(f"unknown variable {self.variable!r}; valid: lambda, sigma")

    @property
    def _tab(self) -> Tableau:
        return TABLEAUX[self.tableau]

    @property
    def order(self) -> int:
        return self._tab.order

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        return singlestep_calls(self._tab.stages, steps, clean_end)

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        return filled_budget(self._tab.stages, nfe, clean_end)

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        check_calls("rk", grid, calls, self._tab.stages)
        if float(grid.alpha[0]) == 0.0:
            raise ValueError(
                f"rk integrates y = x/α, undefined at t = {float(grid.t[0])!r} where α = 0 (a "
                "flow path's noise end): start at process.t_max_finite (the default schedules "
                "do), or use an exponential integrator such as 'dpmpp_2m' or 'heun'"
            )
        return tableau_rules(grid, calls, self._tab, self.variable == "lambda")


def filled_budget(stages: int, nfe: int, clean_end: bool) -> tuple[int, ...]:
    """⌊B/s⌋ full steps after (B mod s) Euler fillers spend B = nfe − (jump) exactly."""
    left = nfe - (1 if clean_end else 0)
    if left < 1 and not clean_end:
        raise ValueError("final='tmin' needs at least one network call per step")
    full, fillers = divmod(left, stages)
    return (1,) * fillers + (stages,) * full + ((1,) if clean_end else ())


def tableau_rules(
    grid: Grid,
    calls: Sequence[int],
    tab: Tableau,
    lam_var: bool,
    starts: Sequence[tuple[float, float, float, float]] | None = None,
) -> tuple[StepRule, ...]:
    """The rules of ``tab`` on ``grid`` (module docstring; a 1-call step is an Euler filler).
    ``starts``: each step's start (t, α, σ, ρ) where it is not the grid point (Heun's churn)."""
    proc = grid.process
    t, alpha, sigma = grid.lists("t", "alpha", "sigma")
    rho = [s / a if a else math.inf for s, a in zip(sigma, alpha)]  # σ/α
    starts = starts or list(zip(t, alpha, sigma, rho))
    final = grid.steps - 1 if grid.clean_end else -1
    # per step but the one to σ = 0: (tableau, stage ρ's, Δ); the stage ρ's off the grid
    plans, exp = {}, math.exp if lam_var else float  # float: v itself
    for i, k in enumerate(calls):
        if i != final:
            tb, r0, r1 = tab if k > 1 else TABLEAUX["euler"], starts[i][3], rho[i + 1]
            v0, v1 = (math.log(r0), math.log(r1)) if lam_var else (r0, r1)
            d = v1 - v0
            rs = [r0 if c == 0.0 else r1 if c == 1.0 else exp(v0 + c * d) for c in tb.c]
            plans[i] = tb, rs, d
    inner = [r for i, p in plans.items() for r in p[1] if r != starts[i][3] and r != rho[i + 1]]
    at: dict[float, tuple[float, float, float]] = {}
    if inner:  # the stage points off the grid, in one pass: t(ρ), α and σ there
        tt = proc.t_of_rho(torch.tensor(inner, dtype=torch.float64))
        a_in, s_in, _ = proc.coefficients(tt)
        at = dict(zip(inner, zip(tt.tolist(), a_in.tolist(), s_in.tolist())))
        known(grid, *zip(*at.values()))
    # each row's Δ-free weights a_ij (stages), b_i (update), newest call first
    rev = {tb: [r[::-1] for r in (*tb.a[1:], tb.b)] for tb in (tab, TABLEAUX["euler"])}
    out = []
    for i, (t0, a0, s0, r0) in enumerate(starts[: len(calls)]):
        if i == final:
            out.append(StepRule((t0,)))
            continue
        tb, rhos, d = plans[i]
        # the step's ends are taken as they are: no round trip through t_of_rho
        r1, e1 = rho[i + 1], (t[i + 1], alpha[i + 1], sigma[i + 1])
        pts = [e1 if r == r1 else (t0, a0, s0) if r == r0 else at[r] for r in rhos]
        # x_j = (α_j/α_0)·x + α_j·Σ_l Δ·a_jl·w_l·ε̂_l, w = ρ at the call (lambda) or 1 (sigma)
        w = [p[2] / p[1] for p in pts][::-1] if lam_var else None
        rows = []
        for (_, aj, _), cs in zip((*pts[1:], e1), rev[tb]):  # the stages', then the update's
            eps = (
                [aj * (d * c) for c in cs]
                if w is None
                else [aj * (d * c) * wl for c, wl in zip(cs, w[-len(cs) :])]
            )
            rows.append(Row(aj / a0, (), tuple(eps)))  # positional: a NamedTuple's fast path
        out.append(StepRule(tuple([p[0] for p in pts]), tuple(rows[:-1]), rows[-1]))
    return tuple(out)


alias("rk4", "rk", "classical 4th-order Runge–Kutta in σ/α", tableau="rk4")
