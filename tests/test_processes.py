"""Processes: α, σ, λ, their inverses and derivatives agree with each other and the literature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffsolve as ds

PROCESSES = {
    "vp-discrete-sd": lambda: ds.VPDiscrete.from_betas("scaled_linear", 0.00085, 0.012, 1000),
    "vp-discrete-ddpm": lambda: ds.VPDiscrete.from_betas("linear", 1e-4, 0.02, 1000),
    "vp-discrete-cos": lambda: ds.VPDiscrete.from_betas("squaredcos_cap_v2", steps=1000),
    "vp-linear": lambda: ds.VPLinear(),
    "vp-cosine": lambda: ds.VPCosine(),
    "ve": lambda: ds.VE(),
    "edm": lambda: ds.EDM(),
    "flow": lambda: ds.FlowMatching(),
    "flow-shift3": lambda: ds.FlowMatching(shift=3.0),
}


def _interior(p, n=41):
    lo, hi = p.t_min, p.t_max_finite
    return torch.linspace(lo + 1e-6 * (hi - lo), hi - 1e-6 * (hi - lo), n, dtype=torch.float64)


@pytest.mark.parametrize("name", PROCESSES)
def test_lambda_is_log_snr_and_decreasing(name):
    p = PROCESSES[name]()
    t = _interior(p)
    lam = p.lambda_(t)
    assert torch.allclose(lam, torch.log(p.alpha(t) / p.sigma(t)), rtol=1e-12, atol=1e-12)
    assert bool((lam[1:] < lam[:-1]).all())
    assert torch.allclose(p.rho(t), p.sigma(t) / p.alpha(t), rtol=1e-12)


@pytest.mark.parametrize("name", PROCESSES)
def test_t_of_lambda_inverts_lambda(name):
    p = PROCESSES[name]()
    t = _interior(p)
    back = p.t_of_lambda(p.lambda_(t))
    assert float((back - t).abs().max()) < 1e-9 * max(1.0, p.t_max)


@pytest.mark.parametrize("name", PROCESSES)
def test_generic_bisection_agrees_with_closed_form_inverse(name):
    p = PROCESSES[name]()
    lam = p.lambda_(_interior(p, 9))
    generic = ds.GaussianProcess.t_of_lambda(p, lam)
    assert torch.allclose(generic, p.t_of_lambda(lam), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", PROCESSES)
def test_derivatives_match_finite_differences(name):
    p = PROCESSES[name]()
    if isinstance(p, ds.VPDiscrete):
        # piecewise-linear log α: compare inside one segment
        t = torch.tensor([0.5005, 0.25075], dtype=torch.float64)
        eps = 1e-7
    else:
        t = _interior(p, 7)[1:-1]
        eps = 1e-6 * max(1.0, p.t_max)
    for f, df in ((p.alpha, p.d_alpha), (p.sigma, p.d_sigma)):
        fd = (f(t + eps) - f(t - eps)) / (2 * eps)
        assert torch.allclose(df(t), fd, rtol=1e-6, atol=1e-8), (f.__name__, df(t), fd)


def test_vp_is_variance_preserving():
    for p in (PROCESSES["vp-discrete-sd"](), ds.VPLinear(), ds.VPCosine()):
        t = _interior(p)
        assert torch.allclose(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)


def test_vp_discrete_hits_table_at_grid_points():
    p = ds.VPDiscrete.from_betas("scaled_linear", 0.00085, 0.012, 1000)
    # the SD table: betas linear in sqrt(beta), alphas_cumprod = cumprod(1 - beta)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ac = np.cumprod(1 - betas)
    k = torch.tensor([0, 1, 499, 998, 999])
    t = p.time_of_index(k)
    assert torch.allclose(p.alpha(t) ** 2, torch.from_numpy(ac[k.numpy()]), rtol=1e-13)
    assert torch.allclose(p.model_time(t), k.double(), atol=1e-9)
    assert p.t_min == 1e-3 and p.t_max == 1.0
    # σ/α at the ends: what k-diffusion / diffusers call sigma_min and sigma_max
    assert math.isclose(float(p.rho(p.t_max)), math.sqrt((1 - ac[-1]) / ac[-1]), rel_tol=1e-12)
    assert math.isclose(float(p.rho(p.t_min)), math.sqrt((1 - ac[0]) / ac[0]), rel_tol=1e-12)


def test_vp_linear_matches_score_sde_formulas():
    p = ds.VPLinear(0.1, 20.0)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    log_mean = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    assert torch.allclose(p.alpha(t), torch.exp(log_mean), rtol=1e-14)
    assert torch.allclose(p.sigma(t), torch.sqrt(1 - torch.exp(2 * log_mean)), rtol=1e-14)


def test_ve_edm_flow_paths():
    ve = ds.VE(0.01, 50.0)
    assert math.isclose(float(ve.sigma(0.0)), 0.01) and math.isclose(float(ve.sigma(1.0)), 50.0)
    assert float(ve.alpha(0.3)) == 1.0
    edm = ds.EDM()
    assert (edm.t_min, edm.t_max) == (0.002, 80.0)
    assert math.isclose(float(edm.model_time(3.0)), 3.0)
    assert edm.prior_std() == 80.0
    fm = ds.FlowMatching()
    assert math.isclose(float(fm.alpha(0.25)), 0.75) and math.isclose(float(fm.sigma(0.25)), 0.25)
    assert fm.t_max == 1.0 and math.isclose(fm.t_max_finite, 0.999)
    assert float(fm.lambda_(1.0)) == -math.inf


def test_flow_shift_is_sd3_formula():
    fm = ds.FlowMatching(shift=3.0)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(fm.shift_time(t), 3 * t / (1 + 2 * t))
    # Flux's exponential shift exp(mu) / (exp(mu) + 1/t - 1) is the same map with s = e^mu
    mu = math.log(3.0)
    tt = t[1:]
    assert torch.allclose(fm.shift_time(tt), math.exp(mu) / (math.exp(mu) + 1 / tt - 1))


def test_prior_scale_and_reproducibility():
    for p, std in ((ds.EDM(), 80.0), (ds.VPLinear(), 1.0), (ds.FlowMatching(), 1.0)):
        g = torch.Generator().manual_seed(3)
        x = ds.prior(p, (4000, 8), generator=g, dtype=torch.float64)
        assert abs(float(x.std()) / std - 1) < 0.02
        x2 = ds.prior(p, (4000, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        assert torch.equal(x, x2)


def test_bad_processes_raise():
    with pytest.raises(ValueError, match="beta schedule"):
        ds.VPDiscrete.from_betas("quadratic-ish")
    with pytest.raises(ValueError, match="decreasing"):
        ds.VPDiscrete([0.5, 0.9])
    with pytest.raises(ValueError):
        ds.EDM(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError):
        ds.FlowMatching(shift=0.0)
