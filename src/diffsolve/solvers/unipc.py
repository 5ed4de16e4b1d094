"""UniPC: the unified predictor-corrector (Zhao et al. 2023), data-prediction B(h) form."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ._expint import phi_data_float
from .base import FinalOrders, Grid, Model, Solver, get_solver, register
from .engine import Row, RowSolver, RowState, StepRule

__all__ = ["UniPC", "fold"]

VARIANTS = ("bh1", "bh2")


def _vandermonde_solve(nodes: list[float], b: list[float]) -> list[float]:
    """ρ with Σ_k ρ_k·r_k^j = b_j (j = 0…n−1), UniPC's system (Zhao et al. 2023, eq. 9):
    ρ_k = Σ_j b_j·[s^j] ℓ_k(s), ℓ_k the Lagrange basis on the nodes, since Σ_k ℓ_k(s)·r_k^j
    = s^j. In plain floats: a system of order ≤ 3 per step, where a LAPACK call's set-up
    would cost more than the arithmetic."""
    rho = []
    for k, rk in enumerate(nodes):
        coef = [1.0]  # ℓ_k's coefficients, lowest degree first
        for m, rm in enumerate(nodes):
            if m != k:
                d = rk - rm
                coef = [(lo - rm * hi) / d for lo, hi in zip([0.0, *coef], [*coef, 0.0])]
        rho.append(sum(bj * cj for bj, cj in zip(b, coef)))
    return rho


def _row(grid: tuple[list[float], ...], i: int, p: int, variant: str, corrector: bool) -> Row:
    """UniP-p (``corrector=False``) or UniC-p for the step t_i → t_{i+1}, expanded onto the
    x̂_0's newest first: [m_s, m_{s_1}, …] (UniP) or [m_t, m_s, m_{s_1}, …] (UniC)."""
    lam, sig, alp = grid
    h = lam[i + 1] - lam[i]
    gain = alp[i + 1] * -math.expm1(-h)
    nodes = [(lam[i - k] - lam[i]) / h for k in range(1, p)]  # r_k < 0: past points
    nodes += [1.0] if corrector else []
    big_b = -h if variant == "bh1" else math.expm1(-h)
    rho = [0.5] * len(nodes)  # official code: ρ^P = ½ for p = 2 (bh2: 2M), ρ^C = ½ for p = 1
    if len(nodes) > 1:
        n = range(1, len(nodes) + 1)  # targets ĥ·φ_{j+1}(ĥ)·j!/B(h), j = 1…
        b = [-phi_data_float(j + 1, h) / h**j * math.factorial(j) / big_b for j in n]
        rho = _vandermonde_solve(nodes, b)
    w = [-alp[i + 1] * big_b * rk / r for rk, r in zip(rho, nodes)]  # on (m_k − m_s)
    new = [w.pop()] if corrector else []  # on (m_t − m_s)
    return Row(sig[i + 1] / sig[i], (*new, gain - sum(w) - sum(new), *w))


def _plus(row: Row, c: float, d: Row, shift: int) -> Row:
    """``row`` + c·d on the evaluations, d read ``shift`` calls further back (a, noise: row's)."""

    def add(w: tuple[float, ...], v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            return w
        out = list(w) + [0.0] * max(0, len(v) + shift - len(w))
        for j, vj in enumerate(v):
            out[j + shift] += c * vj
        return tuple(out)

    return Row(row.a, add(row.x0, d.x0), add(row.eps, d.eps), row.noise)


def fold(rules: tuple[StepRule, ...]) -> tuple[tuple[StepRule, ...], tuple[Row | None, ...]]:
    """UniPC's rules (update + ``correct``) as one row per step on the uncorrected state x̃.

    UniC of step i − 1 (``rules[i].correct``, C) and the predictor row of step i − 1 (P) both
    start from x_{i−1} with the same coefficient, so x_i = x̃_i + Δ_i with Δ_i = C − P over the
    evaluations only (P read one call back: step i's history has m(x̃_i) first), and step i's
    update U from x_i is U.a·x̃_i + (U + U.a·Δ_i) on the evaluations. Returns the folded rules
    and each step's Δ_i (a row with a = 0; None where x_i = x̃_i), so x_i = x̃_i + Δ_i·(m_i, …).

    Where C and P differ in a (a ``predictor`` with another x coefficient) x_{i−1} does not
    cancel: that step keeps its ``correct`` row (from the previous start, with Δ_{i−1} folded
    into it), and its x is the corrected one (Δ_i None). Exact either way.
    """
    out: list[StepRule] = []
    deltas: list[Row | None] = []
    for i, rule in enumerate(rules):
        corr, upd = rule.correct, rule.update
        prev_delta = deltas[-1] if deltas else None
        delta = None
        if corr is not None:
            pred = rules[i - 1].update if i > 0 else None
            if pred is not None and corr.a == pred.a and corr.noise == pred.noise == 0.0:
                delta = _plus(Row(0.0, corr.x0, corr.eps), -1.0, pred, 1)
                corr = None
            elif prev_delta is not None:  # C from x̃_{i−1} + Δ_{i−1}
                corr = _plus(corr, corr.a, prev_delta, 1)
        if rule.stages and delta is not None:
            raise RuntimeError("unipc: a folded corrector needs one-call steps")
        if upd is not None and delta is not None:
            upd = _plus(upd, upd.a, delta, 0)
        out.append(StepRule(rule.t, rule.stages, upd, corr, rule.spans))
        deltas.append(delta)
    return tuple(out), tuple(deltas)


@register
@dataclass(frozen=True)
class UniPC(RowSolver):
    """UniPC (Zhao et al., NeurIPS 2023), multistep, data prediction, B(h) variants.

    With m = x̂_0, step s → t, h = λ_t − λ_s, ĥ = −h, r_k = (λ_{s_k} − λ_s)/h for the history
    points s_k (r_k < 0) and D_k = (m_{s_k} − m_s)/r_k:

        x'    = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·m_s                       (DDIM)
        UniP: x̃_t = x' − α_t·B(h)·Σ_{k<p} ρ^P_k·D_k
        UniC: x_t = x' − α_t·B(h)·(Σ_{k<p} ρ^C_k·D_k + ρ^C_p·(m(x̃_t, t) − m_s))

    B(h) = ĥ (``bh1``) or e^{ĥ} − 1 (``bh2``); ρ solves the Vandermonde system
    Σ_k ρ_k·r_k^{j−1} = ĥ·φ_{j+1}(ĥ)·j!/B(h), j = 1…p (UniC: all p nodes, with r_p = 1; UniP:
    the first p−1). As in the official code and diffusers, ρ^P = ½ for p = 2 (so UniP-2 with bh2
    *is* DPM-Solver++(2M)) and ρ^C = ½ for p = 1. Both are built once per grid in float64 as
    rows over the x̂_0's themselves (:mod:`.engine`): UniP-p is step i's update, UniC-p of step
    i − 1 the ``correct`` row of step i (:meth:`rules`, the table plans show and DC-Solver
    compensates). The engine runs them folded (:func:`fold`, in :meth:`init`): UniC and the
    predictor of step i − 1 share their start and its coefficient, so the corrected x_i is
    x̃_i + Δ_i with Δ_i on the x̂_0's only, and step i is one row on x̃_i (the state the engine
    and callbacks hold; ``state.x_prev`` stays None).

    The corrector uses m(x̃_t, t), the evaluation the next step makes anyway, and that value (taken
    at the *uncorrected* point) is what enters the history: UniC costs no network call and raises
    the order from p to p + 1 (Zhao et al. 2023, §3.2). It is never applied after the last step
    (no evaluation follows) and is skipped on the step to σ = 0 (which returns x̂_0 and discards x).
    A first point with λ = −∞ (α = 0: flow matching's t = 1) gets a DDIM step, no corrector over
    that step, and never serves as a history node. (diffusers' bh1 returns NaN on the step to
    σ = 0, as B(h)·0 = −∞·0 there; here that step is x̂_0 for both variants.)

    Order: the step itself has local error O(h^{p+2}) with UniC and O(h^{p+1}) without. Warm-up
    can mask it globally: the first step (UniP-1 + UniC-1, local O(h³)) caps UniPC-3 with UniC at
    global order 3, and with ``lower_order_final`` an uncorrected UniP-1 ends a ``final="tmin"``
    run.

    Orders follow diffusers' ``UniPCMultistepScheduler`` (0.42) exactly: step i of n uses
    p_i = min(order, i + 1) (warm-up), further capped by n − i when ``lower_order_final`` (for
    any n: the installed diffusers has no step threshold for UniPC). The corrector applied at the
    start of step i uses p_{i−1}; ``disable_corrector`` lists predictor steps k whose result is
    not corrected (diffusers' semantics, e.g. ``(0,)``). ``euler_at_final``: the last predictor
    step is UniP-1 (DDIM from the corrected x) at any step count, as diffusers' DPM-Solver option
    (:class:`~diffsolve.solvers.base.FinalOrders`); UniC still corrects the x it starts from.

    ``predictor``: the name (or object) of another deterministic one-evaluation-per-step solver
    on the weight-table engine whose update rows replace UniP's, with UniC on top (diffusers'
    ``solver_p``). It steps from the corrected x with the x̂_0/ε̂ already evaluated at the
    uncorrected point (diffusers re-converts the raw output with the corrected x instead; the
    two agree for x̂_0-type networks).

    Shapes: x (B, ...); the history holds the evaluations the rows read (up to ``order``, or
    the predictor's).
    """

    order: int = 2  # p of UniP-p; with the corrector the accuracy order is p + 1
    variant: str = "bh2"
    corrector: bool = True
    disable_corrector: tuple[int, ...] = ()
    lower_order_final: bool = True
    predictor: str | Solver | None = None
    euler_at_final: bool = False

    name: ClassVar[str] = "unipc"
    description: ClassVar[str] = "UniPC (UniP-p + UniC), data prediction, B(h) bh1/bh2, order 1-3"

    def __post_init__(self) -> None:
        if not isinstance(self.disable_corrector, tuple):
            object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))
        super().__post_init__()

    def validate(self) -> None:
        if self.order not in (1, 2, 3):
            raise ValueError(f"unipc: order must be 1, 2 or 3, got {self.order!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unipc: variant must be one of {VARIANTS}, got {self.variant!r}")
        if not all(isinstance(k, int) and k >= 0 for k in self.disable_corrector):
            raise ValueError("unipc: disable_corrector must hold non-negative step indices")
        FinalOrders.of("unipc", self.lower_order_final, math.inf, self.euler_at_final)
        if self.predictor is not None and self.euler_at_final:
            raise ValueError("unipc: with a predictor, set euler_at_final on the predictor")
        if self.predictor is not None:
            inner = get_solver(self.predictor)
            if isinstance(inner, UniPC):
                raise ValueError("unipc: predictor must be another solver than unipc")
            if inner.stochastic or inner.nfe_of(4, True) != 4 or inner.nfe_of(4, False) != 4:
                raise ValueError(
                    f"unipc: predictor {inner.name!r} must be deterministic with one network "
                    "call per step (a multistep solver such as 'dpmpp_2m' or 'euler')"
                )
            if not isinstance(inner, RowSolver):
                raise ValueError(
                    f"unipc: predictor {inner.name!r} must be a solver on the weight-table "
                    "engine (a multistep solver such as 'dpmpp_2m' or 'euler')"
                )

    def orders(self, steps: int, start: int = 0) -> list[int]:
        """The predictor order p_i of each of ``steps`` steps (warm-up, lower_order_final).

        ``start = 1`` when the first point has λ = −∞ (α = 0, flow matching's t = 1): that
        point is infinitely far in λ, so it never serves as a history node.
        """
        rule = FinalOrders.of("unipc", self.lower_order_final, math.inf, self.euler_at_final)
        return [max(1, min(self.order, rule.cap(i, steps), i + 1 - start)) for i in range(steps)]

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        g = (grid.lam.tolist(), grid.sigma.tolist(), grid.alpha.tolist())
        n, t = grid.steps, grid.t.tolist()
        start = 0 if math.isfinite(g[0][0]) else 1
        p = self.orders(n, start)
        if self.predictor is not None:
            inner = get_solver(self.predictor)
            predict = [r.update for r in inner.rules(grid, calls)]  # type: ignore[attr-defined]
        else:
            predict = [
                None if grid.is_final(i) else _row(g, i, p[i], self.variant, False)
                for i in range(n)
            ]
        out = []
        for i in range(n):
            use = self.corrector and i > start and i - 1 not in self.disable_corrector
            use = use and not grid.is_final(i)  # no UniC over an infinite step in λ, nor to σ = 0
            fix = _row(g, i - 1, p[i - 1], self.variant, True) if use else None
            out.append(StepRule((t[i],), update=predict[i], correct=fix))
        return tuple(out)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> RowState:
        """The engine's state with the rules folded (:func:`fold`): one row per step, on x̃."""
        state = super().init(x, grid, model, noise)
        rules = fold(state.rules)[0]
        keep = max((r.width for rule in rules for r in rule.rows()), default=1)
        track = any(rule.correct is not None for rule in rules)
        return state.replace(rules=rules, keep=max(keep - 1, 1), track_prev=track)
