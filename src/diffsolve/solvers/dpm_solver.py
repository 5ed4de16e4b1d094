"""DPM-Solver (Lu et al., NeurIPS 2022): exponential integrators of the noise-prediction ODE,
declared on the weight-table engine (:mod:`.multistep`, :mod:`.singlestep` build the rows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..processes.base import GaussianProcess
from .base import FinalOrders, Grid, alias, register
from .engine import RowSolver, StepRule
from .multistep import multistep_orders, multistep_rules
from .singlestep import fast_plan, singlestep_calls, singlestep_rules

__all__ = ["DPMSolver", "fast_plan", "multistep_orders"]

METHODS = ("multistep", "singlestep")
SOLVER_TYPES = ("dpmsolver", "taylor")
ALGORITHM_TYPES = ("auto", "dpmsolver", "dpmsolver++")


@register
@dataclass(frozen=True)
class DPMSolver(RowSolver):
    """DPM-Solver (Lu et al., NeurIPS 2022): exponential integrator of the noise-form ODE.

    Exact solution (eq. 3.4): x_t = (α_t/α_s)·x_s − α_t·∫_{λ_s}^{λ_t} e^{−λ}·ε̂_λ dλ; with
    h = λ_t − λ_s and φ-weights P(k, h) = h^k·φ_k(h), its Taylor truncation (eq. 3.6) is

        x_t = (α_t/α_s)·x_s − σ_t·Σ_{k<n} P(k+1, h)/h^k · h^k·ε̂^{(k)}(λ_s).

    Order 1 is DDIM (eq. 3.7), x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x̂_0 (computed in that form).

    ``method="singlestep"`` (Alg. 1–2), stages uniform in λ, r_j = λ-fractions of h:
        DPM-Solver-2 (r1 = ½): u = DDIM(x_s → s1);
            x_t = DDIM(x_s → t) − σ_t·(e^h − 1)/(2r1)·(ε̂(u, s1) − ε̂_s)           (``dpmsolver``)
            or  − σ_t·P(2,h)/(h·r1)·(ε̂(u, s1) − ε̂_s)                            (``taylor``)
        DPM-Solver-3 (r1 = ⅓, r2 = ⅔): u1 as above, D_j = ε̂(u_j, s_j) − ε̂_s,
            u2 = DDIM(x_s → s2) − σ_{s2}·(r2/r1)·P(2, r2h)/(r2h)·D_1
            x_t = DDIM(x_s → t) − σ_t·P(2,h)/(h·r2)·D_2                          (``dpmsolver``)
            or  − σ_t·(P(2,h)/h·D1 + P(3,h)/h²·D2), D1 = (r2·D_1/r1 − r1·D_2/r2)/(r2 − r1),
                D2 = 2(D_2/r2 − D_1/r1)/(r2 − r1)                                   (``taylor``)
      Budgets ``nfe=M`` follow DPM-Solver-fast (:func:`fast_plan`; with a clean end the step to
      σ = 0 is one first-order call); the outer grid is uniform in λ for the logsnr schedule,
      else the schedule's M-interval grid sub-sampled at the cumulative orders
      (``Schedule.for_calls``). With ``steps=``/``times=`` every step has ``order`` and the
      step to σ = 0 is first order, ``order·(N−1) + 1`` calls (``order·N`` with final="tmin").
      A step starting where α = 0 (λ = −∞: flow matching at t = 1) has no λ-expansion; its
      stages sit uniformly in t (:mod:`.singlestep`). On the same points, singlestep order 2
      (both types) and order 3 ``taylor`` equal diffusers' ``DPMSolverSinglestepScheduler``
      (``algorithm_type="dpmsolver"``, ``midpoint``/``heun``); diffusers' order-3 ``midpoint``
      builds u2 with the midpoint weight instead of the official P(2, r2h) one above.

    ``method="multistep"`` (the official ``multistep_dpm_solver_*_update``), r0 = h_{i−1}/h,
    r1 = h_{i−2}/h, D1_0 = (ε̂_i − ε̂_{i−1})/r0, D1_1 = (ε̂_{i−1} − ε̂_{i−2})/r1:
        order 2: x_t = DDIM − σ_t·(e^h − 1)/2·D1_0   (``dpmsolver``; ``taylor``: P(2,h)/h·D1_0)
        order 3: x_t = DDIM − σ_t·P(2,h)/h·D1 − σ_t·P(3,h)/h²·D2,
                 D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1),  D2 = 2·(D1_0 − D1_1)/(r0 + r1).
      D1 ≈ h·ε̂' and D2 ≈ h²·ε̂'' are the derivatives of the quadratic through the three
      points, so the local error is O(h⁴). The official code (and diffusers) use half this D2
      (``reference=True`` reproduces it): its local error is O(h³), i.e. 2nd order overall.
      Warm-up orders 1, 2, …; ``lower_order_final`` as the official code: below 10 steps step i
      of N uses at most N − i (see :func:`multistep_orders`; diffusers' threshold is 15, so
      runs of 10–14 steps differ from its ``algorithm_type="dpmsolver"`` in the last steps).
      ``euler_at_final`` (multistep only): the last step is DDIM at any step count (diffusers'
      option; it matters with final="tmin", see :class:`~diffsolve.solvers.base.FinalOrders`).

    Aliases: ``dpm2`` (order 2, singlestep) is k-diffusion's ``sample_dpm_2`` and diffusers'
    ``KDPM2DiscreteScheduler`` (DPM-Solver-2 written as Euler in ρ = σ/α with the λ-midpoint
    √(ρ_i·ρ_{i+1})); ``dpm_fast`` (order 3, singlestep) run with ``nfe=M`` on the logsnr
    schedule and final="tmin" is k-diffusion's ``sample_dpm_fast`` (η = 0): the same plan,
    λ-uniform outer grid and ``dpmsolver`` updates (with the default clean end the last step
    is the call at t_min returning x̂_0, see :func:`fast_plan`). The adaptive DPM-Solver-12/23
    is ``dpm_adaptive`` (:mod:`.dpm_adaptive`).

    ``algorithm_type``: ``"dpmsolver"`` (the noise form above), ``"dpmsolver++"`` (the same
    plan and stages in the data form: the official code's ``algorithm_type="dpmsolver++"``, i.e.
    :mod:`.dpmpp`'s rows), or ``"auto"`` (default): the noise form, except on flow paths (α = 0
    at t_max), where the run starts at t_max_finite with α ≈ t_min and the noise form's
    α_t/α_s ≈ 1/t_min amplifies the stage differences: on gmm2d with rectified flow,
    ``dpm_fast`` at NFE 4 had relative error 461 and ``dpm2`` 1.9–2.7 at NFE 5–6 in the noise
    form, 0.52/0.45 and 0.47/0.45/0.31 in the data form.

    The step to σ = 0 returns x̂_0. Shapes: x (B, ...).
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
        if self.order not in (1, 2, 3) or isinstance(self.order, bool):
            raise ValueError(f"dpm_solver: order must be 1, 2 or 3, got {self.order!r}")
        if self.method not in METHODS:
            raise ValueError(f"dpm_solver: method must be one of {METHODS}, got {self.method!r}")
        if self.algorithm_type not in ALGORITHM_TYPES:
            raise ValueError(
                f"dpm_solver: algorithm_type must be one of {ALGORITHM_TYPES}, "
                f"got {self.algorithm_type!r}"
            )
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"dpm_solver: solver_type must be one of {SOLVER_TYPES}, got {self.solver_type!r}"
            )
        FinalOrders.of("dpm_solver", self.lower_order_final, 10, self.euler_at_final)
        if self.euler_at_final and self.method != "multistep":
            raise ValueError("dpm_solver: euler_at_final applies only to method='multistep'")
        if not isinstance(self.reference, bool):
            raise ValueError(f"dpm_solver: reference must be a bool, got {self.reference!r}")
        if self.reference and (self.method != "multistep" or self.order != 3):
            raise ValueError(
                "dpm_solver: reference=True (the official 3rd-order multistep D2) applies only "
                "to method='multistep' with order=3"
            )

    @property
    def singlestep(self) -> bool:
        return self.method == "singlestep"

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        if self.singlestep:
            return singlestep_calls(self.order, steps, clean_end)
        return super().calls(steps, clean_end)

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        if self.singlestep:
            return tuple(fast_plan(self.order, nfe, clean_end))
        return super().budget(nfe, clean_end)

    def grid_times(
        self, process: GaussianProcess, schedule: Any, calls: tuple[int, ...], clean_end: bool
    ) -> Tensor:
        if self.singlestep:
            return schedule.for_calls(process, calls, clean_end)
        return super().grid_times(process, schedule, calls, clean_end)

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


# k-diffusion's sample_dpm_2 (DPM-Solver-2 written as Euler in ρ = σ/α with the λ-midpoint
# σ_mid = √(σ_i·σ_{i+1}), then Euler to σ = 0) and sample_dpm_fast (the DPM-Solver-fast plan on
# a λ-uniform grid, final="tmin", η = 0) are these configurations exactly (tests/test_dpm_solver).
alias(
    "dpm2", "dpm_solver", "DPM-Solver-2 singlestep (k-diffusion's DPM2)",
    order=2, method="singlestep",
)  # fmt: skip
alias(
    "dpm_fast", "dpm_solver", "DPM-Solver-fast: singlestep order 3 with the official NFE plan",
    order=3, method="singlestep",
)  # fmt: skip
