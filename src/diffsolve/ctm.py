"""Consistency Trajectory Models and γ-sampling (Kim et al., ICLR 2024).

A CTM learns the flow map G(x_t, t, s): the probability-flow ODE solution from t to any s ≤ t.
On a Gaussian path x_t = α_t·x_0 + σ_t·ε it is parametrised as the DDIM (Euler in σ/α) jump
with a learned data estimate g_θ (CTM's parametrisation G = (s/t)·x + (1 − s/t)·g_θ, in EDM's
α = 1, σ = t; the same on rectified flow, α = 1 − t, σ = t):

    G(x_t, t, s) = (σ_s/σ_t)·x_t + (α_s − α_t·σ_s/σ_t)·g_θ(x_t, t, s),

so G(x, t, t) = x exactly, and g_θ(x, t, t) is a denoiser (the slope of G at s = t is the
PF-ODE's). :class:`CTM` wraps a network ``net(x, t_model, s_model, **cond)`` whose output is a
prediction (``eps``, ``x0``, ``v``, ``velocity``, ``score``) read at (x_t, t) by the
:class:`~diffsolve.Denoiser` table; its x̂_0 view is g_θ(x_t, t, s).

Two ways to sample it, both through ``ds.sample``:

* **γ-sampling** (CTM's γ-sampler, official code sony/ctm):
  ``ds.sample(ctm, x_T, ds.CTMGamma(gamma=γ), nfe=n)``.
  On a decreasing grid t_0 > … > t_n (the clean end σ = 0 last), step i jumps
  x ← G(x, t_i, s_i) with σ_{s_i}/α_{s_i} = √(1 − γ²)·σ_{t_{i+1}}/α_{t_{i+1}}, then re-noises
  forward to t' = t_{i+1}: x ← (α_{t'}/α_{s_i})·x + √(σ_{t'}² − (α_{t'}·σ_{s_i}/α_{s_i})²)·z,
  z from the run's :class:`~diffsolve.noise.Noise`. The last step jumps to the grid's end with
  no noise. γ = 0 is deterministic multistep along the ODE trajectory; γ = 1 is consistency-model
  multistep (jump to σ = 0, re-noise). One network call per step: NFE = steps. (The official
  code puts s_i at √(1 − γ²)(t_{i+1} − σ_min) + σ_min; here the clean end is σ = 0.)
* **As a denoiser**: called with an ordinary evaluation point (every solver does), a CTM
  returns g_θ(x, t, t), the denoiser of its own trajectory, so every ODE/SDE solver
  (``solver="auto"``, ``dpmpp_2m``, ...) runs on it: the "G(x, t, t − dt)" route.

``CTMGamma`` is a solver object rather than a registered name: registered names must run on
every Denoiser (the solver suites iterate ``ds.solvers()``), and γ-sampling needs a flow map.
It refuses models that are not a :class:`CTM` (through wrappers such as CFG) before any call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .denoiser import Denoiser, DenoiserWrapper, EvalPoint, Prediction
from .processes.base import as_time
from .schedules import Uniform
from .solvers.base import Grid, Model, Solver, State, host

__all__ = ["CTM", "CTMGamma", "JumpPoint"]


@dataclass(frozen=True)
class JumpPoint(EvalPoint):
    """An evaluation point (x_t at t) with a target time s ≤ t; ``s = 0`` is the clean end
    (α_s = 1, σ_s = 0). ``s_in`` is the network's input for s, shape (B,). A :class:`CTM`
    called with it returns (x̂_0 = g_θ(x, t, s), ε̂ = (x − α_t·x̂_0)/σ_t)."""

    s: float = 0.0
    alpha_s: float = 1.0
    sigma_s: float = 0.0
    s_in: Tensor | None = None

    @classmethod
    def of(cls, at: EvalPoint, to: EvalPoint, clean: bool = False) -> JumpPoint:
        """The jump from point ``at`` to point ``to`` (``clean``: to σ = 0, whatever ``to``'s
        coefficients; its network time input is kept)."""
        a_s, s_s = (1.0, 0.0) if clean else (to.alpha, to.sigma)
        return cls(
            at.t, at.alpha, at.sigma, at.d_alpha, at.d_sigma, at.t_in,
            s=to.t, alpha_s=a_s, sigma_s=s_s, s_in=to.t_in,
        )  # fmt: skip

    @property
    def coefficients(self) -> tuple[float, float]:
        """(a, b) of G = a·x + b·g: a = σ_s/σ_t, b = α_s − α_t·a (float64 on the host); (1, 0)
        at s = t, so G(x, t, t) = x exactly."""
        if self.s == self.t:
            return 1.0, 0.0
        a = self.sigma_s / self.sigma
        return a, self.alpha_s - self.alpha * a


class CTM(Denoiser):
    """A Consistency Trajectory Model: ``net(x, t_model, s_model, **cond)`` (Kim et al. 2024).

    Args:
        net: the network; ``t_model``/``s_model`` are ``time_map`` of t and s, shape (B,).
        process: the Gaussian path it was trained on.
        prediction: how the output is read at (x_t, t) (the Denoiser table); its x̂_0 view is
            g_θ(x_t, t, s). With s = t (an ordinary :class:`EvalPoint`) it is a plain denoiser.
        time_map, net_dtype, sample_shape: as :class:`~diffsolve.Denoiser`.

    ``ctm.jump(x, t, s, **cond)`` is the flow map G(x, t, s) (one network call);
    ``ds.sample(ctm, x_T, ds.CTMGamma(gamma=γ), nfe=n)`` is γ-sampling; any other solver
    samples its own ODE trajectory through g_θ(x, t, t).
    """

    def point_pair(self, t: float | Tensor, s: float | Tensor, like: Tensor) -> JumpPoint:
        """The :class:`JumpPoint` from t to s (0 ≤ s ≤ t; s = 0 is the clean end σ = 0).

        Raises ValueError for s > t, s < 0, t ≤ 0 or times past the process's t_max."""
        tf, sf = float(as_time(t)), float(as_time(s))
        if not (math.isfinite(tf) and math.isfinite(sf)):
            raise ValueError(f"CTM jump times must be finite, got t={tf}, s={sf}")
        if not 0.0 <= sf <= tf or tf <= 0.0:
            raise ValueError(
                f"a CTM jumps backward in time: need 0 ≤ s ≤ t and t > 0, got t={tf}, s={sf}"
            )
        if tf > self.process.t_max:
            raise ValueError(f"t={tf} is past the process's t_max={self.process.t_max}")
        return JumpPoint.of(self.point(tf, like), self.point(sf, like), clean=sf == 0.0)

    def raw(self, x: Tensor, point: EvalPoint, **cond: Any) -> Tensor:
        """One network call ``net(x, t_in, s_in, **cond)``; an ordinary point has s = t."""
        x_in = x if self.net_dtype is None else x.to(self.net_dtype)
        s_in = point.s_in if isinstance(point, JumpPoint) else None
        t_in = point.t_in
        s_in = t_in if s_in is None else s_in
        if t_in.shape[0] != x.shape[0]:  # a doubled batch (CFG)
            n = x.shape[0] // t_in.shape[0]
            t_in, s_in = t_in.repeat(n), s_in.repeat(n)
        if self.process.offset(cond) is not None:
            raise ValueError("CTM does not support processes with an offset (mean-reverting)")
        self.nfe += 1
        return self.net(x_in, t_in, s_in, **cond)

    def jump(self, x: Tensor, t: float | Tensor, s: float | Tensor, **cond: Any) -> Tensor:
        """G(x, t, s) for x (B, ...) at t, to s (0 ≤ s ≤ t; s = 0: σ = 0): one network call,
        x itself (exactly) when s = t."""
        pt = self.point_pair(t, s, x)
        a, b = pt.coefficients
        g = self(x, pt, **cond).x0
        return a * x + b * g

    def __repr__(self) -> str:
        return f"CTM({type(self.net).__name__}, {self.process!r}, prediction={self.prediction!r})"


def _ctm_inside(model: Any) -> CTM | None:
    while isinstance(model, DenoiserWrapper):
        model = model.model
    return model if isinstance(model, CTM) else None


@dataclass(frozen=True)
class CTMState(State):
    """γ-sampling's state: the jump points and coefficients of every step (host), the noise."""

    points: tuple[JumpPoint, ...] = host()
    coefs: tuple[tuple[float, float, float, float], ...] = host()
    noise: Any = field(default=None, metadata={"batch": False})


@dataclass(frozen=True)
class CTMGamma(Solver):
    """γ-sampling of a Consistency Trajectory Model (Kim et al. 2024, the γ-sampler).

    Step i (t_i → t_{i+1}): s_i with λ_{s_i} = λ_{t_{i+1}} − ½·log(1 − γ²) (σ/α shrunk by
    √(1 − γ²)), x ← G(x, t_i, s_i), then forward re-noising to t_{i+1} (see the module
    docstring); the last step jumps to the grid's end without noise. One call per step.

    Options:
        gamma: γ ∈ [0, 1]; 0: deterministic jumps along the ODE trajectory, 1: consistency
            model multistep sampling (every jump to σ = 0).
    """

    name: ClassVar[str] = "ctm_gamma"
    description: ClassVar[str] = "γ-sampling of a consistency trajectory model (ds.CTM)"
    stochastic: ClassVar[bool] = True
    # uniform in t, the last point at t_max/n (diffusers' flow grid; starts at t_max here)
    default_schedule: ClassVar[Any] = Uniform(trailing=True)  # type: ignore[assignment]

    gamma: float = 0.0

    def validate(self) -> None:
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 <= g <= 1.0:
            raise ValueError(f"ctm_gamma: gamma must be a number in [0, 1], got {g!r}")

    @property
    def order(self) -> int:
        return 1

    def check_model(self, model: Any) -> None:
        if _ctm_inside(model) is None:
            raise ValueError(
                f"solver 'ctm_gamma' needs a consistency trajectory model (ds.CTM, e.g. "
                f"nets.model('digits-ctm')) that offers jump(x, t, s); got {model!r}. Sample "
                "a diffusion or flow model with an ODE solver (solver='auto')"
            )

    def _target(self, grid: Grid, i: int) -> float:
        """s_i: the grid's next time for γ = 0 or the last step, σ = 0 for γ = 1."""
        if i == grid.steps - 1 or self.gamma == 0.0:
            return float(grid.t[i + 1])
        if self.gamma == 1.0:
            return 0.0
        lam = float(grid.lam[i + 1]) - 0.5 * math.log1p(-(self.gamma**2))
        return float(grid.process.t_of_lambda(torch.tensor(lam, dtype=torch.float64)))

    def grid_times(
        self, process: Any, schedule: Any, calls: tuple[int, ...], clean_end: bool
    ) -> Tensor:
        t = super().grid_times(process, schedule, calls, clean_end)
        # a jump is finite where α = 0 (flow paths at t = 1): start at the prior's own time
        # rather than at the schedules' finite-λ start t_max − t_min
        if float(t[0]) == process.t_max_finite and float(process.alpha(process.t_max)) == 0.0:
            t = t.clone()
            t[0] = process.t_max
        return t

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> CTMState:
        if self.gamma > 0 and grid.steps > 1 and noise is None:
            raise ValueError("ctm_gamma with gamma > 0 needs a noise source")
        points, coefs = [], []
        for i in range(grid.steps):
            s = self._target(grid, i)
            nxt = model.point(float(grid.t[i + 1]), x)
            to = nxt if s == float(grid.t[i + 1]) else model.point(s, x)
            pt = JumpPoint.of(model.point(float(grid.t[i]), x), to, clean=s == 0.0)
            a, b = pt.coefficients
            c, d = 1.0, 0.0
            if s != float(grid.t[i + 1]):  # γ > 0 before the last step: re-noise s → t_{i+1}
                c = nxt.alpha / pt.alpha_s
                d = math.sqrt(max(nxt.sigma**2 - (c * pt.sigma_s) ** 2, 0.0))
            points.append(pt)
            coefs.append((a, b, c, d))
        bound = noise.bind(grid) if noise is not None else None
        return CTMState(points=tuple(points), coefs=tuple(coefs), noise=bound)

    def step(self, x: Tensor, i: int, state: CTMState, model: Model) -> tuple[Tensor, State]:
        a, b, c, d = state.coefs[i]
        g: Prediction = model(x, state.points[i])
        x = a * x + b * g.x0 if a != 0.0 else b * g.x0
        if d > 0.0:  # γ > 0: forward re-noising from s_i to t_{i+1}
            x = c * x + d * state.noise.randn(x, i)
        elif c != 1.0:
            x = c * x
        return x, state
