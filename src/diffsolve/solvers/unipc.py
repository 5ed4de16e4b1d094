"""UniPC: the unified predictor-corrector (Zhao et al. 2023), data-prediction B(h) form."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ._expint import phi_data_float
from .base import FinalOrders, Grid, Model, Solver, check_choices, check_order, get_solver, register
from .engine import Row, RowSolver, RowState, StepRule

__all__ = ["UniPC", "fold"]


def _vandermonde_solve(nodes: list[float], b: list[float]) -> list[float]:
    """ρ with Σ_k ρ_k·r_k^j = b_j, j < n ≤ 3 (Zhao et al. 2023, eq. 9): ρ_k = Σ_j b_j·[s^j] ℓ_k(s),
    ℓ_k the Lagrange basis on the nodes, in plain floats (cheaper than a LAPACK call)."""
    rho = []
    for k, rk in enumerate(nodes):
        o = nodes[:k] + nodes[k + 1 :]  # Π_m (s − o_m): s − o_0, or s² − (o_0 + o_1)·s + o_0·o_1
        if len(o) == 1:
            rho.append((b[1] - o[0] * b[0]) / (rk - o[0]))
        else:
            num = b[2] - (o[0] + o[1]) * b[1] + o[0] * o[1] * b[0]
            rho.append(num / ((rk - o[0]) * (rk - o[1])))
    return rho


def _rows(g: tuple[list[float], ...], i: int, p: int, variant: str, pc: tuple[bool, bool]) -> Any:
    """UniP-p and UniC-p of the step t_i → t_{i+1} (each only where ``pc`` asks; else None)
    on the x̂_0's newest first: [m_s, m_{s_1}, …] (UniP), [m_t, m_s, m_{s_1}, …] (UniC)."""
    lam, sig, alp = g
    h = lam[i + 1] - lam[i]
    em = math.expm1(-h)
    big_b = -h if variant == "bh1" else em
    ratio, gain, scale = sig[i + 1] / sig[i], -alp[i + 1] * em, -alp[i + 1] * big_b
    nodes = [(lam[i - k] - lam[i]) / h for k in range(1, p)]  # r_k < 0
    # targets b_j = ĥ·φ_{j+1}(ĥ)·j!/B(h) = −q_j/B(h), j = 1…n, q_j = j!·P(j + 1, h)/h^j with
    # P(k, h) = h^k·φ_k(−h): q_n from ``phi_data``, the rest by φ_k(z) = 1/k! + z·φ_{k+1}(z)
    n = p if pc[1] else p - 1
    b = [0.0] * n
    if n > 1:
        q = math.factorial(n) * phi_data_float(n + 1, h) / h**n
        b[-1] = -q / big_b
        for j in range(n - 1, 0, -1):
            q = h * (1.0 - q) / (j + 1)
            b[j - 1] = -q / big_b
    pred = corr = None  # ρ^P = ½ for p = 2 (bh2's UniP-2 is DPM-Solver++(2M)), ρ^C = ½ for p = 1
    if pc[0]:
        rho = _vandermonde_solve(nodes, b) if p > 2 else [0.5] * (p - 1)
        w = [scale * rk / r for rk, r in zip(rho, nodes)]  # on (m_k − m_s)
        pred = Row(ratio, (gain - sum(w), *w))
    if pc[1]:
        nodes.append(1.0)  # UniC's r_p = 1: m_t
        rho = _vandermonde_solve(nodes, b) if p > 1 else [0.5]
        w = [scale * rk / r for rk, r in zip(rho, nodes)]
        new = w.pop()  # on (m_t − m_s)
        corr = Row(ratio, (new, gain - sum(w) - new, *w))
    return pred, corr


def _add(w: tuple[float, ...], c: float, v: tuple[float, ...], shift: int) -> tuple[float, ...]:
    """The weights w + c·v, v read ``shift`` evaluations further back."""
    if not v:
        return w
    out = [*w, *[0.0] * (len(v) + shift - len(w))]
    for j, vj in enumerate(v, shift):
        out[j] += c * vj
    return tuple(out)


def fold(rules: tuple[StepRule, ...]) -> tuple[tuple[StepRule, ...], tuple[Row | None, ...]]:
    """UniPC's rules (update + ``correct``) as one row per step on the uncorrected state x̃,
    and each step's Δ_i (None where x_i = x̃_i): x_i = x̃_i + Δ_i, Δ_i = C − P (UniC and UniP of
    step i − 1), step i's update U becomes U.a·x̃_i + (U + U.a·Δ_i). Where C and P differ in a
    (a ``predictor``) the step keeps its ``correct`` row (docs/solvers-multistep.md#unipc)."""
    out: list[StepRule] = []
    deltas: list[Row | None] = [None]
    for i, rule in enumerate(rules):
        corr, upd, delta = rule.correct, rule.update, None
        if corr is not None:
            pred = rules[i - 1].update if i > 0 else None
            if pred is not None and corr.a == pred.a and corr.noise == pred.noise == 0.0:
                x0, eps = _add(corr.x0, -1.0, pred.x0, 1), _add(corr.eps, -1.0, pred.eps, 1)
                delta, corr = Row(0.0, x0, eps), None
            elif (d := deltas[-1]) is not None:  # C from x̃_{i−1} + Δ_{i−1}
                x0, eps = _add(corr.x0, corr.a, d.x0, 1), _add(corr.eps, corr.a, d.eps, 1)
                corr = Row(corr.a, x0, eps, corr.noise)
        if rule.stages and delta is not None:
            raise RuntimeError("unipc: a folded corrector needs one-call steps")
        if upd is not None and delta is not None:
            x0, eps = _add(upd.x0, upd.a, delta.x0, 0), _add(upd.eps, upd.a, delta.eps, 0)
            upd = Row(upd.a, x0, eps, upd.noise)
        if corr is not rule.correct or upd is not rule.update:
            rule = StepRule(rule.t, rule.stages, upd, corr, rule.spans)
        out.append(rule)
        deltas.append(delta)
    return tuple(out), tuple(deltas[1:])


@register
@dataclass(frozen=True)
class UniPC(RowSolver):
    """UniPC (Zhao et al., NeurIPS 2023): UniP-p predictor and UniC-p corrector on m = x̂_0.

    Step s → t, h = λ_t − λ_s, past points s_k, r_k = (λ_{s_k} − λ_s)/h, D_k = (m_{s_k} − m_s)/r_k:

        x'  = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·m_s                                  (DDIM)
        x̃_t = x' − α_t·B(h)·Σ_{k<p} ρ^P_k·D_k                                       (UniP-p)
        x_t = x' − α_t·B(h)·(Σ_{k<p} ρ^C_k·D_k + ρ^C_p·(m(x̃_t, t) − m_s))          (UniC-p)

    B(h) = −h (``bh1``) or e^{−h} − 1 (``bh2``); ρ solves eq. 9 (UniC with r_p = 1). UniC reuses
    the next step's call (order p + 1 at no cost). Orders, ``lower_order_final``,
    ``disable_corrector`` and ``predictor`` (diffusers' ``solver_p``) follow diffusers'
    ``UniPCMultistepScheduler``. Shapes: x (B, ...). Notes: docs/solvers-multistep.md#unipc.
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
        check_order("unipc", (1, 2, 3), order=self.order)
        check_choices("unipc", variant=(self.variant, ("bh1", "bh2")))
        if not all(isinstance(k, int) and k >= 0 for k in self.disable_corrector):
            raise ValueError("unipc: disable_corrector must hold non-negative step indices")
        FinalOrders.of("unipc", self.lower_order_final, math.inf, self.euler_at_final)
        if self.predictor is None:
            return
        if self.euler_at_final:
            raise ValueError("unipc: with a predictor, set euler_at_final on the predictor")
        inner = get_solver(self.predictor)
        if isinstance(inner, UniPC):
            raise ValueError("unipc: predictor must be another solver than unipc")
        if inner.stochastic or inner.nfe_of(4, True) != 4 or inner.nfe_of(4, False) != 4:
            need = "be deterministic with one network call per step"
        elif not isinstance(inner, RowSolver):
            need = "be a solver on the weight-table engine"
        else:
            return
        raise ValueError(
            f"unipc: predictor {inner.name!r} must {need} (a multistep solver such as "
            "'dpmpp_2m' or 'euler')"
        )

    def orders(self, steps: int, start: int = 0) -> list[int]:
        """The predictor order p_i of each step; ``start = 1`` if λ_0 = −∞ (not a history node)."""
        rule = FinalOrders.of("unipc", self.lower_order_final, math.inf, self.euler_at_final)
        return [max(1, min(self.order, rule.cap(i, steps), i + 1 - start)) for i in range(steps)]

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        g = (grid.lam.tolist(), grid.sigma.tolist(), grid.alpha.tolist())
        n, t, own = grid.steps, grid.t.tolist(), self.predictor is None
        start = 0 if math.isfinite(g[0][0]) else 1
        last = n - 1 if grid.clean_end else n  # the step to σ = 0: x̂_0, no UniP, no UniC
        p = self.orders(n, start)
        predict: list[Any] = [None] * n
        if self.predictor is not None:
            inner = get_solver(self.predictor)
            predict = [r.update for r in inner.rules(grid, calls)]  # type: ignore[attr-defined]
        fix: list[Any] = [None] * (n + 1)  # fix[i]: UniC of step i − 1, applied at step i's start
        for i in range(last):
            # no UniC over an infinite step in λ, nor into the step to σ = 0, nor after the last
            use = self.corrector and start <= i < last - 1 and i not in self.disable_corrector
            if own or use:
                row, fix[i + 1] = _rows(g, i, p[i], self.variant, (own, use))
                predict[i] = row if own else predict[i]
        return tuple(StepRule((t[i],), update=predict[i], correct=fix[i]) for i in range(n))

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> RowState:
        """The engine's state with the rules folded (:func:`fold`): one row per step, on x̃."""
        rules, points = self._planned(x, grid, model)
        # the state of the folded rules, scanned once (a folded-away corrector never draws)
        return self._state(fold(rules)[0], points, grid, noise)
