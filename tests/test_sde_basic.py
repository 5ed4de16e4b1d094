"""Score-SDE samplers: Euler–Maruyama (strong and weak order 1 on a fixed Brownian path, PF-ODE
Euler at noise_scale 0) and the predictor–corrector sampler (official update formulas, exact
nfe budgets, the target distribution on gmm2d)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.bench import sliced_w2
from diffsolve.noise import BrownianTree, NoiseSource
from diffsolve.solvers.base import Grid, get_solver

from .conftest import prior64, reference, rel_err, sd_process


def _slope(steps, errors) -> float:
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def _moments(gmm, alpha: float = 1.0, sigma: float = 0.0):
    """Exact mean and covariance of the mixture's marginal α·x_0 + σ·ε."""
    cov_k = torch.diag_embed(gmm.eigvals)
    if gmm.eigvecs is not None:
        cov_k = gmm.eigvecs @ cov_k @ gmm.eigvecs.transpose(1, 2)
    w, mk = gmm.weights, gmm.means
    mu = (w[:, None] * mk).sum(0)
    second = (w[:, None, None] * (cov_k + mk[:, :, None] * mk[:, None, :])).sum(0)
    cov = second - mu[:, None] * mu[None, :]
    return alpha * mu, alpha**2 * cov + sigma**2 * torch.eye(len(mu), dtype=cov.dtype)


# -- Euler–Maruyama ----------------------------------------------------------------------------
@pytest.mark.parametrize("noise_scale", [1.0, 0.5])
def test_em_one_step_is_the_formula(g64, noise_scale):
    """x' = x − Δ·[f·x + ½(g² + γ²)·ε̂/σ] + γ·sqrt(Δ)·z with γ² = noise_scale²·gamma_sq."""
    p = sd_process()
    m = g64.denoiser(p)
    times = torch.tensor([0.7, 0.55], dtype=torch.float64)
    x = prior64(p, n=3) * float(p.alpha(0.7))
    seeds = [4, 5, 6]
    out = ds.sample(
        m,
        x,
        "euler_maruyama",
        times=times,
        final="tmin",
        noise_scale=noise_scale,
        noise=NoiseSource.from_seeds(seeds),
    )
    z = NoiseSource.from_seeds(seeds).randn(x, 0)  # step 0's noise (stage 0)
    t, d = 0.7, 0.15
    f, g2 = float(p.drift_coef(t)), float(p.diffusion_sq(t))
    gam2 = noise_scale**2 * float(p.gamma_sq(t))
    eps = m(x, t).eps
    ref = x - d * (f * x + 0.5 * (g2 + gam2) * eps / float(p.sigma(t))) + math.sqrt(gam2 * d) * z
    assert rel_err(out, ref) < 1e-12


def test_em_last_step_returns_x0(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=3)
    out = ds.sample(m, x_T, "euler_maruyama", steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, m(x_T, p.t_max).x0)


def test_em_without_noise_is_pf_ode_euler_order_1(g64):
    """noise_scale = 0 is Euler's method on the PF-ODE in t: relative RMSE to the exact
    solution at t_min on the uniform grid; measured 0.029, 0.0148, 0.0074 at 32/64/128 steps
    (slope 0.98)."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p)
    ref = reference(g64, p, x_T, p.t_min)
    steps = [32, 64, 128]
    errs = [
        rel_err(ds.sample(m, x_T, "euler_maruyama", steps=k, final="tmin", noise_scale=0.0), ref)
        for k in steps
    ]
    assert abs(_slope(steps, errs) - 1.0) <= 0.3, errs
    # no noise is drawn at all
    grid = Grid.build(p, torch.tensor([1.0, 0.5], dtype=torch.float64), True)
    assert get_solver("euler_maruyama", noise_scale=0.0).init(x_T, grid, m, None).noise is None


def _em(m, x_T, k, t_end, noise):
    p = m.process
    times = torch.linspace(p.t_max, t_end, k + 1, dtype=torch.float64)
    return ds.sample(m, x_T, "euler_maruyama", times=times, final="tmin", noise=noise)


def test_em_strong_order_1_on_one_brownian_path(g2):
    """Same Brownian path (a BrownianTree in t) at every step count, gmm2d, 256 samples, SD
    process from t = 1 to t = 0.2 on uniform grids: the relative RMSE to the 256-step EM
    solution falls at order 1 (the noise is additive, so EM is Milstein's method). Measured:
    0.178, 0.082, 0.038 at 8/16/32 steps (slope 1.12; the fine run's own error steepens it a
    little). Another Brownian path gives 1.41: without a shared path nothing converges."""
    p = sd_process()
    m = g2.denoiser(p)
    x_T = ds.prior(p, (256, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tree = BrownianTree.from_seeds(range(256))
    fine = _em(m, x_T, 256, 0.2, tree)
    steps = [8, 16, 32]
    errs = [rel_err(_em(m, x_T, k, 0.2, tree), fine) for k in steps]
    assert abs(_slope(steps, errs) - 1.0) <= 0.3, errs
    other = _em(m, x_T, 32, 0.2, BrownianTree.from_seeds(range(1000, 1256)))
    assert rel_err(other, fine) > 10 * errs[-1]


def test_em_weak_order_1_on_moments(g2):
    """2048 gmm2d samples, SD process, t = 1 → 0.2, one Brownian path per sample for every step
    count (so the Monte-Carlo noise cancels between runs). Weak error: the covariance of the
    k-step samples against the Richardson limit 2·C_256 − C_128 of the 256- and 128-step
    covariances; measured 0.051, 0.024, 0.0119 at 16/32/64 steps (slope 1.05). The 256-step
    covariance and mean match the exact mixture marginal at t = 0.2 within Monte-Carlo error
    (measured 0.021 and 0.017 relative; MC standard error ≈ 0.02)."""
    p = sd_process()
    m = g2.denoiser(p)
    n, t_end = 2048, 0.2
    x_T = ds.prior(p, (n, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tree = BrownianTree(7)
    fine = _em(m, x_T, 256, t_end, tree)
    c_fine = torch.cov(fine.T)
    limit = 2 * c_fine - torch.cov(_em(m, x_T, 128, t_end, tree).T)
    steps = [16, 32, 64]
    errs = []
    for k in steps:
        x = _em(m, x_T, k, t_end, tree)
        errs.append(float((torch.cov(x.T) - limit).norm() / limit.norm()))
    assert abs(_slope(steps, errs) - 1.0) <= 0.3, errs
    mu, cov = _moments(g2, float(p.alpha(t_end)), float(p.sigma(t_end)))
    assert float((c_fine - cov).norm() / cov.norm()) < 0.06
    assert float((fine.mean(0) - mu).norm() / cov.diagonal().sum().sqrt()) < 0.06


# -- predictor–corrector -------------------------------------------------------------------------
@pytest.mark.parametrize("corrector_steps", [0, 1, 2, 3])
@pytest.mark.parametrize("nfe", [1, 2, 7, 10])
def test_pc_nfe_budget_is_exact(g64, corrector_steps, nfe):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=2)
    _, info = ds.sample(
        m,
        x_T,
        "pc",
        nfe=nfe,
        corrector_steps=corrector_steps,
        return_info=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert info.nfe == nfe
    assert info.steps == -(-nfe // (corrector_steps + 1))
    solver = get_solver("pc", corrector_steps=corrector_steps)
    assert solver.nfe_of(5, True) == 5 * (corrector_steps + 1)


def test_pc_default_snr():
    pc = get_solver("pc")
    assert pc.snr_for(ds.VE()) == 0.16 and pc.snr_for(ds.EDM()) == 0.16
    assert pc.snr_for(sd_process()) == 0.01 and pc.snr_for(ds.VPLinear()) == 0.01
    assert get_solver("pc", snr=0.2).snr_for(ds.VE()) == 0.2


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_pc_one_step_is_the_official_update(g64, kind):
    """One corrector step then one reverse-diffusion predictor step, against the formulas of
    score_sde_pytorch (LangevinCorrector with batch-averaged norms; ReverseDiffusionPredictor
    with VE G² = σ_i² − σ_{i−1}², VP f = (sqrt(1 − β) − 1)x, G = sqrt(β))."""
    if kind == "ve":
        p = ds.VE(sigma_min=0.01, sigma_max=50.0)
        times = torch.tensor([0.6, 0.59], dtype=torch.float64)
    else:
        p = sd_process()
        times = p.time_of_index([500, 499])
    m = g64.denoiser(p)
    t0, t1 = float(times[0]), float(times[1])
    a0, a1, s0, s1 = (float(v) for v in (p.alpha(t0), p.alpha(t1), p.sigma(t0), p.sigma(t1)))
    x = prior64(p, n=4) * (s0 / float(p.prior_std()))
    seeds = [1, 2, 3, 4]
    out = ds.sample(
        m, x, "pc", times=times, final="tmin", noise=NoiseSource.from_seeds(seeds), snr=0.16
    )
    src = NoiseSource.from_seeds(seeds)
    draws = iter((1, 0))  # the corrector's noise is stage 1 of the step, the predictor's stage 0

    def draw():
        return src.randn(x, 0, next(draws))

    score = lambda v: -m(v, t0).eps / s0  # noqa: E731
    # corrector: α_i = 1 − β_i = (α_{t_i}/α_{t_{i−1}})² (1 on VE)
    alpha_i = (a0 / a1) ** 2
    z = draw()
    g = score(x)
    step = 2 * alpha_i * (0.16 * z.norm(dim=1).mean() / g.norm(dim=1).mean()) ** 2
    x = x + step * g + torch.sqrt(2 * step) * z
    # predictor
    if kind == "ve":
        g2 = s0**2 - s1**2
        ref = x + g2 * score(x) + math.sqrt(g2) * draw()
    else:
        beta = 1 - (a0 / a1) ** 2
        ref = x - (math.sqrt(1 - beta) - 1) * x + beta * score(x) + math.sqrt(beta) * draw()
    assert rel_err(out, ref) < 1e-12


def test_pc_samples_the_mixture(g2):
    """Song et al.'s test (a) at 200 steps: PC (reverse diffusion + 1 Langevin step, snr 0.16)
    and the predictor alone on VE(0.01, 50), 2000 gmm2d samples. Each sample is assigned to its
    nearest component (Mahalanobis); mode weights and the mean squared Mahalanobis distance
    (2 for exact samples in 2-D; MC standard error 0.045) are compared with the mixture's.
    Measured: PC max weight error 0.0125, mean distance² 2.04; predictor only 0.0117, 2.09
    (exact data samples: 0.009, 1.92). Sliced W2 to data is at its MC floor (≈ 0.05–0.08)
    for both and not discriminative here."""
    p = ds.VE(sigma_min=0.01, sigma_max=50.0)
    m = g2.denoiser(p)
    n = 2000
    x_T = ds.prior(p, (n, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = g2.sample(n, generator=torch.Generator().manual_seed(1))
    cov_k = g2.eigvecs @ torch.diag_embed(g2.eigvals) @ g2.eigvecs.transpose(1, 2)
    prec = torch.linalg.inv(cov_k)

    def modes(x):
        d = x[:, None, :] - g2.means[None]
        q = torch.einsum("bki,kij,bkj->bk", d, prec, d)
        w = torch.bincount(q.argmin(1), minlength=len(g2.weights)) / len(x)
        return float((w - g2.weights).abs().max()), float(q.min(1).values.mean())

    for c in (1, 0):
        x = ds.sample(
            m, x_T, "pc", steps=200, corrector_steps=c, generator=torch.Generator().manual_seed(2)
        )
        w_err, d2 = modes(x)
        assert w_err < 0.03 and abs(d2 - 2.0) < 0.15, (c, w_err, d2)
        assert sliced_w2(x, data) < 0.1


def test_pc_batch_and_sample_norms(g64):
    """snr_norm="sample" makes a sample independent of its batch; "batch" does not."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    seeds = [1, 2, 3, 4]

    def run(sl, norm):
        return ds.sample(
            m, x_T[sl], "pc", steps=4, snr_norm=norm, noise=NoiseSource.from_seeds(seeds[sl])
        )

    whole = run(slice(0, 4), "sample")
    parts = torch.cat([run(slice(0, 1), "sample"), run(slice(1, 4), "sample")])
    assert rel_err(parts, whole) < 1e-14
    whole_b = run(slice(0, 4), "batch")
    parts_b = torch.cat([run(slice(0, 1), "batch"), run(slice(1, 4), "batch")])
    assert rel_err(parts_b, whole_b) > 1e-8


def test_pc_euler_maruyama_predictor_without_corrector_is_em(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=3)
    seeds = [1, 2, 3]
    pc = ds.sample(
        m,
        x_T,
        "pc",
        steps=5,
        corrector_steps=0,
        predictor="euler_maruyama",
        noise=NoiseSource.from_seeds(seeds),
        schedule="uniform",
    )
    em = ds.sample(m, x_T, "euler_maruyama", steps=5, noise=NoiseSource.from_seeds(seeds))
    assert rel_err(pc, em) < 1e-14


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("euler_maruyama", {"noise_scale": -1.0}, "noise_scale"),
        ("euler_maruyama", {"noise_scale": math.inf}, "noise_scale"),
        ("pc", {"corrector_steps": -1}, "corrector_steps"),
        ("pc", {"corrector_steps": 1.5}, "corrector_steps"),
        ("pc", {"snr": 0.0}, "snr"),
        ("pc", {"predictor": "ancestral"}, "predictor"),
        ("pc", {"snr_norm": "mean"}, "snr_norm"),
    ],
)
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        get_solver(name, **opts)


@pytest.mark.parametrize("name", ["euler_maruyama", "pc"])
def test_flow_matching_needs_a_finite_start(g2, name):
    """At t = 1 flow matching has α = 0 and g² = ∞: the uniform grid is refused with a hint;
    the logsnr grid (from t_max_finite) samples the mixture (relative covariance error at 41
    NFE, 500 samples: euler_maruyama 0.023, pc 0.061; MC standard error ≈ 0.06)."""
    p = ds.FlowMatching()
    m = g2.denoiser(p)
    x_T = ds.prior(p, (500, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="t_max_finite"):
        ds.sample(m, x_T, name, nfe=41, schedule="uniform")
    x = ds.sample(
        m, x_T, name, nfe=41, schedule="logsnr", generator=torch.Generator().manual_seed(1)
    )
    _, cov = _moments(g2)
    assert float((torch.cov(x.T) - cov).norm() / cov.norm()) < 0.15
