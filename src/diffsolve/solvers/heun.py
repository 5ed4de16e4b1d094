"""EDM's second-order Heun sampler with optional stochastic churn (Karras et al. 2022, Alg. 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..noise import NoiseSource
from ..processes.base import GaussianProcess
from .base import Grid, Model, check_choices, host, register
from .engine import Row, RowSolver, RowState, StepRule
from .rk import TABLEAUX, filled_budget, tableau_rules
from .singlestep import check_calls, singlestep_calls

__all__ = ["Heun"]


@dataclass(frozen=True)
class HeunState(RowState):
    """The engine's state plus each step's churn (scale, amount, t_i, t_{i+1}), applied to x
    before the step's first call: x ← scale·x + amount·z, z the noise over t_i → t_{i+1}."""

    churn: tuple[tuple[float, float, float, float], ...] = host(default=())


@register
@dataclass(frozen=True)
class Heun(RowSolver):
    """EDM's Heun sampler (Karras et al. 2022, Alg. 2; k-diffusion ``sample_heun``). On
    x̃ = x/α against ρ = σ/α (dx̃/dρ = ε̂), step i of N from ρ_i to ρ_{i+1}:

        ρ̂ = ρ_i·(1 + γ_i),   γ_i = min(S_churn/N, √2 − 1) if S_tmin ≤ ρ_i ≤ S_tmax else 0
        x̃̂ = x̃_i + sqrt(ρ̂² − ρ_i²)·S_noise·z,      x̃' = x̃̂ + (ρ_{i+1} − ρ̂)·ε̂(x̃̂, ρ̂)
        x̃_{i+1} = x̃̂ + (ρ_{i+1} − ρ̂)·(ε̂(x̃̂, ρ̂) + ε̂(x̃', ρ_{i+1}))/2

    The step to σ = 0 is Euler (x̂_0); a budget ``nfe=`` of the wrong parity makes the first
    step Euler. ``variable``: ``"rho"`` (the above), ``"t"`` (Heun on x in the process time,
    diffusers' ``FlowMatchHeunDiscreteScheduler``) or ``"auto"`` (``"t"`` on flow paths); churn
    needs ``"rho"``. Order 2. Shapes: x (B, ...). Details: docs/solvers-singlestep.md#heun.
    """

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    variable: str = "auto"

    name: ClassVar[str] = "heun"
    order: ClassVar[int] = 2
    description: ClassVar[str] = "EDM Heun (2nd order in σ/α, 2 NFE/step, last step Euler), churn"
    default_schedule: ClassVar[str] = "karras"

    def validate(self) -> None:
        if not self.s_churn >= 0:
            raise ValueError(f"heun: s_churn must be >= 0, got {self.s_churn!r}")
        if not self.s_noise >= 0:
            raise ValueError(f"heun: s_noise must be >= 0, got {self.s_noise!r}")
        if not self.s_tmin <= self.s_tmax:
            raise ValueError("heun: s_tmin must not exceed s_tmax")
        check_choices("heun", variable=(self.variable, ("auto", "rho", "t")))
        if self.variable == "t" and self.s_churn > 0:
            raise ValueError("heun: churn is defined in σ/α (EDM); use variable='rho' with s_churn")

    def in_time(self, process: GaussianProcess) -> bool:
        """Whether this run is Heun in t on x (``variable``, resolved for ``process``)."""
        if self.variable == "auto":
            return float(process.alpha(process.t_max)) == 0.0 and not self.s_churn > 0
        return self.variable == "t"

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.s_churn > 0

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        return singlestep_calls(2, steps, clean_end)

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        return filled_budget(2, nfe, clean_end)

    def _hats(self, grid: Grid) -> list[tuple[float, float, float, float]]:
        """Per step the churned start (t̂, α̂, ρ̂), ρ̂ ≤ ρ(t_max_finite), and the noise amount
        α̂·sqrt(ρ̂² − ρ_i²)·S_noise (0: no churn at this step)."""
        n, process = grid.steps, grid.process
        t, alpha = grid.t.tolist(), grid.alpha.tolist()
        rho = (grid.sigma / grid.alpha).tolist()
        rho_max = float(process.rho(process.t_max_finite)) if self.s_churn > 0 else math.inf
        out = []
        for i in range(n):
            gamma = min(self.s_churn / n, math.sqrt(2) - 1)
            gamma = gamma if self.s_tmin <= rho[i] <= self.s_tmax else 0.0
            rho_hat = min(rho[i] * (1 + gamma), rho_max)
            if not rho_hat > rho[i] * (1 + 1e-12):  # no churn (or none left after the clamp)
                out.append((t[i], alpha[i], rho[i], 0.0))
                continue
            t_hat = float(process.t_of_rho(rho_hat))
            a_hat = float(process.alpha(t_hat))
            amount = a_hat * math.sqrt(max(rho_hat**2 - rho[i] ** 2, 0.0)) * self.s_noise
            out.append((t_hat, a_hat, rho_hat, amount))
        return out

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        in_t = self.in_time(grid.process)
        if not in_t and float(grid.alpha[0]) <= 0:
            raise ValueError(
                "heun works on x/α and needs α > 0 at the first time; flow matching: start at "
                "t_max_finite (the karras and logsnr schedules do)"
            )
        check_calls("heun", grid, calls, 2)
        if in_t:
            return self._rules_in_t(grid, calls)
        # RK's heun2 in σ/α, each step from its churned start (t̂, α̂, ρ̂)
        starts = [(t_hat, a_hat, rho * a_hat, rho) for t_hat, a_hat, rho, _ in self._hats(grid)]
        return tableau_rules(grid, calls, TABLEAUX["heun2"], False, starts)

    def _rules_in_t(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        """Heun on dx/dt = c_x·x + c_0·x̂_0: Euler stage x' = (1 + Δc_x0)·x + Δc_00·x̂_0,0,
        update x + Δ/2·(u_0 + u_1), Δ = t_{i+1} − t_i."""
        p, t = grid.process, grid.t
        inner = t[:-1] if grid.clean_end else t  # σ > 0: where the velocity is evaluated
        alpha, sigma = p.alpha(inner), p.sigma(inner)
        ds_ = p.d_sigma(inner)
        cx = (ds_ / sigma).tolist()
        c0 = (p.d_alpha(inner) - ds_ * alpha / sigma).tolist()
        tl = t.tolist()
        out = []
        for i, k in enumerate(calls):
            if grid.is_final(i):
                out.append(StepRule((tl[i],)))
                continue
            d = tl[i + 1] - tl[i]
            euler = Row(1 + d * cx[i], (d * c0[i],))
            if k == 1:
                out.append(StepRule((tl[i],), update=euler))
                continue
            a = 1 + d / 2 * (cx[i] + cx[i + 1] * (1 + d * cx[i]))
            w = (d / 2 * c0[i + 1], d / 2 * (c0[i] + cx[i + 1] * d * c0[i]))
            out.append(StepRule((tl[i], tl[i + 1]), (euler,), Row(a, w)))
        return tuple(out)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> RowState:
        state = super().init(x, grid, model, noise)
        if not self.stochastic:
            return state
        t, alpha = grid.t.tolist(), grid.alpha.tolist()
        churn = tuple(
            (a_hat / alpha[i], amount, t[i], t[i + 1])
            for i, (_, a_hat, _, amount) in enumerate(self._hats(grid))
        )
        source = (noise if noise is not None else NoiseSource()).bind(grid)
        return HeunState(**{**vars(state), "noise": source, "churn": churn})

    def step(self, x: Tensor, i: int, state: RowState, model: Model) -> tuple[Tensor, RowState]:
        if isinstance(state, HeunState):  # churn: x at t_i → x̂ at t̂_i, then the step's rows
            scale, amount, t_from, t_to = state.churn[i]
            x = scale * x
            if amount > 0:
                x = x + amount * state.noise.randn_between(x, i, t_from, t_to)
        return super().step(x, i, state, model)
