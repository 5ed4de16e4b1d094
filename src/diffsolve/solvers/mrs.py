"""MRS (Li et al., ICLR 2025): the fast sampler for mean-reverting diffusion.

On a mean-reverting process (:class:`~diffsolve.processes.MeanReverting`) y = x − μ follows the
Gaussian path y_t = α_t·y_0 + σ_t·ε with σ_t = λ·sqrt(1 − α_t²), and MRS is the DPM-Solver family
on y with λ_t = log(α_t/σ_t) (λ_∞ inside σ), h = λ_t − λ_s (Li et al. 2025; the official
``MRSampler``, grrrute/mr-sampler). ``sample`` already runs every solver on y, so the updates below
are written in y; on any other Gaussian path they are the same exponential integrators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import FinalOrders, Grid, register
from .engine import RowSolver, StepRule
from .multistep import multistep_orders, multistep_rules

__all__ = ["MRS"]

SOLVER_TYPES = ("ode", "sde")
PARAMETERIZATIONS = ("data", "noise")


@register
@dataclass(frozen=True)
class MRS(RowSolver):
    """MRS (Li et al. 2025), multistep, on the path y = x − μ (``sample`` handles the shift).

    ODE (``solver_type="ode"``), orders 1–3, with m_j the prediction at t_{i−j}, r0 = h_{i−1}/h,
    r1 = h_{i−2}/h, D1_0 = (m0 − m1)/r0, D1_1 = (m1 − m2)/r1, and, at order 3,
    D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1), D2 = 2(D1_0 − D1_1)/(r0 + r1) (D1 = D1_0 at order 2):

        data  (m = x̂_0): y_t = (σ_t/σ_s)·y_s + α_t·[(1 − e^{−h})·m0 + P_d(2,h)/h·D1
                                                     + P_d(3,h)/h²·D2]
        noise (m = ε̂):  y_t = (α_t/α_s)·y_s − σ_t·[(e^h − 1)·m0 + P_n(2,h)/h·D1
                                                     + P_n(3,h)/h²·D2]

    with P_d(k, h) = h^kφ_k(−h), P_n(k, h) = h^kφ_k(h) (Li et al. 2025; the official
    ``MRSampler.step_ode_*``, whose 2nd-order weight is this Taylor one, not DPM-Solver++'s
    midpoint (1 − e^{−h})/2). Written in x they carry the official code's μ terms, e.g. data
    order 1:
    x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x̂_0 + μ·(1 − σ_t/σ_s + (σ_t/σ_s)·α_s − α_t).
    The official 3rd order uses half the D2 above (``reference=True`` reproduces it; global
    order 2 then, as in DPM-Solver(++)'s official code, see ``dpmpp_3m``).

    SDE (``solver_type="sde"``), orders 1–2: the reverse SDE dx = [f·x − g²·∇log p] dt + g dw̄
    with g² = 2λ²θ, integrated exactly in its linear part (Li et al. 2025; the official
    ``MRSampler.step_sde_*``), z ~ N(0, I):

        data:  y_t = (σ_t/σ_s)·e^{−h}·y_s + α_t·(1 − e^{−2h})·m0
                     + α_t·(1 − (1 − e^{−2h})/(2h))·D1_0 + σ_t·sqrt(1 − e^{−2h})·z
        noise: y_t = (α_t/α_s)·y_s − 2σ_t·(e^h − 1)·m0 − 2σ_t·((e^h − 1)/h − 1)·D1_0
                     + σ_t·sqrt(e^{2h} − 1)·z

    The noise form is unstable with large steps (its y-coefficient α_t/α_s multiplies a drift
    extrapolated over e^h − 1): at few steps prefer the data form; with many steps the noise-form
    SDE is the more accurate one (tests/test_mean_reverting.py measures both).

    The network's own parameterisation (MRS's ``fit_target``: noise, data or velocity) is the
    Denoiser's ``prediction`` (``eps``, ``x0``, ``v``); ``parameterization`` picks which of
    x̂_0 or ε̂ the integrator expands (MRS reports data prediction stable at low NFE and noise
    prediction not). Warm-up orders 1, 2, …; ``lower_order_final``: below 10 steps step i of N
    uses order ≤ N − i (the official rule; its very last step keeps full order, ours is the step
    to σ = 0, which returns x̂_0). Order: ``order`` (ODE; 2 for order 3 with ``reference``).
    The SDE forms are the η = 1 members of :mod:`.multistep`'s family. Shapes: x (B, ...).
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
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"mrs: solver_type must be 'ode' or 'sde', got {self.solver_type!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"mrs: parameterization must be 'data' or 'noise', got {self.parameterization!r}"
            )
        top = 3 if self.solver_type == "ode" else 2
        if isinstance(self.order, bool) or self.order not in range(1, top + 1):
            raise ValueError(
                f"mrs: order must be 1-{top} for solver_type={self.solver_type!r}, "
                f"got {self.order!r}"
            )
        FinalOrders.of("mrs", self.lower_order_final, 10, False)
        if not isinstance(self.reference, bool):
            raise ValueError(f"mrs: reference must be a bool, got {self.reference!r}")
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
