"""Feynman–Kac steering (Singhal et al. 2025): particles resampled toward p(x0)·exp(λ·r(x0)).

The batch is the population: consecutive blocks of K particles per prompt (conditioning tensors
are constant within a block, so resampling inside blocks keeps every particle's prompt). After
each solver step the Tweedie estimate x̂0 of each new particle, x̂0(x_{i+1}, t_{i+1}), is scored by
the reward r (that network call is the next step's first one, kept and reused: no extra NFE,
except for a solver whose step does not start with a call at its input, e.g. Heun with churn),
and each particle gets an intermediate potential G_i (their eq. 5 and §3.2):

* ``"difference"``: G_i = exp(λ·(r_i − r_{i−1})) (r_{−1} = 0), which telescopes to exp(λ·r(x0));
* ``"max"``: G_i = exp(λ·max_{j≤i} r_j);
* ``"sum"``: G_i = exp(λ·Σ_{j≤i} r_j).

At the end the potential is exp(λ·r(x0)) divided by the product of the potentials along the
particle's ancestry (for ``max`` and ``sum``; ``difference`` telescopes by itself), so the
weights target exactly p(x0)·exp(λ·r(x0)) as K grows (for the base sampler's own law p). Between
resamplings the log-weights accumulate; a block is resampled (multinomial or systematic) when its
effective sample size falls below ``ess_threshold``·K (``resample="adaptive"``) or every k steps
(``resample=k``), and always at the end, so the returned batch is the steered population.

With a deterministic solver a resampled duplicate follows its parent exactly (ODE paths do not
split): diversity within a block can only fall. The paper's sampler is stochastic (DDIM with
η = 1, i.e. ``"ddpm"`` here), whose independent per-position noise separates duplicates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["FK", "FKRun"]

POTENTIALS = ("difference", "max", "sum")
RESAMPLERS = ("multinomial", "systematic")


@dataclass(frozen=True)
class FK:
    """Feynman–Kac steering, passed as ``ds.sample(..., steer=ds.FK(reward, particles=K))``.

    Args:
        reward: ``reward(x0) -> (B,)`` on samples (B, ...); differentiability not needed.
        particles: K, particles per prompt (the batch must be a multiple of K).
        scale: λ in the target p(x0)·exp(λ·r(x0)).
        potential: ``"difference"`` (default), ``"max"`` or ``"sum"``. All three target the
            same law as K → ∞; at finite K on the exact tilted mixture (gmm2d, ddpm, NFE 20,
            exact mean reward −0.704) ``difference`` gave −0.85 / −0.73 / −0.77 at K = 8 / 32 /
            128, ``max`` −0.54 / −0.41 / −0.38 and ``sum`` −0.035 / −0.058 / −0.007: the
            cumulative potentials collapse a block onto its best particle before the final
            correction can act (they favour reward over calibration).
        resample: ``"adaptive"`` (when ESS < ``ess_threshold``·K) or an int k (every k steps).
        ess_threshold: the adaptive trigger, a fraction of K.
        method: ``"multinomial"`` or ``"systematic"`` resampling.
        seed: the resampling's random stream (deterministic for a seed).
    """

    reward: Callable[[Tensor], Tensor]
    particles: int
    scale: float = 1.0
    potential: str = "difference"
    resample: str | int = "adaptive"
    ess_threshold: float = 0.5
    method: str = "multinomial"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.particles, bool) or not isinstance(self.particles, int):
            raise ValueError(f"FK: particles must be an int >= 1, got {self.particles!r}")
        if self.particles < 1:
            raise ValueError(f"FK: particles must be >= 1, got {self.particles}")
        if not callable(self.reward):
            raise ValueError("FK: reward must be callable, reward(x0) -> (B,)")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ValueError(f"FK: scale must be a finite number, got {self.scale!r}")
        if self.potential not in POTENTIALS:
            raise ValueError(f"FK: potential must be one of {POTENTIALS}, got {self.potential!r}")
        if self.method not in RESAMPLERS:
            raise ValueError(f"FK: method must be one of {RESAMPLERS}, got {self.method!r}")
        ok = self.resample == "adaptive" or (
            isinstance(self.resample, int) and not isinstance(self.resample, bool)
            and self.resample >= 1
        )  # fmt: skip
        if not ok:
            raise ValueError(
                f"FK: resample must be 'adaptive' or an int >= 1, got {self.resample!r}"
            )
        if not 0.0 < self.ess_threshold <= 1.0:
            raise ValueError(f"FK: ess_threshold must be in (0, 1], got {self.ess_threshold!r}")

    def start(self, x: Tensor, steps: int) -> FKRun:
        """The run's state; raises ValueError (before any network call) if K does not divide
        the batch."""
        if x.shape[0] % self.particles:
            raise ValueError(
                f"FK: the batch ({x.shape[0]}) must be a multiple of particles "
                f"({self.particles}): consecutive blocks of K particles per prompt"
            )
        return FKRun(self, x.shape[0] // self.particles, steps, x.device)


@dataclass
class FKRun:
    """One steered run: per-particle rewards and potentials, reindexed with the particles."""

    fk: FK
    blocks: int
    steps: int
    device: torch.device
    log_w: Tensor = field(init=False)
    log_prod: Tensor = field(init=False)
    r_prev: Tensor = field(init=False)
    r_max: Tensor = field(init=False)
    r_sum: Tensor = field(init=False)
    ess: list[Tensor] = field(init=False, default_factory=list)
    resampled: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        n = self.blocks * self.fk.particles
        z = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.log_w, self.log_prod = z.clone(), z.clone()
        self.r_prev, self.r_sum = z.clone(), z.clone()
        self.r_max = torch.full_like(z, -math.inf)
        self._gen = torch.Generator(device="cpu").manual_seed(int(self.fk.seed))

    def _score(self, x0: Tensor, step: int) -> Tensor:
        r = self.fk.reward(x0)
        if not isinstance(r, Tensor) or r.shape != (x0.shape[0],):
            got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ValueError(f"FK: reward must return shape ({x0.shape[0]},), got {got}")
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"FK: the reward is NaN/Inf at step {step}")
        return r.detach().to(torch.float64)

    def _log_potential(self, r: Tensor) -> Tensor:
        lam = float(self.fk.scale)
        if self.fk.potential == "difference":
            out = lam * (r - self.r_prev)
        elif self.fk.potential == "max":
            self.r_max = torch.maximum(self.r_max, r)
            out = lam * self.r_max
        else:
            self.r_sum = self.r_sum + r
            out = lam * self.r_sum
        self.r_prev = r
        return out

    def _ess(self) -> Tensor:
        lw = self.log_w.reshape(self.blocks, -1)
        w = torch.softmax(lw, dim=1)
        return 1.0 / (w * w).sum(dim=1)  # (blocks,)

    def _indices(self) -> Tensor:
        k = self.fk.particles
        w = torch.softmax(self.log_w.reshape(self.blocks, k), dim=1).cpu()
        if self.fk.method == "multinomial":
            idx = torch.multinomial(w, k, replacement=True, generator=self._gen)
        else:
            u = (torch.rand(self.blocks, 1, generator=self._gen, dtype=torch.float64)
                 + torch.arange(k, dtype=torch.float64)) / k  # fmt: skip
            cdf = torch.cumsum(w, dim=1)
            cdf[:, -1] = 1.0
            idx = torch.searchsorted(cdf, u).clamp(max=k - 1)
        idx = idx + (torch.arange(self.blocks) * k)[:, None]
        return idx.reshape(-1).to(self.device)

    def _reindex(self, idx: Tensor) -> None:
        for name in ("log_prod", "r_prev", "r_max", "r_sum"):
            setattr(self, name, getattr(self, name)[idx])
        self.log_w = torch.zeros_like(self.log_w)

    def after_step(
        self, i: int, x: Tensor, state: Any, x0: Tensor
    ) -> tuple[Tensor, Any, Tensor | None]:
        """Weight the particles by their newest x̂0 after step i (< the last) and resample the
        blocks that need it; returns x, state and the resampling index (None: not resampled)."""
        lg = self._log_potential(self._score(x0, i))
        self.log_w = self.log_w + lg
        self.log_prod = self.log_prod + lg
        ess = self._ess()
        self.ess.append(ess)
        k = self.fk.particles
        if self.fk.resample == "adaptive":
            due = bool((ess < self.fk.ess_threshold * k).any())  # one host read per step
        else:
            due = (i + 1) % int(self.fk.resample) == 0
        if not due or k == 1:
            return x, state, None
        idx = self._indices()
        self._reindex(idx)
        self.resampled.append(i)
        return x[idx], (state.select(idx) if hasattr(state, "select") else state), idx

    def finish(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The final potential exp(λ·r(x0)) over the ancestry's product, the final weights
        (returned, (B,) log-weights normalised within blocks) and the resampled population."""
        r = self._score(x, self.steps)
        lam = float(self.fk.scale)
        if self.fk.potential == "difference":
            lg = lam * (r - self.r_prev)
        else:
            lg = lam * r - self.log_prod
        self.log_w = self.log_w + lg
        k = self.fk.particles
        lw = self.log_w.reshape(self.blocks, k)
        norm = (lw - torch.logsumexp(lw, dim=1, keepdim=True)).reshape(-1)
        self.ess.append(self._ess())
        if k == 1:
            return x, norm
        idx = self._indices()
        self._reindex(idx)
        return x[idx], norm
