"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): exponential integrators in the data form,
h = λ_t − λ_s, P(k, h) = h^k·φ_k(−h) (``phi_data``); rows from :mod:`.multistep` and
:mod:`.singlestep`. Derivations and peer notes: docs/solvers-multistep.md#dpmpp_2s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import FinalOrders, Grid, check_bools, check_choices, register
from .dpm_solver import SOLVER_TYPES
from .engine import RowSolver, StepRule
from .multistep import multistep_orders, multistep_rules
from .singlestep import SinglestepSolver, singlestep_rules

__all__ = ["DPMSolverPP2M", "DPMSolverPP2S", "DPMSolverPP3M", "DPMSolverPP3S"]

SOLVER_TYPES_2M = ("midpoint", "heun")


@dataclass(frozen=True)
class _DataSinglestep(SinglestepSolver):
    """DPM-Solver++ singlestep (:mod:`.singlestep`'s rows, data form): ``order`` calls a step,
    the step to σ = 0 one (x̂_0); ``nfe=M`` as DPM-Solver-fast."""

    order: ClassVar[int] = 2
    solver_type: ClassVar[str] = "dpmsolver"

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        return singlestep_rules(grid, calls, data=True, solver_type=self.solver_type)


@register
@dataclass(frozen=True)
class DPMSolverPP2S(_DataSinglestep):
    """DPM-Solver++(2S), singlestep (Lu et al. 2022b, Alg. 1), stage at λ_{s1} = λ_s + h/2:

        u   = (σ_{s1}/σ_s)·x_s + α_{s1}(1 − e^{−h/2})·x̂_0(x_s, s)
        x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x̂_0(u, s1).

    Two calls per step; order 2 (``dpm_solver`` singlestep order 2 in the data form). Shapes:
    x (B, ...).
    """

    name: ClassVar[str] = "dpmpp_2s"
    description: ClassVar[str] = "DPM-Solver++(2S): singlestep 2nd order, data prediction"


@register
@dataclass(frozen=True)
class DPMSolverPP3S(_DataSinglestep):
    """DPM-Solver++(3S) (Lu et al. 2022b, App. B; the official third-order singlestep update in
    the data form): stages at λ-fractions r1 = ⅓, r2 = ⅔, m_j = x̂_0 at stage j,
    D_j = m_j − m_0, u_j = DDIM(x_s → s_j) (u2 + α_{s2}·(r2/r1)·P(2, r2h)/(r2h)·D_1), and

        x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·m_0 + α_t·P(2, h)/(h·r2)·D_2   (``dpmsolver``)

    or with Taylor weights of D_1, D_2 (``taylor``: diffusers' ``heun``). Three calls per step;
    order 3. Shapes: x (B, ...).
    """

    solver_type: str = "dpmsolver"  # type: ignore[misc]

    order: ClassVar[int] = 3
    name: ClassVar[str] = "dpmpp_3s"
    description: ClassVar[str] = "DPM-Solver++(3S): singlestep 3rd order, data prediction"

    def validate(self) -> None:
        check_choices("dpmpp_3s", solver_type=(self.solver_type, SOLVER_TYPES))


@register
@dataclass(frozen=True)
class DPMSolverPP2M(RowSolver):
    """DPM-Solver++(2M), multistep (Lu et al. 2022b, Alg. 2; diffusers
    ``DPMSolverMultistepScheduler(solver_order=2)``, k-diffusion ``sample_dpmpp_2m``). With
    r = h_{i−1}/h_i and D1 = (x̂_0,i − x̂_0,i−1)/r, from DDIM at the first step:

        x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}(1 − e^{−h})·x̂_0,i + α_{i+1}·c·D1,

    c = (1 − e^{−h})/2 (``midpoint``) or P(2, h)/h (``heun``). ``lower_order_final``
    (diffusers: under 15 steps) and ``euler_at_final`` as :class:`.base.FinalOrders`. Order 2.
    Shapes: x (B, ...); one x̂_0 of history.
    """

    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False

    name: ClassVar[str] = "dpmpp_2m"
    order: ClassVar[int] = 2
    description: ClassVar[str] = "DPM-Solver++(2M): multistep 2nd order, data prediction"

    def validate(self) -> None:
        check_choices("dpmpp_2m", solver_type=(self.solver_type, SOLVER_TYPES_2M))
        FinalOrders.of("dpmpp_2m", self.lower_order_final, 15, self.euler_at_final)

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        orders = multistep_orders(grid, 2, self.lower_order_final, 15, self.euler_at_final)
        second = "half" if self.solver_type == "midpoint" else "taylor"
        return multistep_rules(grid, orders, data=True, second=second)


@register
@dataclass(frozen=True)
class DPMSolverPP3M(RowSolver):
    """DPM-Solver++(3M), multistep, with the third-order term weighted correctly. With
    m_j = x̂_0 at t_{i−j}, r0 = h_{i−1}/h, r1 = h_{i−2}/h, D1_0 = (m0 − m1)/r0,
    D1_1 = (m1 − m2)/r1, D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1), D2 = 2·(D1_0 − D1_1)/(r0 + r1):

        x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}·[(1 − e^{−h})·m0 + P(2,h)/h·D1 + P(3,h)/h²·D2],

    the exact integral of the quadratic through the three points: order 3. ``reference=True``:
    the official code's and diffusers' D2, half of it (order 2). Warm-up DDIM, 2M; final steps
    as :class:`DPMSolverPP2M`. Shapes: x (B, ...); two x̂_0 of history.
    """

    reference: bool = False
    lower_order_final: bool = True
    euler_at_final: bool = False

    name: ClassVar[str] = "dpmpp_3m"
    description: ClassVar[str] = (
        "DPM-Solver++(3M): multistep 3rd order, data prediction (reference=True: official D2)"
    )

    def validate(self) -> None:
        check_bools("dpmpp_3m", reference=self.reference)
        FinalOrders.of("dpmpp_3m", self.lower_order_final, 15, self.euler_at_final)

    @property
    def order(self) -> int:
        return 2 if self.reference else 3

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        orders = multistep_orders(grid, 3, self.lower_order_final, 15, self.euler_at_final)
        return multistep_rules(grid, orders, data=True, reference=self.reference)
