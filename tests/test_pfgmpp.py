"""PFGM++ (Xu et al. 2023): the finite-D prior's radial law, the D → ∞ limit (EDM), and the
finite-D field ODE run by the library's ordinary solvers.

The prior is the kernel p(x) ∝ (‖x‖² + r²)^{−(N+D)/2} at r = σ_max·sqrt(D); its radius has
R²/r² ~ BetaPrime(N/2, D/2) (derivation in ``processes/pfgmpp.py``), checked here against
scipy's BetaPrime CDF and, independently, against the official sampler B ~ Beta(N/2, D/2),
R = r·sqrt(B/(1 − B)) drawn with numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import solve_ivp

import diffsolve as ds
from diffsolve.bench.pfgmpp import exact_points_denoiser
from diffsolve.processes.pfgmpp import PFGMPP

from .conftest import rel_err

N = 64


def _radii(D: float, n: int = 4000, seed: int = 0) -> np.ndarray:
    p = PFGMPP(D)
    x = p.prior((n, N), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.norm(dim=1).numpy()


@pytest.mark.parametrize("D", [4, 128, 2048])
def test_prior_radial_law(D):
    """KS p-values (measured): 0.135 against the exact CDF for each D (the quantile transport
    of the same z gives the same statistic), 0.16 / 0.23 / 0.078 against the official
    Beta sampler (two-sample, 4000 each)."""
    r = _radii(D)
    r_max = 80.0 * math.sqrt(D)
    exact = stats.kstest((r / r_max) ** 2, stats.betaprime(N / 2, D / 2).cdf)
    assert exact.pvalue > 0.01, exact
    rng = np.random.default_rng(1)
    b = rng.beta(N / 2, D / 2, r.size)
    official = stats.ks_2samp(r, r_max * np.sqrt(b / (1 - b)))
    assert official.pvalue > 0.01, official
    # and the direction is uniform: the mean unit vector is ~ N(0, 1/(n·N)) per coordinate
    p = PFGMPP(D)
    x = p.prior((4000, N), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean_dir = (x / x.norm(dim=1, keepdim=True)).mean(0)
    assert float(mean_dir.norm()) < 3 * math.sqrt(1 / 4000), float(mean_dir.norm())


@pytest.mark.parametrize(("D", "tol"), [(128, 0.01), (2048, 0.01)])
def test_prior_second_moment(D, tol):
    """E‖x‖² = σ_max²·N·D/(D − 2) (extras §3 test a). Measured ratio to N·σ_max²: 1.0167
    (theory 1.0159) and 1.0018 (1.0010)."""
    r = _radii(D)
    ratio = float((r**2).mean() / (N * 80.0**2))
    assert abs(ratio / (D / (D - 2)) - 1) < tol, ratio
    assert PFGMPP(D).prior_std() == pytest.approx(80.0 * math.sqrt(D / (D - 2)))


def test_aligned_sampler_tends_to_edm(g64):
    """An EDM-trained model (the exact gmm64 denoiser on σ = t) sampled with PFGM++'s prior at
    r = σ·sqrt(D), the prior coupled to EDM's σ_max·z through the same z: Heun (18 steps,
    Karras) lands on EDM's samples as D → ∞. Measured relative distance 2.4e-2, 2.7e-4,
    2.7e-6 at D = 1e2, 1e4, 1e6 (∝ 1/D)."""
    z = torch.randn(8, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    edm = ds.EDM()
    ref = ds.sample(g64.denoiser(edm, "x0"), 80.0 * z, "heun", steps=18, schedule="karras")
    errs = []
    for D in (1e2, 1e4, 1e6):
        p = PFGMPP(D)
        x_T = p.kernel_from_normal(z)
        errs.append(rel_err(ds.sample(g64.denoiser(p, "x0"), x_T, "heun", steps=18), ref))
    assert errs[0] > 50 * errs[1] > 2500 * errs[2], errs
    assert errs[2] < 1e-5, errs


def _circle(k: int = 8, radius: float = 2.0) -> torch.Tensor:
    ang = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    return radius * torch.stack([ang.cos(), ang.sin()], 1)


@pytest.mark.parametrize("D", [4, 128])
def test_finite_D_heun_reaches_the_data(D):
    """Extras §3 test b: 8 points on a circle of radius 2 (N = 2), the exact finite-D PFGM++
    denoiser, 18 Heun steps from the finite-D prior: every sample lands on a data point and
    each mode gets 1/8 ± 0.01 of 20000 samples (measured: largest distance 3e-8 / 0, largest
    frequency deviation 0.0071 for both D: the same z drives both priors)."""
    pts = _circle()
    p = PFGMPP(D)
    model = exact_points_denoiser(p, pts)
    x_T = p.prior((20000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = ds.sample(model, x_T, "heun", steps=18, schedule="karras")
    d = torch.cdist(out, pts)
    near, idx = d.min(dim=1)
    assert float(near.max()) < 1e-6, float(near.max())
    freq = torch.bincount(idx, minlength=8).double() / out.shape[0]
    assert float((freq - 0.125).abs().max()) < 0.01, freq.tolist()


def _field_ode(model, x: torch.Tensor, s_from: float, s_to: float) -> torch.Tensor:
    """dx/d log σ = x − D(x; σ) by DOP853 at 1e-12 (the PFGM++ field ODE in σ = r/sqrt(D))."""
    shape = x.shape

    def rhs(u: float, y: np.ndarray) -> np.ndarray:
        xs = torch.from_numpy(y).reshape(shape)
        return (xs - model(xs, math.exp(u)).x0).reshape(-1).numpy()

    sol = solve_ivp(
        rhs, (math.log(s_from), math.log(s_to)), x.reshape(-1).numpy(), "DOP853",
        rtol=1e-12, atol=1e-12,
    )  # fmt: skip
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


@pytest.mark.parametrize(("solver", "order"), [("euler", 1), ("dpmpp_2m", 2), ("dpmpp_3m", 3)])
def test_finite_D_ode_is_solved_by_the_same_solvers(solver, order):
    """D = 4 (far from EDM): from the PFGM++ prior at σ = 80 to σ = 0.5 on log-uniform grids,
    each exponential integrator converges to the exact field ODE at its own order: log-log
    slope of the error over 16 → 64 steps within ±0.3 (measured 1.01, 1.94, 2.96; errors at
    64 steps 1.1e-2, 5.5e-4, 5.3e-5)."""
    pts = _circle()
    p = PFGMPP(4)
    model = exact_points_denoiser(p, pts)
    x_T = p.prior((16, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _field_ode(model, x_T, 80.0, 0.5)
    errs = []
    for steps in (16, 32, 64):
        times = torch.logspace(math.log10(80.0), math.log10(0.5), steps + 1, dtype=torch.float64)
        opts = {} if solver == "euler" else {"lower_order_final": False}
        out = ds.sample(model, x_T, solver, times=times, final="tmin", **opts)
        errs.append(rel_err(out, ref))
    slope = math.log(errs[0] / errs[2]) / math.log(4)
    assert abs(slope - order) <= 0.3, (slope, errs)
