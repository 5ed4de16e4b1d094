"""Multistep rows of the DPM family, for every η: one builder for DPM-Solver (noise form),
DPM-Solver++ (data form) and their SDE forms (Lu et al. 2022a, 2022b; Song et al. 2021).

History m_0 (newest), m_1, m_2 (x̂_0 or ε̂), r0 = h_{i−1}/h, r1 = h_{i−2}/h, D1_0 = (m_0 − m_1)/r0,
D1_1 = (m_1 − m_2)/r1, H = (1 + η)·h, P(k) the form's φ-weights: order 2 adds c·D1_0
(``second="half"``: c = (1 − e^{−H})/2 or (e^h − 1)/2; ``"taylor"``: P(2)/H), order 3
P(2)/H·D1 + P(3)/H²·D2, D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1), D2 = 2·(D1_0 − D1_1)/(r0 + r1)
(``reference=True``: 1 in place of 2). Derivation: docs/solvers-multistep.md#the-multistep-builder.
"""

from __future__ import annotations

import math

from ._expint import phi_data_float as _pd
from ._expint import phi_noise_float as _pn
from .base import FinalOrders, Grid
from .engine import Row, StepRule, update_rules

__all__ = ["multistep_orders", "multistep_rules"]


def multistep_orders(
    grid: Grid, order: int, lower_order_final: bool, below: float, euler_at_final: bool = False
) -> list[int]:
    """Order of each step (0 for the step to σ = 0, which returns x̂_0): min(order, i + 1)
    (warm-up), no history point where λ = −∞ (α = 0), and the final-step rules of
    :class:`.base.FinalOrders` (``below``: DPM-Solver's 10, diffusers' 15)."""
    rule = FinalOrders(below if lower_order_final else 0.0, euler_at_final)
    n, lam = grid.steps, grid.lam.tolist()
    out, run = [], 0
    for i in range(n - int(grid.clean_end)):  # then the step to σ = 0: 0
        run = run + 1 if math.isfinite(lam[i]) else 0
        out.append(min(order, i + 1, max(run, 1), rule.cap(i, n)))
    return out + [0] * int(grid.clean_end)


def multistep_rules(
    grid: Grid,
    orders: list[int],
    *,
    data: bool,
    eta: float = 0.0,
    s_noise: float = 1.0,
    second: str = "half",
    reference: bool = False,
    name: str = "dpm_solver",
) -> tuple[StepRule, ...]:
    """One rule per step (module docstring), evaluating at grid.t[i]; ``orders`` from
    :func:`multistep_orders`."""
    lam, sig, alp = grid.lists("lam", "sigma", "alpha")
    en = grid.exp_neg_h.tolist()  # e^{−h}, finite (0) where α_s = 0
    rows: list[Row | None] = []
    for i, k in enumerate(orders):
        if k == 0:  # the step to σ = 0: x̂_0
            rows.append(None)
            continue
        h = lam[i + 1] - lam[i]
        if data:
            big = (1 + eta) * h
            s_t, c_half = alp[i + 1], -math.expm1(-big) / 2
            p2 = _pd(2, big) / big if k > 1 else 0.0
            p3 = _pd(3, big) / big**2 if k > 2 else 0.0
            # e^{−ηh} as (e^{−h})^η: 0 where α_s = 0, and 0^0 = 1 keeps the ODE's σ_t/σ_s
            ratio = sig[i + 1] / sig[i] * en[i] ** eta if eta else sig[i + 1] / sig[i]
            gain = alp[i + 1] * -math.expm1(-big) if eta else alp[i + 1] * (1 - en[i])
            var = -math.expm1(-2 * eta * h) if eta else 0.0
        else:
            if not math.isfinite(lam[i]) and eta > 0:
                raise ValueError(
                    f"{name}: the noise form has no finite step from α = 0 (λ = −∞) with "
                    "eta > 0; start at t_max_finite (the logsnr and karras schedules do)"
                )
            s_t, c_half = -(1 + eta) * sig[i + 1], math.expm1(h) / 2
            p2 = _pn(2, h) / h if k > 1 else 0.0
            p3 = _pn(3, h) / h**2 if k > 2 else 0.0
            ratio = sig[i + 1] / sig[i] * ((1 + eta) - eta * math.exp(h) if eta else 1.0)
            gain = (1 + eta) * alp[i + 1] * (-math.expm1(-h) if eta else 1 - en[i])
            var = eta * math.expm1(2 * h) if eta else 0.0
        w = [0.0, 0.0, 0.0]
        if k == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            c1 = s_t * (c_half if second == "half" else p2)
            w[0], w[1] = c1 / r0, -c1 / r0
        elif k == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            a = r0 / (r0 + r1)
            f = (1.0 if reference else 2.0) / (r0 + r1)
            # D1 = (1 + a)·D1_0 − a·D1_1, D2 = f·(D1_0 − D1_1), expanded onto m_0, m_1, m_2
            d1 = ((1 + a) / r0, -(1 + a) / r0 - a / r1, a / r1)
            d2 = (f / r0, -f / r0 - f / r1, f / r1)
            w = [s_t * (p2 * u + p3 * v) for u, v in zip(d1, d2)]
        std = sig[i + 1] * math.sqrt(var) * s_noise
        if data:  # the order-1 term's x̂_0 is m_0 itself
            w[0] += gain
            row = Row(ratio, tuple(w[:k]), (), std)
        else:
            row = Row(ratio, (gain,), tuple(w[:k]) if k > 1 else (), std)
        rows.append(row)
    return update_rules(grid, rows)
