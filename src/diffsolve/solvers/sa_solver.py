"""SA-Solver: stochastic Adams predictor-corrector (Xue et al., NeurIPS 2023), data prediction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ._expint import phi_data_float, phi_noise_float
from .base import Grid, check_nonnegative, check_order, register
from .engine import Row, RowSolver, StepRule, update_rules

__all__ = ["SASolver"]


def _moment(k: int, z: float) -> float:
    """∫_0^1 v^k·e^{−z·v} dv = k!·e^{−z}·φ_{k+1}(z), z > 0, float64."""
    if z < 1:
        zp = phi_noise_float(k + 1, z)  # z^{k+1}·φ_{k+1}(z)
        return math.factorial(k) * math.exp(-z) * zp / z ** (k + 1)
    head = sum(z**j / math.factorial(j) for j in range(k + 1))
    return math.factorial(k) / z ** (k + 1) * (1 - math.exp(-z) * head)


def _adams_weights(
    nodes: list[float], lam_s: float, lam_t: float, c: float, memo: dict | None = None
) -> list[float]:
    """w_j = c·∫_{λ_s}^{λ_t} e^{c(λ − λ_t)}·ℓ_j(λ) dλ for the Lagrange basis ℓ_j on ``nodes``.

    In u = (λ − λ_t)/h this is c·h·Σ_k C_{jk}·∫_{−1}^0 e^{c·h·u}·u^k du with ℓ_j(u) = Σ_k C_{jk}u^k
    (Xue et al. 2023, eq. 14 and App. B); C from the product form of ℓ_j (at most 4 nodes).
    ``memo`` keeps the moments of one plan (a step's predictor and corrector share c·h).
    """
    h = lam_t - lam_s
    z = c * h
    u = [(v - lam_t) / h for v in nodes]
    memo = {} if memo is None else memo
    moments = memo.setdefault(z, [])  # (−1)^k·∫_0^1 v^k·e^{−z·v} dv, k = 0, 1, …
    while len(moments) < len(u):
        moments.append((-1) ** len(moments) * _moment(len(moments), z))
    if len(u) == 2:  # the default orders, in closed form: ℓ_0 = (u − u_1)/(u_0 − u_1), …
        (u0, u1), (m0, m1) = u, moments[:2]
        return [z * (m1 - u1 * m0) / (u0 - u1), z * (u0 * m0 - m1) / (u0 - u1)]
    out = []
    for j, uj in enumerate(u):
        coef, scale = [1.0], 1.0  # ℓ_j's coefficients, lowest power first
        for m, um in enumerate(u):
            if m != j:
                coef = [0.0, *coef]
                for k in range(len(coef) - 1):
                    coef[k] -= um * coef[k + 1]
                scale *= uj - um
        out.append(z * sum(a * b for a, b in zip(coef, moments)) / scale)
    return out


def _row(
    cols: tuple[list[float], ...], i: int, nodes: list[int], tau: float, corrector: bool, memo: dict
) -> Row:
    """The SA-Predictor (``corrector=False``; nodes i, i−1, …) or SA-Corrector (nodes i+1, i, …)
    row of the step t_i → t_{i+1} of the grid whose λ, α, σ columns are ``cols``
    (:meth:`Grid.lists`): x_t = decay·x_s + Σ_j α_t·w_j·x̂_0[j] + noise·z, x̂_0 over the nodes
    newest first. ``memo``: what the plan's rows share (a step's predictor and corrector have
    the same c·h)."""
    lam, alpha, sigma = cols
    lam_s, lam_t = lam[i], lam[i + 1]
    h = lam_t - lam_s
    c = 1 + tau**2
    w = _adams_weights([lam[j] for j in nodes], lam_s, lam_t, c, memo)
    if len(nodes) == 2:
        # SA-Solver's (and diffusers') second-order modification, like UniPC's ρ = ½: the
        # first divided difference gets weight c·h²/2 (predictor) or c·h/2 (corrector) instead
        # of the exact-interpolant ones; same order, better at few steps.
        ex = memo.get(("ex", c, h))
        if ex is None:
            ex = memo[("ex", c, h)] = phi_data_float(2, c * h) / c**2
        delta = (
            c * (h * h / 2 - ex) / (lam_s - lam[i - 1]) if not corrector else c * (h / 2 - ex / h)
        )
        w = [w[0] + delta, w[1] - delta]
    decay = math.exp(-(tau**2) * h) * (sigma[i + 1] / sigma[i])
    noise = sigma[i + 1] * math.sqrt(-math.expm1(-2 * tau**2 * h))
    return Row(decay, tuple(alpha[i + 1] * wj for wj in w), (), noise)


def _fold(predict: Row, correct: Row, previous: Row) -> Row:
    """Step i's predictor row from the corrected start x̃_i + Δ, as a row on x̃_i.

    ``correct`` (SA-Corrector of step i − 1) and ``previous`` (that step's SA-Predictor) share
    x_{i−1}, its coefficient and the noise draw z_{i−1}, so Δ = correct − previous reads only
    x̂_0: weights correct.x0 over (m_i, m_{i−1}, …) minus previous.x0 over (m_{i−1}, …).
    """
    if correct.a != previous.a or correct.noise != previous.noise:
        raise RuntimeError("sa_solver: the corrector must restart from the predictor's x and z")
    n = max(len(predict.x0), len(correct.x0), len(previous.x0) + 1)
    delta = [0.0] * n
    for j, w in enumerate(correct.x0):
        delta[j] += w
    for j, w in enumerate(previous.x0):
        delta[j + 1] -= w
    x0 = [predict.a * d for d in delta]
    for j, w in enumerate(predict.x0):
        x0[j] += w
    return Row(predict.a, tuple(x0), (), predict.noise)


@register
@dataclass(frozen=True)
class SASolver(RowSolver):
    """SA-Solver (Xue et al., NeurIPS 2023), data prediction, as diffusers' ``SASolverScheduler``:
    on dx = (f·x − ½(1 + τ²)g²∇log p)dt + τ·g·dw̄, step s → t, h = λ_t − λ_s (their eq. 13):

        x_t = e^{−τ²h}·(σ_t/σ_s)·x_s + α_t·Σ_j w_j·x̂_0(λ_j) + σ_t·sqrt(1 − e^{−2τ²h})·z,
        w_j = (1 + τ²)·∫_{λ_s}^{λ_t} e^{(1+τ²)(λ − λ_t)}·ℓ_j(λ) dλ,

    ℓ_j the Lagrange basis on λ_s, λ_{s−1}, … (SA-Predictor, eq. 14, ``predictor_order`` nodes)
    or λ_t, λ_s, … (SA-Corrector, eq. 16, ``corrector_order``; 0: off; no extra call, folded into
    the next row by :func:`_fold`). τ > 0 draws z where ``tau_tmin ≤ t_s ≤ tau_tmax``. Orders
    follow diffusers (0.42). Accuracy order (τ = 0): p, or min(c, p + 1) with the corrector.
    Shapes: x (B, ...). Notes: docs/solvers-stochastic.md#sa_solver.
    """

    predictor_order: int = 2
    corrector_order: int = 2
    tau: float = 0.0
    tau_tmin: float = 0.0
    tau_tmax: float = math.inf
    lower_order_final: bool = True

    name: ClassVar[str] = "sa_solver"
    description: ClassVar[str] = "SA-Solver: stochastic Adams predictor-corrector (τ = 0: ODE)"

    def validate(self) -> None:
        check_order("sa_solver", (1, 2, 3, 4), predictor_order=self.predictor_order)
        check_order("sa_solver", (0, 1, 2, 3, 4), corrector_order=self.corrector_order)
        check_nonnegative("sa_solver", tau=self.tau)
        if not self.tau_tmin <= self.tau_tmax:
            raise ValueError("sa_solver: tau_tmin must not exceed tau_tmax")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.tau > 0

    @property
    def order(self) -> int:
        p, c = self.predictor_order, self.corrector_order
        return min(c, p + 1) if c else p

    def _tau_at(self, t: float) -> float:
        return self.tau if self.tau_tmin <= t <= self.tau_tmax else 0.0

    def rows(self, grid: Grid) -> tuple[list[Row | None], list[Row | None]]:
        """The SA-Predictor row of each step (None: the step to σ = 0) and the SA-Corrector row
        of the step before, applied at the start of each step (None: no corrector there)."""
        n = grid.steps
        if not math.isfinite(float(grid.lam[0])):
            raise ValueError(
                "sa_solver interpolates x̂_0 in λ and needs a finite λ at the first time; flow "
                "matching: start at t_max_finite (the karras and logsnr schedules do)"
            )
        lof = self.lower_order_final
        t, lam, alpha, sigma = grid.lists("t", "lam", "alpha", "sigma")
        cols = (lam, alpha, sigma)
        final = n - 1 if grid.clean_end else -1  # the step to σ = 0: x̂_0, no row
        predict: list[Row | None] = []
        correct: list[Row | None] = [None]
        memo: dict = {}
        for i in range(n):
            tau = self._tau_at(t[i])
            if i == final:
                predict.append(None)
            else:
                p = min(self.predictor_order, i + 1, n - i if lof else 4)
                predict.append(_row(cols, i, [i - j for j in range(p)], tau, False, memo))
            if i == 0:
                continue
            q = min(self.corrector_order, i + 1, n - i + 2 if lof else 4)
            # the corrector at the start of step i corrects step i − 1, with that step's τ
            use = q > 0 and i != final
            nodes = [i - j for j in range(q)]
            tau_prev = self._tau_at(t[i - 1])
            correct.append(_row(cols, i - 1, nodes, tau_prev, True, memo) if use else None)
        return predict, correct

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        predict, correct = self.rows(grid)
        rows = [  # step i's predictor row after the corrector of step i − 1 (predict[i − 1])
            p if p is None or c is None or prev is None else _fold(p, c, prev)
            for p, c, prev in zip(predict, correct, [None, *predict])
        ]
        return update_rules(grid, rows)
