"""SVDD: soft value-based decoding (Li et al. 2024, "Derivative-free guidance in continuous and
discrete diffusion models with soft value-based decoding", Alg. 1).

The optimal per-step policy toward p(x0)·exp(λ·r(x0)) is the pretrained kernel tilted by the soft
value, p_pre(x_{i+1} | x_i)·exp(λ·v(x_{i+1})), v(x) = (1/λ)·log E[exp(λ·r(x0)) | x]. SVDD draws M
candidate next states from the pretrained (stochastic) step, scores each by a value estimate
and keeps one per sample, drawn by softmax(λ·v) (λ = ∞: the argmax):

* SVDD-PM (no training): v(x_{i+1}) ≈ r(x̂0(x_{i+1})), the reward of the Tweedie estimate at the
  candidate's own noise level — one network call on the M candidates, which is also the next
  step's first call for the kept candidate (reused, not repeated);
* SVDD-MC: a value network ``value(x, t_model) -> (B,)`` regressed on rollouts' rewards.

Cost: each step's network call runs on B·M candidates (the paper: about M times the base
sampler's NFE). M = 1 is the base sampler exactly. The candidates' noise for candidate m is the
base run's stage-``m`` stream of the same counter-based source (m = 0 is the base draw), and the
choice uses the source's own uniform stream, so a sample does not depend on its batch split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Prediction
from ..noise import Noise

__all__ = ["SVDD", "SVDDRun"]

_CANDIDATE_STAGE = 64  # candidate m draws stage (stage + 64·m): clear of every solver's stages
_CHOICE_STAGE = 63  # the selection's uniform draw (a stream no solver uses)


@dataclass(frozen=True)
class SVDD:
    """Soft value-based decoding, passed as ``ds.sample(..., steer=ds.SVDD(reward, candidates=M))``.

    Args:
        reward: ``reward(x0) -> (B,)`` on samples (B, ...); differentiability not needed.
        candidates: M, candidate next states per step and sample (1: the base sampler).
        scale: λ; the kept candidate is drawn from softmax(λ·v) over the M; ``math.inf``
            (the default, the paper's image setting α = 0) keeps the argmax.
        value: optional value network ``value(x_t, t_model) -> (B,)`` (SVDD-MC); default None
            uses the reward of the candidate's Tweedie estimate (SVDD-PM).

    Needs a stochastic solver (``ddpm``, ``dpmpp_2m_sde``, ``dpmpp_sde``, ``euler_maruyama``,
    ...): a deterministic step gives M identical candidates (refused before any call where the
    solver's options say so, else after the first step). Noise: a counter-based
    :class:`~diffsolve.noise.NoiseSource` (the default); a Brownian tree is refused.
    Conditioning tensors (B, ...) are repeated for the candidates. ``info.nfe`` counts network
    calls, each on B·M rows: the cost in single-sample evaluations is about M times it.
    """

    reward: Callable[[Tensor], Tensor]
    candidates: int
    scale: float = math.inf
    value: Callable[[Tensor, Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        m = self.candidates
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"SVDD: candidates must be an int >= 1, got {m!r}")
        if not callable(self.reward):
            raise ValueError("SVDD: reward must be callable, reward(x0) -> (B,)")
        if self.value is not None and not callable(self.value):
            raise ValueError("SVDD: value must be callable, value(x_t, t_model) -> (B,)")
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isnan(s) or s < 0:
            raise ValueError(f"SVDD: scale must be >= 0 (math.inf: argmax), got {s!r}")

    def check_solver(self, solver: Any) -> None:
        """ValueError (before any network call) for a solver whose step draws no noise."""
        silent = getattr(solver, "eta", 1.0) == 0 or getattr(solver, "s_noise", 1.0) == 0
        if not getattr(solver, "stochastic", False) or silent:
            raise ValueError(
                f"SVDD needs a stochastic solver (its M candidates are M noise draws); "
                f"{solver.name!r} is deterministic here: use e.g. 'ddpm' or 'dpmpp_2m_sde'"
            )

    def wrap_noise(self, noise: Noise, batch: int) -> CandidateNoise:
        if getattr(noise, "path", False) or not callable(getattr(noise, "rand", None)):
            raise ValueError(
                "SVDD: candidates need a counter-based NoiseSource (randn and rand), "
                f"got {type(noise).__name__}"
            )
        return CandidateNoise(noise, batch, self.candidates)

    def start(self, x: Tensor, steps: int) -> SVDDRun:
        return SVDDRun(self, x.shape[0])


class CandidateNoise(Noise):
    """The run's noise seen by the candidate batch (B·M rows, sample-major): candidate m of
    sample b draws the base source's stage ``stage + 64·m`` for sample b, so candidate 0 is the
    base sampler's own draw."""

    def __init__(self, base: Noise, batch: int, m: int):
        self.base, self.batch, self.m = base, batch, m

    def bind(self, grid: Any) -> Noise:
        bound = self.base.bind(grid)
        if getattr(bound, "path", False):
            raise ValueError("SVDD: candidates need a counter-based NoiseSource, not a path")
        return CandidateNoise(bound, self.batch, self.m)

    def _draw(self, x: Tensor, fn: Callable[[Tensor, int], Tensor], stage: int) -> Tensor:
        b, m = self.batch, self.m
        if x.shape[0] == b:
            return fn(x, stage)
        if x.shape[0] != b * m:
            raise ValueError(f"SVDD: a draw for batch {x.shape[0]}, expected {b} or {b * m}")
        rows = [fn(x[j::m], stage + _CANDIDATE_STAGE * j) for j in range(m)]
        return torch.stack(rows, dim=1).reshape(x.shape)

    def randn(self, x: Tensor, step: int, stage: int = 0) -> Tensor:
        return self._draw(x, lambda v, s: self.base.randn(v, step, s), stage)

    def rand(self, x: Tensor, step: int, stage: int = 0) -> Tensor:
        return self._draw(x, lambda v, s: self.base.rand(v, step, s), stage)  # type: ignore[attr-defined]


@dataclass
class SVDDRun:
    """One SVDD run: the per-step choice among M candidates (see the module docstring)."""

    svdd: SVDD
    batch: int
    offset: Tensor | None = None  # μ of a mean-reverting path: the reward sees x̂0 + μ

    def _score(self, x0: Tensor, x: Tensor, t_in: Tensor, step: int) -> Tensor:
        fn = self.svdd.value
        v = fn(x, t_in) if fn is not None else self.svdd.reward(x0)
        what = "value" if fn is not None else "reward"
        if not isinstance(v, Tensor) or v.shape != (x.shape[0],):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"SVDD: the {what} must return shape ({x.shape[0]},), got {got}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"SVDD: the {what} is NaN/Inf at step {step}")
        return v.detach().to(torch.float64)

    def step(self, solver: Any, x: Tensor, i: int, state: Any, ev: Any, noise: Any) -> tuple:
        """Solver step i from x for M candidates each, then keep one per sample."""
        m, b = self.svdd.candidates, self.batch
        plan = ev.plan
        t_i, t_next = float(plan.t[i]), float(plan.t[i + 1])
        if ev.cached is None or ev.cached[0] is not x:  # x̂0 at (x, t_i) once on B rows
            ev.cached = (x, t_i, ev(x, ev.point(t_i, x)))
        pred: Prediction = ev.cached[2]
        rep = torch.arange(b, device=x.device).repeat_interleave(m)
        xr = x[rep]
        cond = ev.cond  # per-sample conditioning follows its candidates
        ev.cond = {
            k: v[rep] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b else v
            for k, v in cond.items()
        }
        try:
            ev.cached = (xr, t_i, Prediction(pred.x0[rep], pred.eps[rep]))
            xc, sc = solver.step(xr, i, state.select(rep), ev)
            ev.cached = None
            if plan.clean_end and i == plan.steps - 1:  # the step to t = 0 draws no noise
                keep = torch.arange(0, b * m, m, device=x.device)
                return xc[keep], sc.select(keep)
            if i == 0 and m > 1 and torch.equal(xc[0::m], xc[1::m]):  # one host read, once
                raise ValueError(
                    f"SVDD: {solver.name!r} drew no noise with these options (its M "
                    "candidates are identical): use a stochastic setting"
                )
            p = ev.point(t_next, xc)
            cand = ev(xc, p)
        finally:
            ev.cond = cond
        x0 = cand.x0
        if self.offset is not None:
            mu = self.offset
            x0 = x0 + (mu[rep] if mu.ndim > 0 and mu.shape[0] == b else mu)
        v = self._score(x0, xc, p.t_in, i).reshape(b, m)
        lam = float(self.svdd.scale)
        if math.isinf(lam) or m == 1:
            pick = v.argmax(dim=1)
        else:
            w = torch.softmax(lam * (v - v.amax(dim=1, keepdim=True)), dim=1)
            cdf = torch.cumsum(w, dim=1)
            cdf[:, -1] = 1.0
            u = self._uniform(noise, x, i)
            pick = torch.searchsorted(cdf, u[:, None]).reshape(b).clamp(max=m - 1)
        sel = pick + torch.arange(b, device=x.device) * m
        x_new = xc[sel]
        ev.cached = (x_new, t_next, Prediction(cand.x0[sel], cand.eps[sel]))
        return x_new, sc.select(sel)

    @staticmethod
    def _uniform(noise: Any, x: Tensor, i: int) -> Tensor:
        """One U[0, 1) per sample from the run's counter-based source (split-invariant)."""
        base: Any = noise.base if isinstance(noise, CandidateNoise) else noise
        probe = torch.empty(x.shape[0], 1, dtype=torch.float64, device=x.device)
        return base.rand(probe, i, _CHOICE_STAGE).reshape(-1)
