"""DC-Solver: UniPC with a dynamically compensated history (Zhao et al., ECCV 2024), as rows.

**Compensation.** UniPC (:mod:`diffsolve.solvers.unipc`) evaluates m_i = x̂_0(x̃_i, t_i) at the
*uncorrected* point x̃_i and uses it from the corrected state x_i: a misalignment that hurts at
few steps and large guidance. Just before predictor step i (i ≥ K, K = ``dc_order``, 2 by
default) DC-Solver replaces the newest stored prediction by the Lagrange interpolant in t
through the last K + 1 stored ones, taken at a shifted time::

    t'_i = t_{i−1} + ρ_i·(t_i − t_{i−1}),     m̃_i = L_0(t'_i)·m_i + Σ_{l=1..K} L_l(t'_i)·m̃_{i−l},
    L_l(t') = Π_{j≠l} (t' − t_{i−j}) / (t_{i−l} − t_{i−j})

ρ_i = 1 gives t' = t_i, m̃_i = m_i: plain UniPC. The replacement is permanent: later predictor
rows, UniC rows and compensations read m̃ where UniPC reads m; only UniC's new point m_t is the
raw evaluation (as in the official ``dynamic_compensation`` with its buffer). Time is the
process time t (the official code uses the discrete label, an affine image of t on
:class:`~diffsolve.VPDiscrete`, so the interpolants agree). With the standard end, the last step
returns m̃_{N−1} instead of m_{N−1} (the official code compensates before the last predictor step
as well). Each m̃ is a fixed linear combination of raw evaluations, so every step is still a
row of float64 weights (:mod:`diffsolve.solvers.engine`): :func:`dc_rules` expands UniPC's rows
through the compensations and :func:`dc_solver` exports them as a :class:`~.tuned.Tuned` solver.

**Search** (official ``find_optim_ratio``): greedily, one step at a time along the calibration
trajectory (≈ 10 noises), ρ_i minimises the relative mean squared distance to the teacher's
state at t_{i+1} of what step i produces: the UniC-corrected x_{i+1} (one network call at
x̃_{i+1}, differentiated through), x̃_{i+1} where no corrector follows, and on the last step the
returned x̂_0 against the teacher's standard end. AdamW, lr 0.1, 20 iterations (the diffusers
version; the LDM one runs 40), from ρ = 1, optionally bounded as ρ = 1 + ½·tanh(p); the best
iterate is kept (the official code keeps the last). The teacher is the model's own ODE
(:func:`~.teacher.teacher_path`, rk45) instead of a 200-step DDIM. That is
``objective="trajectory"``. The default, ``"endpoint"``, then refines all ratios jointly on the
distance of the run's standard end to the teacher's (the loss of every tuner in
:func:`diffsolve.tune`), through the same differentiable run: on gmm64 the greedy matching
alone trades the typical sample for the worst few; the refined ratios generalise (the tests).

**Cascade polynomial regression** (CPR): with x = (i + 1)/N for step i of N,

    ρ(x; N, w) = Σ_a c_a(N, w)·x^a,  c_a(N, w) = Σ_b c_ab(N)·(w/12)^b,  c_ab(N) = Σ_c C_abc·(N/50)^c

(a, b, c ≤ 2: 27 numbers, fitted stage by stage by least squares: ρ over x per (N, w), then the
coefficients over the guidance scale w per N, then over N), ρ = 1 on the first K steps.
:func:`fit_dc_regression` searches ρ on a grid of (N, w) and fits C; :class:`DCRegression`
predicts the ratios at an unseen NFE and scale.

Defaults are the official Stable-Diffusion ones: UniPC order 2, ``bh2``, ``dc_order=2``,
``disable_corrector=(0,)``, on a grid uniform in t (:class:`DCConfig`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..denoiser import CFG
from ..schedules import Schedule, get_schedule
from ..solvers.base import Grid
from ..solvers.engine import Row, StepRule, eval_points
from ..solvers.unipc import UniPC
from .student import inner_denoiser
from .teacher import teacher_path
from .tuned import Tuned, process_signature

__all__ = [
    "DCConfig",
    "DCRegression",
    "dc_rules",
    "dc_solver",
    "fit_dc",
    "fit_dc_regression",
    "lagrange_weights",
]

SCALE_UNIT = 12.0  # CPR's normalisations (official code): w/12, N/50
NFE_UNIT = 50.0


# -- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DCConfig:
    """The UniPC that DC-Solver compensates, and the compensation's interpolation order.

    ``order``, ``variant``, ``corrector``, ``disable_corrector`` are :class:`~diffsolve.UniPC`'s
    (``lower_order_final`` on, as there); ``dc_order`` is K (K + 1 interpolation points, K ≤ 3);
    ``schedule`` the grid's schedule (name or object; None: UniPC's default, log-SNR). The
    default is uniform in t, the grid both official codes compensate on (LDM's
    ``time_uniform``; diffusers' ``linspace`` is its :class:`~diffsolve.VPDiscrete` cousin).
    """

    order: int = 2
    variant: str = "bh2"
    corrector: bool = True
    disable_corrector: tuple[int, ...] = (0,)
    dc_order: int = 2
    schedule: str | Schedule | None = "uniform"

    def __post_init__(self) -> None:
        object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))
        if isinstance(self.dc_order, bool) or self.dc_order not in (1, 2, 3):
            raise ValueError(f"dc_order must be 1, 2 or 3, got {self.dc_order!r}")
        self.unipc()  # validates the UniPC options

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> DCConfig:
        valid = [f.name for f in fields(cls)]
        bad = sorted(set(options) - set(valid))
        if bad:
            raise ValueError(f"unknown DC-Solver option(s) {bad}; valid: {', '.join(valid)}")
        return cls(**options)

    def unipc(self) -> UniPC:
        return UniPC(
            order=self.order,
            variant=self.variant,
            corrector=self.corrector,
            disable_corrector=self.disable_corrector,
        )

    def base(self, process: Any, nfe: int) -> tuple[Grid, tuple[StepRule, ...]]:
        """UniPC's grid (standard end) and rules for ``nfe`` calls, as ``ds.sample`` plans them."""
        solver = self.unipc()
        sched = get_schedule(
            self.schedule if self.schedule is not None else solver.default_schedule
        )
        calls = tuple(solver.budget(nfe, True))
        grid = Grid.build(process, solver.grid_times(process, sched, calls, True), True, nfe=nfe)
        return grid, tuple(solver.rules(grid, calls))

    def first(self, grid: Grid) -> int:
        """The first step that may be compensated: K earlier points exist, none at λ = −∞."""
        return self.dc_order + (0 if math.isfinite(float(grid.lam[0])) else 1)


def _positive_nfe(nfe: Any) -> int:
    if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 2:
        raise ValueError(f"nfe must be an integer >= 2, got {nfe!r}")
    return int(nfe)


# -- the rows ------------------------------------------------------------------------------------
def lagrange_weights(nodes: Sequence[Any], t: Any) -> list[Any]:
    """L_l(t) = Π_{j≠l} (t − t_j)/(t_l − t_j) for each node (floats, or tensors in ``t``)."""
    out = []
    for l_, tl in enumerate(nodes):
        w: Any = 1.0
        for j, tj in enumerate(nodes):
            if j != l_:
                w = w * (t - tj) / (tl - tj)
        out.append(w)
    return out


def _shifted(times: Sequence[float], i: int, rho: Any) -> Any:
    return times[i - 1] + rho * (times[i] - times[i - 1])


def dc_rules(
    base: Sequence[StepRule], ratios: Sequence[float], dc_order: int = 2
) -> tuple[StepRule, ...]:
    """UniPC's rules with the compensations ρ (one per step; 1 = none), expanded onto the raw
    evaluations (float64). ρ ≡ 1 returns rows equal to ``base``'s.

    ``base``: one-call rules over x̂_0 histories (UniPC's, :meth:`DCConfig.base`); the last one
    may be the step to σ = 0 (``update`` None: it returns x̂_0, here m̃ when ρ ≠ 1).
    """
    n = len(base)
    if len(ratios) != n:
        raise ValueError(f"{len(ratios)} ratios for {n} steps")
    times = [float(r.t[0]) for r in base]
    for r in base:
        if r.calls != 1 or r.stages or any(any(v != 0.0 for v in w.eps) for w in r.rows()):
            raise ValueError("DC-Solver compensates one-call rules on x̂_0 histories only")
    eff: list[dict[int, float]] = []  # m̃_k as {raw evaluation index: weight}

    def expand(row: Row | None, i: int, srcs: list[dict[int, float]]) -> Row | None:
        """``row`` over m̃'s (``srcs``, newest first) as a row over raw evaluations."""
        if row is None:
            return None
        acc: dict[int, float] = {}
        for w, src in zip(row.x0, srcs):
            for k, c in src.items():
                acc[k] = acc.get(k, 0.0) + w * c
        lo = min(acc) if acc else i
        return Row(row.a, tuple(acc.get(i - j, 0.0) for j in range(i - lo + 1)))

    out = []
    for i, rule in enumerate(base):
        past = eff[::-1]  # m̃_{i−1}, m̃_{i−2}, …
        correct = expand(rule.correct, i, [{i: 1.0}, *past])
        rho = float(ratios[i])
        cur = {i: 1.0}
        if rho != 1.0:
            if i < dc_order or not math.isfinite(rho):
                raise ValueError(f"step {i}: a ratio other than 1 needs a finite ρ and i >= K")
            nodes = [times[i - l_] for l_ in range(dc_order + 1)]
            weights = lagrange_weights(nodes, _shifted(times, i, rho))
            acc: dict[int, float] = {}
            for w, src in zip(weights, [cur, *past]):
                for k, c in src.items():
                    acc[k] = acc.get(k, 0.0) + w * c
            cur = acc
        eff.append(cur)
        srcs = eff[::-1]
        if rule.update is not None:
            update = expand(rule.update, i, srcs)
        elif rho != 1.0:  # the standard end returns m̃ instead of m
            update = expand(Row(0.0, (1.0,)), i, srcs)
        else:
            update = None
        out.append(StepRule(rule.t, update=update, correct=correct, spans=rule.spans))
    return tuple(out)


def _tuned(
    model: Any,
    grid: Grid,
    base: Sequence[StepRule],
    ratios: Sequence[float],
    cfg: DCConfig,
    info: Mapping[str, Any],
) -> Tuned:
    times = tuple(grid.t[:-1].tolist())
    info = {
        "method": "dc",
        "nfe": len(base),
        "ratios": [float(r) for r in ratios],
        **{k: v for k, v in asdict(cfg).items() if k != "schedule"},
        "schedule": cfg.schedule if isinstance(cfg.schedule, str | None) else repr(cfg.schedule),
        **info,
    }
    info["disable_corrector"] = list(cfg.disable_corrector)
    return Tuned(
        times=times,
        steps=dc_rules(base, ratios, cfg.dc_order),
        final="standard",
        prediction=getattr(inner_denoiser(model), "prediction", ""),
        signature=process_signature(model.process),
        info=info,
    )


def dc_solver(
    model: Any,
    nfe: int,
    ratios: Sequence[float],
    *,
    info: Mapping[str, Any] | None = None,
    **options: Any,
) -> Tuned:
    """DC-Solver with the given ratios (one per call; 1 = no compensation, as on the first K
    steps) as a :class:`~.tuned.Tuned` solver on ``model``'s process: ``ds.sample(model, x_T,
    solver=tuned)``. ``options``: :class:`DCConfig`'s fields."""
    cfg = DCConfig.of(options)
    grid, base = cfg.base(model.process, _positive_nfe(nfe))
    first = cfg.first(grid)
    if any(float(r) != 1.0 for r in list(ratios)[:first]):
        raise ValueError(f"the first {first} ratios must be 1 (no K earlier points)")
    return _tuned(model, grid, base, ratios, cfg, dict(info or {}))


# -- the differentiable run and the search -------------------------------------------------------
def _rel(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).mean() / target.pow(2).mean()


class _Run:
    """The compensated UniPC in torch on a fixed plan: UniPC's rows applied to m̃'s that are
    Lagrange combinations differentiable in ρ (the same sums :func:`dc_rules` expands)."""

    def __init__(self, model: Any, base: Sequence[StepRule], points: Any, cfg: DCConfig, cond):
        self.model, self.base, self.points, self.cond = model, tuple(base), points, dict(cond)
        self.times = [float(r.t[0]) for r in base]
        self.k = cfg.dc_order
        width = max((r.width for rule in base for r in rule.rows()), default=1)
        self.keep = max(width, cfg.dc_order + 1)

    def call(self, x: Tensor, i: int) -> Tensor:
        return self.model(x, self.points[i][0], **self.cond).x0

    @staticmethod
    def apply(row: Row, x: Tensor | None, hist: Sequence[Tensor]) -> Tensor:
        out = row.a * x if (row.a != 0.0 and x is not None) else torch.zeros_like(hist[0])
        for w, m in zip(row.x0, hist):
            if w != 0.0:
                out = out + w * m
        return out

    def compensate(self, rho: Tensor | float, i: int, hist: Sequence[Tensor]) -> Tensor:
        if isinstance(rho, float) and rho == 1.0:
            return hist[0]
        nodes = [self.times[i - l_] for l_ in range(self.k + 1)]
        weights = lagrange_weights(nodes, _shifted(self.times, i, rho))
        out = hist[0] * 0
        for w, m in zip(weights, hist):
            out = out + (w.to(m.dtype) if isinstance(w, Tensor) else w) * m
        return out

    def forward(self, x: Tensor, ratios: Sequence[Any]) -> Tensor:
        """The whole run from x at t_0 with these ratios: the returned x̂_0 (standard end)."""
        hist: list[Tensor] = []
        x_prev: Tensor | None = None
        e = self.call(x, 0)
        for i, rule in enumerate(self.base):
            hist = [e, *hist][: self.keep]
            if rule.correct is not None and x_prev is not None:
                x = self.apply(rule.correct, x_prev, hist)
            hist[0] = self.compensate(ratios[i], i, hist)
            if rule.update is None:
                return hist[0]
            x_prev, x = x, self.apply(rule.update, x, hist)
            e = self.call(x, i + 1)
        raise ValueError("the rules do not end the standard way (a last step to σ = 0)")

    def produce(self, rho: Any, i: int, x: Tensor, hist: list[Tensor]) -> Tensor:
        """What step i (from the corrected x_i, with e_i first in ``hist``) hands on: the state
        at t_{i+1} (corrected where a corrector follows) or, on the last step, x̂_0."""
        h = [self.compensate(rho, i, hist), *hist[1:]]
        rule = self.base[i]
        if rule.update is None:
            return h[0]
        nxt = self.apply(rule.update, x, h)
        after = self.base[i + 1] if i + 1 < len(self.base) else None
        if after is not None and after.correct is not None:
            return self.apply(after.correct, x, [self.call(nxt, i + 1), *h])
        return nxt


def _search(
    run: _Run,
    x: Tensor,
    states: Sequence[Tensor],
    end: Tensor,
    first: int,
    *,
    iters: int,
    lr: float,
    bound: str | None,
    progress: Callable[[str, int, int, float], None] | None,
) -> tuple[list[float], list[float]]:
    """Greedy per-step search of ρ (module docstring); returns (ratios, per-step losses)."""
    n = len(run.base)
    ratios, losses = [1.0] * n, [0.0] * n
    hist: list[Tensor] = []
    x_prev: Tensor | None = None
    with torch.no_grad():
        e = run.call(x, 0)
    for i in range(n):
        rule = run.base[i]
        hist = [e, *hist][: run.keep]
        if rule.correct is not None and x_prev is not None:
            with torch.no_grad():
                x = run.apply(rule.correct, x_prev, hist)
        target = end if rule.update is None else states[i + 1]
        if i >= first:
            ratios[i], losses[i] = _fit_one(run, i, x, hist, target, iters, lr, bound, progress)
        with torch.no_grad():
            hist[0] = run.compensate(ratios[i], i, hist)
            if rule.update is None:
                break
            x_prev, x = x, run.apply(rule.update, x, hist)
            e = run.call(x, i + 1)
    return ratios, losses


class _Adam:
    """Adam / AdamW (decoupled weight decay) on a float64 vector: torch.optim's update
    (β = (0.9, 0.999), ε = 1e-8), without its set-up cost, which dominates a 1-parameter fit."""

    def __init__(self, p: Tensor, lr: float, weight_decay: float = 0.0):
        self.p = p.detach().to(torch.float64).clone()
        self.m, self.v = torch.zeros_like(self.p), torch.zeros_like(self.p)
        self.lr, self.wd, self.t = lr, weight_decay, 0

    def step(self, grad: Tensor) -> None:
        self.t += 1
        b1, b2 = 0.9, 0.999
        self.p.mul_(1 - self.lr * self.wd)
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v / (1 - b2**self.t)).sqrt_().add_(1e-8)
        self.p.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))


def _fit_one(
    run: _Run,
    i: int,
    x: Tensor,
    hist: list[Tensor],
    target: Tensor,
    iters: int,
    lr: float,
    bound: str | None,
    progress: Callable[[str, int, int, float], None] | None,
) -> tuple[float, float]:
    """ρ_i by AdamW (weight decay 0.01, torch's default, as the official code) from ρ = 1; the
    best iterate and its loss."""

    def ratio(p: Tensor) -> Tensor:
        return 1.0 + 0.5 * torch.tanh(p) if bound == "tanh" else p

    opt = _Adam(torch.tensor(0.0 if bound == "tanh" else 1.0), lr, weight_decay=0.01)
    best = (math.inf, 1.0)
    for it in range(iters + 1):
        p = opt.p.clone().requires_grad_(True)
        rho = ratio(p)
        loss = _rel(run.produce(rho, i, x, hist), target)
        value = float(loss.detach())
        if math.isfinite(value) and value < best[0]:
            best = (value, float(rho.detach()))
        if it == iters or not math.isfinite(value):  # the last iterate is scored only
            break
        (grad,) = torch.autograd.grad(loss, p)
        opt.step(grad)
        if progress is not None:
            progress(f"dc step {i}", it + 1, iters, value)
    if not math.isfinite(best[0]):
        from .tune import TuningError

        raise TuningError(f"dc step {i}: non-finite loss from the first iterate")
    return best[1], best[0]


def _refine(
    run: _Run,
    x: Tensor,
    end: Tensor,
    ratios: list[float],
    first: int,
    iters: int,
    lr: float,
    progress: Callable[[str, int, int, float], None] | None,
) -> tuple[list[float], float]:
    """All ratios from step ``first`` on, jointly, by Adam on the distance of the whole run's
    standard end to the teacher's, from the search's ratios; the best iterate (or ρ ≡ 1 where
    none beats UniPC) and its loss."""
    opt = _Adam(torch.tensor(ratios[first:]), lr)
    with torch.no_grad():  # UniPC itself is a candidate: the result is never worse than it
        plain = float(_rel(run.forward(x, [1.0] * len(ratios)), end))
    best = (plain if math.isfinite(plain) else math.inf, [1.0] * len(ratios))
    for it in range(iters + 1):
        p = opt.p.clone().requires_grad_(True)
        loss = _rel(run.forward(x, [*ratios[:first], *p]), end)
        value = float(loss.detach())
        if math.isfinite(value) and value < best[0]:
            best = (value, [*ratios[:first], *p.detach().tolist()])
        if it == iters or not math.isfinite(value):
            break
        (grad,) = torch.autograd.grad(loss, p)
        opt.step(grad)
        if progress is not None:
            progress("dc endpoint", it + 1, iters, value)
    return best[1], best[0]


OBJECTIVES = ("endpoint", "trajectory")


def fit_dc(
    model: Any,
    x_calib: Tensor,
    nfe: int,
    *,
    cond: Mapping[str, Any] | None = None,
    objective: str = "endpoint",
    iters: int = 20,
    lr: float = 0.1,
    refine_iters: int = 60,
    refine_lr: float = 0.02,
    bound: str | None = None,
    rtol: float = 1e-6,
    progress: Callable[[str, int, int, float], None] | None = None,
    **options: Any,
) -> Tuned:
    """DC-Solver's ratios fitted on ``model`` for ``nfe`` calls, as a :class:`~.tuned.Tuned`.

    Args:
        model: a :class:`~diffsolve.Denoiser` or a guidance wrapper (fit at the guidance scale
            you sample with, or use :func:`fit_dc_regression`).
        x_calib: prior samples x_T (B, ...), about 10 (the paper's count), never the test noises.
        nfe: the budget (N calls: UniPC's grid for N with the standard end).
        cond: the network's conditioning for x_calib, as in ``ds.sample``.
        objective: ``"trajectory"``: the official greedy search alone (each ρ_i matches the
            teacher's state after step i; module docstring); ``"endpoint"`` (default): that
            search, then all ratios refined jointly on the distance of the standard end to the
            teacher's (Adam, ``refine_iters`` × ``refine_lr``), the quantity every other tuner
            of :func:`diffsolve.tune` minimises. On gmm64 the greedy search alone trades the
            typical sample for the few worst ones; the refined ratios generalise (the tests).
        iters, lr: AdamW iterations and learning rate per step of the search (official: 20, 0.1).
        refine_iters, refine_lr: Adam iterations and learning rate of the joint refinement.
        bound: None, or ``"tanh"``: the search's ρ = 1 + ½·tanh(p) ∈ (½, 3/2) (official option).
        rtol: the teacher's tolerance (its states at the grid times).
        progress: ``progress(phase, i, total, loss)`` after each iteration.
        **options: :class:`DCConfig`'s fields (UniPC order, variant, corrector, disable_corrector,
            dc_order, schedule).

    Returns:
        The solver; ``tuned.info`` holds ``ratios`` (and ``ratios_trajectory``, the greedy
        search's), the options, the search's per-step losses and the calibration relative RMSE
        at the standard end before (UniPC, ρ ≡ 1) and after.
    """
    from ..sample import sample

    cfg = DCConfig.of(options)
    nfe = _positive_nfe(nfe)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not isinstance(x_calib, Tensor) or not x_calib.is_floating_point() or x_calib.ndim < 2:
        raise ValueError("x_calib must be a floating-point tensor of prior samples (B, ...)")
    if bound not in (None, "tanh"):
        raise ValueError(f"bound must be None or 'tanh', got {bound!r}")
    for name, v in (("iters", iters), ("refine_iters", refine_iters)):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    cond = dict(cond or {})
    start = time.perf_counter()
    x = x_calib.to(torch.float64)
    grid, base = cfg.base(model.process, nfe)
    times = grid.t[:-1].clone()
    if not math.isfinite(float(grid.lam[0])):  # α = 0: the teacher starts where ds.tune's does
        times[0] = float(model.process.t_max_finite)
    states, end = teacher_path(model, x, times, cond=cond, rtol=rtol)
    t_teacher = time.perf_counter() - start
    run = _Run(model, base, eval_points(model, base, x), cfg, cond)
    first = cfg.first(grid)
    greedy, losses = _search(
        run, x, states, end, first, iters=int(iters), lr=lr, bound=bound, progress=progress
    )
    ratios = greedy
    if objective == "endpoint" and first < nfe:
        ratios, _ = _refine(run, x, end, greedy, first, int(refine_iters), refine_lr, progress)

    def calib(solver: Tuned) -> float:  # on the engine, as the solver will run
        out = sample(model, x, solver=solver, cond=cond)
        assert isinstance(out, Tensor)
        return float(_rel(out, end).sqrt())

    before = calib(_tuned(model, grid, base, [1.0] * nfe, cfg, {}))
    tuned = _tuned(model, grid, base, ratios, cfg, {})
    after = calib(tuned)
    if not math.isfinite(after):
        from .tune import TuningError

        raise TuningError(f"the fitted ratios give a non-finite calibration error ({after})")
    info = {
        "objective": objective,
        "ratios_trajectory": greedy,
        "first": first,
        "iters": int(iters),
        "lr": lr,
        "refine_iters": int(refine_iters) if objective == "endpoint" else 0,
        "refine_lr": refine_lr,
        "bound": bound,
        "calib_samples": int(x.shape[0]),
        "search_losses": losses,
        "calib_rel_rmse_before": before,
        "calib_rel_rmse_after": after,
        "guidance_scale": _scale_of(model),
        "teacher_seconds": t_teacher,
        "seconds": time.perf_counter() - start,
    }
    tuned.info.update(info)
    return tuned


# -- cascade polynomial regression ---------------------------------------------------------------
def _scale_of(model: Any) -> float:
    """The classifier-free guidance scale of ``model`` (through wrappers; 1 without CFG)."""
    inner = model
    while True:
        if isinstance(inner, CFG):
            return float(inner.scale)
        if not hasattr(inner, "model"):
            return 1.0
        inner = inner.model


def _polyfit(x: Sequence[float], y: np.ndarray) -> np.ndarray:
    """Least-squares coefficients (ascending powers, degree min(2, #x − 1), padded to 3) of
    y over x; y may carry trailing axes (fitted column by column)."""
    xs = np.asarray(x, dtype=np.float64)
    deg = min(2, len(xs) - 1)
    vander = xs[:, None] ** np.arange(deg + 1)[None]
    ys = np.asarray(y, dtype=np.float64)
    flat = ys.reshape(len(xs), -1)
    coef = np.linalg.lstsq(vander, flat, rcond=None)[0]
    out = np.zeros((3, flat.shape[1]))
    out[: deg + 1] = coef
    return out.reshape(3, *ys.shape[1:])


@dataclass(frozen=True)
class DCRegression:
    """DC-Solver's cascade polynomial regression: ratios for any NFE and guidance scale.

    ``coeffs[a][b][c]`` multiplies x^a·(w/12)^b·(N/50)^c (module docstring); ``config`` the
    DC-Solver the ratios belong to (its schedule a name or None); ``searched`` the ratios the fit
    came from, {"N@w": [ρ_0, …]}. The first K = ``config.dc_order`` ratios are 1 (and one more
    where the grid starts at λ = −∞, flow matching's t = 1).
    """

    coeffs: tuple[tuple[tuple[float, ...], ...], ...]
    config: DCConfig = field(default_factory=DCConfig)
    searched: dict[str, list[float]] = field(default_factory=dict, compare=False)

    def ratios(self, nfe: int, scale: float = 1.0) -> list[float]:
        """ρ_i, i = 0 … nfe − 1, predicted for ``nfe`` calls at guidance scale ``scale``."""
        nfe = _positive_nfe(nfe)
        c = np.asarray(self.coeffs, dtype=np.float64)
        pw = (float(scale) / SCALE_UNIT) ** np.arange(3)
        pn = (nfe / NFE_UNIT) ** np.arange(3)
        ca = np.einsum("abc,b,c->a", c, pw, pn)
        return [
            1.0 if i < self.config.dc_order else float(ca @ (((i + 1) / nfe) ** np.arange(3)))
            for i in range(nfe)
        ]

    def solver(self, model: Any, nfe: int, scale: float | None = None) -> Tuned:
        """The predicted DC-Solver for ``model`` (``scale``: its CFG scale unless given)."""
        w = _scale_of(model) if scale is None else float(scale)
        ratios = self.ratios(nfe, w)
        grid, base = self.config.base(model.process, nfe)
        first = min(self.config.first(grid), nfe)
        ratios[:first] = [1.0] * first
        info = {"cpr": True, "guidance_scale": w}
        return _tuned(model, grid, base, ratios, self.config, info)

    def to_dict(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        if not isinstance(cfg["schedule"], str | None):
            raise ValueError("a DCRegression with a schedule object cannot be saved; use a name")
        cfg["disable_corrector"] = list(cfg["disable_corrector"])
        return {
            "format": "diffsolve-dc-cpr",
            "version": 1,
            "coeffs": np.asarray(self.coeffs).tolist(),
            "config": cfg,
            "searched": self.searched,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DCRegression:
        if d.get("format") != "diffsolve-dc-cpr" or d.get("version") != 1:
            raise ValueError("not a diffsolve-dc-cpr version 1 document")
        c = np.asarray(d["coeffs"], dtype=np.float64)
        if c.shape != (3, 3, 3):
            raise ValueError(f"CPR coefficients must be 3×3×3, got {c.shape}")
        return cls(
            coeffs=_nested(c),
            config=DCConfig.of(dict(d.get("config", {}))),
            searched={k: [float(v) for v in vs] for k, vs in d.get("searched", {}).items()},
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DCRegression:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _nested(c: np.ndarray) -> tuple[tuple[tuple[float, ...], ...], ...]:
    return tuple(tuple(tuple(float(v) for v in row) for row in mat) for mat in c)


def _model_for(models: Any, scale: float, k: int) -> Any:
    if isinstance(models, Mapping):
        return models[scale]
    if hasattr(models, "process"):  # one model
        return models
    if isinstance(models, Sequence):
        return models[k]
    if callable(models):
        return models(scale)
    raise TypeError("models: a model, a sequence aligned with scales, a mapping or a factory")


def fit_dc_regression(
    models: Any,
    x_calib: Tensor,
    nfes: Sequence[int],
    scales: Sequence[float] = (1.0,),
    *,
    cond: Mapping[str, Any] | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
    **kwargs: Any,
) -> DCRegression:
    """Fit DC-Solver's ratios at every (NFE, scale) of ``nfes`` × ``scales`` on the same
    calibration noise (:func:`fit_dc`) and the cascade polynomial regression to them.

    ``models``: the model at each scale, as a factory ``scale -> model``, a mapping, a sequence
    aligned with ``scales``, or one model (one scale). A model's CFG scale must equal its
    ``scale`` (1 without CFG). Three or more NFEs and scales give the quadratic cascade; fewer
    lower that stage's degree. ``kwargs``: :func:`fit_dc`'s options and :class:`DCConfig`'s
    fields (the schedule as a name).
    """
    names = {f.name for f in fields(DCConfig)}
    cfg = DCConfig.of({k: v for k, v in kwargs.items() if k in names})
    if isinstance(cfg.schedule, Schedule):
        raise ValueError("fit_dc_regression needs a schedule name (or None), not an object")
    nfe_list = sorted({_positive_nfe(n) for n in nfes})
    given = list(dict.fromkeys(float(w) for w in scales))  # the order ``models`` may follow
    if not nfe_list or not given:
        raise ValueError("give at least one NFE and one guidance scale")
    if min(nfe_list) <= cfg.dc_order + 1:
        raise ValueError(f"every NFE must exceed dc_order + 1 = {cfg.dc_order + 1}")
    by_scale = {w: _model_for(models, w, k) for k, w in enumerate(given)}
    scale_list = sorted(given)
    searched: dict[str, list[float]] = {}
    cells = np.zeros((len(nfe_list), len(scale_list), 3))
    for k, w in enumerate(scale_list):
        model = by_scale[w]
        if not math.isclose(_scale_of(model), w, rel_tol=1e-12, abs_tol=1e-12):
            raise ValueError(f"the model given for scale {w} has CFG scale {_scale_of(model)}")
        for j, n in enumerate(nfe_list):
            tuned = fit_dc(model, x_calib, n, cond=cond, progress=progress, **kwargs)
            rho, first = tuned.info["ratios"], tuned.info["first"]
            searched[f"{n}@{w:g}"] = list(rho)
            cells[j, k] = _polyfit([(i + 1) / n for i in range(first, n)], np.asarray(rho[first:]))
    ws = [w / SCALE_UNIT for w in scale_list]
    per_nfe = np.stack([_polyfit(ws, cells[j]) for j in range(len(nfe_list))])  # (N, b, a)
    coeffs = _polyfit([n / NFE_UNIT for n in nfe_list], per_nfe)  # (c, b, a)
    return DCRegression(coeffs=_nested(coeffs.transpose(2, 1, 0)), config=cfg, searched=searched)
