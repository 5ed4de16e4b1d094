"""Score-SDE samplers (Song et al., ICLR 2021): Euler–Maruyama and predictor–corrector, on the
reverse-time SDE family of any Gaussian path (``processes/base.py``) in process time t,

    dx = [f_t·x − ½(g_t² + γ_t²)·∇log p_t(x)] dt + γ_t dw̄,    ∇log p_t = −ε̂/σ_t,

(f = dlog α/dt, g² the forward diffusion, γ² = ``process.gamma_sq(t)``). Noise: the run's
NoiseSource (a Brownian tree in t makes a path consistent across step counts). The step to
σ = 0 returns x̂_0 (Song et al.'s "noise removal"). Notes: docs/solvers-stochastic.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..noise import NoiseSource
from ..processes.base import GaussianProcess
from .base import Grid, Model, check_choices, check_nonnegative, register
from .engine import Row, RowSolver, RowState, StepRule, update_rules

__all__ = ["PC", "EulerMaruyama"]


def _em_rows(grid: Grid, noise_scale: float) -> list[Row | None]:
    """Per step the row (x, ε̂, noise) of one Euler–Maruyama step in t, float64 (None: the step
    to σ = 0, which returns x̂_0):

    x_{i+1} = (1 − Δ·f_i)·x_i − Δ·½(g_i² + γ_i²)/σ_i·ε̂ + γ_i·sqrt(Δ)·z,  Δ = t_i − t_{i+1} > 0.
    """
    p = grid.process
    t = grid.t[:-1]
    dt = (grid.t[:-1] - grid.t[1:]).tolist()
    f = p.drift_coef(t).tolist()
    g2 = p.diffusion_sq(t).tolist()
    gam2 = (noise_scale**2 * p.gamma_sq(t)).tolist()
    sig = grid.sigma[:-1].tolist()
    out: list[Row | None] = []
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
        out.append(Row(c[0], (), (c[1],), c[2]))
    return out


def _refuse_flow_start(grid: Grid, name: str, why: str, more: str = "") -> None:
    """ValueError for a grid that starts where α = 0 (a flow path at t = 1)."""
    if float(grid.alpha[0]) == 0.0:
        raise ValueError(
            f"{name}: α = 0 at the first time t = {float(grid.t[0])!r} ({grid.process!r}, a "
            f"flow path): {why}. Use 'ddpm', 'dpmpp_2m_sde' or 'dpmpp_sde' (exact in the linear "
            f"part), or pass schedule='logsnr' (it starts at t_max_finite){more}"
        )


@register
@dataclass(frozen=True)
class EulerMaruyama(RowSolver):
    """Euler–Maruyama on the reverse SDE in process time (Song et al. 2021, §4.2 / App. C):

        x_{i+1} = x_i − Δ_i·[f_i·x_i + ½(g_i² + γ_i²)·ε̂(x_i, t_i)/σ_i] + γ_i·sqrt(Δ_i)·z_i,

    Δ_i = t_i − t_{i+1} > 0, γ_i² = ``noise_scale``²·``process.gamma_sq(t_i)`` (γ = g: Song et
    al. eq. 6; 0: Euler on the probability-flow ODE in t), z_i = ``randn_between(x, i, t_i,
    t_{i+1})``. One row per step; weak order 1. Default schedule: uniform in t. Refused on a grid
    that starts where α = 0 (a flow path). Shapes: x (B, ...).
    Notes: docs/solvers-stochastic.md#euler_maruyama.
    """

    noise_scale: float = 1.0

    name: ClassVar[str] = "euler_maruyama"
    order: ClassVar[int] = 1
    description: ClassVar[str] = "Euler–Maruyama on the reverse SDE in t (Score SDE)"
    stochastic: ClassVar[bool] = True
    default_schedule: ClassVar[str] = "uniform"

    def validate(self) -> None:
        check_nonnegative("euler_maruyama", noise_scale=self.noise_scale)

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        why = (
            "the reverse SDE's drift and diffusion are infinite there, and an explicit "
            "Euler–Maruyama step in t is unstable near it"
        )
        _refuse_flow_start(grid, "euler_maruyama", why, " with at least 16 steps")
        return update_rules(grid, _em_rows(grid, self.noise_scale))


PREDICTORS = ("reverse_diffusion", "euler_maruyama")
SNR_NORMS = ("sample", "batch")


@register
@dataclass(frozen=True)
class PC(RowSolver):
    """Predictor–corrector sampling (Song et al. 2021, Alg. 1–3 / App. G). Step i runs
    ``corrector_steps`` Langevin corrections at t_i, then one predictor step t_i → t_{i+1}; with
    s = ∇log p_{t_i} = −ε̂/σ_i, α_i = (α_{t_i}/α_{t_{i+1}})², a_i = α_{t_i}/α_{t_{i+1}}:

        corrector: ε_L = 2·α_i·(snr·‖z‖/‖s‖)²,  x ← x + ε_L·s + sqrt(2ε_L)·z   (Alg. 4/5)
        predictor: x_{i+1} = (2 − a_i)·x_i + G_i²·s + G_i·z,  G_i² = σ_{t_i}² − a_i²·σ_{t_{i+1}}²

    (reverse diffusion, App. E eq. 46; ``predictor="euler_maruyama"``: :class:`EulerMaruyama`'s
    step). The corrector is a loop (ε_L depends on x), the predictor the step's row. ``snr``:
    0.16 where α ≡ 1, else 0.01; ``snr_norm="batch"`` (the official norms) makes a sample depend
    on its batch, ``"sample"`` does not. One call per corrector and predictor step. Shapes:
    x (B, ...). Notes (noise stages, budgets, measured numbers): docs/solvers-stochastic.md#pc.
    """

    snr: float | None = None
    corrector_steps: int = 1
    predictor: str = "reverse_diffusion"
    snr_norm: str = "batch"

    name: ClassVar[str] = "pc"
    order: ClassVar[int] = 1
    description: ClassVar[str] = "Score-SDE predictor–corrector: reverse diffusion + Langevin"
    stochastic: ClassVar[bool] = True
    default_schedule: ClassVar[str] = "uniform"

    def validate(self) -> None:
        c, s = self.corrector_steps, self.snr
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"pc: corrector_steps must be an integer >= 0, got {c!r}")
        number = isinstance(s, (int, float)) and not isinstance(s, bool)
        if s is not None and not (number and math.isfinite(s) and s > 0):
            raise ValueError(f"pc: snr must be a finite number > 0 (or None: auto), got {s!r}")
        check_choices("pc", predictor=(self.predictor, PREDICTORS))
        check_choices("pc", snr_norm=(self.snr_norm, SNR_NORMS))

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
        why = "the score is singular there and its default uniform-in-t grid starts there"
        _refuse_flow_start(grid, "pc", why)
        if not all(1 <= k <= self.corrector_steps + 1 for k in calls):
            raise ValueError(f"pc: {grid.steps} steps cannot make exactly {sum(calls)} calls")
        a = (grid.alpha[:-1] / grid.alpha[1:]).tolist()
        if self.predictor == "euler_maruyama":
            rows = _em_rows(grid, 1.0)
        else:  # reverse diffusion; G²·s = −G²·ε̂/σ
            s2, sig = (grid.sigma**2).tolist(), grid.sigma.tolist()
            rows = []
            for i in range(grid.steps):
                g2 = s2[i] - a[i] ** 2 * s2[i + 1]
                row = Row(2.0 - a[i], (), (-g2 / sig[i],), math.sqrt(max(g2, 0.0)))
                rows.append(None if grid.is_final(i) else row)
        snr = self.snr_for(grid.process)
        # k − 1 corrector calls at t_i first; its constants: snr, α_i = (α_{t_i}/α_{t_{i+1}})²
        return tuple(
            rule._replace(t=rule.t * k, consts=(snr, a[i] ** 2))
            for i, (k, rule) in enumerate(zip(calls, update_rules(grid, rows)))
        )

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> RowState:
        state = super().init(x, grid, model, noise)
        if state.noise is None:  # no predictor draws (one step to σ = 0): the correctors do
            state = state.replace(noise=(noise if noise is not None else NoiseSource()).bind(grid))
        return state

    def _norm(self, v: Tensor) -> Tensor:
        nrm = v.reshape(v.shape[0], -1).norm(dim=1)
        if self.snr_norm == "batch":
            nrm = nrm.mean().expand(v.shape[0])
        return nrm.reshape(-1, *([1] * (v.ndim - 1)))

    def step(self, x: Tensor, i: int, state: RowState, model: Model) -> tuple[Tensor, RowState]:
        rule, points = state.rules[i], state.points[i]
        snr, langevin_alpha = rule.consts
        inv_sigma = 1.0 / points[0].sigma
        for k in range(rule.calls - 1):  # Langevin: a step size from the norms, not a row
            score = model(x, points[k]).eps * -inv_sigma
            z = state.noise.randn(x, i, k + 1)
            ratio = snr * self._norm(z) / self._norm(score).clamp_min(1e-30)
            eps_l = (2.0 * langevin_alpha) * ratio * ratio
            x = x + eps_l * score + torch.sqrt(2.0 * eps_l) * z
        return super().step(x, i, state, model)  # the predictor: the step's row
