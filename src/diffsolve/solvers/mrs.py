"""MRS (Li et al., ICLR 2025): the fast sampler for mean-reverting diffusion.

On a mean-reverting process (:class:`~diffsolve.processes.MeanReverting`) y = x − μ follows the
Gaussian path y_t = α_t·y_0 + σ_t·ε, and MRS is the DPM-Solver family on y (``sample`` already
runs every solver on y); on any other Gaussian path these are the same exponential integrators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Grid, check_bools, check_choices, check_order, register
from .engine import RowSolver, StepRule
from .multistep import multistep_orders, multistep_rules

__all__ = ["MRS"]

SOLVER_TYPES = ("ode", "sde")
PARAMETERIZATIONS = ("data", "noise")


@register
@dataclass(frozen=True)
class MRS(RowSolver):
    """MRS (Li et al. 2025; the official ``MRSampler``), multistep, on y = x − μ. With m_j the
    prediction at t_{i−j} and D1, D2 its divided differences as in ``dpmpp_3m``, the ODE
    (``solver_type="ode"``, orders 1–3) is

        y_t = c·y_s + S_t·[P(1, h)·m0 + P(2, h)/h·D1 + P(3, h)/h²·D2],

    data form (m = x̂_0): c = σ_t/σ_s, S_t = α_t, P(k, h) = h^kφ_k(−h); noise form (m = ε̂):
    c = α_t/α_s, S_t = −σ_t, P(k, h) = h^kφ_k(h). The SDE (orders 1–2) is the η = 1 member of
    :mod:`.multistep`'s family (g² = 2λ²θ). ``reference=True``: the official 3rd order (half the
    D2: order 2). ``parameterization``: which of x̂_0 / ε̂ is expanded (data: stable at few
    steps). Shapes: x (B, ...). Notes: docs/solvers-stochastic.md#mrs.
    """

    order: int = 2
    solver_type: str = "ode"
    parameterization: str = "data"
    lower_order_final: bool = True
    reference: bool = False

    name: ClassVar[str] = "mrs"
    description: ClassVar[str] = (
        "MRS: mean-reverting diffusion sampler, ODE (order 1-3) or SDE (1-2), data/noise form"
    )

    def validate(self) -> None:
        check_choices("mrs", solver_type=(self.solver_type, SOLVER_TYPES))
        check_choices("mrs", parameterization=(self.parameterization, PARAMETERIZATIONS))
        valid = (1, 2, 3) if self.solver_type == "ode" else (1, 2)
        check_order(f"mrs (solver_type={self.solver_type!r})", valid, order=self.order)
        check_bools("mrs", lower_order_final=self.lower_order_final, reference=self.reference)
        if self.reference and (self.solver_type != "ode" or self.order != 3):
            raise ValueError("mrs: reference=True (the official 3rd-order D2) needs ode, order 3")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.solver_type == "sde"

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        # the SDE is the η = 1 member of the multistep family (g² = 2λ²θ is the reverse SDE)
        orders = multistep_orders(grid, self.order, self.lower_order_final, 10)
        return multistep_rules(
            grid, orders, data=self.parameterization == "data",
            eta=1.0 if self.solver_type == "sde" else 0.0, second="taylor",
            reference=self.reference, name="mrs",
        )  # fmt: skip
