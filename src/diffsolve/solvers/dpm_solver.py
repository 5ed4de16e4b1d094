"""DPM-Solver (Lu et al., NeurIPS 2022): exponential integrators of the noise-prediction ODE.

The machinery here (multistep and singlestep coefficient tables, the DPM-Solver-fast order plan)
is shared with the data-prediction family in :mod:`.dpmpp`. Both forms are one recipe: with
h = λ_t − λ_s and the prediction m expanded in λ around λ_s,

    data  (m = x̂_0):  x_t = (σ_t/σ_s)·x_s + α_t·Σ_k h^{k+1}φ_{k+1}(−h)·m^{(k)}(λ_s)
    noise (m = ε̂):    x_t = (α_t/α_s)·x_s − σ_t·Σ_k h^{k+1}φ_{k+1}(h)·m^{(k)}(λ_s)

so a correction term is S·P(k, h)·(derivative estimate) with (S, P) = (α_t, ``phi_data``) or
(−σ_t, ``phi_noise``). The k = 0 term of both is DDIM, which is always evaluated in the data form
σ_t/σ_s·x_s + α_t(1 − e^{−h})·x̂_0 (exactly ``euler``; finite where α_s = 0, where the noise
form's α_t/α_s is not).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..denoiser import EvalPoint, Prediction
from ..processes.base import GaussianProcess
from ..schedules import LogSNR
from ._expint import phi_data, phi_noise
from .base import FinalOrders, Grid, Model, Solver, State, alias, host, register

__all__ = ["DPMSolver"]

METHODS = ("multistep", "singlestep")
SOLVER_TYPES = ("dpmsolver", "taylor")


# -- linear combinations as Python floats ---------------------------------------------------------
@dataclass(frozen=True)
class _Lin:
    """x_new = ratio·x + Σ_l a_l·x̂_0[l] + Σ_l b_l·ε̂[l] over the evaluations l of one step."""

    ratio: float
    x0: tuple[float, ...] = ()
    eps: tuple[float, ...] = ()


def _combine(ratio: float, x: Tensor, terms: Sequence[tuple[float, Tensor]]) -> Tensor:
    """ratio·x + Σ c·v, skipping zero weights (0·NaN would poison x, e.g. x̂_0 where α = 0)."""
    out = ratio * x if ratio != 0.0 else None
    for c, v in terms:
        if c != 0.0:
            out = c * v if out is None else out + c * v
    if out is None:  # unreachable for a consistent method (the weights of x̂_0 sum to α_t)
        raise RuntimeError("empty linear combination")
    return out


def _apply(lin: _Lin, x: Tensor, preds: Sequence[Prediction]) -> Tensor:
    terms = [(a, p.x0) for a, p in zip(lin.x0, preds)]
    terms += [(b, p.eps) for b, p in zip(lin.eps, preds)]
    return _combine(lin.ratio, x, terms)


def _form(data: bool, scale_alpha: float, scale_sigma: float) -> tuple[float, Callable]:
    """(S, P) of the module docstring: (α, phi_data) for x̂_0, (−σ, phi_noise) for ε̂."""
    return (scale_alpha, phi_data) if data else (-scale_sigma, phi_noise)


def _p(fn: Callable, k: int, h: float) -> float:
    return float(fn(k, torch.tensor(h, dtype=torch.float64)))


def _ddim(grid: Grid) -> tuple[list[float], list[float]]:
    """σ_{i+1}/σ_i and α_{i+1}(1 − e^{−h_i}) per step, computed exactly as ``euler`` does."""
    ratio = (grid.sigma[1:] / grid.sigma[:-1]).tolist()
    gain = (grid.alpha[1:] * -(grid.exp_neg_h - 1)).tolist()
    return ratio, gain


# -- multistep ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _MS:
    """One multistep update: x_t = ratio·x + gain·x̂_0(current) + Σ_j w_j·m_j (newest first)."""

    ratio: float
    gain: float
    w: tuple[float, ...]


@dataclass(frozen=True)
class MultistepState(State):
    points: tuple[EvalPoint, ...] = host()
    coef: tuple[_MS | None, ...] = host()  # None: the step to σ = 0 (returns x̂_0)
    data: bool = host()
    keep: int = host()
    # m = x̂_0 (data) or ε̂ (noise) of past evaluations, newest first
    history: tuple[Tensor, ...] = ()


def multistep_orders(
    grid: Grid, order: int, lower_order_final: bool, below: int, euler_at_final: bool = False
) -> list[int]:
    """Order of each step (0 for the step to σ = 0, which returns x̂_0).

    Step i uses min(order, i + 1) (warm-up from the single evaluation at t_max), never a history
    point where λ = −∞ (α = 0: no Taylor expansion in λ there), and, with ``lower_order_final``
    and fewer than ``below`` steps, at most N − i (the last step first order, the one before at
    most second): DPM-Solver's rule (``below`` = 10) and diffusers' (15, its ``lower_order_final``
    plus ``lower_order_second``). With a clean end the step to σ = 0 counts as the last step.
    ``euler_at_final``: the last step first order at any N (see :class:`.base.FinalOrders`).
    """
    rule = FinalOrders(below if lower_order_final else 0.0, euler_at_final)
    n = grid.steps
    lam = grid.lam.tolist()
    out, run = [], 0
    for i in range(n):
        run = run + 1 if math.isfinite(lam[i]) else 0
        k = min(order, i + 1, max(run, 1))
        k = min(k, rule.cap(i, n))
        out.append(0 if grid.is_final(i) else k)
    return out


def multistep_coefs(
    grid: Grid, orders: list[int], data: bool, second: str, reference: bool
) -> list[_MS | None]:
    """Coefficients of every step (see :class:`DPMSolver` and :mod:`.dpmpp` for the maths).

    ``second``: weight of the first difference at order 2, "half" (P(1,h)/2: DPM-Solver's
    ``dpmsolver`` type, DPM-Solver++'s ``midpoint``) or "taylor" (P(2,h)/h). ``reference``: the
    order-3 D2 of the official code (half the second derivative; measured order 2).
    """
    ratio, gain = _ddim(grid)
    lam = grid.lam.tolist()
    out: list[_MS | None] = []
    for i, k in enumerate(orders):
        if k == 0:
            out.append(None)
            continue
        h = lam[i + 1] - lam[i]
        s, fn = _form(data, float(grid.alpha[i + 1]), float(grid.sigma[i + 1]))
        w = [0.0, 0.0, 0.0]
        if k == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            c1 = _p(fn, 1, h) / 2 if second == "half" else _p(fn, 2, h) / h
            w[0], w[1] = s * c1 / r0, -s * c1 / r0
        elif k == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            c1, c2 = _p(fn, 2, h) / h, _p(fn, 3, h) / h**2
            a = r0 / (r0 + r1)
            f = (1.0 if reference else 2.0) / (r0 + r1)
            # D1 = (1 + a)·D1_0 − a·D1_1,  D2 = f·(D1_0 − D1_1),  D1_0 = (m0 − m1)/r0,
            # D1_1 = (m1 − m2)/r1: expanded onto m0, m1, m2
            d1 = ((1 + a) / r0, -(1 + a) / r0 - a / r1, a / r1)
            d2 = (f / r0, -f / r0 - f / r1, f / r1)
            w = [s * (c1 * u + c2 * v) for u, v in zip(d1, d2)]
        if data:  # DDIM's x̂_0 term is m0 itself
            w[0] += gain[i]
            out.append(_MS(ratio[i], 0.0, tuple(w[:k])))
        else:
            out.append(_MS(ratio[i], gain[i], tuple(w[:k]) if k > 1 else ()))
    return out


def multistep_init(
    x: Tensor,
    grid: Grid,
    model: Model,
    *,
    order: int,
    data: bool,
    second: str,
    reference: bool,
    lower_order_final: bool,
    below: int,
    euler_at_final: bool = False,
) -> MultistepState:
    orders = multistep_orders(grid, order, lower_order_final, below, euler_at_final)
    return MultistepState(
        points=tuple(model.point(grid.t[i], x) for i in range(grid.steps)),
        coef=tuple(multistep_coefs(grid, orders, data, second, reference)),
        data=data,
        keep=max(order - 1, 1),
    )


def multistep_step(
    x: Tensor, i: int, state: MultistepState, model: Model
) -> tuple[Tensor, MultistepState]:
    pred = model(x, state.points[i])
    c = state.coef[i]
    if c is None:
        return pred.x0, state
    m = pred.x0 if state.data else pred.eps
    hist = (m, *state.history)
    terms = [(c.gain, pred.x0)] if c.gain != 0.0 else []
    terms += list(zip(c.w, hist))
    x = _combine(c.ratio, x, terms)
    return x, state.replace(history=hist[: state.keep])


# -- singlestep ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SS:
    """One singlestep update: stage j evaluates at ``points[j]`` (j = 0 is the step's start) the
    point ``stages[j-1]`` of the evaluations so far; ``final`` lands on t_{i+1}."""

    points: tuple[EvalPoint, ...]
    stages: tuple[_Lin, ...]
    final: _Lin | None  # None: the step to σ = 0 (returns x̂_0)


@dataclass(frozen=True)
class SinglestepState(State):
    plan: tuple[_SS, ...] = host()


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


def singlestep_orders(grid: Grid, order: int) -> list[int]:
    """The plan ``init`` runs: from the budget when the grid was planned for one (``grid.nfe``),
    else ``order`` for every step with a first-order step to σ = 0 (``steps=``/``times=``)."""
    n = grid.steps
    if grid.nfe is None:
        return [order] * (n - 1) + [1] if grid.clean_end else [order] * n
    plan = fast_plan(order, grid.nfe, grid.clean_end)
    if len(plan) != n:
        raise ValueError(
            f"a grid planned for nfe={grid.nfe} at order {order} needs {len(plan)} steps, got {n}"
        )
    return plan


def singlestep_nfe_of(order: int, steps: int, clean_end: bool) -> int:
    return order * (steps - 1) + 1 if clean_end else order * steps


def singlestep_plan_times(
    order: int,
    process: GaussianProcess,
    schedule: Callable[[GaussianProcess, int], Tensor],
    nfe: int,
    clean_end: bool,
) -> Tensor:
    """The outer grid of the fast plan: uniform in λ for the logsnr schedule (K intervals), else
    the schedule's M-interval grid sub-sampled at the cumulative orders (the official rule)."""
    plan = fast_plan(order, nfe, clean_end)
    n = len(plan) if clean_end else len(plan) + 1
    if isinstance(schedule, LogSNR):
        return schedule(process, n)
    every = schedule(process, nfe if clean_end else nfe + 1)
    idx = torch.cumsum(torch.tensor([0, *plan]), 0)[:n]
    return every[idx]


def singlestep_init(
    x: Tensor, grid: Grid, model: Model, *, order: int, data: bool, solver_type: str
) -> SinglestepState:
    """Stage points and coefficients of every step (see :class:`DPMSolver` for the maths)."""
    orders = singlestep_orders(grid, order)
    process = grid.process
    ratio, gain = _ddim(grid)
    t, lam = grid.t.tolist(), grid.lam.tolist()
    alpha, sigma = grid.alpha.tolist(), grid.sigma.tolist()

    # stage times of all steps at once: uniform in λ, or in t where λ_s = −∞ (α_s = 0)
    where: list[tuple[int, int]] = []
    lam_targets: list[float] = []
    t_stage: dict[tuple[int, int], float] = {}
    for i, k in enumerate(orders):
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
    a_st: dict[tuple[int, int], float] = {}
    s_st: dict[tuple[int, int], float] = {}
    l_st: dict[tuple[int, int], float] = {}
    if keys:
        tt = torch.tensor([t_stage[k] for k in keys], dtype=torch.float64)
        a_st = dict(zip(keys, process.alpha(tt).tolist()))
        s_st = dict(zip(keys, process.sigma(tt).tolist()))
        l_st = dict(zip(keys, process.lambda_(tt).tolist()))

    plan = []
    for i, k in enumerate(orders):
        start = model.point(grid.t[i], x)
        if grid.is_final(i):
            plan.append(_SS((start,), (), None))
            continue
        st = [(t_stage[(i, j)], a_st[(i, j)], s_st[(i, j)], l_st[(i, j)]) for j in range(1, k)]
        points = (start, *(model.point(torch.tensor(p[0], dtype=torch.float64), x) for p in st))
        base = _Lin(ratio[i], (gain[i],))
        if k == 1:
            plan.append(_SS(points, (), base))
            continue
        if not math.isfinite(lam[i]):
            stages, final = _infinite_start(st, sigma[i], ratio[i], gain[i])
        else:
            h = lam[i + 1] - lam[i]
            stages, final = _stages(
                k, h, lam[i], sigma[i], alpha[i], st, alpha[i + 1], sigma[i + 1], base,
                data, solver_type,
            )  # fmt: skip
        plan.append(_SS(points, stages, final))
    return SinglestepState(plan=tuple(plan))


def _ddim_to(lam_s: float, sigma_s: float, p: tuple[float, float, float, float]) -> _Lin:
    """DDIM from s to the stage point p = (t, α, σ, λ): σ_p/σ_s·x + α_p(1 − e^{−h_p})·x̂_0."""
    _, a, s, lam = p
    return _Lin(s / sigma_s, (a * -math.expm1(-(lam - lam_s)),))


def _with(lin: _Lin, data: bool, diff: Sequence[float]) -> _Lin:
    """``lin`` plus Σ_l diff_l·m_l, m = x̂_0 (data) or ε̂ (noise)."""
    if data:
        x0 = [*lin.x0, *([0.0] * (len(diff) - len(lin.x0)))]
        return _Lin(lin.ratio, tuple(u + v for u, v in zip(x0, diff)), lin.eps)
    return _Lin(lin.ratio, lin.x0, tuple(diff))


def _stages(
    k: int,
    h: float,
    lam_s: float,
    sigma_s: float,
    alpha_s: float,
    st: list[tuple[float, float, float, float]],
    alpha_t: float,
    sigma_t: float,
    base: _Lin,
    data: bool,
    solver_type: str,
) -> tuple[tuple[_Lin, ...], _Lin]:
    """DPM-Solver-2/3 (noise) or DPM-Solver++(2S)/(3S) (data), official general-r updates.

    r_j = (λ_{s_j} − λ_s)/h are taken from the stage points actually used (λ-uniform up to
    float64 round-off of t_of_lambda), so the coefficients match the points evaluated.
    """
    s_t, fn = _form(data, alpha_t, sigma_t)
    u1 = _ddim_to(lam_s, sigma_s, st[0])
    r1 = (st[0][3] - lam_s) / h
    if k == 2:
        c = s_t * (
            _p(fn, 1, h) / (2 * r1) if solver_type == "dpmsolver" else _p(fn, 2, h) / (h * r1)
        )
        return (u1,), _with(base, data, (-c, c))
    r2 = (st[1][3] - lam_s) / h
    h2 = st[1][3] - lam_s
    s_2, _ = _form(data, st[1][1], st[1][2])
    c2 = s_2 * (r2 / r1) * _p(fn, 2, h2) / h2
    u2 = _with(_ddim_to(lam_s, sigma_s, st[1]), data, (-c2, c2))
    if solver_type == "dpmsolver":
        c = s_t * _p(fn, 2, h) / (h * r2)
        return (u1, u2), _with(base, data, (-c, 0.0, c))
    # taylor: D1 = (r2·D1_0 − r1·D1_1)/(r2 − r1), D2 = 2(D1_1 − D1_0)/(r2 − r1),
    # D1_0 = (m1 − m0)/r1, D1_1 = (m2 − m0)/r2
    d10 = (-1 / r1, 1 / r1, 0.0)
    d11 = (-1 / r2, 0.0, 1 / r2)
    d1 = [(r2 * u - r1 * v) / (r2 - r1) for u, v in zip(d10, d11)]
    d2 = [2 * (v - u) / (r2 - r1) for u, v in zip(d10, d11)]
    c1, c3 = _p(fn, 2, h) / h, _p(fn, 3, h) / h**2
    return (u1, u2), _with(base, data, [s_t * (c1 * u + c3 * v) for u, v in zip(d1, d2)])


def _infinite_start(
    st: list[tuple[float, float, float, float]], sigma_s: float, ratio: float, gain: float
) -> tuple[tuple[_Lin, ...], _Lin]:
    """A step from α_s = 0 (λ_s = −∞, flow matching at t = 1) has no expansion in λ: stages at
    t-uniform points, each DDIM from s with the x̂_0 of the previous stage, and the final DDIM
    with the x̂_0 of the last stage (x_t = σ_t/σ_s·x_s + α_t·x̂_0(u_{k−1})). For r1 = ½ and a
    finite λ_s this is DPM-Solver-2's midpoint rule; here it is a finite first-order update."""
    stages = []
    for j, (_, a, s, _lam) in enumerate(st):
        stages.append(_Lin(s / sigma_s, (*([0.0] * j), a)))  # e^{−h} = 0: gain is α_{s_j}
    return tuple(stages), _Lin(ratio, (*([0.0] * len(st)), gain))


def singlestep_step(
    x: Tensor, i: int, state: SinglestepState, model: Model
) -> tuple[Tensor, SinglestepState]:
    ss = state.plan[i]
    preds = [model(x, ss.points[0])]
    if ss.final is None:
        return preds[0].x0, state
    for point, lin in zip(ss.points[1:], ss.stages):
        preds.append(model(_apply(lin, x, preds), point))
    return _apply(ss.final, x, preds), state


# -- the solver ---------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class DPMSolver(Solver):
    """DPM-Solver (Lu et al., NeurIPS 2022): exponential integrator of the noise-form ODE.

    Exact solution (eq. 3.4): x_t = (α_t/α_s)·x_s − α_t·∫_{λ_s}^{λ_t} e^{−λ}·ε̂_λ dλ; with
    h = λ_t − λ_s and φ-weights P(k, h) = h^k·φ_k(h), its Taylor truncation (eq. 3.6) is

        x_t = (α_t/α_s)·x_s − σ_t·Σ_{k<n} P(k+1, h)/h^k · h^k·ε̂^{(k)}(λ_s).

    Order 1 is DDIM (eq. 3.7), x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x̂_0 (computed in that form).

    ``method="singlestep"`` (Alg. 1–2), stages uniform in λ, r_j = λ-fractions of h:
        DPM-Solver-2 (r1 = ½): u = DDIM(x_s → s1);
            x_t = DDIM(x_s → t) − σ_t·(e^h − 1)/(2r1)·(ε̂(u, s1) − ε̂_s)           (``dpmsolver``)
            or  − σ_t·P(2,h)/(h·r1)·(ε̂(u, s1) − ε̂_s)                            (``taylor``)
        DPM-Solver-3 (r1 = ⅓, r2 = ⅔): u1 as above, D_j = ε̂(u_j, s_j) − ε̂_s,
            u2 = DDIM(x_s → s2) − σ_{s2}·(r2/r1)·P(2, r2h)/(r2h)·D_1
            x_t = DDIM(x_s → t) − σ_t·P(2,h)/(h·r2)·D_2                          (``dpmsolver``)
            or  − σ_t·(P(2,h)/h·D1 + P(3,h)/h²·D2), D1 = (r2·D_1/r1 − r1·D_2/r2)/(r2 − r1),
                D2 = 2(D_2/r2 − D_1/r1)/(r2 − r1)                                   (``taylor``)
      Budgets ``nfe=M`` follow DPM-Solver-fast (:func:`fast_plan`; with a clean end the step to
      σ = 0 is one first-order call); the outer grid is uniform in λ for the logsnr schedule,
      else the schedule's M-interval grid sub-sampled at the cumulative orders. Rule used by
      ``init`` (which sees only the grid): ``grid.nfe`` set → the fast plan of that budget;
      otherwise (``steps=``/``times=`` give the outer steps) every step has ``order`` and the
      step to σ = 0 is first order, ``order·(N−1) + 1`` calls (``order·N`` with final="tmin").
      A step starting where α = 0 (λ = −∞: flow matching at t = 1) has no λ-expansion; its
      stages sit uniformly in t (see ``_infinite_start``). On the same points, singlestep order 2
      (both types) and order 3 ``taylor`` equal diffusers' ``DPMSolverSinglestepScheduler``
      (``algorithm_type="dpmsolver"``, ``midpoint``/``heun``); diffusers' order-3 ``midpoint``
      builds u2 with the midpoint weight instead of the official P(2, r2h) one above.

    ``method="multistep"`` (the official ``multistep_dpm_solver_*_update``), r0 = h_{i−1}/h,
    r1 = h_{i−2}/h, D1_0 = (ε̂_i − ε̂_{i−1})/r0, D1_1 = (ε̂_{i−1} − ε̂_{i−2})/r1:
        order 2: x_t = DDIM − σ_t·(e^h − 1)/2·D1_0   (``dpmsolver``; ``taylor``: P(2,h)/h·D1_0)
        order 3: x_t = DDIM − σ_t·P(2,h)/h·D1 − σ_t·P(3,h)/h²·D2,
                 D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1),  D2 = 2·(D1_0 − D1_1)/(r0 + r1).
      D1 ≈ h·ε̂' and D2 ≈ h²·ε̂'' are the derivatives of the quadratic through the three
      points, so the local error is O(h⁴). The official code (and diffusers) use half this D2
      (``reference=True`` reproduces it): its local error is O(h³), i.e. 2nd order overall.
      Warm-up orders 1, 2, …; ``lower_order_final`` as the official code: below 10 steps step i
      of N uses at most N − i (see :func:`multistep_orders`; diffusers' threshold is 15, so
      runs of 10–14 steps differ from its ``algorithm_type="dpmsolver"`` in the last steps).
      ``euler_at_final`` (multistep only): the last step is DDIM at any step count (diffusers'
      option; it matters with final="tmin", see :class:`~diffsolve.solvers.base.FinalOrders`).

    Aliases: ``dpm2`` (order 2, singlestep) is k-diffusion's ``sample_dpm_2`` and diffusers'
    ``KDPM2DiscreteScheduler`` (DPM-Solver-2 written as Euler in ρ = σ/α with the λ-midpoint
    √(ρ_i·ρ_{i+1})); ``dpm_fast`` (order 3, singlestep) run with ``nfe=M`` on the logsnr
    schedule and final="tmin" is k-diffusion's ``sample_dpm_fast`` (η = 0): the same plan,
    λ-uniform outer grid and ``dpmsolver`` updates (with the default clean end the last step
    is the call at t_min returning x̂_0, see :func:`fast_plan`). The adaptive DPM-Solver-12/23
    is ``dpm_adaptive`` (:mod:`.dpm_adaptive`).

    The step to σ = 0 returns x̂_0. Shapes: x (B, ...).
    """

    order: int = 2
    method: str = "multistep"
    solver_type: str = "dpmsolver"
    lower_order_final: bool = True
    reference: bool = False
    euler_at_final: bool = False

    name: ClassVar[str] = "dpm_solver"
    description: ClassVar[str] = (
        "DPM-Solver (noise prediction), order 1-3, multistep or singlestep (DPM-Solver-fast)"
    )

    def validate(self) -> None:
        if self.order not in (1, 2, 3) or isinstance(self.order, bool):
            raise ValueError(f"dpm_solver: order must be 1, 2 or 3, got {self.order!r}")
        if self.method not in METHODS:
            raise ValueError(f"dpm_solver: method must be one of {METHODS}, got {self.method!r}")
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"dpm_solver: solver_type must be one of {SOLVER_TYPES}, got {self.solver_type!r}"
            )
        FinalOrders.of("dpm_solver", self.lower_order_final, 10, self.euler_at_final)
        if self.euler_at_final and self.method != "multistep":
            raise ValueError("dpm_solver: euler_at_final applies only to method='multistep'")
        if not isinstance(self.reference, bool):
            raise ValueError(f"dpm_solver: reference must be a bool, got {self.reference!r}")
        if self.reference and (self.method != "multistep" or self.order != 3):
            raise ValueError(
                "dpm_solver: reference=True (the official 3rd-order multistep D2) applies only "
                "to method='multistep' with order=3"
            )

    def nfe_of(self, steps: int, clean_end: bool) -> int:
        if self.method == "multistep":
            return steps
        return singlestep_nfe_of(self.order, steps, clean_end)

    def plan_times(
        self,
        process: GaussianProcess,
        schedule: Callable[[GaussianProcess, int], Tensor],
        nfe: int,
        clean_end: bool,
    ) -> Tensor:
        if self.method == "multistep":
            return super().plan_times(process, schedule, nfe, clean_end)
        return singlestep_plan_times(self.order, process, schedule, nfe, clean_end)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> State:
        if self.method == "singlestep":
            return singlestep_init(
                x, grid, model, order=self.order, data=False, solver_type=self.solver_type
            )
        return multistep_init(
            x, grid, model, order=self.order, data=False,
            second="half" if self.solver_type == "dpmsolver" else "taylor",
            reference=self.reference, lower_order_final=self.lower_order_final, below=10,
            euler_at_final=self.euler_at_final,
        )  # fmt: skip

    def step(self, x: Tensor, i: int, state: State, model: Model) -> tuple[Tensor, State]:
        if isinstance(state, SinglestepState):
            return singlestep_step(x, i, state, model)
        return multistep_step(x, i, state, model)  # type: ignore[arg-type]


# k-diffusion's sample_dpm_2 (DPM-Solver-2 written as Euler in ρ = σ/α with the λ-midpoint
# σ_mid = √(σ_i·σ_{i+1}), then Euler to σ = 0) and sample_dpm_fast (the DPM-Solver-fast plan on
# a λ-uniform grid, final="tmin", η = 0) are these configurations exactly (tests/test_dpm_solver).
alias(
    "dpm2", "dpm_solver", "DPM-Solver-2 singlestep (k-diffusion's DPM2)",
    order=2, method="singlestep",
)  # fmt: skip
alias(
    "dpm_fast", "dpm_solver", "DPM-Solver-fast: singlestep order 3 with the official NFE plan",
    order=3, method="singlestep",
)  # fmt: skip
