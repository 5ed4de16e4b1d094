"""DPM-Solver-v3 (Zheng et al., NeurIPS 2023): a multistep predictor–corrector on the model's
empirical statistics (EMS) l_λ, s_λ, b_λ, per element of a sample.

With ε̂ the model's noise prediction along the probability-flow ODE in λ = log(α/σ),

    dx/dλ = (d log α/dλ − l_λ)·x − N,    N = σ·ε̂ − l_λ·x,   f = N/α,
    g(λ)  = e^{−S̃(λ)}·f(λ) − B̃(λ),      S̃ = ∫_{λ_s}^{λ} s,  B̃ = ∫_{λ_s}^{λ} e^{−S̃}·b,

the step s → t is exactly (Zheng et al. 2023, eq. 11; L̃ = ∫_{λ_s}^{λ} l, E = L̃ + S̃)

    x_t = (α_t/α_s)·e^{−L̃_t}·x_s − α_t·e^{−L̃_t}·∫_{λ_s}^{λ_t} e^{E(λ)}·(g(λ) + B̃(λ)) dλ,

and the solver expands g in λ around λ_s (order p = n + 1, eq. 13):

    x_t = (α_t/α_s)·e^{−L̃_t}·x_s − α_t·e^{−L̃_t}·[Ĩ·g_s + C̃ + Σ_{k=1}^{n} A_k·g_s^{(k)}],
    Ĩ = ∫ e^{E},   C̃ = ∫ e^{E}·B̃,   A_k = ∫ e^{E}·(λ − λ_s)^k/k!      (over [λ_s, λ_t]).

g^{(k)} comes from the history (λ_j, g_j) by a Vandermonde solve, or by divided differences
(``pseudo``: the paper's pseudo-order, §3.3). l = 1, s = b = 0 gives g = −x̂_0 and the
DPM-Solver++ multistep update with Taylor weights (tested to 1e-12); l = 0, s = −1, b = 0 gives
DPM-Solver (noise form).

The corrector (§3.4) re-solves the last step s → t from x_s with the new evaluation at t as a
node (order q = p + 1 with ``corrector_pseudo``, else q = p; applied when q > 1, at no extra
call); N at t is kept, so the cached ε̂ follows the corrected x through its linear part,
ε̂ ← (N + l_t·x_t^c)/σ_t. Here the history holds f = N/α directly. The step to σ = 0 returns
x̂_0 = (1 − l_t)·x_t/α_t − f_t, i.e. x̂_0 at the corrected x_t through the same linear part
(the plain x̂_0 when l = 1).

Quadrature. The statistics are cubic Hermite interpolants in λ of their grid values (slopes
by second-order differences; C¹, so f and g have no kinks at the grid points), and the run's
λ's are added to that grid. L̃ and S̃ are exact; on each cell E = E_c + z·u + q(u), u ∈ [0, 1],
q(0) = q(1) = 0: the integrals of e^{z·u} times polynomials (Ĩ, the A_k, and C̃ with B̃ the
cubic Hermite interpolant of its values and slopes in the cell) are exact through φ-functions,
and the factor e^{q} − 1 is taken by a 5-node product rule. Where l + s is constant q = 0, so
DPM-Solver++ (l = 1, s = b = 0) and DPM-Solver (l = 0, s = −1, b = 0) are exact on any grid.
(The official code snaps the run's times to the statistics grid and applies the trapezoid rule
to cumulative sums.)

All coefficients are built once per grid in float64 as tensors of one sample's shape (or
floats when the statistics are scalars): a step is x_t = a ⊙ x_s + Σ_j W_j ⊙ f_j + c. Every
row steps between neighbouring run λ's (step i's predictor λ_i → λ_{i+1}, step i + 1's corrector
the same), so Ĩ, the A_k and C̃ are sums over one step's cells, taken for all steps at once; a
row only weights them by its nodes. The elements of a sample are independent: they are built
in blocks whose arrays stay in cache.
"""

from __future__ import annotations

import bisect
import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..denoiser import EvalPoint
from .base import Grid, Model, Solver, State, check_bools, host, register
from .multistep import multistep_orders

__all__ = ["DPMSolverV3", "V3State"]

_F64 = torch.float64
# The per-element rows of runs already set up, per process (weakly held), keyed by the solver
# (its statistics included), the grid and the samples' shape, device and dtype: a repeated run
# skips the quadrature, as the plan cache does for the engine's solvers. At most _KEEP each.
_TABLES: weakref.WeakKeyDictionary[Any, dict[tuple, tuple]] = weakref.WeakKeyDictionary()
_KEEP = 8
_CACHE_BYTES = 64 * 2**20
# Values per cell array of one block of elements: small enough that a block's intermediates
# stay in cache (a 4×64×64 per-element set-up then runs about twice as fast as at once).
_BLOCK = 2**15


# Gauss–Legendre nodes on [0, 1] and the inverse of their Vandermonde matrix V[i, m] = u_i^m:
# the product rule ∫_0^1 e^{z·u}·F(u) du ≈ Σ_i ω_i(z)·F(u_i), ω = V^{−T}·μ(z), exact for F of
# degree < 5. It is applied only to the factor e^{q(u)} − 1 of a cell's curved exponent (zero
# where l + s is constant, so DPM-Solver++'s coefficients stay exact).
_GAUSS = (-0.906179845938664, -0.5384693101056831, 0.0, 0.5384693101056831, 0.906179845938664)
_NODES = np.array([(g + 1) / 2 for g in _GAUSS])
_POWERS = _NODES[None, :] ** np.arange(len(_NODES))[:, None]  # [m, i] = u_i^m
_VINV = np.linalg.inv(_POWERS.T)
# ∫_0^u of the Hermite basis h01, h10, h11 minus u times their integrals, at those nodes
_PRIMITIVES = np.stack(
    [
        _NODES**3 - _NODES**4 / 2 - _NODES / 2,
        _NODES**2 / 2 - 2 * _NODES**3 / 3 + _NODES**4 / 4 - _NODES / 12,
        -(_NODES**3) / 3 + _NODES**4 / 4 + _NODES / 12,
    ],
    axis=1,
)
_FACT = [float(math.factorial(k)) for k in range(len(_NODES))]
# Taylor coefficients of μ_4(z) = Σ_j z^j/(j!·(j + 5)); 21 terms reach 2^−62 at |z| = 1
_TOP_SERIES = np.array([1 / (math.factorial(j) * (j + 5)) for j in range(22)])
# |z| up to which j terms of that series leave the first omitted one below 2^−62
_SERIES_REACH = [(2**-62 * math.factorial(j) * (j + 5)) ** (1 / j) for j in range(1, 22)]
# k!/i! at [i − 1, k − 1] (the derivative weights' Newton form), and 1/((k − m)!·m!) for m ≤ k
_NEWTON_SCALE = np.array([[_FACT[k] / _FACT[i] for k in range(1, 4)] for i in range(1, 4)])
_TAYLOR_SCALE = np.array(
    [[1 / (_FACT[k - m] * _FACT[m]) if m <= k else 0.0 for m in range(4)] for k in range(4)]
)
_TAYLOR_POWER = np.maximum(np.arange(4)[:, None] - np.arange(4), 0)


# -- the statistics on a run's λ grid (numpy float64; arrays (nodes or cells, elements)) -------
def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dy/dx (y (N, E)) at the nodes x (N,): second-order differences (numpy's gradient
    with edge_order 2), the chord for 2 nodes."""
    if x.size == 2:
        return np.broadcast_to((y[1] - y[0]) / (x[1] - x[0]), y.shape)
    return np.gradient(y, x, axis=0, edge_order=2)


def _hermite(
    xq: np.ndarray, xp: np.ndarray, fp: np.ndarray, dp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The cubic Hermite interpolant of values fp and slopes dp (N, E) at nodes xp (N,): its
    values and slopes at xq (Q,), written so that constant data stay exactly constant."""
    idx = np.clip(np.searchsorted(xp, xq), 1, xp.size - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    h = (x1 - x0)[:, None]
    t = ((xq - x0) / (x1 - x0))[:, None]
    t2, t3 = t * t, t * t * t
    f0, f1, d0, d1 = fp[idx - 1], fp[idx], dp[idx - 1], dp[idx]
    val = f0 + (3 * t2 - 2 * t3) * (f1 - f0)
    val = val + h * ((t - 2 * t2 + t3) * d0 + (t3 - t2) * d1)
    der = (6 * t - 6 * t2) * (f1 - f0) / h + (1 - 4 * t + 3 * t2) * d0 + (3 * t2 - 2 * t) * d1
    return val, der


def _cell_integrals(y: np.ndarray, dy: np.ndarray, d: np.ndarray) -> np.ndarray:
    """∫_cell y for y cubic Hermite on each cell (values y, slopes dy at the nodes; widths d)."""
    y0, y1 = y[:-1], y[1:]
    return d * (y0 + (y1 - y0) / 2 + (dy[:-1] * d - dy[1:] * d) / 12)


def _deviations(y: np.ndarray, dy: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q(u) = ∫_{λ_c}^{λ_c + δu} y − u·∫_cell y at the product rule's nodes, (5, cells, E), for
    y as in :func:`_cell_integrals` (exactly zero where y is constant)."""
    parts = np.stack([y[1:] - y[:-1], dy[:-1] * d, dy[1:] * d])
    return d * _mix(_PRIMITIVES, parts)


def _mix(mat: np.ndarray, arr: np.ndarray) -> np.ndarray:
    """mat (P, Q) applied along the first axis of arr (Q, ...), without BLAS (whose threads
    cost more than they bring for such a short inner dimension)."""
    return np.einsum("ij,j...->i...", mat, arr)


def _cumulative(cells: np.ndarray) -> np.ndarray:
    """The running sum over cells (C, E) at the C + 1 nodes, 0 at the first."""
    return np.concatenate([np.zeros_like(cells[:1]), np.cumsum(cells, 0)])


def _moments(z: np.ndarray) -> np.ndarray:
    """μ_m(z) = ∫_0^1 e^{z·u}·u^m du = m!·e^z·φ_{m+1}(−z) for m < 5, stacked (5, *z.shape).

    Where |z| < 1: μ_4 by its Taylor series and the others downwards, μ_{m−1} = (e^z − z·μ_m)/m,
    which damps errors by |z|/m (the upward direction cancels there); elsewhere the closed
    form, φ_k(w) = (e^w − Σ_{j<k} w^j/j!)/w^k."""
    ez = np.exp(z)
    small = np.abs(z) < 1
    every = bool(small.all())
    zs = z if every else np.where(small, z, 0.0)
    terms = bisect.bisect_left(_SERIES_REACH, float(np.abs(zs).max(initial=0.0))) + 1
    top = np.full(z.shape, _TOP_SERIES[terms - 1])
    for j in range(terms - 2, -1, -1):  # Horner, in place
        top *= zs
        top += _TOP_SERIES[j]
    mu = np.empty((len(_NODES), *z.shape))
    mu[-1] = top
    for m in range(len(_NODES) - 1, 0, -1):
        mu[m - 1] = (ez - zs * mu[m]) / m
    if not every:
        big = ~small
        w, ezb = -z[big], ez[big]
        em, poly, wk = np.expm1(w), np.zeros_like(w), np.ones_like(w)
        for m in range(len(_NODES)):
            wk = wk * w
            mu[m][big] = _FACT[m] * ezb * ((em - poly) / wk)
            poly = poly + wk / math.factorial(m + 1)
    return mu


def _bent(mu: np.ndarray, q: np.ndarray) -> np.ndarray:
    """ω_i(z)·(e^{q(u_i)} − 1) at the product rule's nodes, from μ(z) (5, ...)."""
    return _mix(_VINV.T, mu) * np.expm1(q)


def _curved_moments(z: np.ndarray, q: np.ndarray) -> np.ndarray:
    """∫_0^1 e^{z·u + q(u)}·u^m du for m < 4, (4, *z.shape): the exact moments of e^{z·u}
    plus the deviation factor e^{q(u)} − 1 (q at the product rule's nodes) by the product
    rule, skipped (so exactly zero) where q = 0."""
    mu = _moments(z)
    if not q.any():
        return mu[:4]
    return mu[:4] + _mix(_POWERS[:4], _bent(mu, q))


def _curved_integral(z: np.ndarray, q: np.ndarray, beta: tuple[np.ndarray, ...]) -> np.ndarray:
    """∫_0^1 e^{z·u + q(u)}·Σ_m β_m·u^m du (as :func:`_curved_moments`)."""
    mu = _moments(z)
    out = beta[0] * mu[0]
    for bm, mm in zip(beta[1:], mu[1:]):
        out = out + bm * mm
    if q.any():
        at_nodes = _mix(_POWERS[: len(beta)].T, np.stack(beta))  # Σ_m β_m·u_i^m
        out = out + (_bent(mu, q) * at_nodes).sum(0)
    return out


class _Layout:
    """The merged λ grid of one run: the run's λ's (strictly increasing) plus the statistics'
    nodes strictly inside their range, and what every block of elements shares. Step i of the
    run covers the cells [pos[i], pos[i + 1]); ``anchor`` is the first node of each cell's
    step and ``taylor[k, m]`` (cells,) = (λ_c − λ_anchor)^{k−m}/(k − m)!·δ^m/m! (0 for m > k;
    k, m ≤ kmax), the expansion of (λ − λ_s)^k/k! on a cell in powers of u."""

    def __init__(self, lams: list[float], stat_lam: np.ndarray | None, kmax: int):
        run = np.array(lams)
        src, inner = np.zeros(0, dtype=np.int64), np.zeros(0)
        if stat_lam is not None:
            lo, hi = float(run.min()), float(run.max())
            tol = 1e-9 * (1 + max(abs(lo), abs(hi)))
            if lo < stat_lam[0] - tol or hi > stat_lam[-1] + tol:
                raise ValueError(
                    f"dpm_solver_v3: the run needs λ in [{lo:.6g}, {hi:.6g}] but the statistics "
                    f"cover [{stat_lam[0]:.6g}, {stat_lam[-1]:.6g}]; compute them over the "
                    "run's range (the default covers the process's t_min..t_max)"
                )
            src = np.flatnonzero((stat_lam > lo) & (stat_lam < hi))
            if src.size:  # drop statistics nodes that coincide with a run λ
                gap = np.abs(stat_lam[src, None] - run[None, :]).min(1)
                src = src[gap > 1e-12 * (1 + np.abs(stat_lam[src]))]
            inner = stat_lam[src]
            self.run_q = np.clip(run, stat_lam[0], stat_lam[-1])
        if not (run[1:] > run[:-1]).all():
            raise ValueError("dpm_solver_v3 needs λ strictly increasing along the run")
        self.nodes = nodes = np.sort(np.concatenate([run, inner])) if src.size else run
        self.pos = np.searchsorted(nodes, run)
        self.inner_src, self.inner_at = src, np.searchsorted(nodes, inner)
        d = nodes[1:] - nodes[:-1]
        self.d = d[:, None]
        self.anchor = self.pos[np.repeat(np.arange(run.size - 1), np.diff(self.pos))]
        start = nodes[:-1] - nodes[self.anchor]
        size = kmax + 1
        sp, dp = np.ones((size, d.size)), np.ones((size, d.size))  # start^k, δ^k
        for k in range(1, size):
            sp[k], dp[k] = sp[k - 1] * start, dp[k - 1] * d
        self.taylor = _TAYLOR_SCALE[:size, :size, None] * sp[_TAYLOR_POWER[:size, :size]] * dp

    def values(self, stat_lam: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values and slopes (nodes, E) of statistics v (n, E) given on stat_lam: the data at
        the statistics' own nodes, the cubic Hermite interpolant at the run's λ's."""
        dv = _slopes(stat_lam, v)
        val, der = np.empty((2, self.nodes.size, v.shape[1]))
        val[self.inner_at], der[self.inner_at] = v[self.inner_src], dv[self.inner_src]
        val[self.pos], der[self.pos] = _hermite(self.run_q, stat_lam, v, dv)
        return val, der


@dataclass(frozen=True)
class _Profile:
    """One block of elements on a run's merged grid: l and b (nodes, E), the cumulative
    L = ∫l and S = ∫s (exact), and per cell the moments M_m = ∫_0^1 e^{E(λ_c + δu) − E(λ_c)}·u^m du
    of E = L + S (m ≤ 3, (4, cells, E)) and, where b ≠ 0 anywhere in the block, the integral
    K = ∫_cell e^{−(S − S(λ_c))}·b; all origin-free: a step only shifts them to its λ_s."""

    l: np.ndarray
    b: np.ndarray
    L: np.ndarray
    S: np.ndarray
    M: np.ndarray
    K: np.ndarray | None

    @classmethod
    def build(cls, lay: _Layout, stats: tuple[np.ndarray, ...] | None) -> _Profile:
        """From the statistics' (lam, l, s, b) of the block ((n,), then (n, E)), or None for
        l = 1, s = b = 0."""
        d = lay.d
        if stats is None:  # E = λ − λ_c on every cell (q = 0), no B̃
            one = np.ones((lay.nodes.size, 1))
            return cls(one, 0 * one, _cumulative(d), 0 * one, _moments(d)[:4], None)
        lam, *vals = stats
        val, der = lay.values(lam, np.concatenate(vals, axis=1))  # [l | s | b]
        e = val.shape[1] // 3
        l, s, b = val[:, :e], val[:, e : 2 * e], val[:, 2 * e :]
        dl, ds, db = der[:, :e], der[:, e : 2 * e], der[:, 2 * e :]
        cells = _cell_integrals(val[:, : 2 * e], der[:, : 2 * e], d)  # ∫l, ∫s
        cell_l, cell_s = cells[:, :e], cells[:, e:]
        # E = E_c + z·u + q(u) on a cell, u = (λ − λ_c)/δ, q = 0 where l + s is constant
        M = _curved_moments(cell_l + cell_s, _deviations(l + s, dl + ds, d))
        K = None
        if b.any():  # b(u) = Σ_m β_m·u^m on a cell, against e^{−(S − S_c)}
            b0, b1, g0, g1 = b[:-1], b[1:], db[:-1] * d, db[1:] * d
            beta = (b0, g0, 3 * (b1 - b0) - 2 * g0 - g1, 2 * (b0 - b1) + g0 + g1)
            K = d * _curved_integral(-cell_s, -_deviations(s, ds, d), beta)
        total = _cumulative(cells)
        return cls(l, b, total[:, :e], total[:, e:], M, K)


@dataclass(frozen=True)
class _StepSums:
    """Per step of the run, λ_s = λ_i → λ_t = λ_{i+1}, for one block: Q = (Ĩ, A_1, …, A_kmax)
    (1 + kmax, steps, E), e^{−L̃_t} (steps, E), and when b ≠ 0 C̃ (steps, E) and B̃ at the
    run's λ's near λ_s: back[i, 1 + o] = B̃(λ_{i−o}) for o = −1 … reach (steps, 2 + reach, E)."""

    Q: np.ndarray
    decay: np.ndarray
    C: np.ndarray | None
    back: np.ndarray | None

    @classmethod
    def build(cls, lay: _Layout, prof: _Profile, reach: int) -> _StepSums:
        """The cell sums of every step at once: per-cell terms relative to the step's λ_s
        (its ``anchor``), added up per step."""
        a, starts, M = lay.anchor, lay.pos[:-1], prof.M
        L, S = prof.L, prof.S
        rel_s = S[:-1] - S[a]
        base = lay.d * np.exp(L[:-1] - L[a] + rel_s)
        # ∫ e^E·(λ − λ_s)^k/k!, the polynomial expanded on each cell
        terms = np.einsum("kmc,mc...->kc...", lay.taylor, M[: lay.taylor.shape[1]])
        c_t = back = None
        if prof.K is not None:
            c_cells, local = _b_cells(lay, prof, rel_s)
            c_t = np.add.reduceat(base * c_cells, starts, axis=0)
            back = _b_table(S[lay.pos], np.add.reduceat(local, starts, axis=0), reach)
        Q = np.add.reduceat(base * terms, starts, axis=1)
        decay = np.exp(-(L[lay.pos[1:]] - L[starts]))
        return cls(Q, decay, c_t, back)


def _b_cells(lay: _Layout, prof: _Profile, rel_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, Σ_m c_m·M_m with B̃ = Σ_m c_m·u^m the cubic Hermite interpolant of its values
    and slopes (so C̃ = Σ_cells e^{E_c − E_s}·δ·Σ_m c_m·M_m), and the cell's share of B̃,
    e^{−(S_c − S_s)}·K_c. B̃ at the nodes is the running sum of the shares from the step's
    start; one running sum over all cells serves every step (each share is relative to its
    own step, so the sum stays of the order of a few steps' B̃)."""
    a, d, S, b, M = lay.anchor, lay.d, prof.S, prof.b, prof.M
    assert prof.K is not None
    e0, e1 = np.exp(-rel_s), np.exp(-(S[1:] - S[a]))
    local = e0 * prof.K
    run = _cumulative(local)
    b0, b1 = run[:-1] - run[a], run[1:] - run[a]
    g0, g1 = d * e0 * b[:-1], d * e1 * b[1:]
    cub = (b0, g0, 3 * (b1 - b0) - 2 * g0 - g1, 2 * (b0 - b1) + g0 + g1)
    out = cub[0] * M[0]
    for m in range(1, 4):
        out = out + cub[m] * M[m]
    return out, local


def _b_table(s_run: np.ndarray, share: np.ndarray, reach: int) -> np.ndarray:
    """B̃ relative to λ_i at λ_{i+1} (share[i], the step's total) and at λ_{i−o}, o = 0 … reach:
    −Σ_{κ=1}^{o} e^{S_i − S_{i−κ}}·share[i − κ] (s_run: S at the run's λ's)."""
    steps = share.shape[0]
    out = np.zeros((steps, 2 + reach, *share.shape[1:]))
    out[:, 0] = share
    for o in range(1, min(reach, steps - 1) + 1):
        out[o:, 1 + o] = out[o:, o] - np.exp(s_run[o:steps] - s_run[: steps - o]) * share[:-o]
    return out


def _derivative_weights(r: np.ndarray, n: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """w[row, j, k − 1] with g^{(k)}(λ_s) ≈ Σ_j w·g_j, k = 1 … J − 1, from each row's nodes
    r_j = λ_j − λ_s (R, J), r_0 = 0, of which the first n[row] + 1 count (the rest get 0):
    k!·g[r_0, …, r_k] where ``pseudo`` (divided differences), else the interpolating
    polynomial's derivatives, from its Newton form Σ_i g[r_0, …, r_i]·N_i,
    N_i = x·Π_{0<m<i}(x − r_m)."""
    rows, width = r.shape
    j, k = np.arange(width), np.arange(1, width)
    diff = r[:, :, None] - r[:, None, :]
    diff[:, j, j] = 1.0
    prods = np.cumprod(diff, axis=2)[:, :, 1:]  # Π_{m ≤ k, m ≠ j} (r_j − r_m)
    divided = np.zeros((rows, width, width - 1))
    live = (j[:, None] <= k) & (k <= n[:, None, None])  # j ≤ k ≤ n
    np.divide(np.array(_FACT[1:width]), prods, out=divided, where=live)
    if pseudo.all() or width == 1:
        return divided
    newton = np.zeros((rows, width, width))  # [·, i, k]: x^k in N_i, i, k ≥ 1 used
    newton[:, 1, 1] = 1.0
    for i in range(2, width):
        newton[:, i, 1:] = newton[:, i - 1, :-1] - r[:, i - 1, None] * newton[:, i - 1, 1:]
    convert = newton[:, 1:, 1:] * _NEWTON_SCALE[: width - 1, : width - 1]  # k!/i!·[x^k]N_i
    lagrange = divided @ convert
    return np.where(pseudo[:, None, None], divided, lagrange)


@dataclass(frozen=True)
class _RowSet:
    """The rows of one run as arrays: row r steps λ_s = λ_{seg[r]} → λ_{seg[r] + 1} with g's
    derivatives from the run's points node[r] (node[r, 0] = seg[r], padded with it); g_j =
    Σ_k weight[r, j, k]·Q_k with Q = (Ĩ, A_1, …)."""

    seg: np.ndarray  # (R,)
    node: np.ndarray  # (R, J)
    count: np.ndarray  # (R, 1): how many nodes
    weight: np.ndarray  # (R, J, 1 + kmax)
    ratio: np.ndarray  # (R, 1): α_t/α_s
    alpha_t: np.ndarray  # (R, 1)
    reach: int  # how far back (in run points) a row's nodes go from its λ_s

    @classmethod
    def build(
        cls, nodes: list[list[int]], pseudo: list[bool], lam: list[float], alpha: list[float]
    ) -> _RowSet:
        """From each row's nodes (λ_s's index first, then in the divided differences' order)."""
        width = max(map(len, nodes))
        padded = itertools.chain.from_iterable(v + v[:1] * (width - len(v)) for v in nodes)
        node = np.fromiter(padded, np.int64, len(nodes) * width).reshape(-1, width)
        n = np.fromiter(map(len, nodes), np.int64, len(nodes)) - 1
        seg = node[:, 0]
        lams, alps = np.array(lam), np.array(alpha)
        w = _derivative_weights(lams[node] - lams[seg, None], n, np.array(pseudo))
        kmax = int(n.max())
        weight = np.zeros((len(nodes), width, 1 + kmax))
        weight[:, 0, 0] = 1.0
        weight[:, :, 1:] = w[:, :, :kmax]
        alpha_t = alps[seg + 1, None]
        reach = int((seg[:, None] - node).max())
        return cls(seg, node, n[:, None] + 1, weight, alpha_t / alps[seg, None], alpha_t, reach)

    @property
    def kmax(self) -> int:
        return self.weight.shape[2] - 1

    def values(
        self, lay: _Layout, prof: _Profile, sums: _StepSums
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """a (R, E), W (R, J, E) and c (R, E) or None, for one block."""
        seg, S = self.seg, prof.S
        g = np.einsum("rjk,kr...->rj...", self.weight, sums.Q[:, seg])
        decay = sums.decay[seg]
        pref = self.alpha_t * decay
        rel_s = S[lay.pos[self.node]] - S[lay.pos[seg]][:, None]
        weights = -pref[:, None] * g * np.exp(-rel_s)
        c = None
        if sums.C is not None and sums.back is not None:
            b_nodes = sums.back[seg[:, None], 1 + seg[:, None] - self.node]
            c = -pref * (sums.C[seg] - (g * b_nodes).sum(1))
        return self.ratio * decay, weights, c


def _coefficients(
    lam: list[float],
    alpha: list[float],
    stats: Any,
    nodes: list[list[int]],
    pseudo: list[bool],
    steps: int,
) -> tuple[np.ndarray, bool]:
    """The run's coefficients, one row of E values each (E the elements of a sample, 1 for
    scalar or no statistics): for each row in turn a, then its W_j, then (when b ≠ 0) each
    row's c, then u = (1 − l)/α at the first ``steps`` λ's. The rows step between the run's
    λ's ``lam`` (α's ``alpha``) with the given nodes (indices, λ_s's first)."""
    rows = _RowSet.build(nodes, pseudo, lam, alpha) if nodes else None
    data: tuple[np.ndarray, ...] | None = None
    if stats is not None:
        lam_st = stats.lam.detach().to(device="cpu", dtype=_F64).numpy().reshape(-1)
        vals = (stats.l, stats.s, stats.b)
        data = (
            lam_st,
            *(v.detach().to("cpu", _F64).reshape(lam_st.size, -1).numpy() for v in vals),
        )
    lay = _Layout(lam, None if data is None else data[0], rows.kmax if rows else 0)
    count, width = rows.node.shape if rows else (0, 1)
    elements = 1 if data is None else data[1].shape[1]
    out = np.empty(((2 + width) * count + steps, elements))
    a, w = out[:count], out[count : (1 + width) * count].reshape(count, width, elements)
    c, u = out[(1 + width) * count : (2 + width) * count], out[(2 + width) * count :]
    has_b = False
    alpha_s = np.array(alpha[:steps])[:, None]
    block = max(1, _BLOCK // lay.nodes.size)
    for lo in range(0, elements, block):
        cols = slice(lo, lo + block)
        part = None if data is None else (data[0], *(v[:, cols] for v in data[1:]))
        prof = _Profile.build(lay, part)
        u[:, cols] = (1.0 - prof.l[lay.pos[:steps]]) / alpha_s
        if rows is not None:
            sums = _StepSums.build(lay, prof, rows.reach)
            a[:, cols], w[:, :, cols], cb = rows.values(lay, prof, sums)
            c[:, cols] = 0.0 if cb is None else cb
            has_b = has_b or cb is not None
    used = np.ones(out.shape[0], dtype=bool)  # drop the padding of W, and c where b = 0
    if rows is not None:
        used[count : (1 + width) * count] = (np.arange(width) < rows.count).reshape(-1)
    used[(1 + width) * count : (2 + width) * count] = has_b
    return out[used], has_b


def _on_sample(table: np.ndarray, stats: Any, x: Tensor) -> list[Any]:
    """The rows of ``table`` as floats (scalar or no statistics), else as tensors of one
    sample's shape on x's device and dtype (one transfer)."""
    if stats is None or stats.l.ndim == 1:
        return table[:, 0].tolist()
    out = torch.from_numpy(table).to(device=x.device, dtype=x.dtype)
    return list(out.view(-1, *stats.l.shape[1:]).unbind(0))


@dataclass(frozen=True)
class _Row:
    """x_new = a ⊙ x + Σ_j W[j] ⊙ f[hist[j]] + c (f newest first)."""

    a: Tensor | float
    w: tuple[Tensor | float, ...]
    hist: tuple[int, ...]
    c: Tensor | None


@dataclass(frozen=True)
class _Step:
    point: EvalPoint
    u: Tensor | float  # (1 − l)/α at the step's start: f = u·x − x̂_0
    predict: _Row | None  # None: the step to σ = 0 (returns x̂_0)
    correct: _Row | None


@dataclass(frozen=True)
class V3State(State):
    """Per-step coefficients (host) and the run's f = N/α, newest first, with the previous
    step's start (for the corrector)."""

    steps: tuple[_Step, ...] = host()
    keep: int = host()
    history: tuple[Tensor, ...] = ()
    x_prev: Tensor | None = None


def _combine(row: _Row, x: Tensor, hist: tuple[Tensor, ...]) -> Tensor:
    out = row.a * x
    for w, j in zip(row.w, row.hist):
        if isinstance(w, Tensor):
            out = out.addcmul_(w, hist[j])
        elif w != 0.0:
            out = out.add_(hist[j], alpha=w)
    return out if row.c is None else out.add_(row.c)


@register
@dataclass(frozen=True)
class DPMSolverV3(Solver[V3State]):
    """DPM-Solver-v3 (Zheng et al., NeurIPS 2023), multistep predictor–corrector on empirical
    model statistics; the maths is in the module docstring.

    Options (official names in brackets; defaults are the official README's):

    * ``statistics``: the model's EMS (:func:`diffsolve.tuning.v3.compute_statistics`); None
      runs with l = 1, s = b = 0, i.e. DPM-Solver++ (plus the corrector, if on).
    * ``order`` (3): predictor order p; the official advice is 3 unguided, 2 guided.
    * ``predictor_pseudo`` [p_pseudo] (False): g's derivatives by divided differences.
    * ``corrector`` [use_corrector] (True) and ``corrector_pseudo`` [c_pseudo] (True).
    * ``lower_order_final`` (True): as the official code, at any step count: step i of N uses
      order ≤ N − i (the step to σ = 0 counts as the last).

    Orders: step i uses min(order, i + 1) (warm-up). Without statistics and corrector the run
    is DPM-Solver++ multistep with Taylor weights: ``dpmpp_2m`` with ``solver_type="heun"`` at
    order 2; at order 3 the 3M update with D2 = the quadratic's second derivative
    (``dpmpp_3m``'s) after a Taylor-weighted order-2 warm-up step (``dpmpp_3m`` warms up with
    the midpoint weight). Every evaluated time needs a finite λ (α > 0) inside the
    statistics' range. Shapes: x (B, *shape), statistics (n, *shape) or (n,).
    """

    statistics: Any = None
    order: int = 3  # type: ignore[assignment]
    predictor_pseudo: bool = False
    corrector: bool = True
    corrector_pseudo: bool = True
    lower_order_final: bool = True

    name: ClassVar[str] = "dpm_solver_v3"
    description: ClassVar[str] = (
        "DPM-Solver-v3: multistep predictor-corrector on empirical model statistics (l, s, b)"
    )

    def validate(self) -> None:
        if isinstance(self.order, bool) or self.order not in (1, 2, 3):
            raise ValueError(f"dpm_solver_v3: order must be 1, 2 or 3, got {self.order!r}")
        names = ("predictor_pseudo", "corrector", "corrector_pseudo", "lower_order_final")
        check_bools("dpm_solver_v3", **{k: getattr(self, k) for k in names})
        st = self.statistics
        if st is not None and not all(hasattr(st, k) for k in ("lam", "l", "s", "b")):
            raise ValueError(
                "dpm_solver_v3: statistics must be a V3Statistics (diffsolve.tuning.v3), "
                f"got {type(st).__name__}"
            )

    def check_model(self, model: Any) -> None:
        check = getattr(self.statistics, "check", None)
        if check is not None:
            check(model.process)

    def init(self, x: Tensor, grid: Grid, model: Model, noise: Any = None) -> V3State:
        st = self.statistics
        if st is not None and tuple(st.l.shape[1:]) not in ((), tuple(x.shape[1:])):
            raise ValueError(
                f"dpm_solver_v3: statistics of per-sample shape {tuple(st.l.shape[1:])} do not "
                f"fit samples of shape {tuple(x.shape[1:])}"
            )
        rows, keep = self._cached_rows(x, grid)
        many = getattr(model, "points", None)  # every step's point in one vectorised pass
        ts = grid.t[: grid.steps]
        points = many(ts, x) if many is not None else [model.point(t, x) for t in ts]
        steps = tuple(_Step(pt, u, pred, corr) for pt, (u, pred, corr) in zip(points, rows))
        return V3State(steps=steps, keep=keep)

    def _cached_rows(self, x: Tensor, grid: Grid) -> tuple[tuple[tuple[Any, Any, Any], ...], int]:
        """:meth:`_rows`, kept for a repeated run (see ``_TABLES``; rows over _CACHE_BYTES of
        per-element weights are not kept)."""
        key = (self, tuple(grid.t.tolist()), grid.clean_end, tuple(x.shape[1:]), x.device, x.dtype)
        try:
            table = _TABLES.setdefault(grid.process, {})
            hit = table.get(key)
        except TypeError:  # an unhashable configuration or process: no cache
            return self._rows(x, grid)
        if hit is None:
            hit = self._rows(x, grid)
            size = sum(
                v.numel() * v.element_size()
                for u, *rows in hit[0]
                for r in rows
                if r is not None
                for v in (r.a, *r.w, r.c)
                if isinstance(v, Tensor)
            )
            if size <= _CACHE_BYTES:
                table[key] = hit
                while len(table) > _KEEP:
                    del table[next(iter(table))]
        return hit

    def _rows(self, x: Tensor, grid: Grid) -> tuple[tuple[tuple[Any, Any, Any], ...], int]:
        """Per step (u, predictor row, corrector row) on x's device and dtype, and the history
        the rows read."""
        st = self.statistics
        n = grid.steps
        evals = n if grid.clean_end else n + 1  # grid points with a network call or a landing
        lam, alp = grid.lam.tolist(), grid.alpha.tolist()
        if not all(math.isfinite(v) for v in lam[:evals]):
            raise ValueError(
                "dpm_solver_v3 needs a finite λ (α > 0) at every evaluated time; start at "
                "t_max_finite (the default schedules do)"
            )
        orders = multistep_orders(grid, self.order, self.lower_order_final, math.inf)
        nodes: list[list[int]] = []  # per row, λ_s's index first (all rows step λ_i → λ_{i+1})
        pseudo: list[bool] = []
        hists: list[tuple[int, ...]] = []
        plan = []  # per step, its predictor's and corrector's row (or None)
        for i in range(n):
            pred = corr = None
            p = orders[i]
            if p > 0:
                pred = len(nodes)
                nodes.append([i - j for j in range(p)])
                pseudo.append(self.predictor_pseudo)
                hists.append(tuple(range(p)))
            if self.corrector and i > 0:
                q = orders[i - 1] + (1 if self.corrector_pseudo else 0)
                if q > 1:  # nodes s = i−1, t = i, then older; history index of t is 0
                    corr = len(nodes)
                    nodes.append([i - 1, i] + [i - j for j in range(2, q)])
                    pseudo.append(self.corrector_pseudo)
                    hists.append((1, 0, *range(2, q)))
            plan.append((pred, corr))
        table, has_b = _coefficients(lam[:evals], alp[:evals], st, nodes, pseudo, n)
        values = _on_sample(table, st, x)  # in _coefficients' order
        count = len(nodes)
        ends = list(itertools.accumulate(map(len, nodes), initial=count))
        w = [tuple(values[i:j]) for i, j in itertools.pairwise(ends)]
        c = values[ends[-1] : ends[-1] + count] if has_b else [None] * count
        u = values[ends[-1] + count * has_b :]
        rows = [_Row(*r) for r in zip(values[:count], w, hists, c)]
        keep = max(map(max, hists), default=0)
        steps = tuple(
            (ui, None if p is None else rows[p], None if q is None else rows[q])
            for ui, (p, q) in zip(u, plan)
        )
        return steps, keep

    def step(self, x: Tensor, i: int, state: V3State, model: Model) -> tuple[Tensor, V3State]:
        st = state.steps[i]
        pred = model(x, st.point)
        x0 = pred.x0
        f = -x0 if isinstance(st.u, float) and st.u == 0.0 else st.u * x - x0
        hist = (f, *state.history)
        corrected = st.correct is not None and state.x_prev is not None
        if corrected:
            x = _combine(st.correct, state.x_prev, hist)  # type: ignore[arg-type]
        if st.predict is None:  # σ = 0: x̂_0 at the (corrected) x through the linear part
            if not corrected or (isinstance(st.u, float) and st.u == 0.0):
                return x0, state.replace(history=hist[: state.keep])
            return st.u * x - f, state.replace(history=hist[: state.keep])
        out = _combine(st.predict, x, hist)
        track = any(s.correct is not None for s in state.steps[i + 1 : i + 2])
        return out, state.replace(history=hist[: state.keep], x_prev=x if track else None)
