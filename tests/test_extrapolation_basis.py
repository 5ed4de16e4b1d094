"""The continuation to σ = 0 (``final="extrapolate"``) fits x̂_0 in the even basis {1, ρ², ρ⁴}
(issue 11): along the exact PF-ODE path x̂_0 is even in ρ, so the fit error falls as ρ⁶; the odd
basis {1, ρ², ρ³} it replaced falls as ρ⁴. Checked on the exact path of gmm2d and gmm64 (EDM,
x̂_0 of the exact mixture at three points ρ = h, 2h, 3h, against the exact x(0))."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.bench import solve_pf_ode
from diffsolve.solvers._expint import extrapolate_to_zero

from .conftest import rel_err


def _odd_fit(rhos, vals):
    r = torch.tensor(rhos, dtype=torch.float64)
    w = torch.linalg.inv(torch.stack([r**0, r**2, r**3], 1))[0].tolist()
    return sum(wi * v for wi, v in zip(w, vals))


@pytest.mark.parametrize("name", ["g2", "g64"])
def test_even_basis_is_sixth_order_on_the_exact_path(name, request):
    """Measured errors at h = 0.005 / 0.0025 / 0.00125: even 7.6e-7 / 1.3e-8 / 2.1e-10 (gmm2d),
    1.4e-8 / 2.2e-10 / 3.5e-12 (gmm64): slope 5.90 / 5.98; odd {1, ρ², ρ³}: 5.9e-6 / 4.5e-7 /
    2.9e-8 and 5.0e-7 / 3.3e-8 / 2.1e-9 (slope 3.82 / 3.96)."""
    g = request.getfixturevalue(name)
    p = ds.EDM()
    x_T = ds.prior(p, (16, g.dim), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1 = solve_pf_ode(g, p, x_T, p.t_max, 1.0)
    ref = solve_pf_ode(g, p, x1, 1.0, 0.0)
    hs = [0.005, 0.0025, 0.00125]
    even, odd = [], []
    for h in hs:
        rhos = [h, 2 * h, 3 * h]  # newest (smallest ρ) first, as continue_to_zero passes them
        vals = [g.x0_mean(solve_pf_ode(g, p, x1, 1.0, r), 1.0, r) for r in rhos]
        even.append(rel_err(extrapolate_to_zero(rhos, vals), ref))
        odd.append(rel_err(_odd_fit(rhos, vals), ref))
    slope = np.polyfit(np.log(hs), np.log(even), 1)[0]
    slope_odd = np.polyfit(np.log(hs), np.log(odd), 1)[0]
    assert slope > 5.3, (even, slope)
    assert abs(slope_odd - 4.0) < 0.5, (odd, slope_odd)
    assert all(e < o for e, o in zip(even, odd))
