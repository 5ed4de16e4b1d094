"""Ancestral sampling: DDPM and DDIM with η (Song et al. 2021, eq. 12)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Grid, register
from .engine import Row, RowSolver, StepRule

__all__ = ["DDPM"]


@register
@dataclass(frozen=True)
class DDPM(RowSolver):
    """Ancestral sampling (Ho et al. 2020; Song et al. 2021, DDIM eq. 12 with σ_t(η)).

    DDIM eq. 12, step s → t (ᾱ = α² on a VP path, and written for any Gaussian path):

        x_t = α_t·x̂_0 + sqrt(σ_t² − c²)·ε̂ + c·z,   z ~ N(0, I)
        c   = η·sqrt((1 − ᾱ_t)/(1 − ᾱ_s))·sqrt(1 − ᾱ_s/ᾱ_t) = η·σ_t·sqrt(1 − e^{−2h}),

    h = λ_t − λ_s. With ε̂ = (x_s − α_s·x̂_0)/σ_s and q = sqrt(1 − η²·(1 − e^{−2h})) this is

        x_t = (σ_t/σ_s)·q·x_s + α_t·(1 − e^{−h}·q)·x̂_0 + c·z,

    one row per step, its noise the increment over s → t. η = 1 (the default) is DDPM's
    posterior q(x_t | x_s, x̂_0), i.e. SDE-DPM-Solver++(1):
    x_t = (σ_t/σ_s)·e^{−h}·x_s + α_t·(1 − e^{−2h})·x̂_0 + σ_t·sqrt(1 − e^{−2h})·z; η = 0 is
    exactly DDIM (``euler``, no noise drawn). The step to σ = 0 returns x̂_0. Weak order 1.
    Shapes: x (B, ...).
    """

    eta: float = 1.0

    name: ClassVar[str] = "ddpm"
    description: ClassVar[str] = "ancestral sampling: DDPM (η = 1) / DDIM eq. 12 with η in [0, 1]"
    stochastic: ClassVar[bool] = True

    def validate(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"ddpm: eta must lie in [0, 1], got {self.eta!r}")

    @property
    def order(self) -> int:
        return 1

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        ratio = grid.sigma[1:] / grid.sigma[:-1]
        en = grid.exp_neg_h
        # 1 − e^{−2h} = u·(2 − u) with u = 1 − e^{−h}, accurate for small h
        u = -torch.expm1(-grid.h.clamp(max=1e300))
        q = torch.sqrt(1 - self.eta**2 * u * (2 - u))
        a = (ratio * q).tolist()
        b = (grid.alpha[1:] * (1 - en * q)).tolist()
        c = (self.eta * grid.sigma[1:] * torch.sqrt(u * (2 - u))).tolist()
        t = grid.t.tolist()
        out = []
        for i in range(grid.steps):
            if grid.is_final(i):  # a = c = 0, b = 1: x̂_0
                out.append(StepRule((t[i],)))
                continue
            spans = ((t[i], t[i + 1]),) if c[i] != 0.0 else ()
            out.append(StepRule((t[i],), update=Row(a[i], (b[i],), (), c[i]), spans=spans))
        return tuple(out)
