"""Mean-reverting diffusion (IR-SDE) as a Gaussian path in x − μ, and the MRS sampler.

Model: data x_0 ~ a Gaussian mixture, μ a degraded image drawn independently of x_0 (another
mixture sample plus noise, fixed per sample), so y = x − μ has data y_0 = x_0 − μ: a shifted
mixture, whose exact denoiser is the mixture's at y + α·μ = α·x_0 + σ·ε. The same identity gives
the exact reference: z = x − (1 − α_t)·μ follows the *unshifted* mixture's probability-flow ODE
on the same (α, σ), so ``solve_pf_ode`` runs on z (``_solve`` below).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.bench import gmm2d, gmm3072, solve_pf_ode
from diffsolve.bench.gmm import GaussianMixture
from diffsolve.noise import Noise, NoiseSource
from diffsolve.processes.mean_reverting import MeanReverting, theta_table
from diffsolve.solvers.base import Grid
from diffsolve.solvers.sde_basic import EulerMaruyama

from .conftest import rel_err

LAM = 0.5


def _problem(gmm, n: int, seed: int = 0, process: MeanReverting | None = None):
    p = process or MeanReverting(lam=LAM)
    gen = torch.Generator().manual_seed(seed)
    mu = gmm.sample(n, generator=gen) + 0.3 * torch.randn(
        n, *gmm.shape, generator=gen, dtype=torch.float64
    )
    x_T = p.prior((n, *gmm.shape), generator=gen, dtype=torch.float64, mu=mu)
    return p, mu, x_T


def _solve(gmm, p, mu, x, t_from: float, t_to: float) -> torch.Tensor:
    """Exact PF-ODE of the mean-reverting mixture model, x at t_from → t_to (0: σ = 0)."""
    a_from = float(p.alpha(t_from))
    z = solve_pf_ode(gmm, p, x - (1 - a_from) * mu, t_from, t_to)
    a_to = 1.0 if t_to == 0 else float(p.alpha(t_to))
    return z + (1 - a_to) * mu


# -- the process ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_process_matches_irsde_tables(kind):
    """α, σ at the grid points are IR-SDE's (thetas_cumsum − θ_0, dt from eps), e^{−θ̄_T} = eps,
    g² = 2λ²θ, f = −θ, derivatives match finite differences, λ inverts, the network time is the
    discrete index."""
    p = MeanReverting(lam=0.3, theta=kind, steps=100, eps=0.005)
    th = theta_table(kind, 100)
    cum = np.cumsum(th) - th[0]
    dt = -math.log(0.005) / cum[-1]
    n = torch.arange(1, 101)
    t = n.double() / 100
    a = torch.from_numpy(np.exp(-cum * dt))[1:]
    assert float((p.alpha(t) - a).abs().max()) < 1e-14
    assert float((p.sigma(t) - 0.3 * torch.sqrt(1 - a**2)).abs().max()) < 1e-14
    assert float(p.alpha(1.0)) == pytest.approx(0.005, rel=1e-12)
    assert float((p.model_time(t) - n).abs().max()) < 1e-12
    tm = (n[:-1].double() + 0.37) / 100  # off the grid points, where θ is discontinuous
    theta = p.theta(tm)
    assert float((p.diffusion_sq(tm) / (2 * 0.3**2 * theta) - 1).abs().max()) < 1e-12
    assert float((p.drift_coef(tm) + theta).abs().max()) < 1e-12
    e = 1e-7
    fd_a = (p.alpha(tm + e) - p.alpha(tm - e)) / (2 * e)
    fd_s = (p.sigma(tm + e) - p.sigma(tm - e)) / (2 * e)
    # central differences in float64: ~1e-6 relative where σ' is small (round-off in σ)
    assert float(((p.d_alpha(tm) - fd_a) / fd_a).abs().max()) < 1e-5
    assert float(((p.d_sigma(tm) - fd_s) / fd_s).abs().max()) < 1e-5
    assert float((p.t_of_lambda(p.lambda_(tm)) - tm).abs().max()) < 1e-12
    # θ schedules as IR-SDE: cosine θ_n = 1 − ᾱ_{n+1}/ᾱ_0 rises from ~0 to ~1
    if kind == "cosine":
        assert 0 < th[0] < 1e-3 and 0.99 < th[-1] <= 1.0


def test_prior_and_offset():
    p = MeanReverting(lam=0.2)
    mu = torch.full((3, 4), 0.7, dtype=torch.float64)
    x = p.prior((3, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64, mu=mu)
    y = p.prior((3, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(x - mu, y, rtol=0, atol=1e-15) and p.prior_std() == 0.2
    with pytest.raises(ValueError, match="cond="):
        p.offset({})
    with pytest.raises(ValueError, match="theta"):
        MeanReverting(theta="quadratic")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score", "velocity"])
def test_every_prediction_gives_the_same_sample(prediction):
    """The exact network in each parameterisation (MRS's v = λ·α·ε − (σ/λ)·(x_0 − μ)) converts to
    the same (x̂_0, ε̂) on the path in y: the samples agree to float64 round-off."""
    g = gmm2d()
    p, mu, x_T = _problem(g, 16)
    base = ds.sample(g.denoiser(p, "eps"), x_T, "mrs", nfe=8, cond={"mu": mu})
    got = ds.sample(g.denoiser(p, prediction), x_T, "mrs", nfe=8, cond={"mu": mu})
    assert rel_err(got, base) < 1e-12


def test_network_sees_x_and_mrs_conversions():
    """The network receives x = y + μ (and μ); its x0 and v outputs follow MRS's
    ``convert_model_output``: x̂_0 = α·x − (σ/λ_∞)·v + (1 − α)·μ and, from ε,
    x̂_0 = (x − σ·ε̂)/α − μ·(1 − α)/α."""
    g = gmm2d()
    p, mu, x_T = _problem(g, 5)
    t = 0.4
    a, s = float(p.alpha(t)), float(p.sigma(t))
    x = x_T * 0.9  # any point
    seen = {}

    def spy(prediction):
        den = g.denoiser(p, prediction)
        inner = den.net

        def net(xx, tt, **cond):
            seen[prediction] = (xx, cond["mu"])
            return inner(xx, tt, **cond)

        den.net = net
        return den

    preds = {k: spy(k)(x - mu, t, mu=mu) for k in ("eps", "x0", "v")}
    raw = {
        k: g.denoiser(p, k).net(x, torch.tensor([t], dtype=torch.float64), mu=mu)
        for k in ("eps", "x0", "v")
    }
    assert torch.allclose(seen["eps"][0], x, rtol=0, atol=1e-15)
    assert torch.equal(seen["eps"][1], mu)
    x0_eps = (x - s * raw["eps"]) / a - mu * (1 - a) / a
    x0_v = a * x - s / LAM * raw["v"] + (1 - a) * mu
    for k in preds:
        assert rel_err(preds[k].x0 + mu, x0_eps) < 1e-12
    assert rel_err(raw["x0"], x0_eps) < 1e-12 and rel_err(x0_v, x0_eps) < 1e-12
    y = x - mu
    for k in ("x0", "v"):
        back = p.from_path(p.to_path(raw[k], y, mu, a, s, k), y, mu, a, s, k)
        assert rel_err(back, raw[k]) < 1e-14


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_cfg_doubles_mu_with_the_batch(prediction):
    """CFG on a mean-reverting model: μ sits in both branches' conditioning (``uncond`` holds it
    too), the doubled call shifts each half by its own μ; identical branches give the unguided
    sample exactly at any scale (measured: bit-identical)."""
    g = gmm2d()
    p, mu, x_T = _problem(g, 4)
    m = g.denoiser(p, prediction)
    plain = ds.sample(m, x_T, "mrs", nfe=8, cond={"mu": mu})
    guided = ds.sample(ds.CFG(m, 3.0, uncond={"mu": mu}), x_T, "mrs", nfe=8, cond={"mu": mu})
    assert rel_err(guided, plain) < 1e-14


# -- MRS: the paper's updates, identities, orders -------------------------------------------------
def test_mrs_is_the_official_update_in_x():
    """Official ``MRSampler`` formulas written in x (μ terms explicit) on a non-uniform grid:
    ODE data order 1–2 (``step_ode_1st/2nd``) and noise order 1."""
    g = gmm2d()
    p, mu, x_T = _problem(g, 4)
    m = g.denoiser(p, "eps")
    times = torch.tensor([1.0, 0.8, 0.55, 0.4, 0.2], dtype=torch.float64)
    al, si, la = p.alpha(times).tolist(), p.sigma(times).tolist(), p.lambda_(times).tolist()
    for order, par in [(1, "data"), (2, "data"), (1, "noise")]:
        x, q = x_T, []
        for i in range(1, len(times)):
            pred = m(x - mu, float(times[i - 1]), mu=mu)
            q.insert(0, pred.x0 + mu if par == "data" else pred.eps)  # official: x̂_0 in x
            h = la[i] - la[i - 1]
            if par == "noise":
                x = al[i] / al[i - 1] * x - si[i] * math.expm1(h) * q[0]
                x = x + mu * (1 - al[i] / al[i - 1])
                continue
            d = math.expm1(-h) * q[0]
            if order == 2 and i > 1:
                r = (la[i - 1] - la[i - 2]) / h
                d = d - (math.expm1(-h) / h + 1) * (q[0] - q[1]) / r
            x = si[i] / si[i - 1] * x - al[i] * d
            x = x + mu * (1 - si[i] / si[i - 1] + si[i] / si[i - 1] * al[i - 1] - al[i])
        got = ds.sample(
            m, x_T, "mrs", times=times, final="tmin", cond={"mu": mu}, order=order,
            parameterization=par, lower_order_final=False,
        )  # fmt: skip
        assert rel_err(got, x) < 1e-12, (order, par)


IDENTITIES = [
    ({"order": 1}, "euler", {}),
    ({"order": 2}, "dpmpp_2m", {"solver_type": "heun", "lower_order_final": False}),
    ({"order": 2, "parameterization": "noise"}, "dpm_solver", {"solver_type": "taylor"}),
    (
        {"order": 3, "parameterization": "noise"},
        "dpm_solver",
        {"order": 3, "solver_type": "taylor"},
    ),
    ({"order": 1, "solver_type": "sde"}, "ddpm", {}),
    ({"order": 2, "solver_type": "sde"}, "dpmpp_2m_sde", {"solver_type": "heun"}),
    (
        {"order": 2, "solver_type": "sde", "parameterization": "noise"},
        "sde_dpm_solver",
        {"solver_type": "heun"},
    ),
]


@pytest.mark.parametrize(("opts", "peer", "peer_opts"), IDENTITIES, ids=str)
def test_mrs_is_dpm_solver_on_y(opts, peer, peer_opts):
    """MRS is the DPM-Solver family on y = x − μ (Taylor 2nd-order weights): identical samples
    (same noise stream for the SDEs), 8 steps to t_min; measured ≤ 4e-15."""
    g = gmm2d()
    p, mu, x_T = _problem(g, 8)
    m = g.denoiser(p, "eps")
    kw = {"steps": 8, "final": "tmin", "cond": {"mu": mu}}
    if "lower_order_final" in peer_opts:
        opts = {**opts, "lower_order_final": False}

    def noise():
        return NoiseSource(torch.Generator().manual_seed(5))

    got = ds.sample(m, x_T, "mrs", noise=noise(), **kw, **opts)
    want = ds.sample(m, x_T, peer, noise=noise(), **kw, **peer_opts)
    assert rel_err(got, want) < 1e-13


class _Bound:
    """The Denoiser with μ bound, as the sampling loop hands it to a solver."""

    def __init__(self, model, mu):
        self.model, self.mu = model, mu

    def point(self, t, like):
        return self.model.point(t, like)

    def __call__(self, x, t):
        return self.model(x, t, mu=self.mu)


HS = (0.1, 0.05, 0.025)
ORDERS = [
    ({"order": 1}, 0, 1),
    ({"order": 2}, 1, 2),
    ({"order": 3}, 2, 3),
    ({"order": 1, "parameterization": "noise"}, 0, 1),
    ({"order": 2, "parameterization": "noise"}, 1, 2),
    ({"order": 3, "parameterization": "noise"}, 2, 3),
    ({"order": 3, "reference": True}, 2, 2),  # the official D2: second order
]
_EXACT: dict = {}


@pytest.mark.parametrize(("opts", "history", "expected"), ORDERS, ids=str)
def test_mrs_ode_order(g64, opts, history, expected):
    """Local truncation error of one step of size h in λ from the exact solution at λ_s = 1 on
    the mean-reverting gmm64 (cosine θ, λ_∞ = 0.5), history at the exact solution (the method
    of ``test_dpm_solver``); order = log-log slope over h = 0.1, 0.05, 0.025 minus one. The
    official D2 is measured at h/4 (its O(h³) term has a small constant). Measured: 1.00,
    2.01, 3.00 (data), 1.00, 1.97, 2.99 (noise), 1.92 (official D2); errors at h = 0.025:
    2.1e-5, 2.7e-7, 1.1e-8 (data)."""
    p, mu, x_T = _problem(g64, 4)
    model = _Bound(g64.denoiser(p, "eps"), mu)
    hs = tuple(h / 4 for h in HS) if opts.get("reference") else HS
    lam = [[1.0 + (j - 2) * h for j in range(4)] for h in hs]
    todo = sorted({lv for row in lam for lv in row})  # increasing λ = decreasing t
    x, t_prev = x_T, p.t_max
    for lv in todo:
        if lv not in _EXACT:
            t = float(p.t_of_lambda(lv))
            _EXACT[lv] = _solve(g64, p, mu, x, t_prev, t)
        x, t_prev = _EXACT[lv], float(p.t_of_lambda(lv))
    errs = []
    solver = ds.get_solver("mrs", lower_order_final=False, **opts)
    for row in lam:
        row = row[2 - history :]
        times = p.t_of_lambda(torch.tensor(row, dtype=torch.float64))
        grid = Grid.build(p, times, clean_end=False)
        state = solver.init(x_T, grid, model)
        y = _EXACT[row[0]] - mu
        for i in range(grid.steps):
            y, state = solver.step(y, i, state, model)
            if i < history:
                y = _EXACT[row[i + 1]] - mu
        errs.append(rel_err(y + mu, _EXACT[row[-1]]))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0] - 1
    assert abs(slope - expected) <= 0.3, (slope, errs)


# -- acceptance -----------------------------------------------------------------------------------
def test_mrs_ode_nfe10_against_exact():
    """Acceptance (issue 4), image-sized model: gmm3072 with μ = another mixture sample + 0.3·z,
    cosine θ, λ_∞ = 0.5, 4 samples, NFE 10 (logsnr grid, clean end), relative RMSE to the exact
    ODE continued to σ = 0. Measured: noise-form order 3 8.2e-3 (within 1e-2); data-form
    order 2 (MRS's default) 2.6e-2, order 3 4.4e-2; first order 7.0e-2 — every higher order
    beats DDIM."""
    g = gmm3072()
    p, mu, x_T = _problem(g, 4)
    ref = _solve(g, p, mu, x_T, p.t_max, 0)
    m = g.denoiser(p, "eps")

    def err(**opts):
        return rel_err(ds.sample(m, x_T, "mrs", nfe=10, cond={"mu": mu}, **opts), ref)

    best = err(order=3, parameterization="noise")
    assert best < 1e-2, best
    first = err(order=1)
    assert err(order=2) < 0.5 * first and err(order=3) < first, first


class _Probe(Noise):
    """Noise that is 1 for sample i + 2 at step i and 0 elsewhere (see below)."""

    def randn(self, x: torch.Tensor, i: int, stage: int = 0) -> torch.Tensor:
        z = torch.zeros_like(x)
        if i + 2 < x.shape[0]:
            z[i + 2] = 1.0
        return z


def _exact_gaussian_w2(model, p, solver, nfe: int, **opts) -> float:
    """Exact W2 between a sampler's output law and N(0.5, 0.1²), no Monte Carlo.

    On Gaussian data x̂_0 is affine in x, so every sampler here maps (x_T, z_0, z_1, …) to
    out = A·x_T + Σ_i B_i·z_i + c. One batch reads the coefficients off: x_T = 0 and no noise
    (c), x_T = 1 (A + c), and a unit noise at step i only (B_i + c). With x_T drawn from the
    exact marginal at t_max (μ = 0): E out = A·α_T·0.5 + c, Var out = A²(α_T²·0.01 + σ_T²) + ΣB_i²,
    and the law is Gaussian, so W2 = sqrt((E − 0.5)² + (sd − 0.1)²).
    """
    b = nfe + 3
    x_T = torch.zeros(b, 1, dtype=torch.float64)
    x_T[1] = 1.0
    mu = torch.zeros_like(x_T)
    out = ds.sample(model, x_T, solver, nfe=nfe, cond={"mu": mu}, noise=_Probe(), **opts)[:, 0]
    c, gain = out[0], out[1] - out[0]
    a_T, s_T = float(p.alpha(p.t_max)), float(p.sigma(p.t_max))
    mean = float(gain * a_T * 0.5 + c)
    var = float(gain**2 * (a_T**2 * 0.01 + s_T**2) + ((out[2:] - c) ** 2).sum())
    return math.hypot(mean - 0.5, math.sqrt(var) - 0.1)


def test_mrs_sde_vs_euler_maruyama():
    """Extras §14's model: Gaussian data N(0.5, 0.1²), μ = 0, IR-SDE's official schedule (cosine,
    T = 100, eps = 0.005, λ_∞ = 50/255); exact W2 of each sampler's output law (no sampling
    noise, ``_exact_gaussian_w2``). Measured:

    ============  ======  ======  ======
    MRS-SDE       NFE 20  NFE 40  NFE 80
    ============  ======  ======  ======
    noise, 1      2.2e-3  4.4e-4  5.8e-5
    noise, 2      1.5e-3  4.9e-4  1.8e-4
    data, 1       2.0e-2  1.1e-2  5.7e-3  (= ddpm)
    data, 2       8.6e-3  2.0e-3  4.1e-4
    ============  ======  ======  ======

    Euler–Maruyama (uniform t / logsnr): NFE 100 4.6e-3 / 3.7e-3, 200 8.1e-4 / 2.1e-3,
    400 6.9e-4 / 8.9e-4, 800 3.9e-4 / 4.1e-4. So the noise-form MRS-SDE at NFE 40 beats EM at
    NFE 400 (≥ 10× fewer calls); the data form (MRS's default, the stable one at NFE ≤ 10)
    needs ~5× fewer (NFE 40 ≈ EM-logsnr at 200; NFE 80 ≈ EM at 800)."""
    g = GaussianMixture(
        torch.ones(1, dtype=torch.float64),
        torch.full((1, 1), 0.5, dtype=torch.float64),
        torch.full((1, 1), 0.01, dtype=torch.float64),
        None,
        (1,),
        "gauss1d",
    )
    p = MeanReverting(lam=50 / 255)
    m = g.denoiser(p, "eps")
    em = {
        (nfe, sch): _exact_gaussian_w2(m, p, EulerMaruyama(), nfe, schedule=sch)
        for nfe in (100, 400)
        for sch in ("uniform", "logsnr")
    }
    best_em = {nfe: min(em[(nfe, "uniform")], em[(nfe, "logsnr")]) for nfe in (100, 400)}
    for order in (1, 2):
        w = _exact_gaussian_w2(m, p, "mrs", 40, solver_type="sde", order=order,
                               parameterization="noise")  # fmt: skip
        assert w < best_em[400], (order, w, em)
    w = _exact_gaussian_w2(m, p, "mrs", 40, solver_type="sde", order=2)
    assert w < 0.6 * best_em[100], (w, em)
