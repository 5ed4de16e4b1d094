"""PNDM: pseudo numerical methods on the DDIM "transfer" (Liu et al., ICLR 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..processes.base import GaussianProcess
from ._expint import phi_noise
from .adams import _IPNDM as _AB  # the equal-step Adams–Bashforth weights, newest first
from .base import Grid, register
from .engine import Row, RowSolver, StepRule

__all__ = ["PNDM"]

VARIANTS = ("plms", "prk", "fpndm", "spndm")


def _transfers(process: GaussianProcess, t_s: Tensor, t_t: Tensor) -> list[tuple[float, float]]:
    """(a, b) of the transfer φ(x, ε, s → t) = a·x + b·ε (DDIM in the noise form) for each pair
    of times (float64 tensors):

    φ = (α_t/α_s)·x − σ_t·(e^h − 1)·ε = (α_t/α_s)·x + α_t·(ρ_t − ρ_s)·ε,  h = λ_t − λ_s.
    """
    t = torch.cat([t_s, t_t]).to(torch.float64)
    alpha, sigma, lam = process.alpha(t), process.sigma(t), process.lambda_(t)
    n = t_s.numel()
    a = alpha[n:] / alpha[:n]
    b = -sigma[n:] * phi_noise(1, lam[n:] - lam[:n])
    return list(zip(a.tolist(), b.tolist()))


@register
@dataclass(frozen=True)
class PNDM(RowSolver):
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

    Each is a row: the transfer is linear in ε, so x_{i+1} = a·x + b·ε' spreads b over the
    ε̂ that ε' combines, and the stages x2, x3, x4 are rows a'·x + b'·e over the step's calls.

    ``variant`` (all keep e1 of every step, never the later stages, as history: the AB rows
    read e_j where step j's first call sits in the run's evaluations, its stages weighted 0):

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
    fourth; a PLMS step on equal ρ-steps is fourth order (local error O(Δ⁵)), a PRK step never
    is (t-midpoint: local error O(Δ³)). ``order`` says 4 for plms/fpndm (their AB4 step on
    equal ρ-steps), 2 for spndm/prk. diffusers puts the PRK midpoint ⌊⌊N/n⌋/2⌋ timesteps below
    the start: our t-midpoint only when ⌊N/n⌋ is even.

    Flow paths: where the grid starts at α = 0 (flow matching at t = 1, the default uniform
    grid), the transfer from there is singular, so the first step is taken in the data form,
    where it is finite: with r = α/σ and y = x/σ the PF-ODE is dy/dr = x̂_0 from r = 0, and the
    step is Euler (one call: DDIM) or Heun (two calls: the improved-Euler start) in r. The AB
    steps after it leave that first ε̂ (at ρ = ∞) out. PRK steps there are refused (their
    transfer to the midpoint is singular). Shapes: x (B, ...).
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

    @staticmethod
    def _layout(steps: int, prk: int, heun: bool) -> tuple[int, ...]:
        """Calls per step: ``prk`` PRK steps (4), or a pseudo improved Euler start (2), then
        AB steps and the step to σ = 0 (1 each)."""
        first = (4,) * prk + ((2,) if heun else ())
        return first + (1,) * (steps - len(first))

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        free = steps - int(clean_end)  # steps that are not the step to σ = 0
        if self.variant == "prk":
            return self._layout(steps, free, False)
        if self.variant == "fpndm":
            return self._layout(steps, min(3, free), False)
        return self._layout(steps, 0, free >= 1)

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        c = int(clean_end)
        if self.variant == "prk":
            prk = (nfe - c) // 4
            return self._layout(nfe - 3 * prk, prk, False)
        if self.variant == "fpndm":
            prk = next(k for k in (3, 2, 1, 0) if nfe - 3 * k >= 1 and k <= nfe - 3 * k - c)
            return self._layout(nfe - 3 * prk, prk, False)
        heun = nfe >= 2 + c
        return self._layout(nfe - 1 if heun else nfe, 0, heun)

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        # α = 0 at the start (flow matching at t = 1): the transfer divides by α there, so the
        # first step is taken in the data form instead (class docstring, "Flow paths")
        flow = float(grid.alpha[0]) == 0.0
        if flow and calls[0] == 4:
            raise ValueError(
                f"pndm: α = 0 at the first time t = {float(grid.t[0])!r} ({grid.process!r}, a "
                "flow path): a PRK step transfers x/α to its midpoint, which is singular there. "
                "Use variant='plms' or 'spndm', or a schedule that starts at t_max_finite "
                "(schedule='karras' or 'logsnr')"
            )
        n, t = grid.steps, grid.t.tolist()
        for i, k in enumerate(calls):
            if k not in ((1,) if grid.is_final(i) else (1, 2, 4)):
                raise ValueError(f"pndm: step {i} cannot make {k} network calls")
        free = [i for i in range(n) if not grid.is_final(i)]
        prk = [i for i in free if calls[i] == 4]
        mid = {i: 0.5 * (t[i] + t[i + 1]) for i in prk}  # the PRK midpoint, in t
        ends = _transfers(grid.process, grid.t[free], grid.t[[i + 1 for i in free]])
        mids = torch.tensor(list(mid.values()), dtype=torch.float64)
        to_end = dict(zip(free, ends))
        to_mid = dict(zip(prk, _transfers(grid.process, grid.t[prk], mids)))
        cap = 2 if self.variant == "spndm" else 4
        out = []
        for i, k in enumerate(calls):
            if grid.is_final(i):
                out.append(StepRule((t[i],)))
                continue
            if flow and i == 0:
                out.append(self._flow_start(grid, k))
                continue
            a, b = to_end[i]
            if k == 4:
                am, bm = to_mid[i]
                m = mid[i]
                stages = (Row(am, eps=(bm,)), Row(am, eps=(bm,)), Row(a, eps=(b,)))
                update = Row(a, eps=(b / 6, b / 3, b / 3, b / 6))
                out.append(StepRule((t[i], m, m, t[i + 1]), stages, update))
            elif k == 2:
                stage, update = Row(a, eps=(b,)), Row(a, eps=(0.5 * b, 0.5 * b))
                out.append(StepRule((t[i], t[i + 1]), (stage,), update))
            else:  # AB over e1 of steps i, i − 1, …: step j's e1 lies below its later stages
                # on a flow start, step 0's ε̂ (at ρ = ∞) is left out of the extrapolation in ρ
                weights = _AB[min(i if flow else i + 1, cap) - 1]
                at = [sum(calls[i - j : i + 1]) - 1 for j in range(len(weights))]
                eps = [0.0] * (at[-1] + 1)
                for j, w in zip(at, weights):
                    eps[j] = b * w
                out.append(StepRule((t[i],), update=Row(a, eps=tuple(eps))))
        return tuple(out)

    @staticmethod
    def _flow_start(grid: Grid, calls: int) -> StepRule:
        """The first step from α = 0 in the data form: with r = α/σ and y = x/σ the PF-ODE is
        dy/dr = x̂_0, from r = 0. One call: Euler (DDIM), x_1 = (σ_1/σ_0)·x + α_1·x̂_0; two
        calls: Heun in r, the stage that DDIM step and x_1 = (σ_1/σ_0)·x + α_1·(x̂_0 + x̂_0')/2
        (the pseudo improved Euler start, in the variable where the step is finite)."""
        t0, t1 = float(grid.t[0]), float(grid.t[1])
        ratio, a1 = float(grid.sigma[1] / grid.sigma[0]), float(grid.alpha[1])
        euler = Row(ratio, x0=(a1,))
        if calls == 1:
            return StepRule((t0,), update=euler)
        return StepRule((t0, t1), (euler,), Row(ratio, x0=(0.5 * a1, 0.5 * a1)))
