"""Euler / DDIM: the first-order exponential integrator, the first member of every family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Grid, alias, register
from .engine import RowSolver, StepRule
from .singlestep import singlestep_rules

__all__ = ["Euler"]


@register
@dataclass(frozen=True)
class Euler(RowSolver):
    """DDIM (Song et al. 2021, eq. 12 with η = 0), written in the data form:

        x_t = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·x̂_0(x_s, s),   h = λ_t − λ_s.

    The same update is DPM-Solver-1 (Lu et al. 2022, eq. 3.7), DPM-Solver++(1), UniP-1, and
    Euler's method in σ/α on the state x/α (Karras et al. 2022, Alg. 1 without the Heun stage;
    k-diffusion ``sample_euler``). Order 1. The step to σ = 0 returns x̂_0. Shapes: x (B, ...).
    """

    name: ClassVar[str] = "euler"
    order: ClassVar[int] = 1
    description: ClassVar[str] = "DDIM / Euler in σ/α: first-order exponential integrator"

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        return singlestep_rules(grid, calls, data=True)  # order 1 on every step: DDIM


alias("ddim", "euler", "alias of euler (DDIM, η = 0)")
