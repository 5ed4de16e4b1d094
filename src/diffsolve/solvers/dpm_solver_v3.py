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
floats when the statistics are scalars): a step is x_t = a ⊙ x_s + Σ_j W_j ⊙ f_j + c.
"""

from __future__ import annotations

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

__all__ = ["DPMSolverV3", "V3State", "phi"]

_F64 = torch.float64
_SERIES = 30
# The per-element rows of runs already set up, per process (weakly held), keyed by the solver
# (its statistics included), the grid and the samples' shape, device and dtype: a repeated run
# skips the quadrature, as the plan cache does for the engine's solvers. At most _KEEP each.
_TABLES: weakref.WeakKeyDictionary[Any, dict[tuple, tuple]] = weakref.WeakKeyDictionary()
_KEEP = 8
_CACHE_BYTES = 64 * 2**20


# Gauss–Legendre nodes on [0, 1] and the inverse of their Vandermonde matrix V[i, m] = u_i^m:
# the product rule ∫_0^1 e^{z·u}·F(u) du ≈ Σ_i ω_i(z)·F(u_i), ω = V^{−T}·μ(z), exact for F of
# degree < 5. It is applied only to the factor e^{q(u)} − 1 of a cell's curved exponent (zero
# where l + s is constant, so DPM-Solver++'s coefficients stay exact).
_GAUSS = (-0.906179845938664, -0.5384693101056831, 0.0, 0.5384693101056831, 0.906179845938664)
_NODES = tuple((g + 1) / 2 for g in _GAUSS)
_VINV = torch.linalg.inv(
    torch.tensor([[u**m for m in range(len(_NODES))] for u in _NODES], dtype=_F64)
).tolist()


def phi(k: int, z: Tensor) -> Tensor:
    """φ_k(z) = Σ_{j≥0} z^j/(j+k)! elementwise (k ≥ 1), float64, stable for small |z|."""
    z = z.to(_F64)
    small = z.abs() < 1
    zs = torch.where(small, z, torch.zeros_like(z))
    term = torch.full_like(z, 1.0 / math.factorial(k))
    series = term.clone()
    for j in range(1, _SERIES):
        term = term * zs / (j + k)
        series = series + term
    zb = torch.where(small, torch.ones_like(z), z)
    poly = sum(zb**j / math.factorial(j) for j in range(1, k))
    closed = (torch.expm1(zb) - poly) / zb**k
    return torch.where(small, series, closed)


def _slopes(x: Tensor, y: Tensor) -> Tensor:
    """dy/dx (y (N, ...)) at the nodes x (N,): second-order differences (numpy's gradient
    with edge_order 2), the chord for 2 nodes."""
    if x.numel() == 2:
        return ((y[1] - y[0]) / (x[1] - x[0])).expand_as(y).clone()
    out = np.gradient(y.numpy(), x.numpy(), axis=0, edge_order=2)
    return torch.from_numpy(np.ascontiguousarray(out))


def _hermite(xq: Tensor, xp: Tensor, fp: Tensor, dp: Tensor) -> tuple[Tensor, Tensor]:
    """The cubic Hermite interpolant of values fp and slopes dp (N, ...) at nodes xp (N,):
    its values and slopes at xq (Q,), written so that constant data stay exactly constant."""
    idx = torch.searchsorted(xp, xq).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    shp = (-1, *([1] * (fp.ndim - 1)))
    h = (x1 - x0).reshape(shp)
    t = ((xq - x0) / (x1 - x0)).reshape(shp)
    f0, f1, d0, d1 = fp[idx - 1], fp[idx], dp[idx - 1], dp[idx]
    val = f0 + (3 * t**2 - 2 * t**3) * (f1 - f0)
    val = val + h * ((t - 2 * t**2 + t**3) * d0 + (t**3 - t**2) * d1)
    der = (6 * t - 6 * t**2) * (f1 - f0) / h + (1 - 4 * t + 3 * t**2) * d0 + (3 * t**2 - 2 * t) * d1
    return val, der


def _cells(y: Tensor, dy: Tensor, d: Tensor) -> tuple[Tensor, list[Tensor]]:
    """For y cubic Hermite on each cell (values y, slopes dy at the nodes; widths d): the cell
    integrals ∫_cell y and the deviations q(u) = ∫_{λ_c}^{λ_c + δu} y − u·∫_cell y at the product
    rule's nodes (exactly zero where y is constant)."""
    y0, y1, s0, s1 = y[:-1], y[1:], dy[:-1] * d, dy[1:] * d
    total = d * (y0 + (y1 - y0) / 2 + (s0 - s1) / 12)
    dev = []
    for u in _NODES:  # ∫_0^u of the Hermite basis h01, h10, h11, minus u times their integrals
        i01 = u**3 - u**4 / 2 - u / 2
        i10 = u**2 / 2 - 2 * u**3 / 3 + u**4 / 4 - u / 12
        i11 = -(u**3) / 3 + u**4 / 4 + u / 12
        dev.append(d * ((y1 - y0) * i01 + s0 * i10 + s1 * i11))
    return total, dev


class _Profile:
    """l, s, b on the merged λ grid of one run (the statistics' nodes inside the run's range
    plus the run's own λ's) as cubic Hermite interpolants of the statistics (slopes by
    second-order differences), the cumulative L = ∫l and S = ∫s (exact), and per cell the
    moments M_m = ∫_0^1 e^{E(λ_c + δu) − E(λ_c)}·u^m du of E = L + S (m ≤ 3) and the integral
    K = ∫_cell e^{−(S − S(λ_c))}·b, all float64 and origin-free: a row only shifts them to its
    λ_s."""

    def __init__(self, lams: list[float], stats: Any):
        run = torch.tensor(sorted(set(lams)), dtype=_F64)
        if stats is None:
            nodes = run
            l = torch.ones(nodes.numel(), dtype=_F64)
            s = b = dl = ds = db = torch.zeros_like(l)
        else:
            lam = stats.lam.to(_F64)
            lo, hi = float(run[0]), float(run[-1])
            tol = 1e-9 * (1 + max(abs(lo), abs(hi)))
            if lo < float(lam[0]) - tol or hi > float(lam[-1]) + tol:
                raise ValueError(
                    f"dpm_solver_v3: the run needs λ in [{lo:.6g}, {hi:.6g}] but the statistics "
                    f"cover [{float(lam[0]):.6g}, {float(lam[-1]):.6g}]; compute them over the "
                    "run's range (the default covers the process's t_min..t_max)"
                )
            inner = lam[(lam > lo) & (lam < hi)]
            if inner.numel():  # drop statistics nodes that coincide with a run λ
                gap = (inner[:, None] - run[None, :]).abs().min(1).values
                inner = inner[gap > 1e-12 * (1 + inner.abs())]
            nodes = torch.sort(torch.cat([run, inner])).values
            q = nodes.clamp(lam[0], lam[-1])
            vals = [v.to(_F64) for v in (stats.l, stats.s, stats.b)]
            (l, dl), (s, ds), (b, db) = (_hermite(q, lam, v, _slopes(lam, v)) for v in vals)
        self.nodes, self.l, self.s, self.b = nodes, l, s, b
        self.pos = {v: int(torch.searchsorted(nodes, torch.tensor(v, dtype=_F64))) for v in lams}
        self.shp = [-1, *([1] * (l.ndim - 1))]
        self.d = d = (nodes[1:] - nodes[:-1]).reshape(self.shp)
        cell_l, dev_l = _cells(l, dl, d)
        cell_s, dev_s = _cells(s, ds, d)
        zero = torch.zeros_like(l[:1])
        self.L = torch.cat([zero, torch.cumsum(cell_l, 0)])
        self.S = torch.cat([zero, torch.cumsum(cell_s, 0)])
        # E = E_c + z·u + q(u) on a cell, u = (λ − λ_c)/δ, q = 0 where l + s is constant
        self.M = _curved_moments(cell_l + cell_s, [a + c for a, c in zip(dev_l, dev_s)], 4)
        self.has_b = bool((b != 0).any())
        self.K: Tensor | None = None
        if self.has_b:  # b(u) = Σ_m β_m·u^m on a cell, against e^{−(S − S_c)}
            b0, b1, g0, g1 = b[:-1], b[1:], db[:-1] * d, db[1:] * d
            beta = (b0, g0, 3 * (b1 - b0) - 2 * g0 - g1, 2 * (b0 - b1) + g0 + g1)
            self.K = d * _curved_integral(-cell_s, [-v for v in dev_s], beta)

    def row(
        self, node_lams: list[float], lam_t: float, alpha_s: float, alpha_t: float, pseudo: bool
    ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """The step from λ_s = node_lams[0] to lam_t with g's derivatives from the nodes (in
        this order for the divided differences): (a, W_j for each node, c or None)."""
        lam_s = node_lams[0]
        ps, pt = self.pos[lam_s], self.pos[lam_t]
        where = [self.pos[v] for v in node_lams] + [pt]
        lo, hi = min(where), max(where)
        ls = self.L[lo : hi + 1] - self.L[ps]
        ss = self.S[lo : hi + 1] - self.S[ps]
        at, end = ps - lo, pt - lo  # λ_s's and λ_t's index inside the slice
        bs = torch.zeros_like(ss)
        if self.has_b:  # B̃ = ∫_{λ_s} e^{−S̃}·b at the nodes, outward from λ_s
            assert self.K is not None
            cell = torch.exp(-ss[:-1]) * self.K[lo:hi]
            fwd = torch.cumsum(cell[at:], 0)
            back = -torch.flip(torch.cumsum(torch.flip(cell[:at], [0]), 0), [0])
            bs = torch.cat([back, torch.zeros_like(ss[:1]), fwd])
        # the step's own cells, λ_s → λ_t
        dd = self.d[ps:pt]
        moments = [m[ps:pt] for m in self.M]
        base = dd * torch.exp(ls[at:end] + ss[at:end])
        i_t = (base * moments[0]).sum(0)
        c_t = None
        if self.has_b:  # B̃ inside a cell: the cubic Hermite interpolant of its values, slopes
            b0, b1 = bs[at:end], bs[at + 1 : end + 1]
            g0 = dd * torch.exp(-ss[at:end]) * self.b[ps:pt]
            g1 = dd * torch.exp(-ss[at + 1 : end + 1]) * self.b[ps + 1 : pt + 1]
            cub = (b0, g0, 3 * (b1 - b0) - 2 * g0 - g1, 2 * (b0 - b1) + g0 + g1)
            c_t = (base * sum(cm * moments[m] for m, cm in enumerate(cub))).sum(0)
        n = len(node_lams) - 1
        start = (self.nodes[ps:pt] - lam_s).reshape(self.shp)  # cells' starts − λ_s
        a_k = []
        # ∫ e^E·(λ − λ_s)^k/k!, the polynomial expanded at each cell; the powers made once
        start_pow = [start**m for m in range(n + 1)]
        dd_pow = [dd**m for m in range(n + 1)]
        for k in range(1, n + 1):
            poly = sum(
                start_pow[k - m]
                / math.factorial(k - m)
                * dd_pow[m]
                / math.factorial(m)
                * moments[m]
                for m in range(k + 1)
            )
            a_k.append((base * poly).sum(0))
        w = _derivative_weights([v - lam_s for v in node_lams], pseudo)  # (n, n + 1)
        g = [(i_t if j == 0 else torch.zeros_like(i_t)) for j in range(n + 1)]
        for k in range(n):
            for j in range(n + 1):
                if w[k][j] != 0.0:
                    g[j] = g[j] + w[k][j] * a_k[k]
        decay = torch.exp(-ls[end])
        pref = alpha_t * decay
        a = alpha_t / alpha_s * decay
        weights, c = [], None
        for j, v in enumerate(node_lams):
            kj = self.pos[v] - lo
            weights.append(-pref * g[j] * torch.exp(-ss[kj]))
            if self.has_b and j > 0:
                term = g[j] * bs[kj]
                c = term if c is None else c + term
        if c_t is not None:
            c = -pref * (c_t - (c if c is not None else 0.0))
        return a, weights, c


def _moments(z: Tensor) -> list[Tensor]:
    """μ_m(z) = ∫_0^1 e^{z·u}·u^m du = m!·e^z·φ_{m+1}(−z), m < 5, elementwise."""
    ez = torch.exp(z)
    return [math.factorial(m) * ez * phi(m + 1, -z) for m in range(len(_NODES))]


def _curved_moments(z: Tensor, q: list[Tensor], count: int) -> list[Tensor]:
    """∫_0^1 e^{z·u + q(u)}·u^m du for m < count, elementwise: the exact moments of e^{z·u}
    (φ-functions) plus the deviation factor e^{q(u)} − 1 (q given at the product rule's nodes)
    by the product rule, skipped (so exactly zero) where q = 0."""
    mu = _moments(z)
    out = list(mu[:count])
    if any(bool((v != 0).any()) for v in q):
        bent = _bent(mu, q)
        out = [mu[m] + sum(bi * u**m for bi, u in zip(bent, _NODES)) for m in range(count)]
    return out


def _curved_integral(z: Tensor, q: list[Tensor], beta: tuple[Tensor, ...]) -> Tensor:
    """∫_0^1 e^{z·u + q(u)}·Σ_m β_m·u^m du (as :func:`_curved_moments`)."""
    mu = _moments(z)
    out = torch.zeros_like(z)
    for bm, mm in zip(beta, mu):
        out = out + bm * mm
    if any(bool((v != 0).any()) for v in q):
        for bi, u in zip(_bent(mu, q), _NODES):
            for m, bm in enumerate(beta):
                out = out + bi * bm * u**m
    return out


def _bent(mu: list[Tensor], q: list[Tensor]) -> list[Tensor]:
    """ω_i(z)·(e^{q(u_i)} − 1) at the product rule's nodes."""
    n = len(_NODES)
    omega = [sum(_VINV[m][i] * mu[m] for m in range(n)) for i in range(n)]
    return [om * torch.expm1(v) for om, v in zip(omega, q)]


def _derivative_weights(r: list[float], pseudo: bool) -> list[list[float]]:
    """w[k−1][j] with g^{(k)}(λ_s) ≈ Σ_j w·g_j from nodes r_j = λ_j − λ_s (r_0 = 0), k = 1…n:
    the interpolating polynomial's derivatives (Vandermonde), or k!·g[r_0, …, r_k] (pseudo)."""
    n = len(r) - 1
    if n == 0:
        return []
    if pseudo:
        out = []
        for k in range(1, n + 1):
            row = [0.0] * (n + 1)
            for j in range(k + 1):
                den = math.prod(r[j] - r[m] for m in range(k + 1) if m != j)
                row[j] = math.factorial(k) / den
            out.append(row)
        return out
    vander = torch.tensor([[rj**k for k in range(1, n + 1)] for rj in r[1:]], dtype=_F64)
    inv = torch.linalg.inv(vander)  # d_k = Σ_j inv[k, j]·(g_j − g_0), g^{(k)} = k!·d_k
    out = []
    for k in range(n):
        row = [math.factorial(k + 1) * float(inv[k, j]) for j in range(n)]
        out.append([-sum(row), *row])
    return out


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
        prof = _Profile(lam[:evals], st)
        dev, dt = x.device, x.dtype

        def cast(v: Any) -> Any:
            if isinstance(v, Tensor):
                return float(v) if v.ndim == 0 else v.to(device=dev, dtype=dt)
            return v

        def build(nodes: list[int], hist: list[int], to: int, pseudo: bool) -> _Row:
            a, w, c = prof.row([lam[j] for j in nodes], lam[to], alp[nodes[0]], alp[to], pseudo)
            return _Row(cast(a), tuple(cast(v) for v in w), tuple(hist), cast(c))

        steps, keep = [], 0
        for i in range(n):
            pred = corr = None
            p = orders[i]
            if p > 0:
                pred = build(
                    [i - j for j in range(p)], list(range(p)), i + 1, self.predictor_pseudo
                )
            if self.corrector and i > 0:
                q = orders[i - 1] + (1 if self.corrector_pseudo else 0)
                if q > 1:  # nodes s = i−1, t = i, then older; history index of t is 0
                    nodes = [i - 1, i] + [i - j for j in range(2, q)]
                    corr = build(nodes, [1, 0, *range(2, q)], i, self.corrector_pseudo)
            for r in (pred, corr):
                if r is not None:
                    keep = max(keep, *r.hist)
            u = (1.0 - prof.l[prof.pos[lam[i]]]) / alp[i]
            steps.append((cast(u), pred, corr))
        return tuple(steps), keep

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
