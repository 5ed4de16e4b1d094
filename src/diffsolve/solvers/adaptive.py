"""Adaptive Dormand–Prince 5(4) on the probability-flow ODE: the black-box baseline.

The ODE is the one of :mod:`diffsolve.solvers.rk` (state y = x/α; variable u = log(σ/α) = −λ
or ρ = σ/α). Steps are accepted when the embedded error estimate, an RMS per sample of
(y₅ − y₄)/(atol + rtol·max(|y|, |y'|)) maximised over the batch (DPM-Solver's norm, Lu et al.
2022 §5), is at most 1; the next step comes from a PID controller (Söderlind 2003; the
parameterisation of diffrax's ``PIDController``):

    h' = h · clip(safety · E_n^{−β₁} · E_{n−1}^{−β₂} · E_{n−2}^{−β₃}, factor_min, factor_max),
    β₁ = (p + i + d)/5, β₂ = −(p + 2d)/5, β₃ = d/5.

With p = d = 0 and i = 1 this is the classical I-controller. Adaptive stepping needs the error
norm on the host: this solver reads it once per attempted step (the only solvers that sync).
The last stage is the first of the next step (FSAL), and with a clean end it also gives x̂_0 at
t_min, so the jump to σ = 0 costs no call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..processes.base import GaussianProcess
from .base import Grid, Model, Solver, State, host, register

__all__ = ["RK45"]

# Dormand & Prince (1980), J. Comput. Appl. Math. 6, Table 2 (RK5(4)7M); shared with the
# benchmark's own reference integrator (diffsolve.bench.reference.dopri5)
DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DP_ERR = tuple(b5 - b4 for b5, b4 in zip(DP_B5, DP_B4))


@dataclass(frozen=True)
class RK45State(State):
    grid: Grid = host()
    x0: Tensor | None = None  # x̂_0 at the end of the integration (FSAL), for the jump
    accepted: int = host(default=0)
    rejected: int = host(default=0)


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
        direction = math.copysign(1.0, v1 - v0)

        def field(y: Tensor, v: float) -> tuple[Tensor, Tensor]:
            rho = math.exp(v) if lam_var else v
            t = proc.t_of_rho(rho)
            a = float(proc.alpha(t))
            x0 = model(a * y, model.point(t, y)).x0
            k = y - x0 if lam_var else (y - x0) / rho
            return k, x0

        y = x / float(grid.alpha[i])
        k1, x0 = field(y, v0)
        if self.h_init is not None:
            h = abs(self.h_init)
        else:
            d0 = float(_rms(y).max())
            d1 = float(_rms(k1).max())
            h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
        h = min(h, abs(v1 - v0))
        v = v0
        inv_prev, inv_prev2 = 1.0, 1.0
        k_exp = 5.0  # error estimator of order 4: exponents divide by 4 + 1
        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / k_exp
        b2 = -(self.pcoeff + 2 * self.dcoeff) / k_exp
        b3 = self.dcoeff / k_exp
        accepted = rejected = 0
        while direction * (v1 - v) > 1e-12 * max(1.0, abs(v1)):
            if accepted + rejected >= self.max_steps:
                raise RuntimeError(f"rk45 exceeded max_steps={self.max_steps}")
            last = h >= abs(v1 - v) * (1 - 1e-12)
            hs = abs(v1 - v) if last else h
            dv = direction * hs
            ks = [k1]
            for j in range(1, 7):
                yj = y
                for a, k in zip(DP_A[j], ks):
                    if a != 0.0:
                        yj = yj + (dv * a) * k
                v_stage = v1 if (last and DP_C[j] == 1.0) else v + DP_C[j] * dv
                kj, x0j = field(yj, v_stage)
                ks.append(kj)
            y_new = yj  # row 7 of A is b5: the last stage point is the 5th-order solution
            err = ks[0] * (dv * DP_ERR[0])
            for e, k in zip(DP_ERR[1:], ks[1:]):
                if e != 0.0:
                    err = err + (dv * e) * k
            scale = self.atol + self.rtol * torch.maximum(y.abs(), y_new.abs())
            e_n = float(_rms(err / scale).max())  # the host sync of adaptive stepping
            if not math.isfinite(e_n):
                raise FloatingPointError(f"rk45: non-finite error estimate at ρ-variable {v}")
            inv = 1.0 / max(e_n, 1e-10)
            if e_n <= 1.0:
                accepted += 1
                v = v1 if last else v + dv
                y, k1, x0 = y_new, ks[6], x0j
                factor = self.safety * inv**b1 * inv_prev**b2 * inv_prev2**b3
                inv_prev2, inv_prev = inv_prev, inv
            else:
                rejected += 1
                factor = self.safety * inv**b1
                factor = min(factor, 1.0)
            h = hs * min(self.factor_max, max(self.factor_min, factor))
        new_state = state.replace(
            x0=x0, accepted=state.accepted + accepted, rejected=state.rejected + rejected
        )
        return float(grid.alpha[i + 1]) * y, new_state


def _rms(v: Tensor) -> Tensor:
    """Per-sample root-mean-square, shape (B,)."""
    return v.reshape(v.shape[0], -1).pow(2).mean(1).sqrt()
