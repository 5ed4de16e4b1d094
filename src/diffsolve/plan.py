"""The plan of a run, made once: times, calls per step, evaluation points and weights.

``make_plan`` is the one place that turns (process, schedule, solver, budget, end rule) into
what a solver reads; ``ds.sample`` and the diffusers adapter both call it, and no solver works
its step plan back out of the grid.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from .schedules import Schedule, get_schedule, validate_times
from .solvers.base import Grid, Plan, Solver
from .solvers.engine import RowSolver, eval_points

__all__ = ["FINALS", "make_plan"]

FINALS = ("standard", "extrapolate", "tmin")

# Plans already made, per process (weakly held): (grid, calls, rules) per configuration, and
# evaluation points per model and batch — a repeated run skips the set-up. Only configurations
# that hash (frozen solvers, schedule names or frozen schedules) and were planned without an
# error enter; at most _KEEP of each per owner, oldest dropped first.
_GRIDS: weakref.WeakKeyDictionary[Any, dict[tuple, tuple]] = weakref.WeakKeyDictionary()
_POINTS: weakref.WeakKeyDictionary[Any, dict[tuple, tuple]] = weakref.WeakKeyDictionary()
_KEEP = 32


def _config_key(*parts: Any) -> tuple | None:
    try:
        hash(parts)
    except TypeError:
        return None
    return parts


def _lookup(table: weakref.WeakKeyDictionary, owner: Any, key: tuple | None) -> Any:
    if key is None:
        return None
    try:
        return table.get(owner, {}).get(key)
    except TypeError:  # an owner that cannot be weakly referenced or hashed
        return None


def _store(table: weakref.WeakKeyDictionary, owner: Any, key: tuple | None, value: Any) -> None:
    if key is None:
        return
    try:
        entries = table.setdefault(owner, {})
    except TypeError:
        return
    entries[key] = value
    while len(entries) > _KEEP:
        del entries[next(iter(entries))]


def _positive(name: str, v: Any) -> int:
    if isinstance(v, bool) or int(v) != v or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def make_plan(
    model: Any,
    like: Tensor,
    solver: Solver,
    *,
    nfe: int | None = None,
    steps: int | None = None,
    times: Tensor | None = None,
    schedule: str | Schedule | None = None,
    final: str = "standard",
) -> Plan:
    """The plan of one run of ``solver`` on ``model`` for samples shaped like ``like`` (B, ...).

    Exactly one of ``nfe`` (a budget met exactly: the solver's :meth:`~.Solver.budget` gives the
    calls of each step and :meth:`~.Solver.grid_times` the times), ``steps`` (solver steps on
    the schedule) or ``times`` (explicit decreasing process times, validated) — adaptive solvers
    take none (their grid is the process's two ends) or ``times``. ``final`` as ``ds.sample``.
    For a solver on the weight-table engine the plan also holds every step's rule (evaluation
    times and rows of weights) and the evaluation points, built in one vectorised float64 pass.
    """
    if final not in FINALS:
        raise ValueError(f"unknown final {final!r}; valid: {', '.join(FINALS)}")
    process = model.process
    solver.check_model(model)
    nfe = None if nfe is None else _positive("nfe", nfe)  # before the key: True is not 1
    steps = None if steps is None else _positive("steps", steps)
    times_key = None if times is None else tuple(torch.as_tensor(times).reshape(-1).tolist())
    key = _config_key(solver, nfe, steps, times_key, schedule, final)
    hit = _lookup(_GRIDS, process, key)
    grid = None
    if hit is None:
        grid, calls, rules = _grid_calls_rules(process, solver, nfe, steps, times, schedule, final)
        # the grid's tensors without the process (a value holding its key would never be freed)
        hit = ((grid.t, grid.alpha, grid.sigma, grid.lam, grid.clean_end, grid.nfe), calls, rules)
        _store(_GRIDS, process, key, hit)
    (t, alpha, sigma, lam, clean, budget), calls, rules = hit
    points: tuple = ()
    if rules is not None:
        pkey = None if key is None else (key, like.shape[0], like.dtype, like.device)
        points = _lookup(_POINTS, model, pkey)
        if points is None:
            points = eval_points(model, rules, like, grid)
            _store(_POINTS, model, pkey, points)
    return Plan(
        process, t, alpha, sigma, lam, clean, budget, calls=calls, rules=rules, points=points
    )


def _grid_calls_rules(
    process: Any,
    solver: Solver,
    nfe: int | None,
    steps: int | None,
    times: Tensor | None,
    schedule: str | Schedule | None,
    final: str,
) -> tuple[Grid, tuple[int, ...], tuple | None]:
    """What :func:`make_plan` plans before the evaluation points (validating as it goes)."""
    clean_end = final != "tmin"
    own = solver.planned_nfe
    if own is not None:  # a tuned solver: its own grid and budget
        if steps is not None or times is not None:
            raise ValueError(f"a {solver.name} solver runs on its own grid: omit steps= and times=")
        if solver.planned_final is not None and final != solver.planned_final:
            raise ValueError(
                f"this {solver.name} solver was made for final={solver.planned_final!r}, "
                f"not {final!r}"
            )
        nfe = own if nfe is None else nfe
    if solver.adaptive:
        if nfe is not None or steps is not None:
            raise ValueError(
                f"solver {solver.name!r} chooses its own steps: omit nfe= and steps= "
                "(set its rtol/atol), or give times= for the points to pass through"
            )
        if times is None:
            times = torch.tensor([process.t_max_finite, process.t_min], dtype=torch.float64)
    elif sum(v is not None for v in (nfe, steps, times)) != 1:
        raise ValueError("give exactly one of nfe=, steps= or times=")
    sched = get_schedule(schedule if schedule is not None else solver.default_schedule)
    calls: tuple[int, ...] = ()
    if nfe is not None:
        nfe = _positive("nfe", nfe)
        calls = tuple(solver.budget(nfe, clean_end))
        grid_t = solver.grid_times(process, sched, calls, clean_end)
    elif steps is not None:
        n = _positive("steps", steps)
        grid_t = sched(process, n if clean_end else n + 1)
    else:
        assert times is not None  # exactly one of nfe, steps, times (or adaptive: set above)
        grid_t = validate_times(process, times)
        if not clean_end and grid_t.numel() < 2:
            raise ValueError("final='tmin' needs at least two times")
    grid = Grid.build(process, grid_t, clean_end, nfe=nfe)
    if not calls and not solver.adaptive:
        calls = tuple(solver.calls(grid.steps, clean_end))
    rules = tuple(solver.rules(grid, calls)) if isinstance(solver, RowSolver) else None
    return grid, calls, rules
