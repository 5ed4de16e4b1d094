"""UniPC: the unified predictor-corrector (Zhao et al. 2023), data-prediction B(h) form."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..denoiser import EvalPoint, Prediction
from ._expint import zphi
from .base import FinalOrders, Grid, Model, Solver, State, get_solver, host, register

__all__ = ["UniPC"]

VARIANTS = ("bh1", "bh2")


@dataclass(frozen=True)
class _Update:
    """One multistep update from s to t, as Python floats:

    x_t = ratio·x_s + gain·m_s + Σ_k w_k·(m_{s_k} − m_s) [+ w_new·(m_t − m_s)],
    with ``w`` ordered newest-first over the history (k = 1 is the point before s).
    """

    ratio: float
    gain: float
    w: tuple[float, ...]
    w_new: float = 0.0


@dataclass(frozen=True)
class UniPCState(State):
    points: tuple[EvalPoint, ...] = host()
    predict: tuple[_Update | None, ...] = host()  # None: the step to σ = 0 (returns x̂_0)
    correct: tuple[_Update | None, ...] = host()  # None: no corrector at this step
    inner: Solver | None = host()
    history: tuple[Tensor, ...] = ()  # x̂_0 of past evaluations, oldest first
    x_prev: Tensor | None = None  # x_s of the last predictor step (what UniC restarts from)
    sub: State | None = host(default=None)

    def select(self, index: Tensor) -> UniPCState:
        out = super().select(index)
        return out if self.sub is None else out.replace(sub=self.sub.select(index))


def _bh_targets(h: float, p: int, variant: str) -> tuple[float, Tensor]:
    """B(h) and the targets g_j/B(h) = ĥ·φ_{j+1}(ĥ)·j!/B(h), j = 1…p, with ĥ = −h (float64)."""
    z = torch.tensor(-h, dtype=torch.float64)
    big_b = z if variant == "bh1" else torch.expm1(z)
    b = torch.stack([zphi(j + 1, z) / z**j * math.factorial(j) / big_b for j in range(1, p + 1)])
    return float(big_b), b


def _update(grid: Grid, i: int, p: int, variant: str, corrector: bool) -> _Update:
    """UniP-p (``corrector=False``) or UniC-p for the step grid.t[i] → grid.t[i+1]."""
    h = float(grid.h[i])
    ratio = float(grid.sigma[i + 1] / grid.sigma[i])
    alpha_t = float(grid.alpha[i + 1])
    gain = alpha_t * float(-torch.expm1(-grid.h[i]))
    big_b, b = _bh_targets(h, p, variant)
    r = [float(grid.lam[i - k] - grid.lam[i]) / h for k in range(1, p)]  # < 0: past points
    if corrector:
        if p == 1:
            rho = [0.5]  # the official code fixes ρ = ½ for UniC-1 (trapezoidal)
        else:
            nodes = torch.tensor([*r, 1.0], dtype=torch.float64)
            vander = torch.stack([nodes**j for j in range(p)])  # rows: powers 0…p−1
            rho = torch.linalg.solve(vander, b).tolist()
        w = tuple(-alpha_t * big_b * rk / r[k] for k, rk in enumerate(rho[:-1]))
        return _Update(ratio, gain, w, -alpha_t * big_b * rho[-1])
    if p == 1:
        return _Update(ratio, gain, ())
    if p == 2:
        rho = [0.5]  # official code; makes UniP-2 with bh2 exactly DPM-Solver++(2M)
    else:
        nodes = torch.tensor(r, dtype=torch.float64)
        vander = torch.stack([nodes**j for j in range(p - 1)])
        rho = torch.linalg.solve(vander, b[:-1]).tolist()
    return _Update(ratio, gain, tuple(-alpha_t * big_b * rk / r[k] for k, rk in enumerate(rho)))


def _apply(u: _Update, x: Tensor, history: tuple[Tensor, ...], m_new: Tensor | None) -> Tensor:
    """Evaluate ``u`` from x with m_s = history[-1] (and m_t = m_new for the corrector)."""
    m0 = history[-1]
    out = u.ratio * x + u.gain * m0
    for wk, mk in zip(u.w, reversed(history[:-1])):
        out = out + wk * (mk - m0)
    if m_new is not None:
        out = out + u.w_new * (m_new - m0)
    return out


class _Replay:
    """The model as an inner predictor sees it: the evaluation UniPC already made, once."""

    def __init__(self, model: Model, pred: Prediction | None):
        self.model, self.pred = model, pred

    def point(self, t: float | Tensor, like: Tensor) -> EvalPoint:
        return self.model.point(t, like)

    def __call__(self, x: Tensor, t: EvalPoint) -> Prediction:
        if self.pred is None:
            raise RuntimeError("a UniPC predictor may evaluate the model once per step, in step")
        pred, self.pred = self.pred, None
        return pred


@register
@dataclass(frozen=True)
class UniPC(Solver):
    """UniPC (Zhao et al., NeurIPS 2023), multistep, data prediction, B(h) variants.

    With m = x̂_0, step s → t, h = λ_t − λ_s, ĥ = −h, r_k = (λ_{s_k} − λ_s)/h for the history
    points s_k (r_k < 0) and D_k = (m_{s_k} − m_s)/r_k:

        x'    = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·m_s                       (DDIM)
        UniP: x̃_t = x' − α_t·B(h)·Σ_{k<p} ρ^P_k·D_k
        UniC: x_t = x' − α_t·B(h)·(Σ_{k<p} ρ^C_k·D_k + ρ^C_p·(m(x̃_t, t) − m_s))

    B(h) = ĥ (``bh1``) or e^{ĥ} − 1 (``bh2``); ρ solves the Vandermonde system
    Σ_k ρ_k·r_k^{j−1} = ĥ·φ_{j+1}(ĥ)·j!/B(h), j = 1…p (UniC: all p nodes, with r_p = 1; UniP:
    the first p−1). As in the official code and diffusers, ρ^P = ½ for p = 2 (so UniP-2 with bh2
    *is* DPM-Solver++(2M)) and ρ^C = ½ for p = 1. Coefficients are solved in float64 in ``init``.

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
    run. The tests therefore measure global orders for p ≤ 2 (and p = 3 without UniC) with
    ``lower_order_final=False``, and the order of the step itself from an exact history for all p.

    Orders follow diffusers' ``UniPCMultistepScheduler`` (0.42) exactly: step i of n uses
    p_i = min(order, i + 1) (warm-up), further capped by n − i when ``lower_order_final`` (for
    any n: the installed diffusers has no step threshold for UniPC). The corrector applied at the
    start of step i uses p_{i−1}; ``disable_corrector`` lists predictor steps k whose result is
    not corrected (diffusers' semantics, e.g. ``(0,)``). ``euler_at_final``: the last predictor
    step is UniP-1 (DDIM from the corrected x) at any step count, as diffusers' DPM-Solver option
    (:class:`~diffsolve.solvers.base.FinalOrders`); UniC still corrects the x it starts from.

    ``predictor``: the name (or object) of another one-evaluation-per-step solver whose step
    replaces UniP, with UniC on top (diffusers' ``solver_p``). It runs on its own sub-state kept
    in this state, from the corrected x, and is handed the x̂_0/ε̂ already evaluated at the
    uncorrected point (diffusers re-converts the raw output with the corrected x instead; the
    two agree for x̂_0-type networks).

    Shapes: x (B, ...); history holds up to ``order`` tensors shaped like x.
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
            inner = self._inner()
            if isinstance(inner, UniPC):
                raise ValueError("unipc: predictor must be another solver than unipc")
            if inner.stochastic or inner.nfe_of(4, True) != 4 or inner.nfe_of(4, False) != 4:
                raise ValueError(
                    f"unipc: predictor {inner.name!r} must be deterministic with one network "
                    "call per step (a multistep solver such as 'dpmpp_2m' or 'euler')"
                )

    def _inner(self) -> Solver | None:
        return None if self.predictor is None else get_solver(self.predictor)

    def orders(self, steps: int, start: int = 0) -> list[int]:
        """The predictor order p_i of each of ``steps`` steps (warm-up, lower_order_final).

        ``start = 1`` when the first point has λ = −∞ (α = 0, flow matching's t = 1): that
        point is infinitely far in λ, so it never serves as a history node.
        """
        rule = FinalOrders.of("unipc", self.lower_order_final, math.inf, self.euler_at_final)
        out = []
        for i in range(steps):
            p = min(self.order, rule.cap(i, steps))
            out.append(max(1, min(p, i + 1 - start)))
        return out

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> UniPCState:
        n = grid.steps
        start = 0 if math.isfinite(float(grid.lam[0])) else 1
        orders = self.orders(n, start)
        predict: list[_Update | None] = []
        correct: list[_Update | None] = [None]
        for i in range(n):
            final = grid.is_final(i)
            predict.append(None if final else _update(grid, i, orders[i], self.variant, False))
            if i == 0:
                continue
            use = (
                self.corrector
                and (i - 1) not in self.disable_corrector
                and i - 1 >= start  # no UniC over an infinite step in λ
                and not final
            )
            correct.append(_update(grid, i - 1, orders[i - 1], self.variant, True) if use else None)
        inner = self._inner()
        sub = None if inner is None else inner.init(x, grid, _Replay(model, None))
        return UniPCState(
            points=tuple(model.point(grid.t[i], x) for i in range(n)),
            predict=tuple(predict),
            correct=tuple(correct),
            inner=inner,
            x_prev=x,
            sub=sub,
        )

    def step(self, x: Tensor, i: int, state: UniPCState, model: Model) -> tuple[Tensor, UniPCState]:
        pred = model(x, state.points[i])
        m = pred.x0
        corr = state.correct[i]
        if corr is not None:
            x = _apply(corr, state.x_prev, state.history, m)
        history = (*state.history, m)[-self.order :]
        sub = state.sub
        if state.inner is not None:
            x_next, sub = state.inner.step(x, i, sub, _Replay(model, pred))  # type: ignore[arg-type]
        elif state.predict[i] is None:
            x_next = m
        else:
            x_next = _apply(state.predict[i], x, history, None)  # type: ignore[arg-type]
        return x_next, state.replace(history=history, x_prev=x, sub=sub)
