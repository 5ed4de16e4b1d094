"""Weak convergence of every SDE sampler on gmm2d (issue 4): the covariance of the samples at
t = 0.2 (SD process, uniform grids from t = 1, ``final="tmin"``) against the Richardson limit of
the 128- and 256-step runs. Every step count uses the same Brownian path per sample
(``BrownianTree``), so the Monte-Carlo noise cancels between runs and 1024 samples resolve
errors of 1e-4. Euler–Maruyama's own weak-order test is in test_sde_basic.py.

Whether a sampler beats first order is judged against the true law instead (closed-form
covariance of the mixture's marginal, x_T from the exact marginal at t_max, N = 131072), since a
Richardson limit built from the sampler's own runs let a first-order sampler pass.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.bench import gmm2d
from diffsolve.noise import BrownianTree, NoiseSource
from tests.conftest import sd_process

gmm2d_cached = functools.cache(gmm2d)

N, T_END = 1024, 0.2


def _slope(steps, errors) -> float:
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def _cov_errors(g2, solver, options, steps, order):
    p = sd_process()
    m = g2.denoiser(p)
    x_T = ds.prior(p, (N, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def cov(k):
        times = torch.linspace(p.t_max, T_END, k + 1, dtype=torch.float64)
        x = ds.sample(m, x_T, solver, times=times, final="tmin", noise=BrownianTree(7), **options)
        return torch.cov(x.T)

    c256, c128 = cov(256), cov(128)
    limit = (2**order * c256 - c128) / (2**order - 1)
    return [float((cov(k) - limit).norm() / limit.norm()) for k in steps]


@pytest.mark.parametrize(
    "solver, options",
    [("ddpm", {}), ("sde_dpm_solver", {"order": 1})],
    ids=["ddpm", "sde_dpm_solver-1"],
)
def test_first_order_samplers_converge_weakly_at_order_one(g2, solver, options):
    """Measured (covariance error at 16/32/64 steps): ddpm 0.092 / 0.047 / 0.023 (slope 0.99),
    sde_dpm_solver order 1: 0.033 / 0.015 / 0.0073 (1.10)."""
    errs = _cov_errors(g2, solver, options, [16, 32, 64], order=1)
    assert abs(_slope([16, 32, 64], errs) - 1.0) <= 0.3, errs


def test_sa_solver_stochastic_is_weakly_second_order(g2):
    """SA-Solver with τ = 1 (predictor 2, corrector 2): 0.067 / 0.019 / 0.0059 at 8/16/32 steps
    against the order-2 Richardson limit (slope 1.75)."""
    errs = _cov_errors(g2, "sa_solver", {"tau": 1.0}, [8, 16, 32], order=2)
    assert abs(_slope([8, 16, 32], errs) - 2.0) <= 0.3, errs


def exact_cov(gmm, alpha: float, sigma: float) -> torch.Tensor:
    """The covariance of the exact marginal α·x_0 + σ·ε, x_0 ~ gmm (closed form, float64)."""
    w, mu = gmm.weights, gmm.means
    d = gmm.dim
    comp = torch.diag_embed(gmm.eigvals)
    if gmm.eigvecs is not None:
        comp = gmm.eigvecs @ comp @ gmm.eigvecs.transpose(1, 2)
    m = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (comp + mu[:, :, None] * mu[:, None, :])).sum(0)
    eye = torch.eye(d, dtype=torch.float64)
    return alpha**2 * (second - torch.outer(m, m)) + sigma**2 * eye


N_TRUE = 131072  # Monte-Carlo floor of the covariance error: 0.0028 (an independent exact set)


@functools.cache
def _true_errors(solver: str, options: tuple, steps: tuple) -> list[float]:
    """Relative covariance error at t = 0.2 against the *true* law (closed form), with x_T drawn
    from the exact marginal at t_max (so the true law at 0.2 is the mixture's marginal there,
    not that of a run from N(0, I))."""
    g, p = gmm2d_cached(), sd_process()
    m = g.denoiser(p)
    gen = torch.Generator().manual_seed(1)
    a_T, s_T = float(p.alpha(p.t_max)), float(p.sigma(p.t_max))
    x_T = a_T * g.sample(N_TRUE, gen) + s_T * torch.randn(N_TRUE, 2, generator=gen).double()
    c = exact_cov(g, float(p.alpha(T_END)), float(p.sigma(T_END)))
    errs = []
    for k in steps:
        times = torch.linspace(p.t_max, T_END, k + 1, dtype=torch.float64)
        x = ds.sample(
            m, x_T, solver, times=times, final="tmin", noise=NoiseSource(7), **dict(options)
        )
        errs.append(float((torch.cov(x.T) - c).norm() / c.norm()))
    return errs


def _beats_first_order(errs: list[float]) -> bool:
    """The weak-order criterion at 16 / 32 steps against the true covariance. First-order
    samplers measure (16 / 32 steps) sde_dpm_solver order 1: 0.043 / 0.018, ddpm 0.087 /
    0.045 (error ∝ 1/k: 0.6/k for the former); the bounds sit at about half of the former."""
    return errs[0] < 0.02 and errs[1] < 0.008


@pytest.mark.parametrize(
    "solver, options",
    [("dpmpp_2m_sde", ()), ("dpmpp_3m_sde", ()), ("sde_dpm_solver", ()), ("dpmpp_sde", ())],
    ids=["dpmpp_2m_sde", "dpmpp_3m_sde", "sde_dpm_solver-2", "dpmpp_sde"],
)
def test_higher_order_dpm_sde_samplers_beat_first_order(solver, options):
    """The DPM-Solver SDE family against the true distribution (not a limit extrapolated from
    the sampler's own runs, which let a first-order sampler pass): covariance error at t = 0.2
    below 0.02 at 16 steps and 0.008 at 32, where first-order samplers are at 0.043 / 0.018 or
    worse. Measured (N = 131072, Monte-Carlo floor 0.0028): 2M 0.0039 / 0.0024, 3M 0.0143 /
    0.0032, SDE-DPM-Solver-2 0.0064 / 0.0026, DPM++ SDE 0.0039 / 0.0039."""
    errs = _true_errors(solver, options, (16, 32))
    assert _beats_first_order(errs), errs


@pytest.mark.parametrize(
    "solver, options",
    [("sde_dpm_solver", (("order", 1),)), ("ddpm", ())],
    ids=["sde_dpm_solver-1", "ddpm"],
)
def test_the_weak_order_criterion_rejects_first_order_samplers(solver, options):
    """The criterion above can fail: first-order samplers fail it (measured sde_dpm_solver
    order 1: 0.043 / 0.018, ddpm 0.087 / 0.045)."""
    errs = _true_errors(solver, options, (16, 32))
    assert not _beats_first_order(errs), errs
    assert errs[1] > 1.5 * 0.008, errs
