"""Score-SDE samplers (Song et al., ICLR 2021): Euler–Maruyama and predictor–corrector.

Both integrate the reverse-time SDE family of any Gaussian path (``processes/base.py``)

    dx = [f_t·x − ½(g_t² + γ_t²)·∇log p_t(x)] dt + γ_t dw̄,    ∇log p_t = −ε̂/σ_t,

in process time t (f = dlog α/dt, g² the forward diffusion, γ² = ``process.gamma_sq(t)``).
Noise comes from the run's NoiseSource; a :class:`~diffsolve.noise.BrownianTree` (in t, its
default) makes a sample path consistent across step counts. With a clean end the step to σ = 0
returns x̂_0 at its start point (Song et al.'s "noise removal" step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..processes.base import GaussianProcess
from .base import Grid, Model, host, register
from .engine import Row, RowSolver, RowState, StepRule, combine

__all__ = ["PC", "EulerMaruyama"]


def _em_coefs(grid: Grid, noise_scale: float) -> list[tuple[float, float, float] | None]:
    """Per step (x weight, ε̂ weight, noise weight) of one Euler–Maruyama step in t, float64;
    None for the step to σ = 0 (it returns x̂_0).

    x_{i+1} = (1 − Δ·f_i)·x_i − Δ·½(g_i² + γ_i²)/σ_i·ε̂ + γ_i·sqrt(Δ)·z,  Δ = t_i − t_{i+1} > 0.
    """
    p = grid.process
    t = grid.t[:-1]
    dt = (grid.t[:-1] - grid.t[1:]).tolist()
    f = p.drift_coef(t).tolist()
    g2 = p.diffusion_sq(t).tolist()
    gam2 = (noise_scale**2 * p.gamma_sq(t)).tolist()
    sig = grid.sigma[:-1].tolist()
    out: list[tuple[float, float, float] | None] = []
    for i, d in enumerate(dt):
        if grid.is_final(i):
            out.append(None)
            continue
        c = (1.0 - d * f[i], -d * 0.5 * (g2[i] + gam2[i]) / sig[i], math.sqrt(gam2[i] * d))
        if not all(math.isfinite(v) for v in c):
            raise ValueError(
                f"the SDE coefficients are not finite at t = {float(grid.t[i])!r} (α = 0 there?); "
                "start below the singular end (process.t_max_finite)"
            )
        out.append(c)
    return out


def _rule(t: list[float], i: int, calls: int, coef: tuple[float, float, float] | None) -> StepRule:
    """Step i's rule: ``calls`` evaluations at t_i, then the row (x, ε̂, noise) = ``coef`` over
    the last one with its noise the increment over t_i → t_{i+1} (None: return x̂_0)."""
    if coef is None:
        return StepRule((t[i],) * calls)
    a, b, c = coef
    spans = ((t[i], t[i + 1]),) if c != 0.0 else ()
    return StepRule((t[i],) * calls, update=Row(a, (), (b,), c), spans=spans)


@register
@dataclass(frozen=True)
class EulerMaruyama(RowSolver):
    """Euler–Maruyama on the reverse SDE in process time (Song et al. 2021, §4.2 / App. C):

        x_{i+1} = x_i − Δ_i·[f_i·x_i + ½(g_i² + γ_i²)·ε̂(x_i, t_i)/σ_i] + γ_i·sqrt(Δ_i)·z_i,

    Δ_i = t_i − t_{i+1} > 0, γ_i² = ``noise_scale``²·``process.gamma_sq(t_i)`` (γ = g, the
    default, is the reverse SDE of Song et al. eq. 6; ``noise_scale=0`` is Euler's method on
    the probability-flow ODE in t). z_i = ``noise.randn_between(x, i, t_i, t_{i+1})``: with a
    Brownian tree, the normalised increment of W over [t_{i+1}, t_i]. One row per step. Weak
    order 1; the noise is additive (independent of x), so the strong order on a fixed Brownian
    path is 1 too. The step to σ = 0 returns x̂_0. Default schedule: uniform in t (Song et al.'s
    linspace(T, ε, N)). On a grid that starts where α = 0 (flow matching at t = 1, its default
    there) it is refused: f and g² are infinite there, and from t_max_finite instead the explicit
    step in t explodes at few steps; use ``ddpm`` or ``dpmpp_2m_sde``. Shapes: x (B, ...).
    """

    noise_scale: float = 1.0

    name: ClassVar[str] = "euler_maruyama"
    description: ClassVar[str] = "Euler–Maruyama on the reverse SDE in t (Score SDE)"
    stochastic: ClassVar[bool] = True
    default_schedule: ClassVar[str] = "uniform"

    def validate(self) -> None:
        v = self.noise_scale
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not (math.isfinite(v) and v >= 0)
        ):
            raise ValueError(f"euler_maruyama: noise_scale must be a finite number >= 0, got {v!r}")

    @property
    def order(self) -> int:
        return 1

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        if float(grid.alpha[0]) == 0.0:
            # from t_max_finite instead, the drift f = −1/(1 − t) is so stiff that an explicit
            # step in t explodes at few steps (relative error 408 at NFE 4 and 151 at NFE 8 on
            # gmm2d, logsnr grid), so the default is refused rather than moved
            raise ValueError(
                f"euler_maruyama: α = 0 at the first time t = {float(grid.t[0])!r} "
                f"({grid.process!r}, a flow path): the reverse SDE's drift and diffusion are "
                "infinite there, and an explicit Euler–Maruyama step in t is unstable near it. "
                "Use 'ddpm', 'dpmpp_2m_sde' or 'dpmpp_sde' (exact in the linear part), or pass "
                "schedule='logsnr' (it starts at t_max_finite) with at least 16 steps"
            )
        t = grid.t.tolist()
        return tuple(_rule(t, i, 1, c) for i, c in enumerate(_em_coefs(grid, self.noise_scale)))


@dataclass(frozen=True)
class PCState(RowState):
    """The engine's state (the predictor rows) plus the Langevin corrector's constants."""

    snr: float = host(default=0.0)
    langevin_alpha: tuple[float, ...] = host(default=())  # (α_i/α_{i+1})² per step


PREDICTORS = ("reverse_diffusion", "euler_maruyama")
SNR_NORMS = ("sample", "batch")


@register
@dataclass(frozen=True)
class PC(RowSolver):
    """Predictor–corrector sampling (Song et al. 2021, Alg. 1–3 / App. G).

    Each step i runs ``corrector_steps`` Langevin corrections at t_i, then one predictor step
    t_i → t_{i+1} (the official loop order). With s = ∇log p_{t_i} = −ε̂/σ_i:

    * Langevin corrector (Alg. 4/5): ε_L = 2·α_i·(snr·‖z‖/‖s‖)², x ← x + ε_L·s + sqrt(2ε_L)·z,
      α_i = (α_{t_i}/α_{t_{i+1}})² (= 1 − β_i on a VP chain, 1 for VE). ``snr_norm="batch"``
      (default) is the official code's: per-sample norms averaged over the batch, so the step
      size, and hence a sample, depends on the whole batch it is run in: the same x_T and noise
      (even a split with ``NoiseSource(seed, offset=lo)``, which reproduces every other
      stochastic solver exactly) give other samples in another batch or batch split (measured
      on gmm64, 6 = 2 + 4, 4 steps: relative change 1.8e-3), and one outlier in a batch changes
      the others' steps. ``"sample"`` uses each sample's own norms (split-exact, independent of
      the batch) but is unstable in low dimension: a sample whose score happens to be small gets
      a huge step; use it only for high-dimensional data.
    * Reverse-diffusion predictor (App. E, eq. 46): with the forward chain
      x_{t_i} = a_i·x_{t_{i+1}} + G_i·z, a_i = α_{t_i}/α_{t_{i+1}},
      G_i² = σ_{t_i}² − a_i²·σ_{t_{i+1}}²,
      x_{i+1} = (2 − a_i)·x_i + G_i²·s + G_i·z (VE: x + (σ_i² − σ_{i+1}²)s + …; VP:
      (2 − sqrt(1 − β_i))x + β_i·s + sqrt(β_i)z, exactly the official formulas).
      ``predictor="euler_maruyama"`` uses :class:`EulerMaruyama`'s step (γ = g).

    The predictor is the step's row (over the corrected x). The corrector is not a row: ε_L
    depends on x through ‖s‖, so its calls (at t_i, the step's first ones) run as their own
    loop before it.

    ``snr`` defaults to 0.16 for α ≡ 1 processes (VE, EDM: the official VE setting) and 0.01
    otherwise (VP, sub-VP). NFE: every Langevin step is one call and every predictor step one
    more, so ``steps`` steps cost steps·(corrector_steps + 1); the step to σ = 0 runs its
    correctors and returns x̂_0 (its predictor call). An ``nfe=`` budget is met exactly by
    dropping the surplus correctors from the first step (at t_max, where x_T already has the
    prior's law). Corrector k's noise is ``noise.randn(x, i, stage=k + 1)`` (independent of
    the path); predictor noise ``noise.randn_between(x, i, t_i, t_{i+1})`` (stage 0; a Brownian
    increment with a tree). Default schedule: uniform t.
    Shapes: x (B, ...).
    """

    snr: float | None = None
    corrector_steps: int = 1
    predictor: str = "reverse_diffusion"
    snr_norm: str = "batch"

    name: ClassVar[str] = "pc"
    description: ClassVar[str] = "Score-SDE predictor–corrector: reverse diffusion + Langevin"
    stochastic: ClassVar[bool] = True
    default_schedule: ClassVar[str] = "uniform"

    def validate(self) -> None:
        c = self.corrector_steps
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"pc: corrector_steps must be an integer >= 0, got {c!r}")
        s = self.snr
        if s is not None and (
            isinstance(s, bool)
            or not isinstance(s, (int, float))
            or not (math.isfinite(s) and s > 0)
        ):
            raise ValueError(f"pc: snr must be a finite number > 0 (or None: auto), got {s!r}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"pc: predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.snr_norm not in SNR_NORMS:
            raise ValueError(f"pc: snr_norm must be one of {SNR_NORMS}, got {self.snr_norm!r}")

    @property
    def order(self) -> int:
        return 1

    def snr_for(self, process: GaussianProcess) -> float:
        """The signal-to-noise ratio used on ``process`` (0.16 VE-like, 0.01 otherwise)."""
        if self.snr is not None:
            return float(self.snr)
        t = torch.tensor([process.t_min, process.t_max_finite], dtype=torch.float64)
        return 0.16 if bool((process.alpha(t) == 1).all()) else 0.01

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        return (self.corrector_steps + 1,) * steps

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        per = self.corrector_steps + 1
        steps = -(-nfe // per)
        return (nfe - per * (steps - 1), *(per,) * (steps - 1))

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        n = grid.steps
        if float(grid.alpha[0]) == 0.0:
            raise ValueError(
                f"pc: α = 0 at the first time t = {float(grid.t[0])!r} ({grid.process!r}, a "
                "flow path): the score is singular there and its default uniform-in-t grid "
                "starts there. Pass schedule='logsnr' (it starts at t_max_finite), or use "
                "'ddpm', 'dpmpp_2m_sde' or 'dpmpp_sde'"
            )
        if not all(1 <= k <= self.corrector_steps + 1 for k in calls):
            raise ValueError(f"pc: {n} steps cannot make exactly {sum(calls)} calls")
        a = (grid.alpha[:-1] / grid.alpha[1:]).tolist()
        s2 = (grid.sigma**2).tolist()
        sig = grid.sigma.tolist()
        em = _em_coefs(grid, 1.0) if self.predictor == "euler_maruyama" else None
        t, out = grid.t.tolist(), []
        for i, k in enumerate(calls):
            if grid.is_final(i) or em is not None:
                coef = None if grid.is_final(i) else em[i]  # type: ignore[index]
            else:
                g2 = s2[i] - a[i] ** 2 * s2[i + 1]
                # G²·s = −G²·ε̂/σ
                coef = (2.0 - a[i], -g2 / sig[i], math.sqrt(max(g2, 0.0)))
            out.append(_rule(t, i, k, coef))
        return tuple(out)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> PCState:
        from ..noise import NoiseSource

        state = super().init(x, grid, model, noise)
        if state.noise is None:  # no predictor draws (one step to σ = 0): the correctors do
            state = state.replace(noise=(noise if noise is not None else NoiseSource()).bind(grid))
        return PCState(
            rules=state.rules,
            points=state.points,
            keep=state.keep,
            noise=state.noise,
            snr=self.snr_for(grid.process),
            langevin_alpha=tuple(((grid.alpha[:-1] / grid.alpha[1:]) ** 2).tolist()),
        )

    def _norm(self, v: Tensor) -> Tensor:
        nrm = v.reshape(v.shape[0], -1).norm(dim=1)
        if self.snr_norm == "batch":
            nrm = nrm.mean().expand(v.shape[0])
        return nrm.reshape(-1, *([1] * (v.ndim - 1)))

    # PC.step reads the corrector constants that only PC.init's PCState holds: it narrows
    # RowSolver's state on purpose (a state never passes between solvers)
    def step(  # type: ignore[override]
        self, x: Tensor, i: int, state: PCState, model: Model
    ) -> tuple[Tensor, PCState]:
        rule, points = state.rules[i], state.points[i]
        inv_sigma = 1.0 / points[0].sigma
        for k in range(rule.calls - 1):  # Langevin: a step size from the norms, not a row
            score = model(x, points[k]).eps * -inv_sigma
            z = state.noise.randn(x, i, k + 1)
            ratio = state.snr * self._norm(z) / self._norm(score).clamp_min(1e-30)
            eps_l = (2.0 * state.langevin_alpha[i]) * ratio * ratio
            x = x + eps_l * score + torch.sqrt(2.0 * eps_l) * z
        pred = model(x, points[-1])
        if rule.update is None:
            return pred.x0, state
        span = rule.spans[0] if rule.spans else None  # the predictor's draw is a path increment
        z = None if span is None else state.noise.randn_between(x, i, *span)
        return combine(rule.update, x, (pred,), z), state
