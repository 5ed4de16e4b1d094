"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): exponential integrators in the data form.

Exact solution of the data-prediction ODE (m = x̂_0, h = λ_t − λ_s):

    x_t = (σ_t/σ_s)·x_s + σ_t·∫_{λ_s}^{λ_t} e^{λ}·x̂_0(λ) dλ
        = (σ_t/σ_s)·x_s + α_t·Σ_k h^{k+1}φ_{k+1}(−h)·x̂_0^{(k)}(λ_s)      (Taylor in λ),

whose k = 0 term is DDIM, x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x̂_0. Below P(k, h) =
h^k·φ_k(−h) (``phi_data``). The rows are built by :mod:`.multistep` and :mod:`.singlestep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..processes.base import GaussianProcess
from .base import FinalOrders, Grid, register
from .dpm_solver import SOLVER_TYPES
from .engine import RowSolver, StepRule
from .multistep import multistep_orders, multistep_rules
from .singlestep import fast_plan, singlestep_calls, singlestep_rules

__all__ = ["DPMSolverPP2M", "DPMSolverPP2S", "DPMSolverPP3M", "DPMSolverPP3S"]

SOLVER_TYPES_2M = ("midpoint", "heun")
SOLVER_TYPES_3S = SOLVER_TYPES  # official names: "dpmsolver", "taylor"


def _check_bool(solver: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{solver}: {name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class _DataSinglestep(RowSolver):
    """DPM-Solver++ singlestep of order ``stages`` (rows from :mod:`.singlestep`, data form),
    with DPM-Solver-fast budgets: ``nfe=M`` runs the plan of :func:`~.singlestep.fast_plan`
    (the step to σ = 0 one first-order call), ``steps=``/``times=`` run ``stages`` calls on
    every step but the one to σ = 0."""

    stages: ClassVar[int] = 2
    solver_type: ClassVar[str] = "dpmsolver"

    @property
    def order(self) -> int:
        return self.stages

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        return singlestep_calls(self.stages, steps, clean_end)

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        return tuple(fast_plan(self.stages, nfe, clean_end))

    def grid_times(
        self, process: GaussianProcess, schedule: Any, calls: tuple[int, ...], clean_end: bool
    ) -> Tensor:
        return schedule.for_calls(process, calls, clean_end)

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        return singlestep_rules(grid, calls, data=True, solver_type=self.solver_type)


@register
@dataclass(frozen=True)
class DPMSolverPP2S(_DataSinglestep):
    """DPM-Solver++(2S), singlestep (Lu et al. 2022b, Alg. 1) with r1 = ½, stage uniform in λ:

        u   = (σ_{s1}/σ_s)·x_s + α_{s1}(1 − e^{−h/2})·x̂_0(x_s, s),   λ_{s1} = λ_s + h/2
        x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·[x̂_0(x_s, s) + (x̂_0(u, s1) − x̂_0(x_s, s))/(2r1)]
            = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x̂_0(u, s1).

    Two calls per step; the step to σ = 0 returns x̂_0 (one call). Budgets ``nfe=M``: M/2 steps
    (odd M: one first-order step), exactly as ``dpm_solver`` singlestep order 2 (see there for
    the grid rule). Order 2. Shapes: x (B, ...).
    """

    stages: ClassVar[int] = 2
    name: ClassVar[str] = "dpmpp_2s"
    description: ClassVar[str] = "DPM-Solver++(2S): singlestep 2nd order, data prediction"


@register
@dataclass(frozen=True)
class DPMSolverPP3S(_DataSinglestep):
    """DPM-Solver++(3S), singlestep order 3 in the data form (Lu et al. 2022b, App. B; the
    official ``singlestep_dpm_solver_third_update`` with ``algorithm_type="dpmsolver++"``).

    Stages uniform in λ, r1 = ⅓, r2 = ⅔, P(k, h) = h^k·φ_k(−h), m_j = x̂_0 at stage j
    (m_0 at s), D_j = m_j − m_0:

        u1  = (σ_{s1}/σ_s)·x_s + α_{s1}(1 − e^{−r1·h})·m_0
        u2  = (σ_{s2}/σ_s)·x_s + α_{s2}(1 − e^{−r2·h})·m_0 + α_{s2}·(r2/r1)·P(2, r2h)/(r2h)·D_1
        x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·m_0 + α_t·P(2, h)/(h·r2)·D_2        (``dpmsolver``)
        or  + α_t·(P(2,h)/h·D1 + P(3,h)/h²·D2), D1 = (r2·D_1/r1 − r1·D_2/r2)/(r2 − r1),
            D2 = 2(D_2/r2 − D_1/r1)/(r2 − r1)                                     (``taylor``)

    Three calls per step, the step to σ = 0 one (returns x̂_0). Budgets ``nfe=M`` follow
    DPM-Solver-fast exactly as ``dpm_solver`` singlestep order 3 (orders [3…3, 2, 1] or
    [3…3, 1, 1] with a clean end; see :func:`~.dpm_solver.fast_plan`). ``taylor`` equals
    diffusers' ``DPMSolverSinglestepScheduler(algorithm_type="dpmsolver++", solver_order=3,
    solver_type="heun")`` on the same points; diffusers' ``midpoint`` builds u2 with
    (1 − e^{−r2h})/2 in place of the official P(2, r2h)/(r2h) weight, so neither of its types is
    the official ``dpmsolver`` update (both are 3rd order). Order 3. Shapes: x (B, ...).
    """

    solver_type: str = "dpmsolver"  # type: ignore[misc]

    stages: ClassVar[int] = 3
    name: ClassVar[str] = "dpmpp_3s"
    description: ClassVar[str] = "DPM-Solver++(3S): singlestep 3rd order, data prediction"

    def validate(self) -> None:
        if self.solver_type not in SOLVER_TYPES_3S:
            raise ValueError(
                f"dpmpp_3s: solver_type must be one of {SOLVER_TYPES_3S}, got {self.solver_type!r}"
            )


@register
@dataclass(frozen=True)
class DPMSolverPP2M(RowSolver):
    """DPM-Solver++(2M), multistep (Lu et al. 2022b, Alg. 2; diffusers
    ``DPMSolverMultistepScheduler`` with ``solver_order=2``, k-diffusion ``sample_dpmpp_2m``).

    With r = h_{i−1}/h_i and D1 = (x̂_0,i − x̂_0,i−1)/r:

        x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}(1 − e^{−h})·x̂_0,i + α_{i+1}·c·D1,
        c = (1 − e^{−h})/2   (``midpoint``: the paper's D = (1 + 1/2r)·x̂_0,i − x̂_0,i−1/(2r))
        c = P(2, h)/h = h·φ_2(−h)   (``heun``, diffusers' name; the Taylor weight)

    The first step is DDIM (one evaluation so far). ``lower_order_final`` (diffusers): with
    fewer than 15 steps the last step is first order (it matters only with final="tmin": the
    step to σ = 0 always returns x̂_0). ``euler_at_final``: the last step is DDIM at any step
    count (diffusers #5541; :class:`~diffsolve.solvers.base.FinalOrders`). Order 2.
    Shapes: x (B, ...); one x̂_0 of history.
    """

    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False

    name: ClassVar[str] = "dpmpp_2m"
    description: ClassVar[str] = "DPM-Solver++(2M): multistep 2nd order, data prediction"

    def validate(self) -> None:
        if self.solver_type not in SOLVER_TYPES_2M:
            raise ValueError(
                f"dpmpp_2m: solver_type must be one of {SOLVER_TYPES_2M}, got {self.solver_type!r}"
            )
        FinalOrders.of("dpmpp_2m", self.lower_order_final, 15, self.euler_at_final)

    @property
    def order(self) -> int:
        return 2

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        orders = multistep_orders(grid, 2, self.lower_order_final, 15, self.euler_at_final)
        second = "half" if self.solver_type == "midpoint" else "taylor"
        return multistep_rules(grid, orders, data=True, second=second)


@register
@dataclass(frozen=True)
class DPMSolverPP3M(RowSolver):
    """DPM-Solver++(3M), multistep, with the third-order term weighted correctly.

    With m_j = x̂_0 at t_{i−j}, r0 = h_{i−1}/h, r1 = h_{i−2}/h, D1_0 = (m0 − m1)/r0,
    D1_1 = (m1 − m2)/r1:

        D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1)      ≈ h·x̂_0'(λ_i)
        D2 = 2·(D1_0 − D1_1)/(r0 + r1)               ≈ h²·x̂_0''(λ_i)
        x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}·[(1 − e^{−h})·m0 + P(2,h)/h·D1 + P(3,h)/h²·D2].

    D1 and D2 are the first two derivatives (times h, h²) of the quadratic through the three
    points, so the update integrates that quadratic exactly: local error O(h⁴), global order 3,
    and on equal steps it is UniP-3 (Zhao et al. 2023). Derivation: the Taylor term k = 2 is
    α_t·h³φ_3(−h)·x̂_0'' = α_t·P(3,h)/h²·(h²·x̂_0''), and the quadratic's second divided
    difference (D1_0 − D1_1)/(r0 + r1) is h²·x̂_0''/2.

    ``reference=True`` reproduces the official code and diffusers' ``DPMSolverMultistepScheduler``
    (``solver_order=3``, exactly, warm-up and ``lower_order_final`` included) with
    D2 = (D1_0 − D1_1)/(r0 + r1), half the second derivative: local error O(h³), so global
    order 2 (``order`` reports 2 then). k-diffusion's ``sample_dpmpp_3m_sde`` (η = 0) has the same
    third-order update but a Taylor-weighted (``heun``) second-order warm-up step.

    Warm-up: DDIM, then DPM-Solver++(2M) (midpoint), then 3M. ``lower_order_final`` (diffusers):
    with fewer than 15 steps step i of N uses order ≤ N − i (last first order, the one before
    second); ``euler_at_final``: the last step DDIM at any count (:class:`.base.FinalOrders`).
    The step to σ = 0 returns x̂_0. Shapes: x (B, ...); two x̂_0 of history.
    """

    reference: bool = False
    lower_order_final: bool = True
    euler_at_final: bool = False

    name: ClassVar[str] = "dpmpp_3m"
    description: ClassVar[str] = (
        "DPM-Solver++(3M): multistep 3rd order, data prediction (reference=True: official D2)"
    )

    def validate(self) -> None:
        _check_bool("dpmpp_3m", "reference", self.reference)
        FinalOrders.of("dpmpp_3m", self.lower_order_final, 15, self.euler_at_final)

    @property
    def order(self) -> int:
        return 2 if self.reference else 3

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        orders = multistep_orders(grid, 3, self.lower_order_final, 15, self.euler_at_final)
        return multistep_rules(grid, orders, data=True, reference=self.reference)
