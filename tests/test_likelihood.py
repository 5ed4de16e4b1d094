"""Exact likelihood through the probability-flow ODE, against the mixtures' closed-form density.

Error budget of ``log_likelihood`` on a mixture (each term measured below with the exact
mixture density, not assumed):

* data end: the estimate is log q(x_0), the density of x_0 + ρ_min·ε; its bias
  log q(x_0) − log p_0(x_0) ≈ ½ρ_min²(Δlog p + |∇log p|²) is computed exactly as
  ``gmm.log_prob(x0, 1, ρ_min) − gmm.log_prob(x0)``: ~3e-4 nats at ρ_min = 1e-3 on both mixtures;
* noise end: the Gaussian N(α·m, α²·C + σ²) with the mixture's exact mean and covariance versus
  the exact noised mixture at x_{t_max}: ≤ 1e-4 nats (σ_max = 100, or VP α_T ≈ 0.0067);
  with the default prior (mean 0, no data covariance) it is ~0.013 nats on gmm64 at σ_max = 100;
* ODE error at rtol = 1e-6: ≤ 2e-4 nats (what is left after the two biases are removed).

Measured (max over the batch; data-end / noise-end / ODE parts):
  gmm2d VPLinear 2.5e-4 (2.5e-4 / 2.5e-8 / 1.1e-4); EDM 1.6e-4 (1.6e-4 / 1.7e-7 / 1.0e-5);
  gmm2d VE 2.5e-4 (2.5e-4 / 8.9e-8 / 1.1e-4); FlowMatching 5.5e-6 (2.5e-8 / 8.9e-11 / 5.5e-6,
  ρ_min = 1e-5); gmm64 VE 1.2e-4 (2.4e-4 / 2.1e-5 / 1.8e-4).
The tests bound the parts at 1e-3 / 1e-4 / 5e-4 and the total at the brief's 0.01 nats.
Hutchinson (Rademacher, gmm2d, 128 runs per probe count): RMS error 0.84 / 0.47 / 0.20 nats at
1 / 4 / 16 probes, a log-log slope of −0.52 (theory −½; −0.51 with 256 runs). On gmm64 one
probe has an RMS error of ~6.7 nats (Rademacher) and ~65 nats (Gaussian, whose variance also
carries the Jacobian's large diagonal): Rademacher is the default.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

import diffsolve as ds
from diffsolve.bench import gmm2d, gmm64
from diffsolve.likelihood import (
    bits_per_dim,
    default_t_min,
    dequantization_shift,
    log_likelihood,
)


def moments(g) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture's exact mean (D,) and covariance (D, D)."""
    w = g.weights
    m = (w[:, None] * g.means).sum(0)
    cov = g.eigvecs @ torch.diag_embed(g.eigvals) @ g.eigvecs.transpose(1, 2)
    outer = g.means[:, :, None] * g.means[:, None, :]
    return m, (w[:, None, None] * (cov + outer)).sum(0) - torch.outer(m, m)


@functools.cache
def _mix(name: str):
    return {"gmm2d": gmm2d, "gmm64": gmm64}[name]()


def _budget(g, proc, x0, lp, info) -> tuple[float, float, float]:
    """(data-end bias, noise-end bias, remaining ODE error), max over the batch, in nats."""
    exact = g.log_prob(x0)
    rho0 = float(proc.rho(info.t_min))
    blur = g.log_prob(x0, 1.0, rho0) - exact
    a1, s1 = float(proc.alpha(info.t_max)), float(proc.sigma(info.t_max))
    prior = g.log_prob(info.x_t_max.double(), a1, s1) - info.prior_logp
    ode = lp - exact - blur + prior  # the estimate uses the Gaussian prior: remove its error
    return float(blur.abs().max()), float(prior.abs().max()), float(ode.abs().max())


CASES_2D = [
    ds.VPLinear(),  # default t_min = 1e-5: ρ_min ≈ 1e-3
    ds.EDM(),  # default t_min = 1e-5·80: ρ_min = 8e-4
    ds.VE(sigma_min=1e-3, sigma_max=100.0),  # t_min = 0: ρ_min = σ_min
    ds.FlowMatching(),  # t_min = 1e-5, t_max = t_max_finite = 0.999 (α = 1e-3 there)
]


@pytest.mark.parametrize("proc", CASES_2D, ids=lambda p: type(p).__name__)
def test_exact_divergence_gmm2d(proc):
    g = _mix("gmm2d")
    m, cov = moments(g)
    x0 = g.sample(8, torch.Generator().manual_seed(1))
    model = g.denoiser(proc, "eps")
    lp, info = log_likelihood(
        model, x0, rtol=1e-6, atol=1e-6, data_mean=m, data_var=cov, return_info=True
    )
    assert lp.shape == (8,) and lp.dtype == torch.float64
    err = float((lp - g.log_prob(x0)).abs().max())
    blur, prior, ode = _budget(g, proc, x0, lp, info)
    assert err < 0.01
    assert blur < 1e-3 and prior < 1e-4 and ode < 5e-4, (blur, prior, ode)


def test_exact_divergence_gmm64():
    g = _mix("gmm64")
    m, cov = moments(g)
    proc = ds.VE(sigma_min=1e-3, sigma_max=100.0)
    x0 = g.sample(3, torch.Generator().manual_seed(1))
    lp, info = log_likelihood(
        g.denoiser(proc, "x0"),
        x0,
        rtol=1e-6,
        atol=1e-6,
        data_mean=m,
        data_var=cov,
        return_info=True,
    )
    err = float((lp - g.log_prob(x0)).abs().max())
    blur, prior, ode = _budget(g, proc, x0, lp, info)
    assert err < 0.01
    assert blur < 1e-3 and prior < 1e-4 and ode < 5e-4, (blur, prior, ode)


def test_default_prior_misses_the_data_mean():
    """Without the data's moments the VE prior N(0, σ_max²) is off at first order in |m|/σ:
    the reason ``data_mean``/``data_var`` exist (0.013–0.024 nats on gmm64 at σ_max = 100)."""
    g = _mix("gmm2d")
    proc = ds.VE(sigma_min=1e-3, sigma_max=100.0)
    x0 = g.sample(4, torch.Generator().manual_seed(2))
    model = g.denoiser(proc, "eps")
    lp0, info = log_likelihood(model, x0, return_info=True)
    exact_prior = g.log_prob(info.x_t_max.double(), 1.0, 100.0)
    lp1 = log_likelihood(model, x0, prior_log_prob=lambda x: g.log_prob(x, 1.0, 100.0))
    # the exact prior replaces exactly the prior term and nothing else
    assert torch.allclose(lp1 - lp0, exact_prior - info.prior_logp, atol=1e-9)
    assert float((lp1 - g.log_prob(x0)).abs().max()) < 2e-3


def test_scipy_dop853_agrees():
    g = _mix("gmm2d")
    model = g.denoiser(ds.VPLinear(), "v")
    x0 = g.sample(2, torch.Generator().manual_seed(4))
    a = log_likelihood(model, x0, rtol=1e-7, atol=1e-7)
    b = log_likelihood(model, x0, rtol=1e-7, atol=1e-7, method="dop853")
    assert float((a - b).abs().max()) < 2e-5  # measured 2.2e-6


class GaussianEps(nn.Module):
    """The exact ε-prediction of N(μ, s²·I) data on VE (the network receives σ), float32."""

    def __init__(self, mu: torch.Tensor, s: float):
        super().__init__()
        self.mu = nn.Parameter(mu.float())
        self.log_s = nn.Parameter(torch.tensor(math.log(s)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, shift=None) -> torch.Tensor:
        s2 = torch.exp(2 * self.log_s)
        sig = sigma.reshape(-1, 1).float()
        mu = self.mu if shift is None else self.mu + shift
        return sig * (x - mu) / (s2 + sig**2)


def test_nn_module_gaussian_hutchinson_per_dim():
    """Song et al.'s acceptance test: N(μ, s²I) data, 16 probes, within 0.01 nats/dim."""
    d, s = 10, 0.5
    mu = torch.linspace(-1, 1, d)
    proc = ds.VE(sigma_min=1e-3, sigma_max=100.0)
    model = ds.Denoiser(GaussianEps(mu, s), proc, "eps")
    x0 = (mu + s * torch.randn(6, d, generator=torch.Generator().manual_seed(0))).float()
    lp = log_likelihood(
        model,
        x0,
        divergence="hutchinson",
        probes=16,
        generator=torch.Generator().manual_seed(1),
        data_mean=mu.double(),
        data_var=s * s,
    )
    exact = torch.distributions.Normal(mu.double(), s).log_prob(x0.double()).sum(1)
    assert float((lp - exact).abs().max()) / d < 0.01
    # per-sample conditioning travels with every stacked replica (16 probes in 3 calls)
    shift = torch.randn(6, d, generator=torch.Generator().manual_seed(2))
    lp, info = log_likelihood(
        model,
        x0 + shift,
        divergence="hutchinson",
        probes=16,
        generator=torch.Generator().manual_seed(1),
        data_mean=mu.double(),
        data_var=s * s,
        cond={"shift": shift},
        max_batch=40,
        return_info=True,
    )
    assert info.nfe == 6 * (info.steps + info.rejected) * 3 + 3  # 6 stages, first one shared
    assert float((lp - exact).abs().max()) / d < 0.01


def test_stacked_replicas_match_one_per_call():
    g = _mix("gmm2d")
    model = g.denoiser(ds.EDM(), "eps")
    x0 = g.sample(3, torch.Generator().manual_seed(8))
    for kw in ({}, {"divergence": "hutchinson", "probes": 5}):
        a = log_likelihood(model, x0, generator=torch.Generator().manual_seed(0), **kw)
        b, info = log_likelihood(
            model,
            x0,
            generator=torch.Generator().manual_seed(0),
            max_batch=3,
            return_info=True,
            **kw,
        )
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
        per_eval = 2 if not kw else 5  # one replica per call: D or the probes
        assert info.nfe == per_eval * (1 + 6 * (info.steps + info.rejected))


@functools.cache
def _hutch_setup():
    g = _mix("gmm64")
    proc = ds.VE(sigma_min=1e-3, sigma_max=100.0)
    model = g.denoiser(proc, "eps")
    x0 = g.sample(2, torch.Generator().manual_seed(5))
    exact = log_likelihood(model, x0, rtol=1e-4, atol=1e-4)
    return model, x0, exact


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased(probe):
    """Replicas of one point follow the same y-trajectory, so the step-size controller (which
    watches y only) picks the exact run's grid: the mean over independent probes must equal the
    exact-divergence result up to Monte-Carlo error alone."""
    model, x0, exact = _hutch_setup()
    reps = 128
    est = log_likelihood(
        model,
        x0.repeat_interleave(reps, 0),
        rtol=1e-4,
        atol=1e-4,
        divergence="hutchinson",
        probe=probe,
        generator=torch.Generator().manual_seed(7),
    ).reshape(2, reps)
    err = est - exact[:, None]
    se = err.std(1) / math.sqrt(reps)
    assert bool((se > 0).all())  # the probes do vary
    assert bool((err.mean(1).abs() < 4 * se).all()), (err.mean(1), se)


def test_hutchinson_error_falls_as_inverse_sqrt_probes():
    g = _mix("gmm2d")
    model = g.denoiser(ds.VPLinear(), "eps")
    x0 = g.sample(1, torch.Generator().manual_seed(3))
    exact = log_likelihood(model, x0)
    reps, ks, rms = 128, [1, 4, 16], []
    for k in ks:
        est = log_likelihood(
            model,
            x0.expand(reps, 2),
            divergence="hutchinson",
            probes=k,
            generator=torch.Generator().manual_seed(k),
        )
        rms.append(float((est - exact).pow(2).mean().sqrt()))
    slope = np.polyfit(np.log(ks), np.log(rms), 1)[0]
    assert abs(slope + 0.5) < 0.1, (rms, slope)


def test_bits_per_dim_by_hand():
    # uniform density on [−1, 1]^D: log p = −D·log 2; as 8-bit data that is exactly 8 bits/dim
    d = 3072
    lp = torch.tensor([-d * math.log(2.0)])
    assert float(bits_per_dim(lp, d, dequantization_shift(8, (-1.0, 1.0)))) == pytest.approx(8.0)
    assert float(bits_per_dim(0.0, (3, 32, 32), dequantization_shift(8, (0.0, 1.0)))) == 8.0
    assert dequantization_shift() == 7.0  # Song et al.: 7 − inverse_scaler(−1) for [−1, 1]
    # a dequantised 2-bit toy on [0, 1): density 4·P(k) on bin k, so bpd = −log2 P(k) exactly
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    k = torch.tensor([0, 1, 2, 3, 3, 2])
    lp = torch.log(4 * probs[k])
    bpd = bits_per_dim(lp, 1, dequantization_shift(2, (0.0, 1.0)))
    assert torch.allclose(bpd, -torch.log2(probs[k]))
    # per-dimension averaging: 0.5 nats over 2 dims
    assert float(bits_per_dim(torch.tensor(-1.0), 2)) == pytest.approx(0.5 / math.log(2))


def test_defaults_and_validation():
    assert default_t_min(ds.VPLinear()) == 1e-5
    assert default_t_min(ds.FlowMatching()) == 1e-5
    assert default_t_min(ds.EDM()) == pytest.approx(8e-4)
    assert default_t_min(ds.VE()) == 0.0
    sd = ds.VPDiscrete.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert default_t_min(sd) == sd.t_min
    g = _mix("gmm2d")
    model = g.denoiser(ds.VPLinear(), "eps")
    x0 = g.sample(2, torch.Generator().manual_seed(0))
    for bad in (
        {"divergence": "trace"},
        {"probe": "sphere"},
        {"method": "rk4"},
        {"probes": 0},
        {"t_min": 0.5, "t_max": 0.4},
        {"t_max": 2.0},
    ):
        with pytest.raises(ValueError):
            log_likelihood(model, x0, **bad)
    with pytest.raises(ValueError):
        bits_per_dim(0.0, 0)
