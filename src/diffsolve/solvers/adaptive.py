"""Adaptive Dormand–Prince 5(4) on the probability-flow ODE: the black-box baseline.

The ODE is the one of :mod:`diffsolve.solvers.rk` (state y = x/α; variable u = log(σ/α) = −λ
or ρ = σ/α), integrated by the project's Dormand–Prince 5(4)
(:func:`diffsolve.integrate.dormand_prince`). Steps are accepted when the embedded error
estimate, an RMS per sample of (y₅ − y₄)/(atol + rtol·max(|y|, |y'|)) maximised over the batch
(DPM-Solver's norm, Lu et al. 2022 §5; in the sample's dtype), is at most 1; the next step
comes from a PID controller (Söderlind 2003; the parameterisation of diffrax's
``PIDController``):

    h' = h · clip(safety · E_n^{−β₁} · E_{n−1}^{−β₂} · E_{n−2}^{−β₃}, factor_min, factor_max),
    β₁ = (p + i + d)/5, β₂ = −(p + 2d)/5, β₃ = d/5.

With p = d = 0 and i = 1 this is the classical I-controller. Adaptive stepping needs the error
norm on the host: this solver reads it once per attempted step (the only solvers that sync).
The last stage is the first of the next step (FSAL), and with a clean end it also gives x̂_0 at
t_min, so the jump to σ = 0 costs no call.

Every accepted step's size, embedded error estimate EEst and stiffness estimate are kept
(:class:`~diffsolve.integrate.StepDiagnostics`, in the integration variable u = log ρ or ρ and
the state y = x/α) and reported as ``info.step_sizes``, ``info.local_errors``,
``info.stiffness`` (differentiable with ``grad="backprop"``): Pal et al.'s regularisers
R_E = Σ EEst·|h| and R_S = Σ S·|h| are ``info.diagnostics.error_regularizer()`` and
``.stiffness_regularizer()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..integrate import PIDController, StepDiagnostics, dormand_prince, initial_step
from ..processes.base import GaussianProcess
from .base import Grid, Model, Solver, State, host, register

__all__ = ["RK45"]


@dataclass(frozen=True)
class RK45State(State):
    grid: Grid = host()
    x0: Tensor | None = None  # x̂_0 at the end of the integration (FSAL), for the jump
    accepted: int = host(default=0)
    rejected: int = host(default=0)
    diagnostics: StepDiagnostics | None = host(default=None)


@register
@dataclass(frozen=True)
class RK45(Solver):
    """Dormand–Prince 5(4) with a PID step controller (module docstring).

    Options: ``rtol``, ``atol`` (on y = x/α), ``variable`` ("lambda" or "sigma"), ``h_init``
    (first step in the variable; default from Hairer et al. 1993, II.4), ``pcoeff``, ``icoeff``,
    ``dcoeff``, ``safety``, ``factor_min``, ``factor_max``, ``max_steps``.

    Call it without ``nfe``/``steps``: ``ds.sample(model, x_T, "rk45", rtol=1e-5)``; the grid
    is t_max → t_min (→ σ = 0). ``info.nfe`` reports the calls it made.
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
    description: ClassVar[str] = "adaptive Dormand–Prince 5(4) with a PID controller (baseline)"
    adaptive: ClassVar[bool] = True

    def validate(self) -> None:
        if self.variable not in ("lambda", "sigma"):
            raise ValueError(f"unknown variable {self.variable!r}; valid: lambda, sigma")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError("rtol and atol must be positive")

    @property
    def order(self) -> int:
        return 5

    def plan_times(self, process: GaussianProcess, schedule, nfe: int, clean_end: bool) -> Tensor:
        raise ValueError("rk45 chooses its own steps: call it without nfe= (set rtol/atol)")

    def init(self, x: Tensor, grid: Grid, model: Model, noise: object = None) -> RK45State:
        return RK45State(grid=grid)

    def step(self, x: Tensor, i: int, state: RK45State, model: Model) -> tuple[Tensor, RK45State]:
        if state.grid.is_final(i):
            if state.x0 is None:  # a single-step grid: only the jump
                return model(x, model.point(state.grid.t[i], x)).x0, state
            return state.x0, state
        return self._integrate(x, i, state, model)

    # -- the adaptive integration between two grid times ----------------------------------------
    def _integrate(self, x: Tensor, i: int, state: RK45State, model: Model):
        grid = state.grid
        proc = grid.process
        lam_var = self.variable == "lambda"
        r0, r1 = float(proc.rho(grid.t[i])), float(proc.rho(grid.t[i + 1]))
        v0, v1 = (math.log(r0), math.log(r1)) if lam_var else (r0, r1)

        def field(v: float, y: Tensor) -> tuple[Tensor, Tensor]:
            rho = math.exp(v) if lam_var else v
            t = proc.t_of_rho(rho)
            a = float(proc.alpha(t))
            x0 = model(a * y, model.point(t, y)).x0
            k = y - x0 if lam_var else (y - x0) / rho
            return k, x0

        y = x / float(grid.alpha[i])
        sol = dormand_prince(
            field,
            v0,
            v1,
            y,
            rtol=self.rtol,
            atol=self.atol,
            controller=PIDController(
                self.pcoeff,
                self.icoeff,
                self.dcoeff,
                self.safety,
                self.factor_min,
                self.factor_max,
            ),
            h0=_first_step if self.h_init is None else self.h_init,
            norm=_rms,
            max_steps=self.max_steps,
            name="rk45",
            record=True,
        )
        diag = StepDiagnostics.empty()
        if state.diagnostics is not None:
            diag.extend(state.diagnostics)
        assert sol.diagnostics is not None
        diag.extend(sol.diagnostics)
        new_state = state.replace(
            x0=sol.last[1],
            accepted=state.accepted + sol.steps,
            rejected=state.rejected + sol.rejected,
            diagnostics=diag,
        )
        return float(grid.alpha[i + 1]) * sol.y, new_state


def _rms_tensor(v: Tensor) -> Tensor:
    """Per-sample root-mean-square in the sample's dtype, maximised over the batch (0-d)."""
    ms = v.reshape(v.shape[0], -1).pow(2).mean(1)
    return ms.clamp_min(torch.finfo(ms.dtype).tiny).sqrt().max()  # finite gradient at 0


def _rms(v: Tensor) -> float:
    """:func:`_rms_tensor` on the host (the step control's one read)."""
    return float(_rms_tensor(v.detach()))


_rms.tensor = _rms_tensor  # type: ignore[attr-defined]  # the differentiable diagnostics' form


def _first_step(y: Tensor, k: Tensor) -> float:
    """Hairer et al.'s rule of thumb on the unscaled y and dy/dv."""
    return initial_step(y, k, 1.0, _rms)
