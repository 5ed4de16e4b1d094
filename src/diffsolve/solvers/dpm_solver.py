"""DPM-Solver (Lu et al., NeurIPS 2022) on the weight-table engine (rows from :mod:`.multistep`
and :mod:`.singlestep`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..processes.base import GaussianProcess
from .base import FinalOrders, Grid, alias, check_bools, check_choices, check_order, register
from .engine import StepRule
from .multistep import multistep_orders, multistep_rules
from .singlestep import SinglestepSolver, fast_plan, singlestep_rules

__all__ = ["DPMSolver", "fast_plan", "multistep_orders"]

METHODS = ("multistep", "singlestep")
SOLVER_TYPES = ("dpmsolver", "taylor")
ALGORITHM_TYPES = ("auto", "dpmsolver", "dpmsolver++")


@register
@dataclass(frozen=True)
class DPMSolver(SinglestepSolver):
    """DPM-Solver (Lu et al., NeurIPS 2022): with h = λ_t − λ_s, P(k, h) = h^k·φ_k(h),

        x_t = (α_t/α_s)·x_s − σ_t·Σ_{k<n} P(k+1, h)/h^k · h^k·ε̂^{(k)}(λ_s)      (eq. 3.6);

    order 1 is DDIM. ``method``: ``"singlestep"`` (DPM-Solver-2/3, Alg. 1–2; ``nfe=`` as
    DPM-Solver-fast) or ``"multistep"`` (the official updates; ``reference=True``: its 3rd-order
    D2, order 2). ``solver_type``: ``dpmsolver`` or ``taylor``; ``algorithm_type``:
    ``dpmsolver`` (noise form), ``dpmsolver++`` (data form) or ``auto`` (data form on flow
    paths). ``lower_order_final`` below 10 steps; ``euler_at_final`` (multistep). Aliases
    ``dpm2`` and ``dpm_fast`` are k-diffusion's ``sample_dpm_2`` / ``sample_dpm_fast``. Shapes:
    x (B, ...). Derivations, peers, measurements: docs/solvers-singlestep.md#dpm_solver.
    """

    order: int = 2
    method: str = "multistep"
    solver_type: str = "dpmsolver"
    algorithm_type: str = "auto"
    lower_order_final: bool = True
    reference: bool = False
    euler_at_final: bool = False

    name: ClassVar[str] = "dpm_solver"
    description: ClassVar[str] = (
        "DPM-Solver (noise prediction), order 1-3, multistep or singlestep (DPM-Solver-fast)"
    )

    def validate(self) -> None:
        check_order("dpm_solver", (1, 2, 3), order=self.order)
        check_choices(
            "dpm_solver",
            method=(self.method, METHODS),
            algorithm_type=(self.algorithm_type, ALGORITHM_TYPES),
            solver_type=(self.solver_type, SOLVER_TYPES),
        )
        FinalOrders.of("dpm_solver", self.lower_order_final, 10, self.euler_at_final)
        if self.euler_at_final and self.method != "multistep":
            raise ValueError("dpm_solver: euler_at_final applies only to method='multistep'")
        check_bools("dpm_solver", reference=self.reference)
        if self.reference and (self.method != "multistep" or self.order != 3):
            raise ValueError(
                "dpm_solver: reference=True (the official 3rd-order multistep D2) applies only "
                "to method='multistep' with order=3"
            )

    @property
    def singlestep(self) -> bool:
        return self.method == "singlestep"

    def data_form(self, process: GaussianProcess) -> bool:
        """Whether this run uses the data form (``algorithm_type``, resolved for ``process``)."""
        if self.algorithm_type == "auto":
            return float(process.alpha(process.t_max)) == 0.0
        return self.algorithm_type == "dpmsolver++"

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        data = self.data_form(grid.process)
        if self.singlestep:
            return singlestep_rules(grid, calls, data=data, solver_type=self.solver_type)
        orders = multistep_orders(grid, self.order, self.lower_order_final, 10, self.euler_at_final)
        second = "half" if self.solver_type == "dpmsolver" else "taylor"
        return multistep_rules(grid, orders, data=data, second=second, reference=self.reference)


# k-diffusion's sample_dpm_2 and sample_dpm_fast are these configurations (tests/test_dpm_solver)
alias(
    "dpm2", "dpm_solver", "DPM-Solver-2 singlestep (k-diffusion's DPM2)",
    order=2, method="singlestep",
)  # fmt: skip
alias(
    "dpm_fast", "dpm_solver", "DPM-Solver-fast: singlestep order 3 with the official NFE plan",
    order=3, method="singlestep",
)  # fmt: skip
