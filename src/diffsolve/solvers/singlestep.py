"""Singlestep rows of the DPM family (DPM-Solver-2/3, DPM-Solver++(2S)/(3S); Lu et al. 2022a,
Alg. 1–2 and App. B; 2022b, Alg. 1) and the DPM-Solver-fast budget plan.

Step s → t, h = λ_t − λ_s, stages uniform in λ (r_j = λ-fractions of h), m_j the prediction at
stage j (m_0 at s), D_j = m_j − m_0, P(k, h) = h^k·φ_k(−h) with S = α (data form, m = x̂_0) or
P(k, h) = h^k·φ_k(h) with S = −σ (noise form, m = ε̂), and
DDIM(s → v) = σ_v/σ_s·x + α_v(1 − e^{−h_v})·x̂_0:

    order 2:  u = DDIM(s → s1);  x_t = DDIM(s → t) + S_t·P(1,h)/(2r1)·D_1   (``dpmsolver``)
                                       or + S_t·P(2,h)/(h·r1)·D_1             (``taylor``)
    order 3:  u1 = DDIM(s → s1),  u2 = DDIM(s → s2) + S_{s2}·(r2/r1)·P(2, r2h)/(r2h)·D_1,
              x_t = DDIM(s → t) + S_t·P(2,h)/(h·r2)·D_2                       (``dpmsolver``)
              or  + S_t·(P(2,h)/h·D1 + P(3,h)/h²·D2), D1 = (r2·D_1/r1 − r1·D_2/r2)/(r2 − r1),
                  D2 = 2(D_2/r2 − D_1/r1)/(r2 − r1)                            (``taylor``)

A step from α_s = 0 (λ_s = −∞, flow matching at t = 1) has no λ-expansion: its stages sit
uniformly in t, each DDIM from s with the x̂_0 of the previous stage (a finite first-order step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._expint import phi_data_float, phi_noise_float
from .base import Grid
from .engine import Row, StepRule

__all__ = ["fast_plan", "singlestep_calls", "singlestep_rules"]


def fast_plan(order: int, nfe: int, clean_end: bool) -> list[int]:
    """Per-step orders using exactly ``nfe`` calls (DPM-Solver-fast, Lu et al. 2022).

    ``final="tmin"``: the official plan (``get_orders_and_timesteps_for_singlestep_solver``):
    order 3: K = ⌊M/3⌋ + 1 steps, [3…3, 2, 1] if M ≡ 0 (mod 3), [3…3, 1] if 1, [3…3, 2] if 2;
    order 2: [2…2] plus a final 1 if M is odd; order 1: M ones.
    Clean end: the step to σ = 0 is a 1-call first-order step, the other M − 1 calls are
    [order…order] followed by one lower-order step for the remainder (order 3: [3…3, 2, 1] or
    [3…3, 1, 1]; this is also diffusers' ``DPMSolverSinglestepScheduler`` grouping with
    ``final_sigmas_type="zero"``).
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if clean_end:
        q, r = divmod(nfe - 1, order)
        return [order] * q + ([r] if r else []) + [1]
    if order == 3:
        q, r = divmod(nfe, 3)
        return [3] * (q - 1) + [2, 1] if r == 0 else [3] * q + [r]
    q, r = divmod(nfe, order)
    return [order] * q + ([r] if r else [])


def singlestep_calls(order: int, steps: int, clean_end: bool) -> tuple[int, ...]:
    """``order`` calls in every step but the step to σ = 0 (one call)."""
    return (order,) * (steps - 1) + (1,) if clean_end else (order,) * steps


class _Lin:
    """A combination over the step's start x and its own calls, oldest first (m_0 = at s)."""

    def __init__(self, a: float, x0: Sequence[float] = (), eps: Sequence[float] = ()):
        self.a, self.x0, self.eps = a, list(x0), list(eps)

    def plus(self, data: bool, diff: Sequence[float]) -> _Lin:
        """This combination plus Σ_l diff_l·m_l."""
        own = self.x0 if data else self.eps
        mixed = [*own, *([0.0] * (len(diff) - len(own)))]
        mixed = [u + v for u, v in zip(mixed, [*diff, *([0.0] * (len(mixed) - len(diff)))])]
        return _Lin(self.a, mixed, self.eps) if data else _Lin(self.a, self.x0, mixed)

    def row(self, calls: int) -> Row:
        """As an engine row over ``calls`` evaluations, newest first."""

        def flip(w: list[float]) -> tuple[float, ...]:
            return tuple(reversed([*w, *([0.0] * (calls - len(w)))])) if any(w) else ()

        return Row(self.a, flip(self.x0), flip(self.eps))


def _p(data: bool, k: int, h: float) -> float:
    return phi_data_float(k, h) if data else phi_noise_float(k, h)


def singlestep_rules(
    grid: Grid, orders: Sequence[int], *, data: bool, solver_type: str
) -> tuple[StepRule, ...]:
    """One rule per step, step i of order ``orders[i]`` (module docstring)."""
    process = grid.process
    t, lam = grid.t.tolist(), grid.lam.tolist()
    alpha, sigma = grid.alpha.tolist(), grid.sigma.tolist()
    ratio = (grid.sigma[1:] / grid.sigma[:-1]).tolist()
    gain = (grid.alpha[1:] * -(grid.exp_neg_h - 1)).tolist()

    # stage times of all steps at once: uniform in λ, or in t where λ_s = −∞ (α_s = 0)
    where: list[tuple[int, int]] = []
    lam_targets: list[float] = []
    t_stage: dict[tuple[int, int], float] = {}
    for i, k in enumerate(orders):
        if grid.is_final(i):
            continue
        for j in range(1, k):
            if math.isfinite(lam[i]):
                where.append((i, j))
                lam_targets.append(lam[i] + j / k * (lam[i + 1] - lam[i]))
            else:
                t_stage[(i, j)] = t[i] + j / k * (t[i + 1] - t[i])
    if lam_targets:
        ts = process.t_of_lambda(torch.tensor(lam_targets, dtype=torch.float64)).tolist()
        t_stage.update(zip(where, ts))
    keys = list(t_stage)
    stage_pts: dict[tuple[int, int], tuple[float, float, float, float]] = {}
    if keys:
        tt = torch.tensor([t_stage[k] for k in keys], dtype=torch.float64)
        a_s, s_s, l_s = (v.tolist() for v in process.coefficients(tt))
        stage_pts = {k: v for k, v in zip(keys, zip(tt.tolist(), a_s, s_s, l_s))}

    out: list[StepRule] = []
    for i, k in enumerate(orders):
        if grid.is_final(i):
            out.append(StepRule((t[i],)))
            continue
        st = [stage_pts[(i, j)] for j in range(1, k)]
        base = _Lin(ratio[i], (gain[i],))
        if k == 1:
            stages, final = [], base
        elif not math.isfinite(lam[i]):
            stages = [_Lin(s / sigma[i], (*([0.0] * j), a)) for j, (_, a, s, _l) in enumerate(st)]
            final = _Lin(ratio[i], (*([0.0] * len(st)), gain[i]))
        else:
            stages, final = _stages(
                k, lam[i + 1] - lam[i], lam[i], sigma[i], st, alpha[i + 1], sigma[i + 1], base,
                data, solver_type,
            )  # fmt: skip
        rows = tuple(lin.row(j + 1) for j, lin in enumerate(stages))
        out.append(StepRule((t[i], *(p[0] for p in st)), rows, final.row(k)))
    return tuple(out)


def _ddim_to(lam_s: float, sigma_s: float, p: tuple[float, float, float, float]) -> _Lin:
    """DDIM from s to the stage point p = (t, α, σ, λ): σ_p/σ_s·x + α_p(1 − e^{−h_p})·x̂_0."""
    _, a, s, lam = p
    return _Lin(s / sigma_s, (a * -math.expm1(-(lam - lam_s)),))


def _stages(
    k: int,
    h: float,
    lam_s: float,
    sigma_s: float,
    st: list[tuple[float, float, float, float]],
    alpha_t: float,
    sigma_t: float,
    base: _Lin,
    data: bool,
    solver_type: str,
) -> tuple[list[_Lin], _Lin]:
    """The stage and final combinations of one step of order k = 2 or 3 (module docstring).

    r_j = (λ_{s_j} − λ_s)/h are taken from the stage points actually used (λ-uniform up to
    float64 round-off of t_of_lambda), so the coefficients match the points evaluated.
    """
    s_t = alpha_t if data else -sigma_t
    u1 = _ddim_to(lam_s, sigma_s, st[0])
    r1 = (st[0][3] - lam_s) / h
    if k == 2:
        c = s_t * (
            _p(data, 1, h) / (2 * r1) if solver_type == "dpmsolver" else _p(data, 2, h) / (h * r1)
        )
        return [u1], base.plus(data, (-c, c))
    r2 = (st[1][3] - lam_s) / h
    h2 = st[1][3] - lam_s
    s_2 = st[1][1] if data else -st[1][2]
    c2 = s_2 * (r2 / r1) * _p(data, 2, h2) / h2
    u2 = _ddim_to(lam_s, sigma_s, st[1]).plus(data, (-c2, c2))
    if solver_type == "dpmsolver":
        c = s_t * _p(data, 2, h) / (h * r2)
        return [u1, u2], base.plus(data, (-c, 0.0, c))
    # taylor: D1 = (r2·D1_0 − r1·D1_1)/(r2 − r1), D2 = 2(D1_1 − D1_0)/(r2 − r1),
    # D1_0 = (m1 − m0)/r1, D1_1 = (m2 − m0)/r2
    d10 = (-1 / r1, 1 / r1, 0.0)
    d11 = (-1 / r2, 0.0, 1 / r2)
    d1 = [(r2 * u - r1 * v) / (r2 - r1) for u, v in zip(d10, d11)]
    d2 = [2 * (v - u) / (r2 - r1) for u, v in zip(d10, d11)]
    c1, c3 = _p(data, 2, h) / h, _p(data, 3, h) / h**2
    return [u1, u2], base.plus(data, [s_t * (c1 * u + c3 * v) for u, v in zip(d1, d2)])
