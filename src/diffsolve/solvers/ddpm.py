"""Ancestral sampling: DDPM and DDIM with η (Song et al. 2021, eq. 12), and their row."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .base import Grid, register
from .engine import Row, RowSolver, StepRule, update_rules

__all__ = ["DDPM", "ancestral"]


def ancestral(
    sig_s: float, sig_v: float, alpha_v: float, h: float, eta: float, s_noise: float = 1.0
) -> Row:
    """The row of A_η(s → v; x̂_0), DDIM eq. 12 with η on x, h = λ_v − λ_s (+∞ from α_s = 0):

        x_v = (σ_v/σ_s)·q·x_s + α_v·(1 − e^{−h}·q)·x̂_0 + s_noise·σ_v·sqrt(1 − q²)·z,
        q = sqrt(1 − min(1, η²·(1 − e^{−2h})))   (the clamp acts only for η > 1).

    DDPM's step, and both of ``dpmpp_sde``'s (k-diffusion's ``get_ancestral_step``)."""
    u = -math.expm1(-h)  # 1 − e^{−2h} = u·(2 − u), accurate for small h
    frac = min(1.0, eta**2 * u * (2 - u))
    q = math.sqrt(1 - frac)
    noise = sig_v * math.sqrt(frac) * s_noise
    return Row(sig_v / sig_s * q, (alpha_v * (1 - (1 - u) * q),), (), noise)


@register
@dataclass(frozen=True)
class DDPM(RowSolver):
    """Ancestral sampling (Ho et al. 2020; Song et al. 2021, DDIM eq. 12 with σ_t(η)), for any
    Gaussian path (ᾱ = α² on a VP path), step s → t, h = λ_t − λ_s:

        x_t = α_t·x̂_0 + sqrt(σ_t² − c²)·ε̂ + c·z,   c = η·σ_t·sqrt(1 − e^{−2h}),

    one row per step (:func:`ancestral`), its noise the increment over s → t. η = 1 (default)
    is DDPM's posterior q(x_t | x_s, x̂_0), i.e. SDE-DPM-Solver++(1); η = 0 is DDIM (``euler``,
    no draw). The step to σ = 0 returns x̂_0. Weak order 1. Shapes: x (B, ...).
    Derivation: docs/solvers-stochastic.md#ddpm.
    """

    eta: float = 1.0

    name: ClassVar[str] = "ddpm"
    order: ClassVar[int] = 1
    description: ClassVar[str] = "ancestral sampling: DDPM (η = 1) / DDIM eq. 12 with η in [0, 1]"
    stochastic: ClassVar[bool] = True

    def validate(self) -> None:
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"ddpm: eta must lie in [0, 1], got {self.eta!r}")

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        sig, alpha, h = (v.tolist() for v in (grid.sigma, grid.alpha, grid.h))
        last = grid.steps - int(grid.clean_end)  # then the step to σ = 0: x̂_0
        rows = [ancestral(sig[i], sig[i + 1], alpha[i + 1], h[i], self.eta) for i in range(last)]
        return update_rules(grid, [*rows, *[None] * (grid.steps - last)])
