"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): exponential integrators in the data form.

Exact solution of the data-prediction ODE (m = x̂_0, h = λ_t − λ_s):

    x_t = (σ_t/σ_s)·x_s + σ_t·∫_{λ_s}^{λ_t} e^{λ}·x̂_0(λ) dλ
        = (σ_t/σ_s)·x_s + α_t·Σ_k h^{k+1}φ_{k+1}(−h)·x̂_0^{(k)}(λ_s)      (Taylor in λ),

whose k = 0 term is DDIM, x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x̂_0. Below P(k, h) =
h^k·φ_k(−h) (``phi_data``). The shared coefficient machinery lives in :mod:`.dpm_solver`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..processes.base import GaussianProcess
from .base import Grid, Model, Solver, State, register
from .dpm_solver import (
    MultistepState,
    SinglestepState,
    multistep_init,
    multistep_step,
    singlestep_init,
    singlestep_nfe_of,
    singlestep_plan_times,
    singlestep_step,
)

__all__ = ["DPMSolverPP2M", "DPMSolverPP2S", "DPMSolverPP3M"]

SOLVER_TYPES_2M = ("midpoint", "heun")


def _check_bool(solver: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{solver}: {name} must be a bool, got {value!r}")


@register
@dataclass(frozen=True)
class DPMSolverPP2S(Solver):
    """DPM-Solver++(2S), singlestep (Lu et al. 2022b, Alg. 1) with r1 = ½, stage uniform in λ:

        u   = (σ_{s1}/σ_s)·x_s + α_{s1}(1 − e^{−h/2})·x̂_0(x_s, s),   λ_{s1} = λ_s + h/2
        x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·[x̂_0(x_s, s) + (x̂_0(u, s1) − x̂_0(x_s, s))/(2r1)]
            = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x̂_0(u, s1).

    Two calls per step; the step to σ = 0 returns x̂_0 (one call). Budgets ``nfe=M``: M/2 steps
    (odd M: one first-order step), exactly as ``dpm_solver`` singlestep order 2 (see there for
    the grid rule). Order 2. Shapes: x (B, ...).
    """

    name: ClassVar[str] = "dpmpp_2s"
    description: ClassVar[str] = "DPM-Solver++(2S): singlestep 2nd order, data prediction"

    @property
    def order(self) -> int:
        return 2

    def nfe_of(self, steps: int, clean_end: bool) -> int:
        return singlestep_nfe_of(2, steps, clean_end)

    def plan_times(
        self,
        process: GaussianProcess,
        schedule: Callable[[GaussianProcess, int], Tensor],
        nfe: int,
        clean_end: bool,
    ) -> Tensor:
        return singlestep_plan_times(2, process, schedule, nfe, clean_end)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> SinglestepState:
        return singlestep_init(x, grid, model, order=2, data=True, solver_type="dpmsolver")

    def step(
        self, x: Tensor, i: int, state: SinglestepState, model: Model
    ) -> tuple[Tensor, SinglestepState]:
        return singlestep_step(x, i, state, model)


@register
@dataclass(frozen=True)
class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M), multistep (Lu et al. 2022b, Alg. 2; diffusers
    ``DPMSolverMultistepScheduler`` with ``solver_order=2``, k-diffusion ``sample_dpmpp_2m``).

    With r = h_{i−1}/h_i and D1 = (x̂_0,i − x̂_0,i−1)/r:

        x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}(1 − e^{−h})·x̂_0,i + α_{i+1}·c·D1,
        c = (1 − e^{−h})/2   (``midpoint``: the paper's D = (1 + 1/2r)·x̂_0,i − x̂_0,i−1/(2r))
        c = P(2, h)/h = h·φ_2(−h)   (``heun``, diffusers' name; the Taylor weight)

    The first step is DDIM (one evaluation so far). ``lower_order_final`` (diffusers): with
    fewer than 15 steps the last step is first order (it matters only with final="tmin": the
    step to σ = 0 always returns x̂_0). Order 2. Shapes: x (B, ...); one x̂_0 of history.
    """

    solver_type: str = "midpoint"
    lower_order_final: bool = True

    name: ClassVar[str] = "dpmpp_2m"
    description: ClassVar[str] = "DPM-Solver++(2M): multistep 2nd order, data prediction"

    def validate(self) -> None:
        if self.solver_type not in SOLVER_TYPES_2M:
            raise ValueError(
                f"dpmpp_2m: solver_type must be one of {SOLVER_TYPES_2M}, got {self.solver_type!r}"
            )
        _check_bool("dpmpp_2m", "lower_order_final", self.lower_order_final)

    @property
    def order(self) -> int:
        return 2

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> MultistepState:
        return multistep_init(
            x, grid, model, order=2, data=True,
            second="half" if self.solver_type == "midpoint" else "taylor",
            reference=False, lower_order_final=self.lower_order_final, below=15,
        )  # fmt: skip

    def step(
        self, x: Tensor, i: int, state: MultistepState, model: Model
    ) -> tuple[Tensor, MultistepState]:
        return multistep_step(x, i, state, model)


@register
@dataclass(frozen=True)
class DPMSolverPP3M(Solver):
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
    D2 = (D1_0 − D1_1)/(r0 + r1), half the second derivative: local error O(h³), so measured
    order 2 (``order`` reports 2 then). k-diffusion's ``sample_dpmpp_3m_sde`` (η = 0) has the same
    third-order update but a Taylor-weighted (``heun``) second-order warm-up step.

    Warm-up: DDIM, then DPM-Solver++(2M) (midpoint), then 3M. ``lower_order_final`` (diffusers):
    with fewer than 15 steps step i of N uses order ≤ N − i (last first order, the one before
    second). The step to σ = 0 returns x̂_0. Shapes: x (B, ...); two x̂_0 of history.
    """

    reference: bool = False
    lower_order_final: bool = True

    name: ClassVar[str] = "dpmpp_3m"
    description: ClassVar[str] = (
        "DPM-Solver++(3M): multistep 3rd order, data prediction (reference=True: official D2)"
    )

    def validate(self) -> None:
        _check_bool("dpmpp_3m", "reference", self.reference)
        _check_bool("dpmpp_3m", "lower_order_final", self.lower_order_final)

    @property
    def order(self) -> int:
        return 2 if self.reference else 3

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> MultistepState:
        return multistep_init(
            x, grid, model, order=3, data=True, second="half", reference=self.reference,
            lower_order_final=self.lower_order_final, below=15,
        )  # fmt: skip

    def step(self, x: Tensor, i: int, state: State, model: Model) -> tuple[Tensor, MultistepState]:
        return multistep_step(x, i, state, model)  # type: ignore[arg-type]
