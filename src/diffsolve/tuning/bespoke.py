"""Bespoke solvers (Shaul et al., ICLR 2024): a learned scale–time transformation of the ODE,
integrated by a base Runge–Kutta method, calibrated on the user's model.

The sample path x(t) is transformed to x̄(r) = s_r·x(t_r), r ∈ [0, 1], whose ODE is (their §3)

    dx̄/dr = ū_r(x̄) = (ṡ_r/s_r)·x̄ + ṫ_r·s_r·u_{t_r}(x̄/s_r),

u_t(x) the probability-flow velocity. On a Gaussian path, in the data form,

    u_t(x) = (σ'_t/σ_t)·x + (α'_t − σ'_t·α_t/σ_t)·x̂_0(x, t)

(finite wherever σ > 0, also where α = 0 on flow paths). One RK1 (Euler) or RK2 (midpoint) step
of size h = 1/n in r, mapped back by x = x̄/s, is a linear combination of x and the step's
x̂_0's — an engine row — with the transformation's values at the step's nodes as the only
parameters: t_i, s_i and the products p_i = h·ṫ_i, q_i = h·ṡ_i/s_i (for RK2 the stage uses
h/2 at node i and the step h at the midpoint node m, with its own t_m, s_m, p_m, q_m). These
are the paper's per-node (t, ṫ, s, ṡ), about 8 numbers per RK2 step.

**Start.** Every parameter is written as a deviation from the transformation s = σ_0/σ_t in the
time e^{λ_t} = α_t/σ_t, under which Euler is exactly DDIM and RK2 midpoint exactly
DPM-Solver++(2S) with its stage at the λ-midpoint (``dpmpp_2s``, r = ½): p = p⁰(t)·e^π,
q = q⁰(t) + ν, s = s⁰(t)·e^ω with p⁰, q⁰, s⁰ those of the exponential integrator on the current
(learned) times, so all deviations zero is that solver on that grid, and the times are learned
as LD3 learns them (ordered increments in λ; :mod:`.student`).

**End.** The n steps end at t_n with σ > 0; a last call there returns x̂_0 (the standard end, as
every diffsolve solver by default), so a budget of N calls is n steps using N − 1 calls: RK2
steps, plus one Euler step first when N − 1 is odd (``order=1``: N − 1 Euler steps).

**Loss.** The paper minimises an RMSE bound (Lipschitz-weighted local errors along ground-truth
paths at the learned times). Here the loss is the error of the end point against the teacher's
(the quantity every table of this project measures, and the one :func:`diffsolve.tune`'s other
gradient methods use): it needs no ground truth at learned intermediate times, and the bound it
replaces exists to make exactly this error small.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..denoiser import EvalPoint
from ..solvers.engine import Row, StepRule
from .student import eval_point, inner_denoiser, network_x0
from .tuned import Tuned, process_signature

__all__ = ["BespokeStudent", "bespoke_steps"]


def bespoke_steps(nfe: int, order: int) -> list[int]:
    """The base RK order of each step for a budget of ``nfe`` calls (the last call returns
    x̂_0): ``order=2`` gives RK2 steps and one Euler step first when nfe − 1 is odd."""
    if nfe < 2:
        raise ValueError(f"a Bespoke solver needs nfe >= 2 (steps and the final call), got {nfe}")
    if order not in (1, 2):
        raise ValueError(f"a Bespoke solver's base is RK1 or RK2 (order 1 or 2), got {order!r}")
    calls = nfe - 1
    if order == 1:
        return [1] * calls
    return [1] * (calls % 2) + [2] * (calls // 2)


class BespokeStudent(nn.Module):
    """A differentiable Bespoke-RK sampler (module docstring) and its export to a
    :class:`~.tuned.Tuned` solver.

    Args:
        model: the Denoiser (or a guidance wrapper of one) being tuned.
        nfe: N network calls: RK steps on N − 1 of them, then x̂_0 at the last node.
        t_start: the process time where x is given (t_max, or its finite end on flow paths).
        lam_nodes: (n + 1,) float64 initial step nodes in λ, increasing (noise → data); the
            first is replaced by λ(t_start).
        lam_hi, lam_lo: the range of the last node's λ.
        order: the base method, 1 (Euler) or 2 (RK2 midpoint).
    """

    checkpoint: bool = False  # recompute each call's activations in the backward pass

    def __init__(
        self,
        model: Any,
        nfe: int,
        t_start: float,
        lam_nodes: Tensor,
        lam_hi: float,
        lam_lo: float,
        *,
        order: int = 2,
    ):
        super().__init__()
        self.kinds = bespoke_steps(int(nfe), order)
        self.model, self.process = model, model.process
        self.denoiser = inner_denoiser(model)
        self.nfe, self.order = int(nfe), int(order)
        self.t_start, self.lam_lo, self.lam_hi = float(t_start), float(lam_lo), float(lam_hi)
        f64 = torch.float64
        self.lam_top = float(self.process.lambda_(torch.tensor(self.t_start, dtype=f64)))
        n = len(self.kinds)
        lam = torch.as_tensor(lam_nodes, dtype=f64).clone()
        if lam.shape != (n + 1,):
            raise ValueError(f"lam_nodes must hold {n + 1} nodes for {n} steps, got {lam.shape}")
        lam[0] = self.lam_top
        inc = (lam[1:] - lam[:-1]).clamp_min(1e-6)
        frac = (float(lam[-1]) - self.lam_lo) / (self.lam_hi - self.lam_lo)
        frac = min(max(frac, 1e-4), 1 - 1e-4)
        self.theta = nn.Parameter(torch.log(inc / inc.sum()))
        self.phi = nn.Parameter(torch.tensor(math.log(frac / (1 - frac)), dtype=f64))
        self.mu = nn.Parameter(torch.zeros(n, dtype=f64))  # midpoint fraction logits (RK2)
        # deviations from the exponential integrator: p = p⁰e^π, q = q⁰ + ν (nodes i and m),
        # s = s⁰e^ω at nodes 1…n and the midpoints (s_0 = 1)
        self.pi = nn.Parameter(torch.zeros(n, 2, dtype=f64))
        self.nu = nn.Parameter(torch.zeros(n, 2, dtype=f64))
        self.omega = nn.Parameter(torch.zeros(n, 2, dtype=f64))

    def grid_parameters(self) -> list[nn.Parameter]:
        return [self.theta, self.phi, *([self.mu] if 2 in self.kinds else [])]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [self.pi, self.nu, self.omega]

    # -- the transformation -----------------------------------------------------------------
    def lambdas(self) -> tuple[Tensor, Tensor]:
        """(step nodes λ_0 … λ_n increasing, midpoint λ_m of each step) in λ."""
        lam0 = torch.full((1,), self.lam_top, dtype=torch.float64)
        end = self.lam_lo + (self.lam_hi - self.lam_lo) * torch.sigmoid(self.phi)
        nodes = torch.cat(
            [lam0, lam0 + (end - lam0) * torch.cumsum(torch.softmax(self.theta, 0), 0)]
        )
        mids = nodes[:-1] + (nodes[1:] - nodes[:-1]) * torch.sigmoid(self.mu)
        return nodes, mids

    def _times(self, lam: Tensor) -> Tensor:
        """Node times; the first is t_start itself (not its λ round trip)."""
        first = torch.tensor([self.t_start], dtype=torch.float64)
        return torch.cat([first, self.process.t_of_lambda(lam[1:])])

    def _coef(self, t: Tensor) -> tuple[Tensor, ...]:
        """At times t: σ'/σ, α' − σ'α/σ (the velocity's x and x̂_0 weights), e^λ and its rate,
        and s⁰ = σ_0/σ."""
        p = self.process
        alpha, sigma = p.alpha(t), p.sigma(t)
        da, dsig = p.d_alpha(t), p.d_sigma(t)
        cx = dsig / sigma
        c0 = da - dsig * alpha / sigma
        snr = alpha / sigma  # e^λ
        return cx, c0, snr, c0 / sigma, sigma

    def rows(self) -> tuple[Tensor, Tensor, list[tuple[tuple[Tensor, Tensor], ...]]]:
        """(node times (n + 1), midpoint times (n), per step: (a, x̂_0 weights newest first)
        of the update and, for RK2, (a, weight) of the stage)."""
        nodes, mids = self.lambdas()
        t = self._times(nodes)
        tm = self.process.t_of_lambda(mids)
        cx, c0, snr, rate, sig = self._coef(t)
        cxm, c0m, snrm, ratem, sigm = self._coef(tm)
        s = (sig[0] / sig) * torch.exp(torch.cat([torch.zeros(1, dtype=t.dtype), self.omega[:, 0]]))
        sm = (sig[0] / sigm) * torch.exp(self.omega[:, 1])
        out: list[tuple[tuple[Tensor, Tensor], ...]] = []
        for i, kind in enumerate(self.kinds):
            if kind == 1:  # Euler: DDIM at zero deviation
                p = (snr[i + 1] - snr[i]) / rate[i] * torch.exp(self.pi[i, 0])
                q = -cx[i] * p + self.nu[i, 0]
                ratio = s[i] / s[i + 1]
                out.append(((ratio * (1 + q + p * cx[i]), (ratio * p * c0[i]).reshape(1)),))
                continue
            # RK2 midpoint: stage h/2 at node i, step h at node m (DPM-Solver++(2S) at zero)
            p = (snrm[i] - snr[i]) / rate[i] * torch.exp(self.pi[i, 0])
            q = -cx[i] * p + self.nu[i, 0]
            a1, b1 = (s[i] / sm[i]) * (1 + q + p * cx[i]), (s[i] / sm[i]) * p * c0[i]
            pm = (snr[i + 1] - snr[i]) / ratem[i] * torch.exp(self.pi[i, 1])
            qm = -cxm[i] * pm + self.nu[i, 1]
            k = sm[i] * (qm + pm * cxm[i])  # on x_m
            a = (s[i] + k * a1) / s[i + 1]
            w = torch.stack([sm[i] * pm * c0m[i], k * b1]) / s[i + 1]
            out.append(((a, w), (a1, b1)))
        return t, tm, out

    # -- the run ----------------------------------------------------------------------------
    def _point(self, t: Tensor, like: Tensor) -> EvalPoint:
        return eval_point(self.denoiser, t, like)

    def forward(self, x: Tensor, cond: dict[str, Any] | None = None) -> Tensor:
        """The student's sample from x (B, ...), taken as the state at t_start."""
        cond = cond or {}
        t, tm, rows = self.rows()
        dt = x.dtype
        for i, kind in enumerate(self.kinds):
            m = network_x0(self.model, x, self._point(t[i], x), cond, self.checkpoint)
            if kind == 1:
                ((a, w),) = rows[i]
                x = a.to(dt) * x + w[0].to(dt) * m
                continue
            (a, w), (a1, b1) = rows[i]
            xm = a1.to(dt) * x + b1.to(dt) * m
            mm = network_x0(self.model, xm, self._point(tm[i], x), cond, self.checkpoint)
            x = a.to(dt) * x + w[0].to(dt) * mm + w[1].to(dt) * m
        return network_x0(self.model, x, self._point(t[-1], x), cond, self.checkpoint)

    # -- export -----------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, info: dict[str, Any] | None = None) -> Tuned:
        """The transformation as a :class:`~.tuned.Tuned` solver: per step a stage row (RK2)
        and an update row over the step's x̂_0's, then the final call's x̂_0."""
        t, tm, rows = self.rows()
        steps = []
        for i, kind in enumerate(self.kinds):
            (a, w), *stage = rows[i]
            if kind == 1:
                steps.append(StepRule((float(t[i]),), update=Row(float(a), tuple(w.tolist()))))
                continue
            a1, b1 = stage[0]
            steps.append(
                StepRule(
                    (float(t[i]), float(tm[i])),
                    stages=(Row(float(a1), (float(b1),)),),
                    update=Row(float(a), tuple(w.tolist())),
                )
            )
        steps.append(StepRule((float(t[-1]),)))
        return Tuned(
            times=tuple(t.tolist()),
            steps=tuple(steps),
            final="standard",
            prediction=getattr(self.denoiser, "prediction", ""),
            signature=process_signature(self.process),
            info=dict(info or {}),
        )
