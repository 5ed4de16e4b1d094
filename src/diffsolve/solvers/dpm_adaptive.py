"""Adaptive DPM-Solver-12/23 (Lu et al., NeurIPS 2022, §5 and Alg. 4): embedded singlestep
pairs in λ. Details: docs/solvers-singlestep.md#dpm_adaptive."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..denoiser import Prediction
from ..integrate import StepDiagnostics
from ..processes.base import GaussianProcess
from .adaptive import AdaptiveSolver, AdaptiveState
from .base import Grid, Model, check_bools, check_choices, check_order, host, register
from .dpm_solver import SOLVER_TYPES
from .engine import combine
from .singlestep import combination, stage_rows

__all__ = ["DPMAdaptive"]

CONTROLLERS = ("official", "k-diffusion")


@dataclass(frozen=True)
class DPMAdaptiveState(AdaptiveState):
    h: float = host(kw_only=True)  # the controller's next step size in λ (kept across intervals)
    inv_errs: tuple[float, ...] = host(default=())  # k-diffusion's PID memory 1/E_n, 1/E_{n−1}, …
    x_prev: Tensor | None = None  # x_low of the last accepted step, in the norm's scale


def _point(process: GaussianProcess, t: float) -> tuple[float, float, float, float]:
    """(t, α, σ, λ) of a process time, all from t so that the coefficients match the point."""
    tt = torch.tensor(t, dtype=torch.float64)
    return t, float(process.alpha(tt)), float(process.sigma(tt)), float(process.lambda_(tt))


@register
@dataclass(frozen=True)
class DPMAdaptive(AdaptiveSolver[DPMAdaptiveState]):
    """DPM-Solver-12 / -23: each attempted step runs the singlestep pair (one set of calls)

        order 2: x_low = DDIM,                    x_high = DPM-Solver-2 (r1 = ½)
        order 3: x_low = DPM-Solver-2 (r1 = ⅓),   x_high = DPM-Solver-3 (r1 = ⅓, r2 = ⅔)

    (``solver_type``; ``data``: the DPM-Solver++ form) with E the RMS of (x_high − x_low)/δ,
    δ = max(atol, rtol·max(|x_low|, |x_prev|)), read on the host once per attempt;
    ``controller="official"``: accept if E ≤ 1, h ← θ·h·E^{−1/order} (defaults ``h_init``
    0.05, ``atol`` 0.0078, ``rtol`` 0.05, ``theta`` 0.9); ``"k-diffusion"``: its PID
    (``pcoeff``, ``icoeff``, ``dcoeff``, ``accept_safety``). The call at λ_s is kept across
    rejections. Call it without ``nfe``/``steps``; ``times=`` adds points to pass through.
    ``info.step_sizes``/``local_errors``: the accepted steps. Shapes: x (B, ...).
    """

    order: int = 3
    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    theta: float = 0.9
    controller: str = "official"
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    accept_safety: float = 0.81
    solver_type: str = "dpmsolver"
    data: bool = False
    max_steps: int = 100_000

    name: ClassVar[str] = "dpm_adaptive"
    description: ClassVar[str] = "adaptive DPM-Solver-12/23 (embedded singlestep pair in λ)"

    def validate(self) -> None:
        check_order("dpm_adaptive", (2, 3), order=self.order)
        if not (self.rtol >= 0 and self.atol > 0 and self.h_init > 0 and 0 < self.theta):
            raise ValueError("dpm_adaptive: need atol > 0, rtol >= 0, h_init > 0, theta > 0")
        check_choices(
            "dpm_adaptive",
            controller=(self.controller, CONTROLLERS),
            solver_type=(self.solver_type, SOLVER_TYPES),
        )
        check_bools("dpm_adaptive", data=self.data)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: object = None) -> DPMAdaptiveState:
        last = grid.steps - 1 if grid.clean_end else grid.steps
        if not all(math.isfinite(v) for v in grid.lam.tolist()[: last + 1]):
            raise ValueError(
                "dpm_adaptive steps in λ: its grid needs finite λ (start at t_max_finite)"
            )
        return DPMAdaptiveState(grid=grid, h=self.h_init)

    def _pair(
        self, proc: GaussianProcess, x: Tensor, s: tuple[float, float, float, float],
        t: tuple[float, float, float, float], pred_s: Prediction, model: Model,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(x_low, x_high) of one attempted step from s to t (each a (t, α, σ, λ) tuple)."""
        _, _, s_s, lam_s = s
        _, a_t, s_t, lam_t = t
        h = lam_t - lam_s
        fracs = (1 / 3, 2 / 3) if self.order == 3 else (1 / 2,)
        lam_st = torch.tensor([lam_s + r * h for r in fracs], dtype=torch.float64)
        st = [_point(proc, u) for u in proc.t_of_lambda(lam_st).tolist()]
        ends = ((lam_s, s_s), (a_t, s_t), (s_t / s_s, a_t * -math.expm1(-h)))
        stages, high = stage_rows(self.order, h, st, *ends, self.data, self.solver_type)
        if self.order == 3:  # the lower order: DPM-Solver-2 with r1 = ⅓ on the first stage
            low = stage_rows(2, h, st[:1], *ends, self.data, self.solver_type)[1]
        else:  # DDIM
            low = combination(1, ends[2][0], ends[2][1:])
        preds = [pred_s]
        for (tu, *_), row in zip(st, stages):
            u = combine(row, x, preds[::-1], None)
            preds.append(model(u, model.point(torch.tensor(tu, dtype=torch.float64), x)))
        x_low = combine(low, x, preds[: self.order - 1][::-1], None)
        return x_low, combine(high, x, preds[::-1], None)

    def integrate(
        self, x: Tensor, i: int, state: DPMAdaptiveState, model: Model
    ) -> tuple[Tensor, DPMAdaptiveState]:
        grid, proc = state.grid, state.grid.process
        s = _point(proc, float(grid.t[i]))
        end = (float(grid.t[i + 1]), float(grid.alpha[i + 1]), float(grid.sigma[i + 1]),
               float(grid.lam[i + 1]))  # fmt: skip
        kd = self.controller == "k-diffusion"
        h, inv_errs = state.h, state.inv_errs
        x_prev = state.x_prev if state.x_prev is not None else (x / s[1] if kd else x)
        pred_s = None
        accepted = rejected = 0
        diag = StepDiagnostics.empty()
        tol = 1e-12 * max(1.0, abs(end[3]))
        while end[3] - s[3] > tol:
            if accepted + rejected >= self.max_steps:
                raise RuntimeError(f"dpm_adaptive exceeded max_steps={self.max_steps}")
            remaining = end[3] - s[3]
            hs = min(h, remaining)
            t = end if hs >= remaining * (1 - 1e-12) else _point(
                proc, float(proc.t_of_lambda(torch.tensor(s[3] + hs, dtype=torch.float64)))
            )  # fmt: skip
            if pred_s is None:
                pred_s = model(x, model.point(torch.tensor(s[0], dtype=torch.float64), x))
            x_low, x_high = self._pair(proc, x, s, t, pred_s, model)
            lo, hi = (x_low / t[1], x_high / t[1]) if kd else (x_low, x_high)
            delta = torch.clamp(self.rtol * torch.maximum(lo.abs(), x_prev.abs()), min=self.atol)
            q = ((hi - lo) / delta).reshape(x.shape[0], -1)
            err = q.pow(2).mean().sqrt() if kd else q.pow(2).mean(1).sqrt().max()
            e = float(err.detach())  # the host sync of adaptive stepping
            if not math.isfinite(e):
                raise FloatingPointError(f"dpm_adaptive: non-finite error estimate at λ={s[3]}")
            if kd:
                accept, h, inv_errs = self._pid(e, h, inv_errs)
            else:
                accept = e <= 1.0
            if accept:
                accepted += 1
                diag.u.append(s[3])
                diag.step_sizes.append(hs)
                diag.local_errors.append(err)
                x, x_prev, s, pred_s = x_high, lo, t, None
            else:
                rejected += 1
            if not kd:  # clipped to the interval, unless it landed on the end: then carried
                h = self.theta * hs * max(e, 1e-300) ** (-1.0 / self.order)
                h = min(h, end[3] - s[3]) if end[3] > s[3] else h
        new = state.tally(accepted, rejected, diag, h=h, inv_errs=inv_errs, x_prev=x_prev)
        return x, new

    def _pid(
        self, e: float, h: float, inv_errs: tuple[float, ...]
    ) -> tuple[bool, float, tuple[float, ...]]:
        """k-diffusion's ``PIDStepSizeController.propose_step`` (eps = 1e-8)."""
        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / self.order
        b2 = -(self.pcoeff + 2 * self.dcoeff) / self.order
        b3 = self.dcoeff / self.order
        inv = 1.0 / (e + 1e-8)
        errs = [inv, *inv_errs[1:]] if inv_errs else [inv, inv, inv]
        factor = 1 + math.atan(errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3 - 1)
        accept = factor >= self.accept_safety
        if accept:
            errs = [errs[0], errs[0], errs[1]]
        return accept, h * factor, tuple(errs)
