"""Gradient-free grid searches: GITS dynamic programming and AutoDiffusion's evolution.

* **GITS** (Chen et al., ICML 2024, "On the trajectory regularity of ODE-based diffusion
  sampling"): on a fine grid of M + 1 candidate times uniform in λ, the cost of one step
  j → k is the RMS distance between a first-order (DDIM) step from the teacher's state at j and
  the teacher's state at k; the N-point grid of least total cost (plus the standard end's x̂_0
  error at its last point) is found by dynamic programming in O(N·M²).
* **AutoDiffusion** (Li et al., ICCV 2023): an evolutionary search over grids, fitness = the
  student's distance to the teacher on the calibration noises (no gradients, no training):
  elitism, tournament selection, uniform crossover and Gaussian mutation of the grid logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .teacher import TEACHER_RTOL, teacher_path

__all__ = ["evolve", "gits_grid"]


def _rms(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).pow(2).mean(1).sqrt()


@torch.no_grad()
def gits_grid(
    model: Any,
    x: Tensor,
    nfe: int,
    *,
    t_start: float,
    lam_hi: float,
    target: Tensor,
    cond: Mapping[str, Any] | None = None,
    fine: int | None = None,
    rtol: float = TEACHER_RTOL,
) -> Tensor:
    """The GITS grid in λ, shape (nfe,), from λ(t_start) to at most ``lam_hi``.

    ``target`` is the teacher's standard-end solution from x (the terminal cost's reference).
    """
    proc = model.process
    m = fine if fine is not None else max(40, 6 * nfe)
    lam0 = float(proc.lambda_(torch.tensor(t_start, dtype=torch.float64)))
    lam = torch.linspace(lam0, lam_hi, m + 1, dtype=torch.float64)
    t = torch.cat([torch.tensor([t_start], dtype=torch.float64), proc.t_of_lambda(lam[1:])])
    states, _ = teacher_path(model, x, t, cond=cond, rtol=rtol)
    alpha, sigma = proc.alpha(t).tolist(), proc.sigma(t).tolist()
    lam_l = lam.tolist()
    x0s = [model(s, float(tj), **dict(cond or {})).x0 for s, tj in zip(states, t.tolist())]
    scale = float(_rms(target).mean())
    inf = float("inf")
    cost = torch.full((m + 1, m + 1), inf, dtype=torch.float64)
    for j in range(m + 1):
        for k in range(j + 1, m + 1):
            h = lam_l[k] - lam_l[j]
            ddim = (
                sigma[k] / sigma[j] * states[j]
                + alpha[k] * -torch.expm1(torch.tensor(-h, dtype=torch.float64)).item() * x0s[j]
            )
            cost[j, k] = float(_rms(ddim - states[k]).mean()) / scale
    terminal = torch.tensor([float(_rms(x0 - target).mean()) / scale for x0 in x0s])
    # best[n][k]: least cost of an n-step path 0 → k; n = nfe − 1 steps between the N points
    steps = nfe - 1
    best = torch.full((steps + 1, m + 1), inf, dtype=torch.float64)
    arg = torch.zeros((steps + 1, m + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for n in range(1, steps + 1):
        total = best[n - 1][:, None] + cost  # (from j, to k)
        best[n], arg[n] = total.min(0)
    end = int(torch.argmin(best[steps] + terminal)) if steps else 0
    path = [end]
    for n in range(steps, 0, -1):
        path.append(int(arg[n, path[-1]]))
    return lam[list(reversed(path))]


def evolve(
    fitness: Callable[[Tensor], float],
    start: Tensor,
    *,
    generations: int = 15,
    population: int = 12,
    scale: float = 0.3,
    seed: int = 0,
) -> tuple[Tensor, float]:
    """Minimise ``fitness`` over parameter vectors by evolution from ``start`` (1-D float64);
    returns (best vector, its fitness). Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    d = start.numel()
    pop = [start.clone()] + [
        start + scale * torch.randn(d, generator=g, dtype=torch.float64)
        for _ in range(population - 1)
    ]
    fit = [fitness(p) for p in pop]
    for _ in range(generations):
        order = sorted(range(len(pop)), key=lambda i: fit[i])
        elite = [pop[i] for i in order[: max(2, population // 4)]]
        children: list[Tensor] = []
        while len(children) < population - len(elite):
            pick = torch.randint(len(pop), (4,), generator=g).tolist()
            a = min(pick[:2], key=lambda i: fit[i])
            b = min(pick[2:], key=lambda i: fit[i])
            mask = torch.rand(d, generator=g) < 0.5
            child = torch.where(mask, pop[a], pop[b])
            child = child + scale * torch.randn(d, generator=g, dtype=torch.float64)
            children.append(child)
        pop = elite + children
        fit = [fit[order[i]] for i in range(len(elite))] + [fitness(c) for c in children]
    i = min(range(len(pop)), key=lambda i: fit[i])
    return pop[i], fit[i]
