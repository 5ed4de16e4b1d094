"""Denoising Langevin Gibbs (DLG): MCMC on (x, noise level), then any ODE solver finishes.

Kim & Ye 2022 (Denoising MCMC, ICML 2023), Alg. 1; official code 1202kbs/DMCMC (``Demo.ipynb``).
The chain targets the joint π(x, i) ∝ p_{ρ_i}(x) over the data and a grid of noise levels
ρ_1 < … < ρ_N (σ for VE; ρ = σ/α in general) with a uniform prior on i, by Gibbs sweeps:

    x | i:  x ← x + (η/2)·∇log p_{ρ_i}(x) + √η·z,  z ~ N(0, I),   ∇log p = −ε̂/σ_i   (Langevin)
    i | x:  i ← argmax_j c_j(x)   (official code)   or   i ~ softmax(c(x))   ("sample")

where c(x) are the logits of a noise-level classifier p(i | x) ∝ p_{ρ_i}(x) (a small CNN in the
paper; the exact log-densities for the Gaussian-mixture oracle). The chain stays near the data
manifold at moderate noise, so a short reverse integration from the chain's own level suffices.
Within each block of ``sweeps`` sweeps the state of smallest level is kept (``keep="min"``,
official) and handed to any registered solver, which integrates the probability-flow ODE from
t(ρ_i) to the data end with ``nfe`` network calls (its clean end is the Tweedie step x̂_0 at
t_min, the official x + ε²·s(x, ε)). The chain persists across blocks: pass the returned state
back in.

Official defaults (CIFAR-10, VE σ_max = 50): η = 0.8 in the data's own units (not scaled by
σ²), 10 sweeps per block, 20-step stochastic Heun to σ_min, Tweedie ε = 1e-2; initialisation by
a 20-step sampler plus N(0, 0.5²) noise and ~20 warm-up sweeps. ``step="scaled"`` uses
η·ρ_i² instead (annealed-Langevin scaling; an unadjusted Langevin step on a Gaussian of variance
ρ_i² + v inflates it by 1/(1 − η_i/(4(ρ_i² + v))), so a scaled step bounds that bias at every
level; the official absolute step lets the classifier absorb it).

NFE: each sweep evaluates the network once per sample (one call per distinct level in the
batch, since a call shares one time), plus ``nfe`` per sample for the hand-over;
``DLGInfo`` reports both, and the classifier calls separately.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .denoiser import DenoiserWrapper
from .sample import sample
from .solvers.base import Solver, get_solver

__all__ = ["DLGInfo", "DLGState", "dlg_chain", "dlg_sample"]

PICKS = ("argmax", "sample")
KEEPS = ("min", "last")
STEPS = ("absolute", "scaled")


@dataclass(frozen=True)
class DLGState:
    """The persistent chain: x (B, ...) and level indices (B,) into the level grid."""

    x: Tensor
    level: Tensor


@dataclass(frozen=True)
class DLGInfo:
    """What a block did.

    Attributes:
        state: the chain after the block (pass it to the next call).
        start: the states handed to the ODE solver (x and their level indices).
        nfe_chain: Langevin network evaluations per sample (= sweeps).
        nfe_ode: ODE solver network evaluations per sample (the solver's budget).
        calls: network calls actually made (grouped by level).
        classifier_calls: classifier evaluations (one per sweep, plus the initial one).
    """

    state: DLGState
    start: DLGState
    nfe_chain: int
    nfe_ode: int
    calls: int
    classifier_calls: int


class _Restricted(DenoiserWrapper):
    """A model whose process ends at the chain's level: the solver plans its grid there."""

    def __init__(self, model: Any, process: Any):
        super().__init__(model)
        self.process = process

    def __call__(self, x: Tensor, t: Any, **cond: Any):
        return self.model(x, t, **cond)


def _check(levels: Tensor, eta: float, pick: str, keep: str, step: str, sweeps: int) -> None:
    if levels.ndim != 1 or levels.numel() < 2 or not bool((levels > 0).all()):
        raise ValueError("levels must be a 1-D tensor of at least two positive noise levels")
    if not eta > 0:
        raise ValueError(f"eta must be positive, got {eta!r}")
    if pick not in PICKS:
        raise ValueError(f"unknown pick {pick!r}; valid: {', '.join(PICKS)}")
    if keep not in KEEPS:
        raise ValueError(f"unknown keep {keep!r}; valid: {', '.join(KEEPS)}")
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; valid: {', '.join(STEPS)}")
    if int(sweeps) != sweeps or sweeps < 0:
        raise ValueError(f"sweeps must be a non-negative integer, got {sweeps!r}")


def _choose(logits: Tensor, pick: str, generator: torch.Generator | None) -> Tensor:
    if pick == "argmax":
        return logits.argmax(dim=1)
    probs = torch.softmax(logits.to(torch.float64), dim=1)
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    return (
        torch.multinomial(probs.to(gen_dev), 1, generator=generator).reshape(-1).to(logits.device)
    )


def dlg_chain(
    model: Any,
    state: DLGState | Tensor,
    *,
    levels: Tensor,
    classifier: Callable[[Tensor], Tensor],
    sweeps: int = 10,
    eta: float = 0.8,
    pick: str = "argmax",
    keep: str = "min",
    step: str = "absolute",
    generator: torch.Generator | None = None,
) -> tuple[DLGState, DLGState, int, int]:
    """Run ``sweeps`` Gibbs sweeps of the DLG chain (module docstring).

    Args:
        model: a Denoiser on the process the levels belong to.
        state: the chain (:class:`DLGState`) or a bare x (B, ...), whose level the classifier
            then assigns.
        levels: noise levels ρ_i = σ_i/α_i (σ_i for VE), shape (N,), float64.
        classifier: x (B, ...) ↦ logits (B, N) of p(i | x).
        sweeps, eta, pick, keep, step: see the module docstring.
        generator: the stream of the Langevin noise and of ``pick="sample"``.

    Returns:
        (chain after the sweeps, the kept states, network calls, classifier calls).
    """
    levels = torch.as_tensor(levels, dtype=torch.float64)
    _check(levels, eta, pick, keep, step, sweeps)
    proc = model.process
    times = proc.t_of_rho(levels).tolist()
    calls = ccalls = 0
    if isinstance(state, Tensor):
        x = state
        level = _choose(classifier(x), pick, generator)
        ccalls += 1
    else:
        x, level = state.x, state.level
    keep_x, keep_level = x, level
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    for _ in range(sweeps):
        z = torch.randn(x.shape, generator=generator, device=gen_dev, dtype=x.dtype).to(x.device)
        drift = torch.empty_like(x)
        gain = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        noise = torch.empty_like(gain)
        for i in torch.unique(level).tolist():  # one call per distinct level (one time per call)
            idx = (level == i).nonzero().reshape(-1)
            t = times[i]
            s_i = float(proc.sigma(t))
            eps = model(x[idx], model.point(t, x[idx])).eps
            calls += 1
            h = eta * float(levels[i]) ** 2 if step == "scaled" else eta
            drift[idx] = -eps.to(x.dtype) / s_i  # ∇log p_t = −ε̂/σ
            gain[idx] = 0.5 * h
            noise[idx] = math.sqrt(h)
        shape = (-1,) + (1,) * (x.ndim - 1)
        x = x + gain.reshape(shape) * drift + noise.reshape(shape) * z
        level = _choose(classifier(x), pick, generator)
        ccalls += 1
        if keep == "min":
            lower = levels.to(x.device)[level] < levels.to(x.device)[keep_level]
            keep_x = torch.where(lower.reshape(shape), x, keep_x)
            keep_level = torch.where(lower, level, keep_level)
        else:
            keep_x, keep_level = x, level
    return DLGState(x, level), DLGState(keep_x, keep_level), calls, ccalls


def dlg_sample(
    model: Any,
    state: DLGState | Tensor,
    *,
    levels: Tensor,
    classifier: Callable[[Tensor], Tensor],
    sweeps: int = 10,
    eta: float = 0.8,
    pick: str = "argmax",
    keep: str = "min",
    step: str = "absolute",
    solver: str | Solver = "heun",
    nfe: int = 10,
    schedule: Any = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> tuple[Tensor, DLGInfo]:
    """One block of DLG: ``sweeps`` Gibbs sweeps, then ``solver`` from each kept state's level.

    Each kept state is integrated by ``ds.sample(..., solver, nfe=nfe)`` on the process
    restricted to [t_min, t(ρ_i)] (states sharing a level share one run; a state at the lowest
    time gets x̂_0 there, one call). Returns the clean samples (B, ...) and a :class:`DLGInfo`
    whose ``state`` continues the chain.
    """
    solver_obj = get_solver(solver, **options)
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    chain, start, calls, ccalls = dlg_chain(
        model,
        state,
        levels=levels,
        classifier=classifier,
        sweeps=sweeps,
        eta=eta,
        pick=pick,
        keep=keep,
        step=step,
        generator=generator,
    )
    proc = model.process
    levels = torch.as_tensor(levels, dtype=torch.float64)
    times = proc.t_of_rho(levels)
    out = torch.empty_like(start.x)
    for i in torch.unique(start.level).tolist():
        idx = (start.level == i).nonzero().reshape(-1)
        xi = start.x[idx]
        t_i = min(float(times[i]), proc.t_max)
        if t_i <= proc.t_min * (1 + 1e-12) + 1e-15:
            out[idx] = model(xi, model.point(proc.t_min, xi)).x0.to(out.dtype)
            calls += 1
            continue
        sub = copy.copy(proc)
        sub.t_max = t_i
        xs, info = sample(
            _Restricted(model, sub),
            xi,
            solver_obj,
            nfe=nfe,
            schedule=schedule,
            generator=generator if solver_obj.stochastic else None,
            return_info=True,
        )
        out[idx] = xs
        calls += info.nfe
    return out, DLGInfo(chain, start, sweeps, int(nfe), calls, ccalls)
