"""Euler / DDIM: the first-order exponential integrator, the first member of every family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..denoiser import EvalPoint
from .base import Grid, Model, Solver, State, alias, host, register

__all__ = ["Euler"]


@dataclass(frozen=True)
class EulerState(State):
    points: tuple[EvalPoint, ...] = host()
    coef: tuple[tuple[float, float], ...] = host()


@register
@dataclass(frozen=True)
class Euler(Solver):
    """DDIM (Song et al. 2021, eq. 12 with η = 0), written in the data form:

        x_t = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·x̂_0(x_s, s),   h = λ_t − λ_s.

    The same update is DPM-Solver-1 (Lu et al. 2022, eq. 3.7), DPM-Solver++(1), UniP-1, and
    Euler's method in σ/α on the state x/α (Karras et al. 2022, Alg. 1 without the Heun stage;
    k-diffusion ``sample_euler``). Order 1. The step to σ = 0 returns x̂_0.
    """

    name: ClassVar[str] = "euler"
    description: ClassVar[str] = "DDIM / Euler in σ/α: first-order exponential integrator"

    @property
    def order(self) -> int:
        return 1

    def init(self, x: Tensor, grid: Grid, model: Model, noise: object = None) -> EulerState:
        points = tuple(model.point(grid.t[i], x) for i in range(grid.steps))
        ratio = (grid.sigma[1:] / grid.sigma[:-1]).tolist()
        gain = (grid.alpha[1:] * -(grid.exp_neg_h - 1)).tolist()
        return EulerState(points=points, coef=tuple(zip(ratio, gain)))

    def step(self, x: Tensor, i: int, state: EulerState, model: Model) -> tuple[Tensor, EulerState]:
        x0 = model(x, state.points[i]).x0
        ratio, gain = state.coef[i]
        return ratio * x + gain * x0, state


alias("ddim", "euler", "alias of euler (DDIM, η = 0)")
