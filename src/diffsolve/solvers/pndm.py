"""PNDM: pseudo numerical methods on the DDIM "transfer" (Liu et al., ICLR 2022)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..denoiser import EvalPoint
from ..processes.base import GaussianProcess
from ._expint import phi_noise
from .adams import _IPNDM as _AB  # the equal-step Adams–Bashforth weights, newest first
from .base import Grid, Model, Solver, State, host, register

__all__ = ["PNDM"]

VARIANTS = ("plms", "prk", "fpndm", "spndm")


def _transfer(process: GaussianProcess, t_s: float, t_t: float) -> tuple[float, float]:
    """(a, b) of the transfer φ(x, ε, s → t) = a·x + b·ε (DDIM in the noise form):

    φ = (α_t/α_s)·x − σ_t·(e^h − 1)·ε = (α_t/α_s)·x + α_t·(ρ_t − ρ_s)·ε,  h = λ_t − λ_s.
    """
    t = torch.tensor([t_s, t_t], dtype=torch.float64)
    alpha, sigma, lam = process.alpha(t), process.sigma(t), process.lambda_(t)
    return float(alpha[1] / alpha[0]), float(-sigma[1] * phi_noise(1, lam[1] - lam[0]))


@dataclass(frozen=True)
class _Step:
    """Step i: its kind, the transfer to the step's end (and to its midpoint for PRK)."""

    kind: str  # "ab" (one call), "heun" (two), "prk" (four), "final" (one; returns x̂_0)
    ab: int = 1  # Adams–Bashforth order of an "ab" step
    to_end: tuple[float, float] = (1.0, 0.0)
    to_mid: tuple[float, float] = (1.0, 0.0)


@dataclass(frozen=True)
class PNDMState(State):
    eps: tuple[Tensor, ...] = ()  # ε̂ history, newest first (≤ 3)
    start: tuple[EvalPoint, ...] = host(default=())
    mid: tuple[EvalPoint | None, ...] = host(default=())
    end: tuple[EvalPoint | None, ...] = host(default=())
    plan: tuple[_Step, ...] = host(default=())


@register
@dataclass(frozen=True)
class PNDM(Solver):
    """Pseudo numerical methods for diffusion models (Liu et al., ICLR 2022, §3–4).

    The building block is the "transfer" φ(x, ε, s → t), the DDIM step with a given ε (their
    eq. 9): φ = (α_t/α_s)·x + α_t·(ρ_t − ρ_s)·ε, ρ = σ/α. A step s = t_i → t = t_{i+1} combines
    several ε̂ into one ε' and transfers with it:

    * PRK, pseudo Runge–Kutta (eq. 13), midpoint m = (s + t)/2 in time:
      e1 = ε̂(x, s), x2 = φ(x, e1, s→m), e2 = ε̂(x2, m), x3 = φ(x, e2, s→m), e3 = ε̂(x3, m),
      x4 = φ(x, e3, s→t), e4 = ε̂(x4, t), ε' = (e1 + 2e2 + 2e3 + e4)/6. Four calls.
    * PLMS, pseudo linear multistep (eq. 12): ε' = (55e_i − 59e_{i−1} + 37e_{i−2} − 9e_{i−3})/24,
      with e_j = ε̂ at the start of step j; AB2/AB3 weights ([3, −1]/2, [23, −16, 5]/12) while the
      history is short. One call.
    * pseudo improved Euler: ε' = (e1 + ε̂(φ(x, e1, s→t), t))/2. Two calls.

    ``variant`` (all keep e1 of every step, never the later stages, as history):

    * ``"plms"`` (default) — pseudo improved Euler first step, then AB2, AB3, AB4: the "PLMS" of
      LDM/Stable Diffusion (``plms.py``) and of diffusers' ``PNDMScheduler(skip_prk_steps=True)``.
      NFE = steps + 1. (It is not the paper's F-PNDM.)
    * ``"fpndm"`` — F-PNDM: three PRK steps, then PLMS with AB4; diffusers'
      ``PNDMScheduler(skip_prk_steps=False)``. NFE = steps + 9.
    * ``"spndm"`` — S-PNDM: pseudo improved Euler first step, then AB2 throughout. NFE = steps + 1.
    * ``"prk"`` — PRK at every step. NFE = 4·steps.

    The step to σ = 0 returns x̂_0 at its start (one call, as an AB step costs), so the counts
    above hold with a clean end too, except PRK: 4·(steps − 1) + 1. ``nfe=`` budgets are met
    exactly: F-PNDM and PRK use as many PRK steps as the budget allows (up to 3, resp. all; the
    remainder are AB steps after them); PLMS/S-PNDM start with a plain DDIM step when the budget
    leaves no room for the second call of the improved-Euler start (nfe ≤ 2).

    The AB weights are the equal-step ones, applied to whatever grid is given (as the paper and
    diffusers do); the midpoint is in t. Both are exact in the variable ρ only on equal steps in
    ρ with ρ-midpoints, so on the usual grids (uniform in t) all four are second order, not
    fourth (measured 1.9–2.05); a PLMS step on equal ρ-steps is fourth order (local slope 5.2),
    a PRK step never is (t-midpoint: local slope 3). ``order`` says 4 for plms/fpndm (their AB4
    step on equal ρ-steps), 2 for spndm/prk. tests/test_pndm.py has the numbers. diffusers puts
    the PRK midpoint ⌊⌊N/n⌋/2⌋ timesteps below the start: our t-midpoint only when ⌊N/n⌋ is
    even. Shapes: x (B, ...).
    """

    variant: str = "plms"

    name: ClassVar[str] = "pndm"
    description: ClassVar[str] = "PNDM: PLMS (SD) / F-PNDM / S-PNDM / PRK on the DDIM transfer"
    default_schedule: ClassVar[str] = "uniform"

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"pndm: variant must be one of {VARIANTS}, got {self.variant!r}")

    @property
    def order(self) -> int:
        # AB4 on equal ρ-steps; PRK's t-midpoint and S-PNDM's AB2 are second order on any grid
        return 4 if self.variant in ("plms", "fpndm") else 2

    def _split(self, steps: int, clean_end: bool, nfe: int | None) -> tuple[int, bool]:
        """(number of PRK steps, whether the first step is pseudo improved Euler)."""
        free = steps - int(clean_end)  # steps that are not the step to σ = 0
        if nfe is not None:
            extra = nfe - steps
            if self.variant in ("prk", "fpndm") and extra % 3 == 0 and 0 <= extra // 3 <= free:
                return extra // 3, False
            if self.variant in ("plms", "spndm") and extra in (0, 1) and extra <= free:
                return 0, extra == 1
        if self.variant == "prk":
            return free, False
        if self.variant == "fpndm":
            return min(3, free), False
        return 0, free >= 1

    def nfe_of(self, steps: int, clean_end: bool) -> int:
        prk, heun = self._split(steps, clean_end, None)
        return steps + 3 * prk + int(heun)

    def plan_times(
        self,
        process: GaussianProcess,
        schedule: Callable[[GaussianProcess, int], Tensor],
        nfe: int,
        clean_end: bool,
    ) -> Tensor:
        c = int(clean_end)
        if self.variant == "prk":
            steps = nfe - 3 * ((nfe - c) // 4)
        elif self.variant == "fpndm":
            k = next(k for k in (3, 2, 1, 0) if nfe - 3 * k >= 1 and k <= nfe - 3 * k - c)
            steps = nfe - 3 * k
        else:
            steps = nfe - 1 if nfe >= 2 + c else nfe
        return schedule(process, steps if clean_end else steps + 1)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> PNDMState:
        if float(grid.alpha[0]) <= 0:
            raise ValueError(
                "pndm transfers x/α and needs α > 0 at the first time; flow matching: start at "
                "t_max_finite (e.g. schedule='karras' or 'logsnr')"
            )
        n, proc = grid.steps, grid.process
        prk, heun = self._split(n, grid.clean_end, grid.nfe)
        cap = 2 if self.variant == "spndm" else 4
        t = grid.t.tolist()
        start: list[EvalPoint] = []
        mid: list[EvalPoint | None] = []
        end: list[EvalPoint | None] = []
        plan: list[_Step] = []
        for i in range(n):
            start.append(model.point(t[i], x))
            mid.append(None)
            end.append(None)
            if grid.is_final(i):
                plan.append(_Step("final"))
                continue
            to_end = _transfer(proc, t[i], t[i + 1])
            if i < prk:
                m = 0.5 * (t[i] + t[i + 1])
                mid[i], end[i] = model.point(m, x), model.point(t[i + 1], x)
                plan.append(_Step("prk", to_end=to_end, to_mid=_transfer(proc, t[i], m)))
            elif i == 0 and heun:
                end[i] = model.point(t[i + 1], x)
                plan.append(_Step("heun", to_end=to_end))
            else:
                plan.append(_Step("ab", ab=min(i + 1, cap), to_end=to_end))
        return PNDMState(start=tuple(start), mid=tuple(mid), end=tuple(end), plan=tuple(plan))

    def step(self, x: Tensor, i: int, state: PNDMState, model: Model) -> tuple[Tensor, PNDMState]:
        p = state.plan[i]
        pred = model(x, state.start[i])
        if p.kind == "final":
            return pred.x0, state
        e1 = pred.eps
        a, b = p.to_end
        if p.kind == "ab":
            hist = (e1, *state.eps)
            eps = e1 * _AB[p.ab - 1][0]
            for w, e in zip(_AB[p.ab - 1][1:], hist[1:]):
                eps = eps + w * e
        elif p.kind == "heun":
            e2 = model(a * x + b * e1, state.end[i]).eps  # type: ignore[arg-type]
            eps = 0.5 * (e1 + e2)
        else:
            am, bm = p.to_mid
            e2 = model(am * x + bm * e1, state.mid[i]).eps  # type: ignore[arg-type]
            e3 = model(am * x + bm * e2, state.mid[i]).eps  # type: ignore[arg-type]
            e4 = model(a * x + b * e3, state.end[i]).eps  # type: ignore[arg-type]
            eps = (e1 + 2 * (e2 + e3) + e4) / 6
        return a * x + b * eps, state.replace(eps=(e1, *state.eps)[:3])
