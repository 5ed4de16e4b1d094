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

Noise: drawn from the run's :class:`~diffsolve.noise.NoiseSource` with ``randn_like(x, i)`` for
step i (which spans grid.t[i] → grid.t[i+1]). ``dpmpp_sde`` also needs the noise of a sub-interval
(see :func:`draw`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..denoiser import EvalPoint
from ..noise import NoiseSource, bind
from ..processes.base import GaussianProcess
from ._expint import phi_data, phi_noise
from .base import FinalOrders, Grid, Model, Solver, State, host, register
from .dpm_solver import (
    _MS,
    MultistepState,
    multistep_orders,
    multistep_step,
    singlestep_nfe_of,
    singlestep_orders,
    singlestep_plan_times,
)

__all__ = ["DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "DPMSolverPPSDE", "SDEDPMSolver", "draw"]

SOLVER_TYPES = ("midpoint", "heun")


def draw(noise: Any, x: Tensor, i: int, t_from: float, t_to: float) -> Tensor:
    """z ~ N(0, I) for the interval t_from → t_to inside step i (t_from = grid.t[i]).

    A source with an increment API, ``randn_between(x, t_from, t_to)`` (the normalised Brownian
    increment over that interval, e.g. a Brownian tree), is asked for exactly that interval, so
    draws are consistent across step counts. Any other source is asked for ``randn_like(x, i)``.
    """
    between = getattr(noise, "randn_between", None)
    if between is not None:
        return between(x, t_from, t_to)
    return noise.randn_like(x, i)


def _check(solver: str, eta: Any, s_noise: Any) -> None:
    for name, v in (("eta", eta), ("s_noise", s_noise)):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not (math.isfinite(v) and v >= 0)
        ):
            raise ValueError(f"{solver}: {name} must be a finite number >= 0, got {v!r}")


def _noise_source(noise: Any, grid: Grid, draws: bool) -> Any:
    if not draws:
        return None
    return bind(noise if noise is not None else NoiseSource(), grid)


def _pd(k: int, h: float) -> float:
    return float(phi_data(k, torch.tensor(h, dtype=torch.float64)))


def _pn(k: int, h: float) -> float:
    return float(phi_noise(k, torch.tensor(h, dtype=torch.float64)))


# -- multistep ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SDEMultistepState(MultistepState):
    """:class:`~.dpm_solver.MultistepState` (the deterministic part, run by ``multistep_step``)
    plus the noise: x_t = ratio·x + gain·x̂_0 + Σ_j w_j·m_j + std_i·z."""

    std: tuple[float, ...] = host(default=())  # noise amplitude per step (0: none drawn)
    t: tuple[float, ...] = host(default=())
    noise: Any = host(default=None)


def _multistep_coefs(
    grid: Grid,
    orders: list[int],
    *,
    data: bool,
    eta: float,
    s_noise: float,
    second: str,
    reference: bool,
) -> list[tuple[_MS, float] | None]:
    """Per-step coefficients of the module docstring's expansions (float64 → Python floats).

    ``second``: weight of the first difference at order 2, "half" ((1 − e^{−H})/2, the
    midpoint rule) or "taylor" (P(2, H)/H). ``reference``: the order-3 D2 of k-diffusion's
    ``sample_dpmpp_3m_sde`` (half the second derivative).
    """
    lam, sig, alp = grid.lam.tolist(), grid.sigma.tolist(), grid.alpha.tolist()
    en = grid.exp_neg_h.tolist()  # e^{−h}, finite (0) where α_s = 0
    out: list[tuple[_MS, float] | None] = []
    for i, k in enumerate(orders):
        if k == 0:
            out.append(None)
            continue
        h = lam[i + 1] - lam[i]
        if data:
            big = (1 + eta) * h
            s_t, c_half = alp[i + 1], -math.expm1(-big) / 2
            p2 = _pd(2, big) / big if k > 1 else 0.0
            p3 = _pd(3, big) / big**2 if k > 2 else 0.0
            # e^{−ηh} as (e^{−h})^η: 0 where α_s = 0, and 0^0 = 1 keeps the ODE's σ_t/σ_s
            ratio, gain = sig[i + 1] / sig[i] * en[i] ** eta, 0.0
            std = -math.expm1(-2 * eta * h) if eta else 0.0
        else:
            if not math.isfinite(lam[i]) and eta > 0:
                raise ValueError(
                    "sde_dpm_solver: the noise form has no finite step from α = 0 (λ = −∞) with "
                    "eta > 0; start at t_max_finite (the logsnr and karras schedules do)"
                )
            s_t, c_half = -(1 + eta) * sig[i + 1], math.expm1(h) / 2
            p2 = _pn(2, h) / h if k > 1 else 0.0
            p3 = _pn(3, h) / h**2 if k > 2 else 0.0
            # ε̂ = (x − α_s·x̂_0)/σ_s folds the order-1 term onto x and x̂_0: finite as α_s → 0
            # for η = 0, and exactly DDIM's ratio and gain there
            ratio = sig[i + 1] / sig[i] * ((1 + eta) - eta * math.exp(h) if eta else 1.0)
            gain = (1 + eta) * alp[i + 1] * -math.expm1(-h)
            std = eta * math.expm1(2 * h) if eta else 0.0
        noise = sig[i + 1] * math.sqrt(std) * s_noise
        w = [0.0, 0.0, 0.0]
        if k == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            c1 = s_t * (c_half if second == "half" else p2)
            w[0], w[1] = c1 / r0, -c1 / r0
        elif k == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            a = r0 / (r0 + r1)
            f = (1.0 if reference else 2.0) / (r0 + r1)
            # D1 = (1 + a)·D1_0 − a·D1_1 ≈ h·m', D2 = f·(D1_0 − D1_1) ≈ h²·m'' (f = 2/(r0 + r1));
            # D1_0 = (m0 − m1)/r0, D1_1 = (m1 − m2)/r1, expanded onto m0, m1, m2
            d1 = ((1 + a) / r0, -(1 + a) / r0 - a / r1, a / r1)
            d2 = (f / r0, -f / r0 - f / r1, f / r1)
            w = [s_t * (p2 * u + p3 * v) for u, v in zip(d1, d2)]
        if data:  # the order-1 term's x̂_0 is m0 itself
            w[0] += alp[i + 1] * -math.expm1(-big)
        out.append((_MS(ratio, gain, tuple(w[:k]) if (data or k > 1) else ()), noise))
    return out


def _multistep_init(
    x: Tensor,
    grid: Grid,
    model: Model,
    noise: Any,
    *,
    order: int,
    data: bool,
    eta: float,
    s_noise: float,
    second: str,
    reference: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    below: int,
) -> SDEMultistepState:
    orders = multistep_orders(grid, order, lower_order_final, below, euler_at_final)
    coef = _multistep_coefs(
        grid, orders, data=data, eta=eta, s_noise=s_noise, second=second, reference=reference
    )
    std = tuple(c[1] if c is not None else 0.0 for c in coef)
    return SDEMultistepState(
        points=tuple(model.point(grid.t[i], x) for i in range(grid.steps)),
        coef=tuple(c[0] if c is not None else None for c in coef),
        data=data,
        keep=max(order - 1, 1),
        std=std,
        t=tuple(grid.t.tolist()),
        noise=_noise_source(noise, grid, any(v != 0.0 for v in std)),
    )


def _multistep_step(
    x: Tensor, i: int, state: SDEMultistepState, model: Model
) -> tuple[Tensor, SDEMultistepState]:
    out, new = multistep_step(x, i, state, model)
    std = state.std[i]
    if std != 0.0:
        out = out + std * draw(state.noise, x, i, state.t[i], state.t[i + 1])
    return out, new  # type: ignore[return-value]


@dataclass(frozen=True)
class _Multistep(Solver):
    """Shared options and plumbing of the multistep SDE solvers."""

    eta: float = 1.0
    s_noise: float = 1.0
    lower_order_final: bool = True
    euler_at_final: bool = False

    stochastic: ClassVar[bool] = True
    _below: ClassVar[int] = 15

    def validate(self) -> None:
        _check(self.name, self.eta, self.s_noise)
        FinalOrders.of(self.name, self.lower_order_final, self._below, self.euler_at_final)

    def step(self, x: Tensor, i: int, state: State, model: Model) -> tuple[Tensor, State]:
        return _multistep_step(x, i, state, model)  # type: ignore[arg-type]


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

    Convergence at η = 1 (gmm2d + SD, tests/test_dpmpp_sde.py): strong order 1 on a fixed
    Brownian path — the bound for any scheme that sees the path only through its grid
    increments, whatever the drift's order — measured 1.09 (median error 2.1e-3 at 128 steps;
    DDPM 1.08, 3.8e-3). Weak: the covariance error at 8/16/32 steps is .14/.026/.017 (DDPM
    .18/.074/.050): no clean power law yet at these counts, theory gives order 1. η = 0:
    deterministic order 2. Shapes: x (B, ...).
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

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> SDEMultistepState:
        return _multistep_init(
            x, grid, model, noise, order=2, data=True, eta=self.eta, s_noise=self.s_noise,
            second="half" if self.solver_type == "midpoint" else "taylor", reference=False,
            lower_order_final=self.lower_order_final, euler_at_final=self.euler_at_final,
            below=self._below,
        )  # fmt: skip


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
    uses the Taylor weight P(2,H)/H, which ``reference=True`` also reproduces). Measured
    deterministic orders (η = 0, local truncation error): 3.0 (default), 1.9 (reference).

    diffusers' ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)``
    is neither: with D2 = (D1_0 − D1_1)/(r0 + r1) (the half convention) its weight is
    α_t·((1 − e^{−2h} − 2h)/(2h)² − ½) = α_t·(P(3, 2h)/(2h)² − 1) ≈ −α_t, where k-diffusion's is
    α_t·P(3, 2h)/(2h)² ≈ α_t·h/3 and the correct one twice that: a sign error on its ½ that leaves
    an O(h²) local term, so its order-3 SDE runs land 0.1–0.4 relative away from both variants
    here on gmm64 + SD (the branch came with diffusers PR #9104, whose author asked for a careful
    review; tests/test_dpmpp_sde.py pins the one-step formula).

    ``lower_order_final`` / ``euler_at_final`` as ``dpmpp_3m``. At η = 1 the noise limits it as
    2M: strong order measured 1.21 (theory 1), covariance error .10/.028/.018 at 8/16/32 steps.
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

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> SDEMultistepState:
        return _multistep_init(
            x, grid, model, noise, order=3, data=True, eta=self.eta, s_noise=self.s_noise,
            second="taylor" if self.reference else "half", reference=self.reference,
            lower_order_final=self.lower_order_final, euler_at_final=self.euler_at_final,
            below=self._below,
        )  # fmt: skip


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
    O(h²) per step (measured in the tests). η = 0 is exactly ``dpm_solver`` (multistep, the
    ``dpmsolver``/``taylor`` type for ``midpoint``/``heun``). The order-1 term is evaluated with
    ε̂ = (x − α_i·x̂_0)/σ_i folded in, i.e. (σ_{i+1}/σ_i)(1 + η − η·e^h)·x + (1 + η)α_{i+1}(1 −
    e^{−h})·x̂_0. ``lower_order_final`` as ``dpm_solver`` (below 10 steps; diffusers uses 15:
    they differ only with final="tmin"). The step to σ = 0 returns x̂_0. At η = 1: strong
    order measured 1.17 (theory 1), covariance error .36/.015/.018 at 8/16/32 steps; with 4
    steps the noise form is unstable (x-coefficient (σ_t/σ_s)(2 − e^h) ≪ −1 for h ≳ 1:
    covariance error ~900 on gmm2d), so prefer the data-form solvers at few steps.
    Shapes: x (B, ...).
    """

    order: int = 2  # type: ignore[assignment]
    solver_type: str = "midpoint"

    name: ClassVar[str] = "sde_dpm_solver"
    description: ClassVar[str] = "SDE-DPM-Solver: noise prediction, orders 1-2, reverse SDE (eta)"
    _below: ClassVar[int] = 10

    def validate(self) -> None:
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(f"sde_dpm_solver: order must be 1 or 2, got {self.order!r}")
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"sde_dpm_solver: solver_type must be one of {SOLVER_TYPES}, "
                f"got {self.solver_type!r}"
            )
        super().validate()

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> SDEMultistepState:
        return _multistep_init(
            x, grid, model, noise, order=self.order, data=False, eta=self.eta,
            s_noise=self.s_noise, second="half" if self.solver_type == "midpoint" else "taylor",
            reference=False, lower_order_final=self.lower_order_final,
            euler_at_final=self.euler_at_final, below=self._below,
        )  # fmt: skip


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
class DPMSolverPPSDE(Solver):
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
    source with ``randn_between`` (:func:`draw`) is asked for exactly these two intervals. A
    stream source is used with this sub-step index scheme: step i draws w1 = randn_like(x, i),
    then w2 = randn_extra(x, i, 0) (randn_like(x, i) again if the source has no
    ``randn_extra``; for a stream both are its next draws), and takes z_u = w1,
    z_t = c·w1 + sqrt(1 − c²)·w2: the tree's joint law (not its values, which depend on
    torchsde's RNG). Pass ``noise=BrownianTree(..., time="rho")`` for k-diffusion's tree
    variable (values still differ: its tree is torchsde's).

    η = 0 is exactly ``dpmpp_2s`` (r = ½). Order-1 steps of an odd ``nfe`` budget and the step
    from a grid point with one call are A_η(s → t; x̂_0) — with η = 1 DDPM's step exactly. Two
    calls per step; the step to σ = 0 returns x̂_0 (one call). Budgets as ``dpmpp_2s``
    (DPM-Solver-fast plan). At η = 1: strong order measured 0.91 (theory 1; tree noise),
    covariance error .027/.019/.007 at 8/16/32 steps (the best of this module at few steps);
    η = 0: deterministic order 2. Shapes: x (B, ...).
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

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> SDESinglestepState:
        orders = singlestep_orders(grid, 2)
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
        return SDESinglestepState(plan=tuple(plan), noise=_noise_source(noise, grid, draws))

    @staticmethod
    def _pair(noise: Any, x: Tensor, i: int, p: _SDEPlan) -> tuple[Tensor, Tensor]:
        """(z_u, z_t): the normalised increments over [s, u] and [s, t] of one Brownian path."""
        if getattr(noise, "randn_between", None) is not None:
            return draw(noise, x, i, p.t[0], p.t[1]), draw(noise, x, i, p.t[0], p.t[2])
        z_u = noise.randn_like(x, i)
        extra = getattr(noise, "randn_extra", None)
        w = extra(x, i, 0) if extra is not None else noise.randn_like(x, i)
        return z_u, p.mix[0] * z_u + p.mix[1] * w

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
                z_t = draw(state.noise, x, i, p.t[0], p.t[2])
            out = out + p.final.c * z_t
        return out, state
