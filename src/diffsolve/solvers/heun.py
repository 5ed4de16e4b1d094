"""EDM's second-order Heun sampler with optional stochastic churn (Karras et al. 2022, Alg. 2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..denoiser import EvalPoint
from ..noise import NoiseSource, bind
from ..processes.base import GaussianProcess
from .base import Grid, Model, Solver, State, host, register

__all__ = ["Heun"]


@dataclass(frozen=True)
class _HeunStep:
    """Step i as Python floats (see :class:`Heun`): churn, then Euler, then the Heun average."""

    scale: float  # α̂/α_i: x at t_i → x at t̂_i
    noise: float  # α̂·sqrt(ρ̂² − ρ_i²)·S_noise (0: no churn at this step)
    euler: float  # α_{i+1}/α̂: x̂ → x̃-state carried to t_{i+1}
    delta: float  # α_{i+1}·(ρ_{i+1} − ρ̂)
    kind: str  # "heun", "euler" (one evaluation) or "final" (returns x̂_0)


@dataclass(frozen=True)
class HeunState(State):
    hat: tuple[EvalPoint, ...] = host()  # evaluation at (t̂_i): the churned start of step i
    nxt: tuple[EvalPoint | None, ...] = host()  # second evaluation at t_{i+1}
    plan: tuple[_HeunStep, ...] = host()
    noise: Any = host(default=None)


@register
@dataclass(frozen=True)
class Heun(Solver):
    """EDM's Heun sampler (Karras et al. 2022, Alg. 2; k-diffusion ``sample_heun``).

    In ρ = σ/α on x̃ = x/α the probability-flow ODE is dx̃/dρ = ε̂(x̃, ρ) = (x̃ − x̂_0)/ρ
    (Alg. 2 with σ → ρ, s(t) = α). Step i of N, from ρ_i to ρ_{i+1}:

        γ_i = min(S_churn/N, √2 − 1) if S_tmin ≤ ρ_i ≤ S_tmax else 0,   ρ̂ = ρ_i·(1 + γ_i)
        x̃̂ = x̃_i + sqrt(ρ̂² − ρ_i²)·S_noise·z,                  z ~ N(0, I)
        x̃' = x̃̂ + (ρ_{i+1} − ρ̂)·ε̂(x̃̂, ρ̂)                              (Euler)
        x̃_{i+1} = x̃̂ + (ρ_{i+1} − ρ̂)·(ε̂(x̃̂, ρ̂) + ε̂(x̃', ρ_{i+1}))/2     (Heun, if ρ_{i+1} > 0)

    The step to σ = 0 is Euler, i.e. returns x̂_0(x̃̂, ρ̂). With N grid points plus the clean end
    this is 2N − 1 network calls; with ``final="tmin"`` (no clean end) every step is Heun. ρ̂ is
    clamped to ρ(t_max) so the network stays on its range (EDM clamps σ likewise). S_churn = 0
    (the default) is deterministic; otherwise noise comes from the run's NoiseSource.

    NFE budgets (``nfe=N``): with a clean end an odd N uses (N+1)/2 grid points; an even N uses
    N/2 + 1 points and makes the *first* step Euler (at high noise x̂_0 barely moves, so Euler
    loses least there). With ``final="tmin"`` likewise with one step Euler when N is odd.

    Order 2. Shapes: x (B, ...).
    """

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    name: ClassVar[str] = "heun"
    description: ClassVar[str] = "EDM Heun (2nd order in σ/α, 2 NFE/step, last step Euler), churn"
    default_schedule: ClassVar[str] = "karras"

    def validate(self) -> None:
        if not self.s_churn >= 0:
            raise ValueError(f"heun: s_churn must be >= 0, got {self.s_churn!r}")
        if not self.s_noise >= 0:
            raise ValueError(f"heun: s_noise must be >= 0, got {self.s_noise!r}")
        if not self.s_tmin <= self.s_tmax:
            raise ValueError("heun: s_tmin must not exceed s_tmax")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.s_churn > 0

    @property
    def order(self) -> int:
        return 2

    def nfe_of(self, steps: int, clean_end: bool) -> int:
        return 2 * steps - 1 if clean_end else 2 * steps

    def plan_times(
        self,
        process: GaussianProcess,
        schedule: Callable[[GaussianProcess, int], Tensor],
        nfe: int,
        clean_end: bool,
    ) -> Tensor:
        # n points: clean end 2n − 1 calls, tmin 2(n − 1); one too many → the first step is Euler
        return schedule(process, nfe // 2 + 1 if clean_end else (nfe + 1) // 2 + 1)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> HeunState:
        n = grid.steps
        if float(grid.alpha[0]) <= 0:
            raise ValueError(
                "heun works on x/α and needs α > 0 at the first time; flow matching: start at "
                "t_max_finite (the karras and logsnr schedules do)"
            )
        euler_first = grid.nfe is not None and grid.nfe == self.nfe_of(n, grid.clean_end) - 1
        process = grid.process
        rho = (grid.sigma / grid.alpha).tolist()
        rho_max = float(process.rho(process.t_max_finite))
        hat, nxt, plan = [], [], []
        for i in range(n):
            gamma = min(self.s_churn / n, math.sqrt(2) - 1)
            gamma = gamma if self.s_tmin <= rho[i] <= self.s_tmax else 0.0
            a_i = float(grid.alpha[i])
            rho_hat = min(rho[i] * (1 + gamma), rho_max)
            if rho_hat > rho[i] * (1 + 1e-12):  # no churn left after the clamp at t_max
                t_hat = float(process.t_of_rho(rho_hat))
                a_hat = float(process.alpha(t_hat))
                amount = a_hat * math.sqrt(max(rho_hat**2 - rho[i] ** 2, 0.0)) * self.s_noise
            else:
                rho_hat, t_hat, a_hat, amount = rho[i], float(grid.t[i]), a_i, 0.0
            a_next = float(grid.alpha[i + 1])
            if grid.is_final(i):
                kind = "final"
            elif i == 0 and euler_first:
                kind = "euler"
            else:
                kind = "heun"
            hat.append(model.point(t_hat, x))
            nxt.append(model.point(grid.t[i + 1], x) if kind == "heun" else None)
            plan.append(
                _HeunStep(
                    scale=a_hat / a_i,
                    noise=amount,
                    euler=a_next / a_hat,
                    delta=a_next * (rho[i + 1] - rho_hat),
                    kind=kind,
                )
            )
        if noise is None and self.stochastic:
            noise = NoiseSource()
        source = bind(noise, grid) if noise is not None else None
        return HeunState(hat=tuple(hat), nxt=tuple(nxt), plan=tuple(plan), noise=source)

    def step(self, x: Tensor, i: int, state: HeunState, model: Model) -> tuple[Tensor, HeunState]:
        p = state.plan[i]
        if p.noise > 0:
            x = p.scale * x + p.noise * state.noise.randn_like(x, i)
        elif p.scale != 1.0:
            x = p.scale * x
        pred = model(x, state.hat[i])
        if p.kind == "final":
            return pred.x0, state
        x_euler = p.euler * x + p.delta * pred.eps
        if p.kind == "euler":
            return x_euler, state
        eps2 = model(x_euler, state.nxt[i]).eps  # type: ignore[arg-type]
        return p.euler * x + (0.5 * p.delta) * (pred.eps + eps2), state
