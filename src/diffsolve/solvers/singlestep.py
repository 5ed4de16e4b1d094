"""Singlestep rows of the DPM family (DPM-Solver-2/3, DPM-Solver++(2S)/(3S); Lu et al. 2022a,
Alg. 1–2 and App. B; 2022b, Alg. 1) and the DPM-Solver-fast plan: a step s → t starts each stage
from DDIM(s → s_j) and the update from DDIM(s → t), plus weights on m_j − m_0 (m = x̂_0 in the
data form, ε̂ in the noise form). Formulas: docs/solvers-singlestep.md#the-singlestep-builder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..processes.base import GaussianProcess
from ._expint import phi_data_float, phi_noise_float
from .base import Grid
from .engine import Row, RowSolver, StepRule, known

__all__ = ["SinglestepSolver", "check_calls", "fast_plan", "singlestep_calls", "singlestep_rules"]


def fast_plan(order: int, nfe: int, clean_end: bool) -> list[int]:
    """Per-step orders using exactly ``nfe`` calls (DPM-Solver-fast, Lu et al. 2022): the
    official plan with ``final="tmin"``; with a clean end, [order…order, rest] then the 1-call
    step to σ = 0 (diffusers' grouping). Details: docs/solvers-singlestep.md#the-singlestep-builder.
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if order == 3 and nfe % 3 == 0 and not clean_end:  # the official [3…3, 2, 1]
        return [3] * (nfe // 3 - 1) + [2, 1]
    q, r = divmod(nfe - (1 if clean_end else 0), order)
    return [order] * q + ([r] if r else []) + ([1] if clean_end else [])


def singlestep_calls(order: int, steps: int, clean_end: bool) -> tuple[int, ...]:
    """``order`` calls in every step but the step to σ = 0 (one call)."""
    return (order,) * (steps - 1) + (1,) if clean_end else (order,) * steps


class SinglestepSolver(RowSolver):
    """A solver of ``order`` calls a step (the step to σ = 0 one) with DPM-Solver-fast budgets
    on the schedule's grid at the cumulative calls; a one-call-a-step plan where ``singlestep``
    is False."""

    @property
    def singlestep(self) -> bool:
        return True

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        if not self.singlestep:
            return super().calls(steps, clean_end)
        return singlestep_calls(self.order, steps, clean_end)

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        if not self.singlestep:
            return super().budget(nfe, clean_end)
        return tuple(fast_plan(self.order, nfe, clean_end))

    def grid_times(
        self, process: GaussianProcess, schedule: Any, calls: tuple[int, ...], clean_end: bool
    ) -> Tensor:
        if not self.singlestep:
            return super().grid_times(process, schedule, calls, clean_end)
        return schedule.for_calls(process, calls, clean_end)


def check_calls(solver: str, grid: Grid, calls: Sequence[int], *full: int) -> None:
    """ValueError unless each step makes 1 or a ``full`` number of calls (the step to σ = 0: 1)."""
    for i, k in enumerate(calls):
        if k not in ((1,) if grid.is_final(i) else (1, *full)):
            raise ValueError(f"{solver}: step {i} cannot make {k} network calls")


def _newest_first(calls: int, w: Sequence[float]) -> tuple[float, ...]:
    return (0.0,) * (calls - len(w)) + tuple(w[::-1]) if any(w) else ()


def combination(
    calls: int, a: float, x0: Sequence[float], data: bool = True, diff: Sequence[float] = ()
) -> Row:
    """The row a·x + Σ_l x0_l·x̂_0,l + Σ_l diff_l·m_l (m = x̂_0 if ``data`` else ε̂) over a
    step's ``calls`` calls, weights given oldest first (l = 0: the call at s)."""
    if not data:
        return Row(a, _newest_first(calls, x0), _newest_first(calls, diff))
    w = list(x0)
    for l, v in enumerate(diff):
        if l < len(w):
            w[l] += v
        else:
            w.append(v)
    return Row(a, _newest_first(calls, w))


def singlestep_rules(
    grid: Grid, orders: Sequence[int], *, data: bool, solver_type: str = "dpmsolver"
) -> tuple[StepRule, ...]:
    """One rule per step, step i of order ``orders[i]`` (module docstring)."""
    process = grid.process
    t, lam, sigma, alpha = grid.lists("t", "lam", "sigma", "alpha")
    final = grid.steps - 1 if grid.clean_end else -1

    # stage times of all steps at once, in step order: uniform in λ, or in t where λ_s = −∞
    # (α_s = 0); then their (t, α, σ, λ) in one pass
    in_lam: list[bool] = []
    lam_q: list[float] = []
    t_q: list[float] = []
    for i, k in enumerate(orders):
        if i == final or k == 1:
            continue
        finite = math.isfinite(lam[i])
        for j in range(1, k):
            if finite:
                lam_q.append(lam[i] + j / k * (lam[i + 1] - lam[i]))
            else:
                t_q.append(t[i] + j / k * (t[i + 1] - t[i]))
            in_lam.append(finite)
    stage_pts: list[Any] = []
    if in_lam:
        of_lam = iter(
            process.t_of_lambda(torch.tensor(lam_q, dtype=torch.float64)).tolist() if lam_q else ()
        )
        given = iter(t_q)
        stage_t = [next(of_lam) if f else next(given) for f in in_lam]
        coefs = process.coefficients(torch.tensor(stage_t, dtype=torch.float64))
        stage_pts = list(zip(stage_t, *(v.tolist() for v in coefs)))
        known(grid, *list(zip(*stage_pts))[:3])
    at = 0

    out: list[StepRule] = []
    for i, k in enumerate(orders):
        if i == final:
            out.append(StepRule((t[i],)))
            continue
        # DDIM(s → t) = (σ_t/σ_s)·x + α_t(1 − e^{−h})·x̂_0, e^{−h} = σ_t·α_s/(σ_s·α_t) (finite
        # where λ_s = −∞)
        ratio = sigma[i + 1] / sigma[i]
        gain = alpha[i + 1] * -(sigma[i + 1] * alpha[i] / (sigma[i] * alpha[i + 1]) - 1)
        if k == 1:  # DDIM
            out.append(StepRule((t[i],), (), Row(ratio, (gain,) if gain else ())))
            continue
        st, at = stage_pts[at : at + k - 1], at + k - 1
        if not math.isfinite(lam[i]):
            stages = [
                combination(j + 1, p[2] / sigma[i], (*([0.0] * j), p[1])) for j, p in enumerate(st)
            ]
            update = combination(k, ratio, (*([0.0] * len(st)), gain))
        else:
            stages, update = stage_rows(
                k, lam[i + 1] - lam[i], st, (lam[i], sigma[i]), (alpha[i + 1], sigma[i + 1]),
                (ratio, gain), data, solver_type,
            )  # fmt: skip
        out.append(StepRule((t[i], *[p[0] for p in st]), tuple(stages), update))
    return tuple(out)


def stage_rows(
    k: int,
    h: float,
    st: list[tuple[float, float, float, float]],
    s: tuple[float, float],
    end: tuple[float, float],
    ddim: tuple[float, float],
    data: bool,
    solver_type: str,
) -> tuple[list[Row], Row]:
    """The stage rows and the update of one step of order k = 2 or 3 through the stage points
    ``st`` = [(t, α, σ, λ)] from s = (λ_s, σ_s) to ``end`` = (α_t, σ_t), DDIM(s → t) given as
    ``ddim`` = (σ_t/σ_s, α_t(1 − e^{−h})); r_j from the points used (module docstring)."""
    lam_s, sigma_s = s
    s_t = end[0] if data else -end[1]
    phi = phi_data_float if data else phi_noise_float  # P(k, h)

    def ddim_to(j: int, diff: Sequence[float] = ()) -> Row:  # DDIM(s → s_j) plus diff
        _, a, sig, lam = st[j]
        return combination(j + 1, sig / sigma_s, (a * -math.expm1(-(lam - lam_s)),), data, diff)

    r1 = (st[0][3] - lam_s) / h
    if k == 2:
        c = s_t * (phi(1, h) / (2 * r1) if solver_type == "dpmsolver" else phi(2, h) / (h * r1))
        return [ddim_to(0)], combination(2, ddim[0], (ddim[1],), data, (-c, c))
    r2 = (st[1][3] - lam_s) / h
    h2 = st[1][3] - lam_s
    s_2 = st[1][1] if data else -st[1][2]
    c2 = s_2 * (r2 / r1) * phi(2, h2) / h2
    stages = [ddim_to(0), ddim_to(1, (-c2, c2))]
    if solver_type == "dpmsolver":
        c = s_t * phi(2, h) / (h * r2)
        return stages, combination(3, ddim[0], (ddim[1],), data, (-c, 0.0, c))
    # taylor: D1 = (r2·D1_0 − r1·D1_1)/(r2 − r1), D2 = 2(D1_1 − D1_0)/(r2 − r1),
    # D1_0 = (m1 − m0)/r1, D1_1 = (m2 − m0)/r2
    d10 = (-1 / r1, 1 / r1, 0.0)
    d11 = (-1 / r2, 0.0, 1 / r2)
    d1 = [(r2 * u - r1 * v) / (r2 - r1) for u, v in zip(d10, d11)]
    d2 = [2 * (v - u) / (r2 - r1) for u, v in zip(d10, d11)]
    c1, c3 = phi(2, h) / h, phi(3, h) / h**2
    diff = [s_t * (c1 * u + c3 * v) for u, v in zip(d1, d2)]
    return stages, combination(3, ddim[0], (ddim[1],), data, diff)
