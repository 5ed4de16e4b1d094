"""Stochastic DPM-Solver(++): exponential integrators of the reverse-SDE family (Lu et al. 2022b,
§5) dx = [f_t·x − ½(1 + η)·g_t²·∇log p_t(x)] dt + sqrt(η)·g_t dw̄ (η = 0: the probability-flow
ODE, η = 1: the reverse SDE), exact in the linear part and the Gaussian: each is its
deterministic namesake with h → (1 + η)h, a contracted x-coefficient and the noise
``randn_between(x, i, t_from, t_to)``. Derivations and peer notes: docs/solvers-stochastic.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import FinalOrders, Grid, check_bools, check_choices, check_nonnegative, register
from .ddpm import ancestral
from .engine import Row, RowSolver, StepRule
from .multistep import multistep_orders, multistep_rules
from .singlestep import SinglestepSolver

__all__ = ["DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "DPMSolverPPSDE", "SDEDPMSolver"]

SOLVER_TYPES = ("midpoint", "heun")


@dataclass(frozen=True)
class _Multistep(RowSolver):
    """Shared options of the multistep SDE solvers: rows from :mod:`.multistep` with η."""

    eta: float = 1.0
    s_noise: float = 1.0
    lower_order_final: bool = True
    euler_at_final: bool = False

    stochastic: ClassVar[bool] = True
    _below: ClassVar[int] = 15
    _data: ClassVar[bool] = True

    def validate(self) -> None:
        kind = getattr(self, "solver_type", SOLVER_TYPES[0])  # 3M has no solver_type
        check_choices(self.name, solver_type=(kind, SOLVER_TYPES))
        check_nonnegative(self.name, eta=self.eta, s_noise=self.s_noise)
        FinalOrders.of(self.name, self.lower_order_final, self._below, self.euler_at_final)

    def _rules(self, grid: Grid, order: int, second: str, reference: bool) -> tuple[StepRule, ...]:
        orders = multistep_orders(
            grid, order, self.lower_order_final, self._below, self.euler_at_final
        )
        return multistep_rules(
            grid, orders, data=self._data, eta=self.eta, s_noise=self.s_noise, second=second,
            reference=reference, name=self.name,
        )  # fmt: skip


@register
@dataclass(frozen=True)
class DPMSolverPP2MSDE(_Multistep):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, §5; k-diffusion ``sample_dpmpp_2m_sde``; diffusers
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` at η = 1). With
    H = (1 + η)h, r = h_{i−1}/h_i and D1 = (x̂_0,i − x̂_0,i−1)/r:

        x_{i+1} = (σ_{i+1}/σ_i)·e^{−ηh}·x_i + α_{i+1}(1 − e^{−H})·x̂_0,i + α_{i+1}·c·D1
                  + s_noise·σ_{i+1}·sqrt(1 − e^{−2ηh})·z,
        c = (1 − e^{−H})/2 (``midpoint``)  or  P(2, H)/H = 1 − (1 − e^{−H})/H (``heun``).

    First step: SDE-DPM-Solver++(1) (DDPM's step at η = 1); η = 0 is ``dpmpp_2m``; the step to
    σ = 0 returns x̂_0. Shapes: x (B, ...). Notes: docs/solvers-stochastic.md#dpmpp_2m_sde.
    """

    solver_type: str = "midpoint"

    name: ClassVar[str] = "dpmpp_2m_sde"
    order: ClassVar[int] = 2
    description: ClassVar[str] = "SDE-DPM-Solver++(2M): multistep 2nd order, reverse SDE (eta)"

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        second = "half" if self.solver_type == "midpoint" else "taylor"
        return self._rules(grid, 2, second, False)


@register
@dataclass(frozen=True)
class DPMSolverPP3MSDE(_Multistep):
    """SDE-DPM-Solver++(3M), with the third-order term weighted correctly. With H = (1 + η)h,
    m_j = x̂_0 at t_{i−j}, r0 = h_{i−1}/h, r1 = h_{i−2}/h, D1_0 = (m0 − m1)/r0,
    D1_1 = (m1 − m2)/r1, D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1), D2 = 2·(D1_0 − D1_1)/(r0 + r1):

        x_{i+1} = (σ_{i+1}/σ_i)·e^{−ηh}·x_i + α_{i+1}·[(1 − e^{−H})·m0 + P(2,H)/H·D1
                  + P(3,H)/H²·D2] + s_noise·σ_{i+1}·sqrt(1 − e^{−2ηh})·z.

    Warm-up as ``dpmpp_3m``; η = 0 is ``dpmpp_3m``. ``reference=True`` is k-diffusion's
    ``sample_dpmpp_3m_sde`` (half the D2 above: order 2). diffusers' 3M SDE has a sign error
    (docs/solvers-stochastic.md#dpmpp_3m_sde). Shapes: x (B, ...).
    """

    reference: bool = False

    name: ClassVar[str] = "dpmpp_3m_sde"
    description: ClassVar[str] = (
        "SDE-DPM-Solver++(3M): multistep 3rd order, reverse SDE (reference=True: k-diffusion's)"
    )

    def validate(self) -> None:
        check_bools("dpmpp_3m_sde", reference=self.reference)
        super().validate()

    @property
    def order(self) -> int:
        return 2 if self.reference else 3

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        return self._rules(grid, 3, "taylor" if self.reference else "half", self.reference)


# the longest step in λ the noise form takes on a flow path (measured numbers: the docs page)
_FLOW_MAX_H = 0.5


@register
@dataclass(frozen=True)
class SDEDPMSolver(_Multistep):
    """SDE-DPM-Solver (Lu et al. 2022b, §5, noise prediction), orders 1–2, multistep; diffusers
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver")`` at η = 1. With
    r = h_{i−1}/h_i and D1 = (ε̂_i − ε̂_{i−1})/r:

        x_{i+1} = (α_{i+1}/α_i)·x_i − (1 + η)·σ_{i+1}·[(e^h − 1)·ε̂_i + c·D1]
                  + s_noise·σ_{i+1}·sqrt(η(e^{2h} − 1))·z,
        c = (e^h − 1)/2 (``midpoint``)  or  P_ε(2, h)/h = (e^h − 1)/h − 1 (``heun``).

    Order 1 is *not* DDPM's step (agrees to O(h²)); η = 0 is ``dpm_solver`` (multistep). Unstable
    on long steps: on a flow path a step longer than h = 0.5 is refused (η > 0). Shapes:
    x (B, ...). Notes: docs/solvers-stochastic.md#sde_dpm_solver.
    """

    order: int = 2  # type: ignore[assignment]
    solver_type: str = "midpoint"

    name: ClassVar[str] = "sde_dpm_solver"
    description: ClassVar[str] = "SDE-DPM-Solver: noise prediction, orders 1-2, reverse SDE (eta)"
    _below: ClassVar[int] = 10
    _data: ClassVar[bool] = False

    def validate(self) -> None:
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(f"sde_dpm_solver: order must be 1 or 2, got {self.order!r}")
        super().validate()

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        p, h = grid.process, grid.h[torch.isfinite(grid.h)]
        flow = self.eta and float(p.alpha(p.t_max)) == 0.0
        if flow and h.numel() and float(h.max()) > _FLOW_MAX_H:
            lam = grid.lam[torch.isfinite(grid.lam)]
            need = math.ceil(float(lam.max() - lam.min()) / _FLOW_MAX_H)
            raise ValueError(
                f"sde_dpm_solver: its noise-form SDE step is unstable on long steps (x-coefficient "
                f"(σ_t/σ_s)(1 + η − η·e^h) ≪ −1) and blows up on flow paths: the longest step here "
                f"is h = {float(h.max()):.3g} in λ, above {_FLOW_MAX_H} ({p!r}). Use the data-form "
                "solvers 'dpmpp_2m_sde', 'dpmpp_3m_sde', 'dpmpp_sde' or 'ddpm', or give at least "
                f"{need} steps on this λ range"
            )
        second = "half" if self.solver_type == "midpoint" else "taylor"
        return self._rules(grid, self.order, second, False)


@register
@dataclass(frozen=True)
class DPMSolverPPSDE(SinglestepSolver):
    """DPM-Solver++ SDE, singlestep 2nd order (k-diffusion ``sample_dpmpp_sde``; diffusers'
    ``DPMSolverSDEScheduler`` with r = ½). Step s → t, stage at λ_u = λ_s + r·h, fac = 1/(2r),
    A_η(s → v; D) DDPM's ancestral step with DDIM's η (:func:`.ddpm.ancestral`, with s_noise):

        u   = A_η(s → u; x̂_0(x_s, s))                                   noise z_u over [s, u]
        x_t = A_η(s → t; (1 − fac)·x̂_0(x_s, s) + fac·x̂_0(u, λ_u))       noise z_t over [s, t]

    z_u, z_t: ``randn_between`` over the two intervals from a source with a path (a Brownian
    tree); from one without, z_u = w1, z_t = c·w1 + sqrt(1 − c²)·w2 with w1, w2 = ``randn(x, i,
    0)``, ``randn(x, i, 1)``: the path's joint law (c: ``StepRule.mix``). η = 0 is ``dpmpp_2s``;
    a one-call step is A_η(s → t; x̂_0) (``ddpm`` at η = 1); budgets as ``dpmpp_2s``. Shapes:
    x (B, ...). Notes: docs/solvers-stochastic.md#dpmpp_sde.
    """

    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5

    name: ClassVar[str] = "dpmpp_sde"
    order: ClassVar[int] = 2
    description: ClassVar[str] = "DPM-Solver++ SDE (k-diffusion): singlestep 2nd order, reverse SDE"
    stochastic: ClassVar[bool] = True

    def validate(self) -> None:
        check_nonnegative("dpmpp_sde", eta=self.eta, s_noise=self.s_noise)
        if isinstance(self.r, bool) or not isinstance(self.r, (int, float)) or not 0 < self.r <= 1:
            raise ValueError(f"dpmpp_sde: r must lie in (0, 1], got {self.r!r}")

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        t, lam, sig, alpha = (v.tolist() for v in (grid.t, grid.lam, grid.sigma, grid.alpha))
        two = [i for i, k in enumerate(calls) if k == 2 and not grid.is_final(i)]
        if any(not math.isfinite(lam[i]) for i in two):
            raise ValueError(
                "dpmpp_sde places its stage in λ and needs a finite λ at each step's start; flow "
                "matching: start at t_max_finite (the karras and logsnr schedules do)"
            )
        stage: dict[int, Any] = {}
        if two:
            lam_u = [lam[i] + self.r * (lam[i + 1] - lam[i]) for i in two]
            t_u = grid.process.t_of_lambda(torch.tensor(lam_u, dtype=torch.float64))
            coefs = (t_u, *grid.process.coefficients(t_u))
            stage = dict(zip(two, zip(*(v.tolist() for v in coefs))))
        out: list[StepRule] = []
        for i in range(grid.steps):
            if grid.is_final(i):
                out.append(StepRule((t[i],)))
                continue
            h = lam[i + 1] - lam[i]
            update = ancestral(sig[i], sig[i + 1], alpha[i + 1], h, self.eta, self.s_noise)
            whole = ((t[i], t[i + 1]),) if update.noise != 0.0 else ()
            if i not in stage:  # one call: A_η(s → t; x̂_0)
                out.append(StepRule((t[i],), update=update, spans=whole))
                continue
            t_u, a_u, s_u, l_u = stage[i]
            row = ancestral(sig[i], s_u, a_u, l_u - lam[i], self.eta, self.s_noise)
            b, fac = update.x0[0], 1 / (2 * self.r)  # x̂_0 newest first: (at u, at s)
            update = Row(update.a, (b * fac, b * (1 - fac)), (), update.noise)
            spans = ((t[i], t_u), *whole) if row.noise != 0.0 else whole
            # corr(z_u, z_t) of one Brownian path in ρ over [ρ_u, ρ_s] ⊂ [ρ_t, ρ_s]
            rho_s, rho_u, rho_t = math.exp(-lam[i]), math.exp(-l_u), math.exp(-lam[i + 1])
            mix = math.sqrt(min(1.0, (rho_s - rho_u) / (rho_s - rho_t)))
            out.append(StepRule((t[i], t_u), (row,), update, spans=spans, mix=mix))
        return tuple(out)
