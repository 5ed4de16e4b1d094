"""Adaptive DPM-Solver (Lu et al., NeurIPS 2022, §5 and Alg. 4): embedded singlestep pairs in λ.

Each attempted step from λ_s with size h runs the higher-order singlestep DPM-Solver and reads
the lower-order one off the same evaluations (no extra call):

    order 2 (DPM-Solver-12): x_low = DDIM,                    x_high = DPM-Solver-2 (r1 = ½)
    order 3 (DPM-Solver-23): x_low = DPM-Solver-2 (r1 = ⅓),   x_high = DPM-Solver-3 (r1 = ⅓, r2 = ⅔)

(the updates of :func:`.singlestep._stages`, in the noise form or, with ``data=True``, the
DPM-Solver++ data form). The error of the pair, with δ = max(atol, rtol·max(|x_low|, |x_prev|))
elementwise (x_prev: x_low of the last accepted step, x at the start), is

    ``controller="official"`` (the official ``dpm_solver_adaptive``): E = max over the batch of
        the per-sample RMS of (x_high − x_low)/δ, in the process's own scale of x; accept if
        E ≤ 1; then h ← min(θ·h·E^{−1/order}, λ_end − λ_s) whether accepted or not.
    ``controller="k-diffusion"`` (``sample_dpm_adaptive``): the same quotient on x/α (k-diffusion's
        scale), RMS over the whole batch; a PID factor f = E_n^{−β₁}·E_{n−1}^{−β₂}·E_{n−2}^{−β₃}
        (β from ``pcoeff``, ``icoeff``, ``dcoeff`` divided by the order) limited to 1 + atan(f − 1);
        accept if f ≥ ``accept_safety``; h ← h·f; the attempted step is min(h, λ_end − λ_s).

Adaptive stepping needs E on the host: this is the solver's one host sync, once per attempted
step (``float(E)``). The evaluation at λ_s is kept across rejected attempts, so a rejection costs
order − 1 calls (the reference codes re-evaluate it: same result, one call more). The stages never
evaluate the end point of a step, so with a clean end the step to σ = 0 costs one call (x̂_0 at
t_min).

Every accepted step's size h (in λ) and error E are kept (``info.step_sizes``,
``info.local_errors``, differentiable with ``grad="backprop"``). There is no stiffness estimate:
the pair's stages sit at different λ (no two evaluations at one time, as Dormand–Prince's last
two stages are), and the exponential integrator solves the stiff linear part exactly anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..denoiser import Prediction
from ..integrate import StepDiagnostics
from ..processes.base import GaussianProcess
from .base import Grid, Model, Solver, State, host, register
from .dpm_solver import SOLVER_TYPES
from .engine import combine
from .singlestep import _Lin, _stages

__all__ = ["DPMAdaptive"]

CONTROLLERS = ("official", "k-diffusion")


@dataclass(frozen=True)
class DPMAdaptiveState(State):
    grid: Grid = host()
    h: float = host()  # the controller's next step size in λ (carried across grid intervals)
    inv_errs: tuple[float, ...] = host(default=())  # k-diffusion's PID memory 1/E_n, 1/E_{n−1}, …
    x_prev: Tensor | None = None  # x_low of the last accepted step, in the norm's scale
    accepted: int = host(default=0)
    rejected: int = host(default=0)
    diagnostics: StepDiagnostics | None = host(default=None)


def _apply(lin: _Lin, x: Tensor, preds: list[Prediction]) -> Tensor:
    """A stage combination over the step's calls so far (oldest first)."""
    return combine(lin.row(len(preds)), x, preds[::-1], None)


def _point(process: GaussianProcess, t: float) -> tuple[float, float, float, float]:
    """(t, α, σ, λ) of a process time, all from t so that the coefficients match the point."""
    tt = torch.tensor(t, dtype=torch.float64)
    return t, float(process.alpha(tt)), float(process.sigma(tt)), float(process.lambda_(tt))


@register
@dataclass(frozen=True)
class DPMAdaptive(Solver):
    """DPM-Solver-12 / -23 with adaptive steps in λ (module docstring for the pair and the
    controllers). Official defaults: ``h_init`` = 0.05, ``atol`` = 0.0078, ``rtol`` = 0.05,
    ``theta`` = 0.9, ``order`` = 3; k-diffusion's PID defaults ``pcoeff`` = 0, ``icoeff`` = 1,
    ``dcoeff`` = 0, ``accept_safety`` = 0.81 (used with ``controller="k-diffusion"`` only).

    ``solver_type`` ("dpmsolver" | "taylor") and ``data`` (DPM-Solver++ form) select the
    singlestep updates as for ``dpm_solver``/``dpmpp_3s``. Call it without ``nfe``/``steps``:
    ``ds.sample(model, x_T, "dpm_adaptive", return_info=True)`` integrates t_max → t_min (→ σ = 0,
    one more call) and ``info.nfe`` reports the calls made; ``times=`` adds points to pass
    through (the controller's h carries over). Shapes: x (B, ...).
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
    adaptive: ClassVar[bool] = True

    def validate(self) -> None:
        if self.order not in (2, 3) or isinstance(self.order, bool):
            raise ValueError(f"dpm_adaptive: order must be 2 or 3, got {self.order!r}")
        if not (self.rtol >= 0 and self.atol > 0 and self.h_init > 0 and 0 < self.theta):
            raise ValueError("dpm_adaptive: need atol > 0, rtol >= 0, h_init > 0, theta > 0")
        if self.controller not in CONTROLLERS:
            raise ValueError(
                f"dpm_adaptive: controller must be one of {CONTROLLERS}, got {self.controller!r}"
            )
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"dpm_adaptive: solver_type must be one of {SOLVER_TYPES}, got {self.solver_type!r}"
            )
        if not isinstance(self.data, bool):
            raise ValueError(f"dpm_adaptive: data must be a bool, got {self.data!r}")

    def plan_times(self, process: GaussianProcess, schedule, nfe: int, clean_end: bool) -> Tensor:
        raise ValueError("dpm_adaptive chooses its own steps: call it without nfe= (set rtol/atol)")

    def init(self, x: Tensor, grid: Grid, model: Model, noise: object = None) -> DPMAdaptiveState:
        lam = grid.lam.tolist()
        last = grid.steps - 1 if grid.clean_end else grid.steps
        if not all(math.isfinite(v) for v in lam[: last + 1]):
            raise ValueError(
                "dpm_adaptive steps in λ: its grid needs finite λ (start at t_max_finite)"
            )
        return DPMAdaptiveState(grid=grid, h=self.h_init)

    def step(self, x: Tensor, i: int, state: State, model: Model) -> tuple[Tensor, State]:
        assert isinstance(state, DPMAdaptiveState)
        if state.grid.is_final(i):
            return model(x, model.point(state.grid.t[i], x)).x0, state
        return self._integrate(x, i, state, model)

    # -- one grid interval ----------------------------------------------------------------------
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
        ratio = s_t / s_s
        base = _Lin(ratio, (a_t * -math.expm1(-h),))
        stages, high = _stages(
            self.order, h, lam_s, s_s, st, a_t, s_t, base, self.data, self.solver_type
        )
        if self.order == 3:  # DPM-Solver-2 with r1 = ⅓ on the first stage
            _, low = _stages(2, h, lam_s, s_s, st[:1], a_t, s_t, base, self.data,
                             self.solver_type)  # fmt: skip
        else:
            low = base
        preds = [pred_s]
        for (tu, *_), lin in zip(st, stages):
            u = _apply(lin, x, preds)
            preds.append(model(u, model.point(torch.tensor(tu, dtype=torch.float64), x)))
        return _apply(low, x, preds[: self.order - 1]), _apply(high, x, preds)

    def _integrate(
        self, x: Tensor, i: int, state: DPMAdaptiveState, model: Model
    ) -> tuple[Tensor, DPMAdaptiveState]:
        grid = state.grid
        proc = grid.process
        s = _point(proc, float(grid.t[i]))
        end = (float(grid.t[i + 1]), float(grid.alpha[i + 1]), float(grid.sigma[i + 1]),
               float(grid.lam[i + 1]))  # fmt: skip
        kd = self.controller == "k-diffusion"
        h, inv_errs = state.h, state.inv_errs
        x_prev = state.x_prev if state.x_prev is not None else (x / s[1] if kd else x)
        pred_s = None
        accepted = rejected = 0
        diag = StepDiagnostics.empty()
        if state.diagnostics is not None:
            diag.extend(state.diagnostics)
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
            if not kd:
                h = min(self.theta * hs * max(e, 1e-300) ** (-1.0 / self.order), end[3] - s[3])
                if h <= 0:  # landed on the end: the next interval starts from the carried size
                    h = self.theta * hs * max(e, 1e-300) ** (-1.0 / self.order)
        new = state.replace(
            h=h, inv_errs=inv_errs, x_prev=x_prev,
            accepted=state.accepted + accepted, rejected=state.rejected + rejected,
            diagnostics=diag,
        )  # fmt: skip
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
        factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            errs = [errs[0], errs[0], errs[1]]
        return accept, h * factor, tuple(errs)
