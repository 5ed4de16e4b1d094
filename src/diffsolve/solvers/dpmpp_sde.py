"""Stochastic DPM-Solver(++): exponential integrators of the reverse SDE family.

The family (Song et al. 2021; Lu et al. 2022b, §5; k-diffusion's ``eta``, SA-Solver's τ²)

    dx = [f_t·x − ½(1 + η)·g_t²·∇log p_t(x)] dt + sqrt(η)·g_t dw̄,     ∇log p = −ε̂/σ,

has the data marginals for every η ≥ 0: η = 0 is the probability-flow ODE, η = 1 the reverse
SDE. With h = λ_t − λ_s and H = (1 + η)·h, variation of constants in λ gives exactly

    data  (m = x̂_0):  x_t = (σ_t/σ_s)·e^{−ηh}·x_s + α_t(1 + η)∫_{λ_s}^{λ_t} e^{(1+η)(λ−λ_t)}·x̂_0 dλ
                              + σ_t·sqrt(1 − e^{−2ηh})·z,
    noise (m = ε̂):    x_t = (α_t/α_s)·x_s − (1 + η)·α_t∫_{λ_s}^{λ_t} e^{−λ}·ε̂ dλ
                              + σ_t·sqrt(η(e^{2h} − 1))·z,

z ~ N(0, I) (the linear parts and the Gaussian are integrated exactly; only the prediction is
expanded in λ). Taylor-expanding x̂_0 in λ around λ_s, the k-th term of the data form is
α_t·P(k+1, H)/H^k·(h^k·x̂_0^{(k)}), P(k, H) = H^k·φ_k(−H) (``phi_data``); the noise form's is
−(1 + η)·σ_t·P_ε(k+1, h)/h^k·(h^k·ε̂^{(k)}), P_ε(k, h) = h^k·φ_k(h) (``phi_noise``). So every
solver here is its deterministic namesake with h → H in the data-form weights (or × (1 + η) in
the noise form), a contracted x-coefficient and an additive Gaussian; η = 0 is exactly the
deterministic solver.

Noise: drawn from the run's bound noise (the :class:`~diffsolve.noise.Noise` protocol) as
``randn_between(x, i, t_from, t_to)``: the normalised Brownian increment over t_from → t_to inside
step i (grid.t[i] → grid.t[i+1] for a whole step), which a source without a path (the default
counter-based :class:`~diffsolve.noise.NoiseSource`) answers with its independent draw
``randn(x, i)``. ``dpmpp_sde`` also needs the noise of a sub-interval (see ``_pair``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..denoiser import EvalPoint
from ..noise import NoiseSource
from ..processes.base import GaussianProcess
from .base import FinalOrders, Grid, Model, Plan, Solver, State, host, register
from .engine import RowSolver, StepRule
from .multistep import multistep_orders, multistep_rules
from .singlestep import fast_plan, singlestep_calls

__all__ = ["DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "DPMSolverPPSDE", "SDEDPMSolver"]

SOLVER_TYPES = ("midpoint", "heun")


def _check(solver: str, eta: Any, s_noise: Any) -> None:
    for name, v in (("eta", eta), ("s_noise", s_noise)):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not (math.isfinite(v) and v >= 0)
        ):
            raise ValueError(f"{solver}: {name} must be a finite number >= 0, got {v!r}")


# -- multistep ------------------------------------------------------------------------------
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
        _check(self.name, self.eta, self.s_noise)
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
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, §5 and App.; k-diffusion ``sample_dpmpp_2m_sde``;
    diffusers ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` at η = 1).

    With H = (1 + η)h, r = h_{i−1}/h_i and D1 = (x̂_0,i − x̂_0,i−1)/r:

        x_{i+1} = (σ_{i+1}/σ_i)·e^{−ηh}·x_i + α_{i+1}(1 − e^{−H})·x̂_0,i + α_{i+1}·c·D1
                  + s_noise·σ_{i+1}·sqrt(1 − e^{−2ηh})·z,
        c = (1 − e^{−H})/2   (``midpoint``)      c = P(2, H)/H = 1 − (1 − e^{−H})/H   (``heun``).

    The first step is SDE-DPM-Solver++(1), which at η = 1 is DDPM's ancestral step (``ddpm``).
    η = 0 is exactly ``dpmpp_2m`` (same ``solver_type``). ``lower_order_final`` /
    ``euler_at_final`` as ``dpmpp_2m`` (matter only with final="tmin"); the step to σ = 0
    returns x̂_0 (k-diffusion's "denoising step"; diffusers' first-order step to σ = 0).

    Convergence at η = 1: strong order 1 on a fixed Brownian path (the bound for any scheme
    that sees the path only through its grid increments, whatever the drift's order) and weak
    order 1; η = 0: deterministic order 2 (tests/test_dpmpp_sde.py measures them). Shapes:
    x (B, ...).
    """

    solver_type: str = "midpoint"

    name: ClassVar[str] = "dpmpp_2m_sde"
    description: ClassVar[str] = "SDE-DPM-Solver++(2M): multistep 2nd order, reverse SDE (eta)"

    def validate(self) -> None:
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"dpmpp_2m_sde: solver_type must be one of {SOLVER_TYPES}, got {self.solver_type!r}"
            )
        super().validate()

    @property
    def order(self) -> int:
        return 2

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        second = "half" if self.solver_type == "midpoint" else "taylor"
        return self._rules(grid, 2, second, False)


@register
@dataclass(frozen=True)
class DPMSolverPP3MSDE(_Multistep):
    """SDE-DPM-Solver++(3M), with the third-order term weighted correctly.

    With H = (1 + η)h, m_j = x̂_0 at t_{i−j}, r0 = h_{i−1}/h, r1 = h_{i−2}/h,
    D1_0 = (m0 − m1)/r0, D1_1 = (m1 − m2)/r1:

        D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1)     ≈ h·x̂_0'
        D2 = 2·(D1_0 − D1_1)/(r0 + r1)              ≈ h²·x̂_0''
        x_{i+1} = (σ_{i+1}/σ_i)·e^{−ηh}·x_i + α_{i+1}·[(1 − e^{−H})·m0 + P(2,H)/H·D1
                  + P(3,H)/H²·D2] + s_noise·σ_{i+1}·sqrt(1 − e^{−2ηh})·z.

    The Taylor term k = 2 is α_t(1 + η)∫e^{(1+η)(λ−λ_t)}(λ − λ_s)²/2 dλ·x̂_0'' =
    α_t·P(3, H)/H²·(h²·x̂_0''), so D2 must estimate h²·x̂_0'' (the quadratic's second divided
    difference (D1_0 − D1_1)/(r0 + r1) is h²·x̂_0''/2). Warm-up: the first step first order, the
    second DPM-Solver++(2M) ``midpoint``, as ``dpmpp_3m``: η = 0 is exactly ``dpmpp_3m``.

    ``reference=True`` is k-diffusion's ``sample_dpmpp_3m_sde`` exactly (with
    ``lower_order_final=False``): D2 = (D1_0 − D1_1)/(r0 + r1), half the second derivative, so
    its η → 0 limit has local error O(h³) (global order 2, like the official/diffusers 3M: the
    k-diffusion η = 0 run is ``dpmpp_3m(reference=True)`` except that its second (warm-up) step
    uses the Taylor weight P(2,H)/H, which ``reference=True`` also reproduces). Deterministic
    orders (η = 0): 3 (default), 2 (reference).

    diffusers' ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)``
    is neither: with D2 = (D1_0 − D1_1)/(r0 + r1) (the half convention) its weight is
    α_t·((1 − e^{−2h} − 2h)/(2h)² − ½) = α_t·(P(3, 2h)/(2h)² − 1) ≈ −α_t, where k-diffusion's is
    α_t·P(3, 2h)/(2h)² ≈ α_t·h/3 and the correct one twice that: a sign error on its ½ that leaves
    an O(h²) local term (the branch came with diffusers PR #9104, whose author asked for a
    careful review; tests/test_dpmpp_sde.py pins the one-step formula).

    ``lower_order_final`` / ``euler_at_final`` as ``dpmpp_3m``. At η = 1 the noise limits it as
    2M: strong order 1.
    Shapes: x (B, ...); two x̂_0 of history.
    """

    reference: bool = False

    name: ClassVar[str] = "dpmpp_3m_sde"
    description: ClassVar[str] = (
        "SDE-DPM-Solver++(3M): multistep 3rd order, reverse SDE (reference=True: k-diffusion's)"
    )

    def validate(self) -> None:
        if not isinstance(self.reference, bool):
            raise ValueError(f"dpmpp_3m_sde: reference must be a bool, got {self.reference!r}")
        super().validate()

    @property
    def order(self) -> int:
        return 2 if self.reference else 3

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        return self._rules(grid, 3, "taylor" if self.reference else "half", self.reference)


@register
@dataclass(frozen=True)
class SDEDPMSolver(_Multistep):
    """SDE-DPM-Solver (Lu et al. 2022b, §5, noise prediction), orders 1–2, multistep; diffusers
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver")`` at η = 1.

    With r = h_{i−1}/h_i and D1 = (ε̂_i − ε̂_{i−1})/r:

        x_{i+1} = (α_{i+1}/α_i)·x_i − (1 + η)·σ_{i+1}·(e^h − 1)·ε̂_i − (1 + η)·σ_{i+1}·c·D1
                  + s_noise·σ_{i+1}·sqrt(η(e^{2h} − 1))·z,
        c = (e^h − 1)/2  (``midpoint``)      c = P_ε(2, h)/h = (e^h − 1)/h − 1  (``heun``).

    Order 1 is the noise-form exponential Euler–Maruyama step; it is *not* DDPM's step (that one
    is the data-form SDE-DPM-Solver++(1)): the two linearise different drifts, and agree only to
    O(h²) per step (tests/test_dpmpp_sde.py). η = 0 is exactly ``dpm_solver`` (multistep, the
    ``dpmsolver``/``taylor`` type for ``midpoint``/``heun``). The order-1 term is evaluated with
    ε̂ = (x − α_i·x̂_0)/σ_i folded in, i.e. (σ_{i+1}/σ_i)(1 + η − η·e^h)·x + (1 + η)α_{i+1}(1 −
    e^{−h})·x̂_0. ``lower_order_final`` as ``dpm_solver`` (below 10 steps; diffusers uses 15:
    they differ only with final="tmin"). The step to σ = 0 returns x̂_0. At η = 1: strong
    order 1; with few steps the noise form is unstable (its x-coefficient
    (σ_t/σ_s)(2 − e^h) ≪ −1 for h ≳ 1), so prefer the data-form solvers at few steps. On flow
    paths (α = 0 at t_max), where λ spans ≈ 14, it blows up at 8 and 16 steps, so a grid with
    a step longer than h = 0.5 is refused there (η > 0), naming the data-form solvers.
    Shapes: x (B, ...).
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
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"sde_dpm_solver: solver_type must be one of {SOLVER_TYPES}, "
                f"got {self.solver_type!r}"
            )
        super().validate()

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        _refuse_long_noise_steps(grid, self.eta)
        second = "half" if self.solver_type == "midpoint" else "taylor"
        return self._rules(grid, self.order, second, False)


# the longest step in λ the noise form takes on a flow path: on gmm2d (FlowMatching, logsnr)
# h = 1.7 (NFE 8) gives std 182 (order 1) and 4.6e3 (order 2) where the data have 0.85, h = 0.86
# (NFE 16) std 143 at order 2; h = 0.43 (NFE 32) is sane at both orders
_FLOW_MAX_H = 0.5


def _refuse_long_noise_steps(grid: Grid, eta: float) -> None:
    """sde_dpm_solver on a flow path (α = 0 at t_max): refuse steps longer than _FLOW_MAX_H."""
    p = grid.process
    if not eta or float(p.alpha(p.t_max)) != 0.0:
        return
    h = grid.h[torch.isfinite(grid.h)]
    if h.numel() and float(h.max()) > _FLOW_MAX_H:
        lam = grid.lam[torch.isfinite(grid.lam)]
        need = math.ceil(float(lam.max() - lam.min()) / _FLOW_MAX_H)
        raise ValueError(
            f"sde_dpm_solver: its noise-form SDE step is unstable on long steps (x-coefficient "
            f"(σ_t/σ_s)(1 + η − η·e^h) ≪ −1) and blows up on flow paths: the longest step here "
            f"is h = {float(h.max()):.3g} in λ, above {_FLOW_MAX_H} ({p!r}). Use the data-form "
            "solvers 'dpmpp_2m_sde', 'dpmpp_3m_sde', 'dpmpp_sde' or 'ddpm', or give at least "
            f"{need} steps on this λ range"
        )


# -- singlestep (k-diffusion's DPM++ SDE) -----------------------------------------------------
@dataclass(frozen=True)
class _Ancestral:
    """x_to = a·x + b·D + c·z: DDIM-η / DDPM from s to ``to`` with prediction D."""

    a: float
    b: float
    c: float


def _ancestral(
    sig_s: float, sig_to: float, alpha_to: float, en: float, eta: float, s_noise: float
) -> _Ancestral:
    """k-diffusion's ``get_ancestral_step`` + DPM-Solver++(1), on x (not x/α), with e^{−h} = en.

    σ_up = min(ρ_to, η·ρ_to·sqrt(1 − e^{−2h})), σ_down = sqrt(ρ_to² − σ_up²) in ρ = σ/α; then
    x_to = (σ_to/σ_s)·q·x + α_to(1 − e^{−h}·q)·D + α_to·σ_up·z with q = σ_down/ρ_to — DDIM
    eq. 12 with η (``ddpm``), the σ_up clamp active only for η > 1."""
    frac = min(1.0, eta**2 * (1 - en * en))  # (σ_up/ρ_to)²
    q = math.sqrt(1 - frac)
    return _Ancestral(
        sig_to / sig_s * q, alpha_to * (1 - en * q), sig_to * math.sqrt(frac) * s_noise
    )


@dataclass(frozen=True)
class _SDEPlan:
    points: tuple[EvalPoint, ...]
    stage: _Ancestral | None  # None: a first-order step (one call)
    final: _Ancestral | None  # None: the step to σ = 0 (returns x̂_0)
    fac: float  # D = (1 − fac)·x̂_0(x_s) + fac·x̂_0(u)
    t: tuple[float, float, float]  # (t_s, t_u, t_next): the noise intervals [s, u] and [s, t]
    mix: tuple[float, float]  # z_t = mix[0]·z_u + mix[1]·w for stream sources (see the class)


@dataclass(frozen=True)
class SDESinglestepState(State):
    plan: tuple[_SDEPlan, ...] = host()
    noise: Any = host(default=None)


@register
@dataclass(frozen=True)
class DPMSolverPPSDE(Solver[SDESinglestepState]):
    """DPM-Solver++ SDE, singlestep 2nd order (k-diffusion ``sample_dpmpp_sde``; diffusers'
    ``DPMSolverSDEScheduler`` with r = ½).

    Step s → t, h = λ_t − λ_s, stage at λ_u = λ_s + r·h, fac = 1/(2r); A_η(s → v; D) is DDPM's
    ancestral step with DDIM's η (Song et al. 2021 eq. 12, as ``ddpm``: k-diffusion's
    ``get_ancestral_step`` followed by DPM-Solver++(1)):

        A_η(s → v; D) = (σ_v/σ_s)·q·x_s + α_v(1 − e^{−h_v}·q)·D + s_noise·σ_v·sqrt(1 − q²)·z_v,
        q = sqrt(1 − min(1, η²(1 − e^{−2h_v}))),  h_v = λ_v − λ_s,

        u   = A_η(s → u; x̂_0(x_s, s))                     with z_u from the noise over [s, u]
        x_t = A_η(s → t; (1 − fac)·x̂_0(x_s, s) + fac·x̂_0(u, λ_u))   with z_t over [s, t].

    Note η here is DDIM's (as k-diffusion's ``sample_dpmpp_sde`` and ``ddpm``), not the
    e^{−ηh} parametrisation of the multistep SDE solvers; both are the reverse SDE at η = 1.
    Noise: k-diffusion (and diffusers' ``DPMSolverSDEScheduler``) draw z_u and z_t from a
    Brownian tree in ρ = σ/α over the overlapping intervals [ρ_u, ρ_s] and [ρ_t, ρ_s], i.e. the
    normalised increments of one path, correlated with c = sqrt((ρ_s − ρ_u)/(ρ_s − ρ_t)). A
    source with a path (``noise.path``, e.g. a Brownian tree) is asked for exactly these two
    intervals with ``randn_between(x, i, t_s, t_u)`` and ``randn_between(x, i, t_s, t_t)``. A
    source without one gives step i's two independent draws w1 = ``randn(x, i, 0)`` and
    w2 = ``randn(x, i, 1)``, and the step takes z_u = w1, z_t = c·w1 + sqrt(1 − c²)·w2: the
    tree's joint law (not its values, which depend on torchsde's RNG). Pass
    ``noise=BrownianTree(..., time="rho")`` for k-diffusion's tree variable (values still
    differ: its tree is torchsde's).

    η = 0 is exactly ``dpmpp_2s`` (r = ½). Order-1 steps of an odd ``nfe`` budget and the step
    from a grid point with one call are A_η(s → t; x̂_0) — with η = 1 DDPM's step exactly. Two
    calls per step; the step to σ = 0 returns x̂_0 (one call). Budgets as ``dpmpp_2s``
    (DPM-Solver-fast plan). At η = 1: strong order 1; η = 0: deterministic order 2.
    Shapes: x (B, ...).
    """

    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5

    name: ClassVar[str] = "dpmpp_sde"
    description: ClassVar[str] = "DPM-Solver++ SDE (k-diffusion): singlestep 2nd order, reverse SDE"
    stochastic: ClassVar[bool] = True

    def validate(self) -> None:
        _check("dpmpp_sde", self.eta, self.s_noise)
        if isinstance(self.r, bool) or not isinstance(self.r, (int, float)) or not 0 < self.r <= 1:
            raise ValueError(f"dpmpp_sde: r must lie in (0, 1], got {self.r!r}")

    @property
    def order(self) -> int:
        return 2

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        return singlestep_calls(2, steps, clean_end)

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        return tuple(fast_plan(2, nfe, clean_end))

    def grid_times(
        self, process: GaussianProcess, schedule: Any, calls: tuple[int, ...], clean_end: bool
    ) -> Tensor:
        return schedule.for_calls(process, calls, clean_end)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> SDESinglestepState:
        if isinstance(grid, Plan) and grid.calls:
            orders = grid.calls
        else:
            orders = self.calls(grid.steps, grid.clean_end)
        process = grid.process
        lam, t = grid.lam.tolist(), grid.t.tolist()
        alpha, sigma = grid.alpha.tolist(), grid.sigma.tolist()
        en = grid.exp_neg_h.tolist()
        two = [i for i, k in enumerate(orders) if k == 2 and not grid.is_final(i)]
        if any(not math.isfinite(lam[i]) for i in two):
            raise ValueError(
                "dpmpp_sde places its stage in λ and needs a finite λ at each step's start; flow "
                "matching: start at t_max_finite (the karras and logsnr schedules do)"
            )
        lam_u = [lam[i] + self.r * (lam[i + 1] - lam[i]) for i in two]
        t_u: dict[int, float] = {}
        if two:
            t_u = dict(
                zip(two, process.t_of_lambda(torch.tensor(lam_u, dtype=torch.float64)).tolist())
            )
        tt = torch.tensor([t_u[i] for i in two], dtype=torch.float64)
        a_u = dict(zip(two, process.alpha(tt).tolist()))
        s_u = dict(zip(two, process.sigma(tt).tolist()))
        l_u = dict(zip(two, process.lambda_(tt).tolist()))

        plan = []
        for i in range(grid.steps):
            start = model.point(grid.t[i], x)
            if grid.is_final(i):
                plan.append(_SDEPlan((start,), None, None, 0.0, (t[i], t[i], t[i + 1]), (0.0, 1.0)))
                continue
            final = _ancestral(sigma[i], sigma[i + 1], alpha[i + 1], en[i], self.eta, self.s_noise)
            if i not in t_u:
                plan.append(
                    _SDEPlan((start,), None, final, 0.0, (t[i], t[i], t[i + 1]), (0.0, 1.0))
                )
                continue
            en_u = math.exp(-(l_u[i] - lam[i]))
            stage = _ancestral(sigma[i], s_u[i], a_u[i], en_u, self.eta, self.s_noise)
            points = (start, model.point(torch.tensor(t_u[i], dtype=torch.float64), x))
            # corr(z_u, z_t) of one Brownian path in ρ over [ρ_u, ρ_s] ⊂ [ρ_t, ρ_s]
            rho_s, rho_u, rho_t = math.exp(-lam[i]), math.exp(-l_u[i]), math.exp(-lam[i + 1])
            c = math.sqrt(min(1.0, (rho_s - rho_u) / (rho_s - rho_t)))
            mix = (c, math.sqrt(max(0.0, 1 - c * c)))
            ts = (t[i], t_u[i], t[i + 1])
            plan.append(_SDEPlan(points, stage, final, 1 / (2 * self.r), ts, mix))
        draws = self.eta > 0 and self.s_noise > 0
        source = (noise if noise is not None else NoiseSource()).bind(grid) if draws else None
        return SDESinglestepState(plan=tuple(plan), noise=source)

    @staticmethod
    def _pair(noise: Any, x: Tensor, i: int, p: _SDEPlan) -> tuple[Tensor, Tensor]:
        """(z_u, z_t): the normalised increments over [s, u] and [s, t] of one Brownian path."""
        if noise.path:
            s, u, t = p.t
            return noise.randn_between(x, i, s, u), noise.randn_between(x, i, s, t)
        z_u = noise.randn(x, i, 0)
        return z_u, p.mix[0] * z_u + p.mix[1] * noise.randn(x, i, 1)

    def step(
        self, x: Tensor, i: int, state: SDESinglestepState, model: Model
    ) -> tuple[Tensor, SDESinglestepState]:
        p = state.plan[i]
        x0 = model(x, p.points[0]).x0
        if p.final is None:
            return x0, state
        d, z_t = x0, None
        if p.stage is not None:
            u = p.stage.a * x + p.stage.b * x0
            if p.stage.c != 0.0:
                z_u, z_t = self._pair(state.noise, x, i, p)
                u = u + p.stage.c * z_u
            x0_u = model(u, p.points[1]).x0
            d = x0_u if p.fac == 1.0 else (1 - p.fac) * x0 + p.fac * x0_u
        out = p.final.a * x + p.final.b * d
        if p.final.c != 0.0:
            if z_t is None:
                z_t = state.noise.randn_between(x, i, p.t[0], p.t[2])
            out = out + p.final.c * z_t
        return out, state
