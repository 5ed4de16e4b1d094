"""EDM's second-order Heun sampler with optional stochastic churn (Karras et al. 2022, Alg. 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..processes.base import GaussianProcess
from .base import Grid, Model, host, register
from .engine import Row, RowSolver, RowState, StepRule

__all__ = ["Heun"]


@dataclass(frozen=True)
class HeunState(RowState):
    """The engine's state plus each step's churn (scale, amount, t_i, t_{i+1}):
    x ← scale·x + amount·z with z the noise over t_i → t_{i+1}, before the step's first call
    (a row cannot express it: it acts on x before any evaluation of the step)."""

    churn: tuple[tuple[float, float, float, float], ...] = host(default=())


@register
@dataclass(frozen=True)
class Heun(RowSolver):
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

    In x (α̂, α_{i+1} the α at t̂, t_{i+1}) the Euler stage and the Heun update are rows,
    x' = (α_{i+1}/α̂)·x̂ + α_{i+1}(ρ_{i+1} − ρ̂)·ε̂_0 and
    x_{i+1} = (α_{i+1}/α̂)·x̂ + α_{i+1}(ρ_{i+1} − ρ̂)·(ε̂_0 + ε̂_1)/2, read from the churned x̂.

    ``variable``: ``"rho"`` (the above), ``"t"`` (Heun on x itself in the process's time t,
    dx/dt = (σ'/σ)·x + (α' − σ'α/σ)·x̂_0: on rectified flow dx/dt = (x − x̂_0)/t, diffusers'
    ``FlowMatchHeunDiscreteScheduler`` and k-diffusion's ``sample_heun`` on a flow model in its
    σ = t convention), or ``"auto"`` (default): ``"t"`` on flow paths (α = 0 at t_max), where
    x/α at the start is x/t_min and Heun in ρ lost its first steps (relative error 10.5 at NFE 4
    on gmm2d with rectified flow), ``"rho"`` elsewhere. Churn is defined in ρ (EDM): it needs
    ``variable="rho"``.

    Order 2. Shapes: x (B, ...).
    """

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    variable: str = "auto"

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
        if self.variable not in ("auto", "rho", "t"):
            raise ValueError(f"heun: variable must be 'auto', 'rho' or 't', got {self.variable!r}")
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

    @property
    def order(self) -> int:
        return 2

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        return (2,) * (steps - 1) + (1,) if clean_end else (2,) * steps

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        # n steps: clean end 2n − 1 calls, tmin 2n; one call too many → the first step is Euler
        calls = self.calls(nfe // 2 + 1 if clean_end else (nfe + 1) // 2, clean_end)
        return (1, *calls[1:]) if sum(calls) > nfe else calls

    def _hats(self, grid: Grid) -> list[tuple[float, float, float, float]]:
        """Per step the churned start (t̂, α̂, ρ̂) and the noise amount α̂·sqrt(ρ̂² − ρ_i²)·S_noise
        (0: no churn at this step)."""
        n, process = grid.steps, grid.process
        t, alpha = grid.t.tolist(), grid.alpha.tolist()
        rho = (grid.sigma / grid.alpha).tolist()
        if not self.s_churn > 0:
            return [(t[i], alpha[i], rho[i], 0.0) for i in range(n)]
        rho_max = float(process.rho(process.t_max_finite))
        out = []
        for i in range(n):
            gamma = min(self.s_churn / n, math.sqrt(2) - 1)
            gamma = gamma if self.s_tmin <= rho[i] <= self.s_tmax else 0.0
            rho_hat = min(rho[i] * (1 + gamma), rho_max)
            if rho_hat > rho[i] * (1 + 1e-12):  # no churn left after the clamp at t_max
                t_hat = float(process.t_of_rho(rho_hat))
                a_hat = float(process.alpha(t_hat))
                amount = a_hat * math.sqrt(max(rho_hat**2 - rho[i] ** 2, 0.0)) * self.s_noise
                out.append((t_hat, a_hat, rho_hat, amount))
            else:
                out.append((t[i], alpha[i], rho[i], 0.0))
        return out

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        if self.in_time(grid.process):
            return self._rules_in_t(grid, calls)
        if float(grid.alpha[0]) <= 0:
            raise ValueError(
                "heun works on x/α and needs α > 0 at the first time; flow matching: start at "
                "t_max_finite (the karras and logsnr schedules do)"
            )
        t, alpha = grid.t.tolist(), grid.alpha.tolist()
        rho = (grid.sigma / grid.alpha).tolist()
        out = []
        for i, (k, (t_hat, a_hat, rho_hat, _)) in enumerate(zip(calls, self._hats(grid))):
            if k not in ((1,) if grid.is_final(i) else (1, 2)):
                raise ValueError(f"heun: step {i} cannot make {k} network calls")
            if grid.is_final(i):
                out.append(StepRule((t_hat,)))
                continue
            euler, delta = alpha[i + 1] / a_hat, alpha[i + 1] * (rho[i + 1] - rho_hat)
            if k == 1:
                out.append(StepRule((t_hat,), update=Row(euler, eps=(delta,))))
            else:
                half = Row(euler, eps=(0.5 * delta, 0.5 * delta))
                out.append(StepRule((t_hat, t[i + 1]), (Row(euler, eps=(delta,)),), half))
        return tuple(out)

    def _rules_in_t(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        """Heun on dx/dt = c_x·x + c_0·x̂_0 (class docstring): Euler stage
        x' = (1 + Δc_x0)·x + Δc_00·x̂_0,0, update x + Δ/2·(u_0 + u_1), Δ = t_{i+1} − t_i."""
        p, t = grid.process, grid.t
        inner = t[:-1] if grid.clean_end else t  # σ > 0: where the velocity is evaluated
        alpha, sigma = p.alpha(inner), p.sigma(inner)
        ds_ = p.d_sigma(inner)
        cx = (ds_ / sigma).tolist()
        c0 = (p.d_alpha(inner) - ds_ * alpha / sigma).tolist()
        tl = t.tolist()
        out = []
        for i, k in enumerate(calls):
            if k not in ((1,) if grid.is_final(i) else (1, 2)):
                raise ValueError(f"heun: step {i} cannot make {k} network calls")
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
        from ..noise import NoiseSource

        t, alpha = grid.t.tolist(), grid.alpha.tolist()
        churn = tuple(
            (a_hat / alpha[i], amount, t[i], t[i + 1])
            for i, (_, a_hat, _, amount) in enumerate(self._hats(grid))
        )
        source = (noise if noise is not None else NoiseSource()).bind(grid)
        return HeunState(
            rules=state.rules, points=state.points, keep=state.keep, noise=source, churn=churn
        )

    def step(self, x: Tensor, i: int, state: RowState, model: Model) -> tuple[Tensor, RowState]:
        if isinstance(state, HeunState):  # churn: x at t_i → x̂ at t̂_i, then the step's rows
            scale, amount, t_from, t_to = state.churn[i]
            if amount > 0:
                x = scale * x + amount * state.noise.randn_between(x, i, t_from, t_to)
            elif scale != 1.0:
                x = scale * x
        return super().step(x, i, state, model)
