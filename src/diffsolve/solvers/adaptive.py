"""Adaptive Dormand–Prince 5(4) on the probability-flow ODE (the black-box baseline), and what
the adaptive solvers share: a state with the step tally and diagnostics, no ``nfe=`` budget, the
jump to σ = 0. Details: docs/solvers-singlestep.md#rk45.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from ..integrate import PIDController, StepDiagnostics, dormand_prince, initial_step
from .base import Grid, Model, Solver, State, host, register

__all__ = ["RK45", "AdaptiveSolver", "AdaptiveState"]

A = TypeVar("A", bound="AdaptiveState")


@dataclass(frozen=True)
class AdaptiveState(State):
    """An adaptive run: its grid, x̂_0 at the end of the integration if known (FSAL, for the
    jump to σ = 0), the accepted and rejected steps and their diagnostics so far."""

    grid: Grid = host()
    x0: Tensor | None = None
    accepted: int = host(default=0)
    rejected: int = host(default=0)
    diagnostics: StepDiagnostics | None = host(default=None)

    def tally(self: A, accepted: int, rejected: int, diag: StepDiagnostics, **changes: Any) -> A:
        """This state after one grid interval's steps, their diagnostics appended."""
        joined = StepDiagnostics.empty()
        joined.extend(self.diagnostics or StepDiagnostics.empty())
        joined.extend(diag)
        return self.replace(
            accepted=self.accepted + accepted, rejected=self.rejected + rejected,
            diagnostics=joined, **changes,
        )  # fmt: skip


class AdaptiveSolver(Solver[A]):
    """A solver that chooses its own steps between the grid's times (no ``nfe=`` budget); the
    step to σ = 0 returns the carried x̂_0, or makes one call."""

    adaptive: ClassVar[bool] = True

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        raise ValueError(f"{self.name} chooses its own steps: call it without nfe= (set rtol/atol)")

    def step(self, x: Tensor, i: int, state: A, model: Model) -> tuple[Tensor, A]:
        if not state.grid.is_final(i):
            return self.integrate(x, i, state, model)
        if state.x0 is None:
            return model(x, model.point(state.grid.t[i], x)).x0, state
        return state.x0, state

    def integrate(self, x: Tensor, i: int, state: A, model: Model) -> tuple[Tensor, A]:
        """x at grid time i + 1 from x at grid time i, by adaptive steps."""
        raise NotImplementedError


@register
@dataclass(frozen=True)
class RK45(AdaptiveSolver[AdaptiveState]):
    """Dormand–Prince 5(4) (:func:`diffsolve.integrate.dormand_prince`) on :mod:`.rk`'s ODE,
    y = x/α against u = log(σ/α) = −λ (``variable="lambda"``) or ρ = σ/α (``"sigma"``). A step
    is accepted when the per-sample RMS of (y₅ − y₄)/(atol + rtol·max(|y|, |y'|)), maximised
    over the batch in the sample's dtype, is ≤ 1; the PID controller (``pcoeff``, ``icoeff``,
    ``dcoeff``, ``safety``, ``factor_min``, ``factor_max``) sets the next step; ``h_init``
    default: Hairer et al. 1993, II.4. Call it without ``nfe``/``steps``; the last stage's x̂_0
    gives the jump to σ = 0. ``info.step_sizes/local_errors/stiffness`` report the accepted
    steps. Order 5. Shapes: x (B, ...).
    """

    rtol: float = 1e-5
    atol: float = 1e-5
    variable: str = "lambda"
    h_init: float | None = None
    pcoeff: float = 0.3
    icoeff: float = 0.4
    dcoeff: float = 0.0
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    max_steps: int = 100_000

    name: ClassVar[str] = "rk45"
    order: ClassVar[int] = 5
    description: ClassVar[str] = "adaptive Dormand–Prince 5(4) with a PID controller (baseline)"

    def validate(self) -> None:
        if self.variable not in ("lambda", "sigma"):
            raise ValueError(f"unknown variable {self.variable!r}; valid: lambda, sigma")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError("rtol and atol must be positive")

    def init(self, x: Tensor, grid: Grid, model: Model, noise: object = None) -> AdaptiveState:
        return AdaptiveState(grid=grid)

    def integrate(
        self, x: Tensor, i: int, state: AdaptiveState, model: Model
    ) -> tuple[Tensor, AdaptiveState]:
        grid, proc = state.grid, state.grid.process
        lam_var = self.variable == "lambda"
        r0, r1 = float(proc.rho(grid.t[i])), float(proc.rho(grid.t[i + 1]))
        v0, v1 = (math.log(r0), math.log(r1)) if lam_var else (r0, r1)

        def field(v: float, y: Tensor) -> tuple[Tensor, Tensor]:
            rho = math.exp(v) if lam_var else v
            t = proc.t_of_rho(rho)
            x0 = model(float(proc.alpha(t)) * y, model.point(t, y)).x0
            return (y - x0 if lam_var else (y - x0) / rho), x0

        pid = PIDController(
            self.pcoeff, self.icoeff, self.dcoeff, self.safety, self.factor_min, self.factor_max
        )
        sol = dormand_prince(
            field, v0, v1, x / float(grid.alpha[i]), rtol=self.rtol, atol=self.atol,
            controller=pid, h0=_first_step if self.h_init is None else self.h_init, norm=_rms,
            max_steps=self.max_steps, name="rk45", record=True,
        )  # fmt: skip
        assert sol.diagnostics is not None
        new = state.tally(sol.steps, sol.rejected, sol.diagnostics, x0=sol.last[1])
        return float(grid.alpha[i + 1]) * sol.y, new


def _rms_tensor(v: Tensor) -> Tensor:
    """Per-sample root-mean-square in the sample's dtype, maximised over the batch (0-d)."""
    ms = v.reshape(v.shape[0], -1).pow(2).mean(1)
    return ms.clamp_min(torch.finfo(ms.dtype).tiny).sqrt().max()  # finite gradient at 0


def _rms(v: Tensor) -> float:
    """:func:`_rms_tensor` on the host (the step control's one read)."""
    return float(_rms_tensor(v.detach()))


_rms.tensor = _rms_tensor  # type: ignore[attr-defined]  # the differentiable diagnostics' form

_first_step = partial(initial_step, scale=1.0, norm=_rms)  # Hairer et al.'s, on the unscaled y
