"""The differentiable few-step sampler that tuning optimises, and its export to a tuned solver.

The student is UniPC (Zhao et al. 2023; :mod:`diffsolve.solvers.unipc`, B(h) = e^{−h} − 1) in
the data form on a grid of N evaluation times, ending the standard way (the last call's x̂_0):
UniP-p predictor rows and, with ``corrector``, UniC-p rows applied after each new call (no extra
NFE). With p ≤ 2 and no corrector it is DPM-Solver++(2M); UniP-3 is DPM-Solver++(3M). Its
parameters:

* the grid, in λ = log(α/σ): the last point λ_{N−1} = λ_lo + (λ_hi − λ_lo)·sigmoid(φ), the
  interior λ_i = λ_0 + (λ_{N−1} − λ_0)·Σ_{j≤i} softmax(θ)_j (LD3's parametrisation, Tong et al.
  2025: ordered by construction, every grid reachable), and, on variance-preserving processes,
  the start λ_0 = λ(t_max) + Δ·sigmoid(ψ) (x_T ~ N(0, I) is nearly as good a sample a little
  below t_max; on VE/EDM paths x_T's scale fixes the start);
* optionally (``time_offsets``) where each call after the first evaluates the network:
  λ'_i = λ_i + b_i·tanh(ω_i) within half a step of λ_i, the rows still built on the grid's λ_i
  (LD3's second, decoupled set of times; GAS's model-time offsets, 2026); the exported steps
  evaluate at these times, the grid stays the plan's;
* per-step corrections of the rows' x̂_0 weights (S4S, Frankel et al. 2025; GAS's additive
  corrections): a row with gain g = α_{i+1}(1 − e^{−h_i}) gets g·(δ − mean δ) added, so every
  corrected row still reproduces a constant x̂_0 exactly (first-order consistency), which keeps
  the learned table from fitting the calibration noises with an inconsistent method.

Everything is torch, so the loss against the teacher is differentiable in θ, φ, ψ, ω and δ
(through the network's time input too). :meth:`Student.export` turns the parameters into a
:class:`~.tuned.Tuned` solver whose rows reproduce the student's run on the engine.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpoint_call

from ..denoiser import EvalPoint
from ..lincomb import combination
from ..solvers.engine import Row, StepRule
from .tuned import Tuned, process_signature

__all__ = ["Student", "eval_point", "inner_denoiser"]


def inner_denoiser(model: Any) -> Any:
    """The :class:`~diffsolve.Denoiser` under guidance wrappers (for its time map)."""
    inner = model
    while not hasattr(inner, "time_map") and hasattr(inner, "model"):
        inner = inner.model
    if not hasattr(inner, "time_map"):
        raise TypeError(f"cannot find the Denoiser inside {type(model).__name__}")
    return inner


def _pk(k: int, h: Tensor) -> Tensor:
    """h^k·φ_k(−h) = (−1)^k·(e^{−h} − Σ_{j<k} (−h)^j/j!), elementwise (float64; for h < 0.2
    its series h^k/k!·Σ_m (−h)^m·k!/(k + m)!, 14 terms in Horner form)."""
    closed = (
        -torch.expm1(-h)
        if k == 1
        else (-1) ** k * (torch.exp(-h) - sum((-h) ** j / math.factorial(j) for j in range(k)))
    )
    small = h < 0.2
    hs = torch.where(small, h, torch.zeros_like(h))
    s = torch.ones_like(hs)
    for m in range(13, 0, -1):
        s = 1 - hs * s / (k + m)
    return torch.where(small, hs**k / math.factorial(k) * s, closed)


def _step_tables(lam: Tensor, alp: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every step's h, B(h) = e^{−h} − 1, gain α_{i+1}·(1 − e^{−h}) and the UniPC targets'
    q_j = j!·P(j + 1, h)/h^j, j = 1 … ``width`` (N − 1, width), in one vectorised pass."""
    h = lam[1:] - lam[:-1]
    big_b = torch.expm1(-h)
    gain = -alp[1:] * big_b
    cols = [_pk(j + 1, h) * math.factorial(j) / h**j for j in range(1, width + 1)]
    q = torch.stack(cols, -1) if cols else h.new_zeros(h.shape[0], 0)
    return h, big_b, gain, q


def _unipc_row(
    lam: Tensor,
    sig: Tensor,
    alp: Tensor,
    tables: tuple[Tensor, Tensor, Tensor, Tensor],
    i: int,
    p: int,
    corrector: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(a, x̂_0 weights newest first, gain) of UniP-p or UniC-p (bh2) for step t_i → t_{i+1}:
    the torch twin of :func:`diffsolve.solvers.unipc._rows` (``tables``: :func:`_step_tables`)."""
    hs, bs, gains, qs = tables
    h, big_b, gain = hs[i], bs[i], gains[i]
    nodes = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
    if corrector:
        nodes.append(torch.ones((), dtype=torch.float64))
    if len(nodes) > 1:
        b = -qs[i, : len(nodes)] / big_b
        vander = torch.stack([torch.stack([r**j for r in nodes]) for j in range(len(nodes))])
        rho = list(torch.linalg.solve(vander, b))
    else:
        rho = [torch.full((), 0.5, dtype=torch.float64)] * len(nodes)
    w = [-alp[i + 1] * big_b * rk / r for rk, r in zip(rho, nodes)]
    new = [w.pop()] if corrector else []
    head = gain - sum(w, torch.zeros((), dtype=torch.float64)) - sum(new, torch.zeros(()))
    return sig[i + 1] / sig[i], torch.stack([*new, head, *w]), gain


def _x0(model: Any, x: Tensor, point: EvalPoint, cond: dict[str, Any]) -> Tensor:
    return model(x, point, **cond).x0


def network_x0(
    model: Any, x: Tensor, point: EvalPoint, cond: dict[str, Any], checkpoint: bool = False
) -> Tensor:
    """x̂_0 of one network call. With ``checkpoint`` (and gradients on) the call's activations
    are not kept for the backward pass but recomputed there (``torch.utils.checkpoint``): a
    differentiated N-call run then holds one call's activations at a time instead of N, for one
    more forward pass per call."""
    if checkpoint and torch.is_grad_enabled():
        return checkpoint_call(_x0, model, x, point, cond, use_reentrant=False)  # type: ignore[no-any-return]
    return _x0(model, x, point, cond)


def eval_point(
    denoiser: Any, t: Tensor, like: Tensor, alpha: Tensor | None = None, sigma: Tensor | None = None
) -> EvalPoint:
    """The evaluation point at a (differentiable) time t for samples like ``like``: α, σ stay
    tensors in t's graph, so a loss differentiates through the network's time input too
    (``alpha``, ``sigma``: α(t), σ(t) if already computed, e.g. over the whole grid at once)."""
    p = denoiser.process
    t_in = denoiser.time_map(t)
    in_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    t_in = t_in.to(device=like.device, dtype=in_dtype).expand(like.shape[0])
    velocity = getattr(denoiser, "prediction", "") == "velocity"
    return EvalPoint(
        t=t,  # type: ignore[arg-type]
        alpha=p.alpha(t) if alpha is None else alpha,  # type: ignore[arg-type]
        sigma=p.sigma(t) if sigma is None else sigma,  # type: ignore[arg-type]
        d_alpha=float(p.d_alpha(t.detach())) if velocity else 0.0,
        d_sigma=float(p.d_sigma(t.detach())) if velocity else 0.0,
        t_in=t_in,
    )


class Student(nn.Module):
    """A differentiable N-call UniPC sampler with a learnable grid and weight corrections.

    Args:
        model: the Denoiser (or a guidance wrapper of one) being tuned.
        nfe: N, the network calls (N evaluation times; the last returns x̂_0).
        t_start: the process time where x is given (t_max, or its finite end on flow paths).
        lam_init: (N,) float64 initial λ grid, increasing (noise → data); its first entry is
            replaced by λ(t_start) (plus ``start_shift`` where the start is learnable).
        lam_hi, lam_lo: the range of the last point's λ (λ_hi: the data end λ(t_min)).
        order: p of UniP-p / UniC-p (≤ 3; warm-up min(p, i + 1), capped by N − i at the end
            as diffusers' ``lower_order_final``).
        corrector: apply UniC after every call but the first and the last.
        start_span: how far (in λ) the start may move below t_max (0: fixed start).
        final_width: the output is Σ_j f_j·x̂_0[j] over the last ``final_width`` calls, f
            learnable with Σ f = 1 (1: the standard end, x̂_0 of the last call; more: a learned
            continuation towards σ = 0 at no extra call, never used for guided models).
        final_init: the initial f (newest first), e.g. the ρ-extrapolation weights of
            ``final="extrapolate"``; default the standard end.
        orders: the predictor order of each step (overrides ``order``'s default rule; USF's
            per-step decisions), each ≤ i + 1.
        correctors: whether UniC corrects after each call t_1 … t_{N−2} (overrides
            ``corrector`` per call).
        time_offsets: learn where each call after the first evaluates the network (LD3's
            second set of times, GAS's model-time offsets): call i runs at λ'_i = λ_i +
            b_i·tanh(ω_i), b_i = ½·min(h_{i−1}, h_i) (the last: ½·min(h_{N−2}, λ_hi − λ_{N−1})),
            so the evaluation times stay ordered and inside the process; the rows still use
            the grid's λ_i. ω = 0 is the plain sampler.
    """

    checkpoint: bool = False  # recompute each call's activations in the backward pass

    def __init__(
        self,
        model: Any,
        nfe: int,
        t_start: float,
        lam_init: Tensor,
        lam_hi: float,
        lam_lo: float,
        *,
        order: int = 2,
        corrector: bool = True,
        start_span: float = 0.0,
        start_shift: float = 0.0,
        final_width: int = 1,
        final_init: Tensor | None = None,
        orders: list[int] | None = None,
        correctors: list[bool] | None = None,
        time_offsets: bool = False,
    ):
        super().__init__()
        if nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe}")
        self.model, self.process = model, model.process
        self.denoiser = inner_denoiser(model)
        self.nfe, self.order, self.corrector = int(nfe), int(order), bool(corrector)
        self.lam_lo, self.lam_hi = float(lam_lo), float(lam_hi)
        self.t_start = float(t_start)
        self.lam_top = float(self.process.lambda_(torch.tensor(self.t_start, dtype=torch.float64)))
        self.start_span = float(start_span)
        n = self.nfe
        lam_init = torch.as_tensor(lam_init, dtype=torch.float64).clone()
        if self.start_span > 0:
            frac = min(max(start_shift / self.start_span, 1e-3), 1 - 1e-3)
            psi = math.log(frac / (1 - frac))
            lam_init[0] = self.lam_top + start_shift
        else:
            psi = 0.0
            lam_init[0] = self.lam_top
        if n > 1:
            inc = (lam_init[1:] - lam_init[:-1]).clamp_min(1e-6)
            theta = torch.log(inc / inc.sum())
            frac = (float(lam_init[-1]) - self.lam_lo) / (self.lam_hi - self.lam_lo)
            frac = min(max(frac, 1e-4), 1 - 1e-4)
            phi = math.log(frac / (1 - frac))
        else:
            theta, phi = torch.zeros(0, dtype=torch.float64), 0.0
        self.theta = nn.Parameter(theta.clone())
        self.phi = nn.Parameter(torch.tensor(phi, dtype=torch.float64))
        self.psi = nn.Parameter(torch.tensor(psi, dtype=torch.float64))
        self.orders = [min(self.order, i + 1, n - i) for i in range(max(n - 1, 0))]
        if orders is not None:
            if len(orders) != len(self.orders) or any(
                not 1 <= k <= min(3, i + 1) for i, k in enumerate(orders)
            ):
                raise ValueError(f"orders must give 1 ≤ p_i ≤ min(3, i + 1) per step, got {orders}")
            self.orders = [int(k) for k in orders]
        self.correctors = (
            [bool(c) for c in correctors]
            if correctors is not None
            else [self.corrector] * max(n - 2, 0)
        )
        if len(self.correctors) != max(n - 2, 0):
            raise ValueError(f"correctors needs {max(n - 2, 0)} flags, got {len(self.correctors)}")
        f64 = torch.float64
        self.delta = nn.ParameterList(
            [nn.Parameter(torch.zeros(k, dtype=f64)) for k in self.orders]
        )
        k_f = max(1, min(int(final_width), n))
        f0 = torch.zeros(k_f, dtype=f64)
        f0[0] = 1.0
        if final_init is not None:
            f0 = torch.as_tensor(final_init, dtype=f64)[:k_f].clone()
        self.final = nn.Parameter(f0 - torch.eye(k_f, dtype=f64)[0])  # δ_f: f = e_0 + δ_f − mean
        # UniC of step i − 1, applied after the call at t_i (i = 1 … N − 2): p_{i−1} + 1 weights
        self.delta_c = nn.ParameterList(
            [nn.Parameter(torch.zeros(self.orders[i - 1] + 1, dtype=f64)) for i in range(1, n - 1)]
        )
        self.time_offsets = bool(time_offsets) and n > 1
        self.omega = nn.Parameter(torch.zeros(n - 1 if self.time_offsets else 0, dtype=f64))

    def grid_parameters(self) -> list[nn.Parameter]:
        """The times: the grid's logits, its end, its start (VP) and the calls' offsets."""
        start = [self.psi] if self.start_span > 0 else []
        return [self.theta, self.phi, *start, *([self.omega] if self.time_offsets else [])]

    def weight_parameters(self) -> list[nn.Parameter]:
        used = [d for d, on in zip(self.delta_c, self.correctors) if on]
        return [*self.delta, *used, *([self.final] if self.final.numel() > 1 else [])]

    def final_weights(self) -> Tensor:
        """f, the output's weights on the last calls' x̂_0 (newest first; Σ f = 1)."""
        k = self.final.numel()
        return torch.eye(k, dtype=torch.float64)[0] + self.final - self.final.mean()

    # -- the grid ---------------------------------------------------------------------------
    def lambdas(self) -> Tensor:
        """The N evaluation points in λ (increasing)."""
        lam0 = torch.full((1,), self.lam_top, dtype=torch.float64)
        if self.start_span > 0:
            lam0 = lam0 + self.start_span * torch.sigmoid(self.psi)
        if self.nfe == 1:
            return lam0
        end = self.lam_lo + (self.lam_hi - self.lam_lo) * torch.sigmoid(self.phi)
        frac = torch.cumsum(torch.softmax(self.theta, 0), 0)
        return torch.cat([lam0, lam0 + (end - lam0) * frac])

    def times(self) -> Tensor:
        """The N grid times (decreasing); a fixed start is t_start itself."""
        return self._times(self.lambdas())

    def _times(self, lam: Tensor) -> Tensor:
        if self.start_span > 0:
            return self.process.t_of_lambda(lam)
        t0 = torch.tensor([self.t_start], dtype=torch.float64)
        return torch.cat([t0, self.process.t_of_lambda(lam[1:])]) if self.nfe > 1 else t0

    def eval_lambdas(self, lam: Tensor) -> Tensor:
        """Where the N calls evaluate the network, in λ (the grid ``lam`` without offsets)."""
        if not self.time_offsets:
            return lam
        h = lam[1:] - lam[:-1]  # (N − 1,)
        after = torch.cat([h[1:], (self.lam_hi - lam[-1:]).clamp_min(0)])
        bound = 0.5 * torch.minimum(h, after)
        return torch.cat([lam[:1], lam[1:] + bound * torch.tanh(self.omega)])

    def eval_times(self) -> Tensor:
        """The N times at which the network is called (the grid's where no offsets)."""
        return self._times(self.eval_lambdas(self.lambdas()))

    # -- the rows ---------------------------------------------------------------------------
    def rows(
        self, t: Tensor
    ) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor] | None]]:
        """(predictor rows, corrector rows): (a, x̂_0 weights newest first) per step, with the
        learned corrections; corrector row i − 1 is applied after the call at t_i."""
        proc = self.process
        return self._rows(proc.lambda_(t), proc.sigma(t), proc.alpha(t))

    def _rows(
        self, lam: Tensor, sig: Tensor, alp: Tensor
    ) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor] | None]]:
        tables = _step_tables(lam, alp, max(self.orders, default=1))
        pred: list[tuple[Tensor, Tensor]] = []
        corr: list[tuple[Tensor, Tensor] | None] = []
        for i in range(self.nfe - 1):
            a, w, gain = _unipc_row(lam, sig, alp, tables, i, self.orders[i], False)
            d = self.delta[i]
            pred.append((a, w + gain * (d - d.mean())))
        for i in range(1, self.nfe - 1):
            if not self.correctors[i - 1]:
                corr.append(None)
                continue
            a, w, gain = _unipc_row(lam, sig, alp, tables, i - 1, self.orders[i - 1], True)
            d = self.delta_c[i - 1]
            corr.append((a, w + gain * (d - d.mean())))
        return pred, corr

    # -- the run ----------------------------------------------------------------------------
    @staticmethod
    def _combine(row: tuple[Tensor, Tensor], x: Tensor, hist: list[Tensor]) -> Tensor:
        a, w = row
        return combination(torch.cat([a.reshape(1), w]), [x, *hist[: w.numel()]])

    def forward(self, x: Tensor, cond: dict[str, Any] | None = None) -> Tensor:
        """The student's sample from x (B, ...), taken as the state at the grid's start."""
        return self.end(self.history(x, cond))

    def end(self, hist: list[Tensor], weights: Tensor | None = None) -> Tensor:
        """The output from :meth:`history`'s x̂_0's: Σ_j f_j·x̂_0[j] with f the learned final
        weights, or ``weights`` (newest first; e.g. another end rule scored on the same run)."""
        f = self.final_weights() if weights is None else weights
        if f.numel() == 1:
            return hist[0]
        k = min(f.numel(), len(hist))
        return combination(f[:k], hist[:k])

    def history(self, x: Tensor, cond: dict[str, Any] | None = None) -> list[Tensor]:
        """The run's last x̂_0's, newest first (at least the final width of them, if the budget
        has them): every network call of :meth:`forward` without the output's combination."""
        cond = cond or {}
        lam_grid = self.lambdas()
        t = self._times(lam_grid)
        proc = self.process
        sig, alp = proc.sigma(t), proc.alpha(t)
        pred, corr = self._rows(proc.lambda_(t), sig, alp)
        if self.time_offsets:
            t = self._times(self.eval_lambdas(lam_grid))
            sig, alp = proc.sigma(t), proc.alpha(t)
        hist: list[Tensor] = []
        x_prev = x
        keep = max(max(self.orders, default=self.order) + 1, self.final.numel())
        for i in range(self.nfe):
            point = eval_point(self.denoiser, t[i], x, alp[i], sig[i])
            hist.insert(0, network_x0(self.model, x, point, cond, self.checkpoint))
            if i == self.nfe - 1:
                return hist
            c = corr[i - 1] if i >= 1 else None
            if c is not None:
                x = self._combine(c, x_prev, hist)
            x_prev = x
            x = self._combine(pred[i], x, hist)
            del hist[keep:]
        raise AssertionError("unreachable")

    # -- export -----------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, info: dict[str, Any] | None = None) -> Tuned:
        """The current grid and table as a :class:`~.tuned.Tuned` solver (float64 rows)."""
        t = self.times()
        pred, corr = self.rows(t)
        tl, te = t.tolist(), self.eval_times().tolist()

        def row(r: tuple[Tensor, Tensor]) -> Row:
            return Row(float(r[0]), tuple(r[1].tolist()))

        steps = []
        for i in range(self.nfe):
            c = corr[i - 1] if 1 <= i < self.nfe - 1 else None
            correct = row(c) if c is not None else None
            update = row(pred[i]) if i < self.nfe - 1 else None
            if i == self.nfe - 1 and self.final.numel() > 1:
                f = self.final_weights()[: min(self.final.numel(), self.nfe)]
                update = Row(0.0, tuple(f.tolist()))
            steps.append(StepRule((te[i],), update=update, correct=correct))
        prediction = getattr(self.denoiser, "prediction", "")
        return Tuned(
            times=tuple(tl),
            steps=tuple(steps),
            final="standard",
            prediction=prediction,
            signature=process_signature(self.process),
            info=dict(info or {}),
        )
