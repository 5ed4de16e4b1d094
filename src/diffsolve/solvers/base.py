"""The solver contract: a frozen configuration, a state value, a registry.

A solver is a frozen dataclass. ``init(x, grid, model)`` builds a state (per-step coefficients
computed once in float64, evaluation points, empty history); ``step(x, i, state, model)`` moves
x from ``grid.t[i]`` to ``grid.t[i+1]`` and returns the new state. History, counters and noise
live in the state, never on the solver, so one solver object can serve concurrent runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from ..denoiser import EvalPoint, Prediction
from ..processes.base import GaussianProcess

__all__ = [
    "FinalOrders",
    "Grid",
    "Model",
    "Plan",
    "Solver",
    "State",
    "get_solver",
    "register",
    "solvers",
]


class Model(Protocol):
    """What a solver calls: a Denoiser (or the sampling loop's counting wrapper of one)."""

    def point(self, t: float | Tensor, like: Tensor) -> EvalPoint: ...

    def points(self, ts: Tensor, like: Tensor) -> list[EvalPoint]: ...

    def __call__(self, x: Tensor, t: EvalPoint) -> Prediction: ...


@dataclass(frozen=True)
class Grid:
    """The time grid of one run, in float64 on the host.

    ``t`` has ``steps + 1`` entries, strictly decreasing. With ``clean_end`` the last one is the
    data end σ = 0 (α = 1, λ = +∞; its t entry is 0 by convention and is never evaluated).
    ``nfe`` is the budget the grid was planned for (``sample(nfe=...)``), else None: a solver
    whose calls per grid are not fixed by the step count (Heun with an odd/even budget) reads it.
    """

    process: GaussianProcess
    t: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor
    clean_end: bool
    nfe: int | None = None

    @classmethod
    def build(
        cls, process: GaussianProcess, times: Tensor, clean_end: bool, nfe: int | None = None
    ) -> Grid:
        t = times.to(torch.float64)
        cols: tuple[Tensor, ...] = (t, *process.coefficients(t))
        ends = (0.0, 1.0, 0.0, math.inf)  # the data end: t, α, σ, λ
        on_host = all(v.device.type == "cpu" and not v.requires_grad for v in cols)  # float64
        if clean_end and on_host:  # numpy: four one-element torch.cat cost ~15 µs
            cols = tuple(torch.from_numpy(np.append(v.numpy(), e)) for v, e in zip(cols, ends))
        elif clean_end:  # times that carry a gradient (tuning) or live off the host
            cols = tuple(torch.cat([v, v.new_tensor([e])]) for v, e in zip(cols, ends))
        t, alpha, sigma, lam = cols
        return cls(process, t, alpha, sigma, lam, clean_end, nfe)

    @property
    def steps(self) -> int:
        return self.t.numel() - 1

    @property
    def h(self) -> Tensor:
        """Step sizes in λ, h_i = λ_{i+1} − λ_i > 0 (+∞ for the step to σ = 0), shape (steps,)."""
        return self.lam[1:] - self.lam[:-1]

    @property
    def exp_neg_h(self) -> Tensor:
        """e^{−h_i} = σ_{i+1}·α_i / (σ_i·α_{i+1}), finite even where λ is infinite."""
        return self.sigma[1:] * self.alpha[:-1] / (self.sigma[:-1] * self.alpha[1:])

    def is_final(self, i: int) -> bool:
        """Whether step i lands on the clean end σ = 0."""
        return self.clean_end and i == self.steps - 1

    @cached_property
    def _host(self) -> dict[str, list[float]]:
        return {n: getattr(self, n).tolist() for n in ("t", "alpha", "sigma", "lam")}

    @cached_property
    def known(self) -> dict[float, tuple[float, float]]:
        """(α, σ) by process time, as computed for this grid: its own times (not the clean end)
        and the stage times a row builder adds (singlestep, RK); evaluation points take them
        from here instead of the process once more (the same float64 numbers)."""
        t, alpha, sigma = self.lists("t", "alpha", "sigma")
        n = len(t) - int(self.clean_end)
        return dict(zip(t[:n], zip(alpha[:n], sigma[:n])))

    def lists(self, *names: str) -> tuple[list[float], ...]:
        """Columns of the grid ("t", "alpha", "sigma", "lam") as Python floats, made once per
        grid: the row builders read them element by element."""
        return tuple(self._host[n] for n in names)


@dataclass(frozen=True)
class Plan(Grid):
    """The plan of one run, made once (:func:`diffsolve.plan.make_plan`) and read by the solver.

    A :class:`Grid` plus ``calls`` (network calls of each step; their sum is the NFE) and, for
    solvers on the weight-table engine, ``rules`` (one :class:`~.engine.StepRule` per step: its
    evaluation times and rows of weights) with their evaluation ``points`` (built in one
    vectorised float64 pass). ``weights`` is the table as plain data.
    """

    calls: tuple[int, ...] = ()
    rules: tuple[Any, ...] | None = None
    points: tuple[tuple[EvalPoint, ...], ...] = ()

    @property
    def weights(self) -> list[dict[str, Any]]:
        """One entry per step: its evaluation times and rows (stages, update, corrector)."""
        return [
            {
                "t": list(rule.t),
                "stages": [r.to_dict() for r in rule.stages],
                "update": None if rule.update is None else rule.update.to_dict(),
                "correct": None if rule.correct is None else rule.correct.to_dict(),
            }
            for rule in self.rules or ()
        ]

    def describe(self) -> str:
        """The weight table as text, one line per row (x̂_0 and ε̂ weights newest first)."""
        lines = []
        for i, (rule, w) in enumerate(zip(self.rules or (), self.weights)):
            head = f"step {i}: t {float(self.t[i]):.6g} -> {float(self.t[i + 1]):.6g}"
            lines.append(f"{head}, {rule.calls} call(s)")
            stages = [(f"stage {k + 1}", r) for k, r in enumerate(w["stages"])]
            for name, r in [("correct", w["correct"]), *stages, ("update", w["update"])]:
                if r is not None:
                    x0 = ", ".join(f"{v:.6g}" for v in r["x0"])
                    eps = ", ".join(f"{v:.6g}" for v in r["eps"])
                    lines.append(
                        f"  {name}: a={r['a']:.6g} x0=[{x0}] eps=[{eps}] noise={r['noise']:.6g}"
                    )
            if w["update"] is None:
                lines.append("  update: x̂_0 of the last call (the step to σ = 0)")
        return "\n".join(lines)


S = TypeVar("S", bound="State")


@dataclass(frozen=True)
class State:
    """Base class of solver states: batch-first tensors (or tuples of them) and host values.

    ``select(index)`` reindexes every batch tensor along dim 0, so particle methods can resample
    between steps.
    """

    def replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes)

    def select(self: S, index: Tensor) -> S:
        def pick(v: Any) -> Any:
            if isinstance(v, Tensor) and v.ndim > 0:
                return v[index]
            if isinstance(v, tuple):
                return tuple(pick(u) for u in v)
            return v

        batch = [f.name for f in fields(self) if f.metadata.get("batch", True)]
        return self.replace(**{name: pick(getattr(self, name)) for name in batch})


@dataclass(frozen=True)
class FinalOrders:
    """How a multistep run lowers its order over its last steps (``lower_order_final``,
    ``euler_at_final``): step i of N (a step to σ = 0 counts as the last) uses order ≤
    ``cap(i, N)``. ``lower_below``: a run of N < lower_below steps ends with orders ≤ N − i
    (15 for DPM-Solver++ 2M/3M and DEIS as diffusers, 10 for DPM-Solver as the official code, ∞
    for UniPC; 0 turns it off). ``euler``: the last step first order at every N (diffusers
    #5433/#5541: no high-order extrapolation near σ → 0). With a clean end the last step returns
    x̂_0 anyway, so these matter for the steps before it or with ``final="tmin"``.
    """

    lower_below: float = 0.0
    euler: bool = False

    @classmethod
    def of(
        cls, solver: str, lower_order_final: Any, below: float, euler_at_final: Any
    ) -> FinalOrders:
        """The rule of a solver's two boolean options (ValueError if they are not bools)."""
        check_bools(solver, lower_order_final=lower_order_final, euler_at_final=euler_at_final)
        return cls(below if lower_order_final else 0.0, euler_at_final)

    def cap(self, i: int, steps: int) -> int:
        """The highest order step i of ``steps`` may use (``steps`` if unconstrained)."""
        k = steps - i if steps < self.lower_below else steps
        return 1 if self.euler and i == steps - 1 else k


def check_nonnegative(solver: str, **values: Any) -> None:
    """ValueError unless every value is a finite number >= 0 (a bool is not a number here)."""
    for name, v in values.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (number and math.isfinite(v) and v >= 0):
            raise ValueError(f"{solver}: {name} must be a finite number >= 0, got {v!r}")


def check_choices(solver: str, **options: tuple[Any, tuple[str, ...]]) -> None:
    """ValueError unless each option's value (first) is one of its choices (second)."""
    for name, (v, choices) in options.items():
        if v not in choices:
            raise ValueError(f"{solver}: {name} must be one of {choices}, got {v!r}")


def check_order(solver: str, valid: Sequence[int], **values: Any) -> None:
    """ValueError unless every value is one of the integers ``valid`` (a bool is not one here)."""
    for name, v in values.items():
        if isinstance(v, bool) or v not in valid:
            *head, last = valid
            listed = f"{', '.join(map(str, head))} or {last}"
            raise ValueError(f"{solver}: {name} must be {listed}, got {v!r}")


def check_bools(solver: str, **values: Any) -> None:
    """ValueError unless every value is a bool."""
    for name, v in values.items():
        if not isinstance(v, bool):
            raise ValueError(f"{solver}: {name} must be a bool, got {v!r}")


def host(**kw: Any) -> Any:
    """A state field that is not per-sample (coefficients, points): ``select`` leaves it alone."""
    return dataclasses.field(metadata={"batch": False}, **kw)


@dataclass(frozen=True)
class Solver(Generic[S]):
    """A sampling method: configuration only (frozen); see the module docstring.

    Generic in its state type S: ``step`` takes the state its own ``init`` made (``class
    DPMSolverV3(Solver[V3State])``). Subclasses set ``name`` and ``description`` and implement
    ``init`` and ``step``; the defaults below fit one network call per step (others override
    ``calls``, ``budget`` and ``grid_times``).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    adaptive: ClassVar[bool] = False  # chooses its own steps between the grid's two ends
    default_schedule: ClassVar[str] = "logsnr"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on inconsistent options (called on construction)."""

    @property
    def order(self) -> int:
        raise NotImplementedError

    @property
    def planned_nfe(self) -> int | None:
        """The NFE a solver with its own grid makes (a tuned solver); None for the others."""
        return None

    @property
    def planned_final(self) -> str | None:
        """The end rule a solver with its own grid was made for; None for the others."""
        return None

    def check_model(self, model: Any) -> None:
        """Raise ValueError if this solver cannot run on ``model`` (a tuned solver made for
        another process or prediction type); called by the plan before any work."""

    def nfe_of(self, steps: int, clean_end: bool) -> int:
        """Network calls made by ``steps`` steps."""
        return sum(self.calls(steps, clean_end))

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        """Network calls of each step of a run of ``steps`` steps (``steps=``/``times=``)."""
        return (1,) * steps

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        """Network calls of each step of a run that spends exactly ``nfe`` calls."""
        return (1,) * nfe

    def grid_times(
        self, process: GaussianProcess, schedule: Any, calls: tuple[int, ...], clean_end: bool
    ) -> Tensor:
        """Grid times (without the clean end) for steps making ``calls`` calls each: the
        schedule's points, one per step (plus the last time with ``final="tmin"``)."""
        return schedule(process, len(calls) if clean_end else len(calls) + 1)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> S:
        """Precompute per-step coefficients (float64 → Python floats) and evaluation points.

        ``noise`` is the run's noise source (:class:`~diffsolve.noise.Noise`; stochastic
        solvers only): ``init`` keeps ``noise.bind(grid)`` in the state and ``step`` draws
        ``randn_between(x, i, t_from, t_to, stage)`` / ``randn(x, i, stage)`` from it.
        """
        raise NotImplementedError

    def step(self, x: Tensor, i: int, state: S, model: Model) -> tuple[Tensor, S]:
        raise NotImplementedError

    @classmethod
    def options(cls) -> dict[str, Any]:
        """Declared options and their defaults."""

        def default(f: dataclasses.Field) -> Any:
            if f.default is not dataclasses.MISSING:
                return f.default
            return None if f.default_factory is dataclasses.MISSING else f.default_factory()

        return {f.name: default(f) for f in fields(cls)}


_REGISTRY: dict[str, type[Solver]] = {}
_ALIASES: dict[str, tuple[str, str, dict[str, Any]]] = {}  # name: (target, description, options)


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator: make ``cls`` available by ``cls.name``."""
    if not cls.name:
        raise ValueError("a registered solver needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def alias(name: str, target: str, description: str, **options: Any) -> None:
    """Register ``name`` as ``target`` with fixed options (e.g. ddim → euler)."""
    _ALIASES[name] = (target, description, options)


def solvers() -> dict[str, str]:
    """Every registered solver name with a one-line description."""
    out = {name: cls.description for name, cls in _REGISTRY.items()}
    out.update({name: description for name, (_, description, _) in _ALIASES.items()})
    return dict(sorted(out.items()))


def get_solver(solver: str | Solver, **options: Any) -> Solver:
    """A solver object from a name (plus options) or an object (options replace its fields)."""
    base: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    if isinstance(solver, Solver):
        cls = type(solver)
        base = {f.name: getattr(solver, f.name) for f in fields(solver)}
    elif isinstance(solver, str) and (solver in _REGISTRY or solver in _ALIASES):
        target, _, fixed = _ALIASES.get(solver, (solver, "", {}))
        cls = _REGISTRY[target]
    elif solver == "auto":
        raise ValueError(
            "'auto' is resolved by ds.sample from the NFE budget; use "
            "diffsolve.auto.recommend(process, nfe) for the solver object"
        )
    else:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(solvers())}")
    valid = set(cls.options())
    unknown = sorted(set(options) - valid)
    if unknown:
        listed = ", ".join(sorted(valid)) or "(none)"
        raise ValueError(f"unknown option(s) {unknown} for solver {cls.name!r}; valid: {listed}")
    return cls(**{**base, **fixed, **options})
