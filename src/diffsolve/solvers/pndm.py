"""PNDM: pseudo numerical methods on the DDIM "transfer" (Liu et al., ICLR 2022)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .adams import _IPNDM as _AB  # the equal-step Adams–Bashforth weights, newest first
from .base import Grid, check_choices, register
from .engine import Row, RowSolver, StepRule
from .singlestep import check_calls

__all__ = ["PNDM"]

VARIANTS = ("plms", "prk", "fpndm", "spndm")


@register
@dataclass(frozen=True)
class PNDM(RowSolver):
    """Pseudo numerical methods for diffusion models (Liu et al., ICLR 2022, §3–4).

    A step moves x by the transfer φ(x, ε, s → t) = (α_t/α_s)·x + α_t·(ρ_t − ρ_s)·ε (DDIM with a
    given ε, eq. 9; ρ = σ/α) with ε' combined from several ε̂; φ is linear in ε, so it is a row:

        PLMS (eq. 12):  ε' = (55e_i − 59e_{i−1} + 37e_{i−2} − 9e_{i−3})/24,  e_j = ε̂ at t_j
        PRK (eq. 13):   ε' = (e1 + 2e2 + 2e3 + e4)/6, stages transferred to the t-midpoint
        improved Euler: ε' = (e1 + ε̂(φ(x, e1, s → t), t))/2

    ``variant``: ``"plms"`` (improved-Euler start, then AB2–AB4: SD's PLMS, diffusers'
    ``PNDMScheduler(skip_prk_steps=True)``), ``"fpndm"`` (three PRK steps, then AB4;
    ``skip_prk_steps=False``), ``"spndm"`` (improved Euler, then AB2) or ``"prk"``. ``nfe=`` is
    met exactly; the step to σ = 0 returns x̂_0. Shapes: x (B, ...). Orders, budgets and flow
    starts: docs/solvers-multistep.md#pndm.
    """

    variant: str = "plms"

    name: ClassVar[str] = "pndm"
    description: ClassVar[str] = "PNDM: PLMS (SD) / F-PNDM / S-PNDM / PRK on the DDIM transfer"
    default_schedule: ClassVar[str] = "uniform"

    def validate(self) -> None:
        check_choices("pndm", variant=(self.variant, VARIANTS))

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
        # first step is taken in the data form instead (:meth:`_flow_start`)
        flow = float(grid.alpha[0]) == 0.0
        if flow and calls[0] == 4:
            raise ValueError(
                f"pndm: α = 0 at the first time t = {float(grid.t[0])!r} ({grid.process!r}, a "
                "flow path): a PRK step transfers x/α to its midpoint, which is singular there. "
                "Use variant='plms' or 'spndm', or a schedule that starts at t_max_finite "
                "(schedule='karras' or 'logsnr')"
            )
        check_calls("pndm", grid, calls, 2, 4)
        t, lam, sig, alp = grid.lists("t", "lam", "sigma", "alpha")

        def transfer(i: int, a_t: float, s_t: float, l_t: float) -> tuple[float, float]:
            """(a, b) of φ = a·x + b·ε from t_i: (α_t/α_i, −σ_t·(e^h − 1)), h = λ_t − λ_i."""
            return a_t / alp[i], -s_t * math.expm1(l_t - lam[i])

        mid = {i: 0.5 * (t[i] + t[i + 1]) for i, k in enumerate(calls) if k == 4}  # PRK's, in t
        to_mid = {}
        if mid:
            coef = grid.process.coefficients(torch.tensor(list(mid.values()), dtype=torch.float64))
            to_mid = {i: transfer(i, *p) for i, p in zip(mid, zip(*(v.tolist() for v in coef)))}
        cap = 2 if self.variant == "spndm" else 4
        out = []
        for i, k in enumerate(calls):
            if grid.is_final(i):
                out.append(StepRule((t[i],)))
                continue
            if flow and i == 0:
                out.append(self._flow_start(grid, k))
                continue
            a, b = transfer(i, alp[i + 1], sig[i + 1], lam[i + 1])
            if k == 4:
                (am, bm), m = to_mid[i], mid[i]
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
        """The first step from α = 0, in r = α/σ where dy/dr = x̂_0 (y = x/σ): Euler (one call:
        DDIM, x_1 = (σ_1/σ_0)·x + α_1·x̂_0) or Heun (two: the improved-Euler start)."""
        t0, t1 = float(grid.t[0]), float(grid.t[1])
        ratio, a1 = float(grid.sigma[1] / grid.sigma[0]), float(grid.alpha[1])
        euler = Row(ratio, x0=(a1,))
        if calls == 1:
            return StepRule((t0,), update=euler)
        return StepRule((t0, t1), (euler,), Row(ratio, x0=(0.5 * a1, 0.5 * a1)))
