"""The weight-table engine: every step of a linear solver is a row of float64 weights.

On a Gaussian path the sampling ODE (and the reverse SDE) is linear in x and in the network's
predictions, so any solver built from evaluations of the network moves x by a fixed linear
combination of what it has seen. One step of such a solver is

    u_k   = a·x + Σ_j b_j·x̂_0[j] + Σ_j c_j·ε̂[j] + s·ξ_k      (stage k: the network's next input)
    x_new = a·x + Σ_j b_j·x̂_0[j] + Σ_j c_j·ε̂[j] + s·ξ        (the update)

over the run's evaluations held **newest first** (j = 0 is the latest call, the step's own
stages included), with ξ standard Gaussian noise (stochastic solvers). A multistep solver has
no stages and a long row; a singlestep one has stage rows over the step's own calls; UniC is a
second row applied right after the step's first call, from the previous step's start
(``StepRule.correct``). Builders compute the rows once per grid in float64; a step is one fused
combination, so a tuned solver is only a learned grid and a learned table (:class:`Row` is what
it saves).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..denoiser import Denoiser, EvalPoint, Prediction
from ..noise import NoiseSource
from .base import Grid, Model, Plan, Solver, State, host

__all__ = ["Row", "RowSolver", "RowState", "StepRule", "combine", "update_rules"]


class Row(NamedTuple):
    """x_new = a·x + Σ_j x0[j]·x̂_0[j] + Σ_j eps[j]·ε̂[j] + noise·ξ (evaluations newest first).

    Rows and rules are immutable records made by the dozen per plan: NamedTuples, a third of a
    frozen dataclass's construction cost."""

    a: float
    x0: tuple[float, ...] = ()
    eps: tuple[float, ...] = ()
    noise: float = 0.0

    @property
    def width(self) -> int:
        """How many past evaluations the row reads."""
        return max(len(self.x0), len(self.eps))

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "x0": list(self.x0), "eps": list(self.eps), "noise": self.noise}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        return cls(
            float(d["a"]),
            tuple(float(v) for v in d.get("x0", ())),
            tuple(float(v) for v in d.get("eps", ())),
            float(d.get("noise", 0.0)),
        )


class StepRule(NamedTuple):
    """One step: the process times it evaluates (``t[0]`` is the step's start), the rows that
    form the inputs of ``t[1:]`` from the step's start x and the evaluations so far, and the
    update to the next grid point (None: the step to σ = 0, which returns the last x̂_0).

    ``correct`` (UniC) is applied right after the step's first call; its ``a`` multiplies the
    previous step's start and its weights read the evaluations including that call.
    ``spans`` are the (t_from, t_to) intervals of the noise of each row that draws (stage rows
    first, then the update), so a Brownian path gives consistent increments; a span of None is
    an independent draw that is no path increment (a Langevin corrector's noise). ``mix`` (one
    stage): where the source has no path, the stage's and the update's noises are built as the
    path's two increments over [s, u] ⊂ [s, t], w1 and mix·w1 + sqrt(1 − mix²)·w2, from the
    step's draws 0 and 1 (mix = their correlation). ``consts``: a solver's own per-step
    constants that are not rows (PC: the corrector's snr and Langevin α).
    """

    t: tuple[float, ...]
    stages: tuple[Row, ...] = ()
    update: Row | None = None
    correct: Row | None = None
    spans: tuple[tuple[float, float] | None, ...] = ()
    mix: float | None = None
    consts: tuple[float, ...] = ()

    @property
    def calls(self) -> int:
        return len(self.t)

    def rows(self) -> tuple[Row, ...]:
        return tuple(r for r in (self.correct, *self.stages, self.update) if r is not None)


def update_rules(grid: Grid, rows: Sequence[Row | None]) -> tuple[StepRule, ...]:
    """One-call steps: step i applies ``rows[i]`` (None: the step returns x̂_0), its noise the
    increment over t_i → t_{i+1}."""
    (t,) = grid.lists("t")
    return tuple(
        StepRule((t[i],), update=row, spans=((t[i], t[i + 1]),) if row and row.noise else ())
        for i, row in enumerate(rows)
    )


def combine(row: Row, x: Tensor | None, hist: Sequence[Prediction], z: Tensor | None) -> Tensor:
    """The row applied to x and the evaluations ``hist`` (newest first), one fused pass per term.

    Zero weights are skipped: 0·NaN would poison x (e.g. x̂_0 where α = 0), and a skipped view of
    a lazy prediction is never formed.
    """
    out: Tensor | None = None
    if row.a != 0.0 and x is not None:
        out = row.a * x
    for w, p in zip(row.x0, hist):
        if w != 0.0:
            out = w * p.x0 if out is None else out.add_(p.x0, alpha=w)
    for w, p in zip(row.eps, hist):
        if w != 0.0:
            out = w * p.eps if out is None else out.add_(p.eps, alpha=w)
    if row.noise != 0.0 and z is not None:
        out = row.noise * z if out is None else out.add_(z, alpha=row.noise)
    if out is None:  # unreachable for a consistent method (the x̂_0 weights sum to α_t)
        raise RuntimeError("empty linear combination")
    return out


@dataclass(frozen=True)
class RowState(State):
    """The engine's state: the plan's rules and points (host), the noise source, and the run's
    evaluations newest first with the previous step's start (for a corrector)."""

    rules: tuple[StepRule, ...] = host()
    points: tuple[tuple[EvalPoint, ...], ...] = host()
    keep: int = host()
    track_prev: bool = host(default=False)  # a corrector restarts from the previous start
    noise: Any = host(default=None)
    history: tuple[Prediction, ...] = ()
    x_prev: Tensor | None = None

    def select(self, index: Tensor) -> RowState:
        hist = tuple(p.select(index) for p in self.history)
        x_prev = self.x_prev[index] if self.x_prev is not None else None
        return self.replace(history=hist, x_prev=x_prev)


def eval_points(
    model: Model, rules: Sequence[StepRule], like: Tensor, grid: Grid | None = None
) -> tuple:
    """Every rule's evaluation points, built in one vectorised pass where the model offers one;
    a time several rules evaluate (a step's end and the next one's start) is built once. Where
    they are a clean-ended ``grid``'s times (one call a step) a Denoiser reuses its α and σ."""
    where: dict[float, int] = {}
    slots = [[where.setdefault(t, len(where)) for t in r.t] for r in rules]
    if not where:
        return tuple(() for _ in rules)
    times = list(where)
    ts = torch.tensor(times, dtype=torch.float64)
    if type(model) is Denoiser and grid is not None and grid.clean_end:
        got = list(map(grid.known.get, times))
        coefs = None if None in got else (*map(list, zip(*got)),)
        pts = model.points(ts, like, coefs=coefs)  # type: ignore[arg-type]
        return tuple([tuple([pts[k] for k in slot]) for slot in slots])
    many = getattr(model, "points", None)
    pts = many(ts, like) if many is not None else [model.point(t, like) for t in ts]
    return tuple(tuple(pts[k] for k in slot) for slot in slots)


def known(grid: Grid, t: Sequence[float], alpha: Sequence[float], sigma: Sequence[float]) -> None:
    """Record α and σ a builder computed at its stage times (``grid.known``):
    :func:`eval_points` reuses them."""
    grid.known.update(zip(t, zip(alpha, sigma)))


class RowSolver(Solver[RowState]):
    """A solver whose steps are rows (see the module docstring): it declares its builder,
    ``rules(grid, calls)``, and inherits ``init`` and ``step``."""

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        """One rule per step of ``grid`` with ``calls[i]`` network calls in step i."""
        raise NotImplementedError

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> RowState:
        return self._state(*self._planned(x, grid, model), grid, noise)

    def _planned(self, x: Tensor, grid: Grid, model: Model) -> tuple[tuple, tuple]:
        """The plan's rules and evaluation points (made here for a bare grid)."""
        if isinstance(grid, Plan) and grid.rules is not None:
            return grid.rules, grid.points
        # a bare grid (tests, the diffusers adapter's probes): plan it here
        rules = self.rules(grid, self.calls(grid.steps, grid.clean_end))
        return rules, eval_points(model, rules, x, grid)

    def _state(self, rules: tuple, points: tuple, grid: Grid, noise: Any) -> RowState:
        """The initial state of ``rules``: the history kept, the noise source if a row draws."""
        # one pass over every row (a cold run pays this once per step): builtins, not a loop
        track = any([rule.correct is not None for rule in rules])
        rows = [r for u in rules for r in (u.correct, *u.stages, u.update) if r is not None]
        draws = any([r.noise != 0.0 for r in rows])
        keep = max([1, *map(len, [r.x0 for r in rows]), *map(len, [r.eps for r in rows])])
        source = None
        if draws:
            source = (noise if noise is not None else NoiseSource()).bind(grid)
        return RowState(
            rules=rules, points=points, keep=max(keep - 1, 1), track_prev=track, noise=source
        )

    def step(self, x: Tensor, i: int, state: RowState, model: Model) -> tuple[Tensor, RowState]:
        rule, pts = state.rules[i], state.points[i]
        hist = (model(x, pts[0]), *state.history)
        if rule.correct is not None and state.x_prev is not None:
            x = combine(rule.correct, state.x_prev, hist, None)
        start, spans, z = x, iter(rule.spans), None
        for k, row in enumerate(rule.stages):
            z = self._draw(state, x, i, k + 1, row, spans, rule.mix, None)
            hist = (model(combine(row, start, hist, z), pts[k + 1]), *hist)
        if rule.update is None:
            return hist[0].x0, state.replace(history=hist[: state.keep])
        z = self._draw(state, x, i, 0, rule.update, spans, rule.mix, z)
        out = combine(rule.update, start, hist, z)
        return out, state.replace(
            history=hist[: state.keep], x_prev=start if state.track_prev else None
        )

    @staticmethod
    def _draw(
        state: RowState, x: Tensor, i: int, stage: int, row: Row, spans: Any, mix: Any, prev: Any
    ) -> Any:
        if row.noise == 0.0:
            return None
        span = next(spans)
        if mix is not None and not state.noise.path:  # StepRule.mix: one path's two increments
            if prev is None:
                return state.noise.randn(x, i, 0)
            return mix * prev + math.sqrt(max(0.0, 1 - mix * mix)) * state.noise.randn(x, i, 1)
        if span is None:
            return state.noise.randn(x, i, stage)
        return state.noise.randn_between(x, i, span[0], span[1], stage)
