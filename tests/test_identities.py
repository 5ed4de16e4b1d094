"""Identities between solvers (STYLE principle 4): the first-order members of every family are
one method, DDIM, and DDIM is the update of its paper."""

from __future__ import annotations

import pytest
import torch

import diffsolve as ds
from diffsolve.noise import Noise

from .conftest import prior64, rel_err, sd_process

PROCESSES = {
    "sd": sd_process,
    "vp-linear": ds.VPLinear,
    "edm": ds.EDM,
    "flow": ds.FlowMatching,
}

FIRST_ORDER = [
    ("dpm_solver", {"order": 1}),
    ("dpm_solver", {"order": 1, "method": "singlestep"}),
    ("unipc", {"order": 1, "corrector": False}),
    ("ddpm", {"eta": 0.0}),
]


@pytest.mark.parametrize("proc", PROCESSES)
@pytest.mark.parametrize("schedule", ["logsnr", "karras", "uniform"])
@pytest.mark.parametrize(("solver", "opts"), FIRST_ORDER, ids=lambda v: str(v))
def test_first_order_members_equal_euler(g64, proc, schedule, solver, opts):
    p = PROCESSES[proc]()
    # flow models predict velocity: ε-prediction has no x̂0 at t = 1 where α = 0
    m = g64.denoiser(p, "velocity" if proc == "flow" else "eps")
    x_T = prior64(p, n=3)
    ref = ds.sample(m, x_T, "euler", nfe=7, schedule=schedule)
    got = ds.sample(m, x_T, solver, nfe=7, schedule=schedule, **opts)
    assert rel_err(got, ref) < 1e-12


def test_ddim_is_the_update_of_its_paper(g64):
    """DDIM (Song et al. 2021, eq. 12, η = 0) written with ᾱ on diffusers' integer timesteps:
    x_{t−1} = sqrt(ᾱ_{t−1})·x̂0 + sqrt(1 − ᾱ_{t−1})·ε̂, and x̂0 at the last step."""
    p = sd_process()
    m = g64.denoiser(p)
    x = prior64(p, n=3)
    idx = [999, 799, 599, 399, 199, 1]
    times = p.time_of_index(idx)
    out = ds.sample(m, x, "ddim", times=times)
    ac = p.alphas_cumprod
    for k, k_next in zip(idx, [*idx[1:], None]):
        pred = m(x, p.time_of_index([k])[0])
        if k_next is None:
            x = pred.x0
        else:
            x = ac[k_next].sqrt() * pred.x0 + (1 - ac[k_next]).sqrt() * pred.eps
    assert rel_err(out, x) < 1e-12


def test_ddpm_eta_one_is_ddpm_posterior_step(g64):
    """DDIM η = 1 is the DDPM ancestral step: the posterior q(x_{t−1} | x_t, x̂0) mean plus
    σ_t·z with σ_t² = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_{t−1}) (Ho et al. 2020, eq. 7)."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=2)
    idx = [999, 500, 10]
    zs = []

    class Recorder(Noise):
        def __init__(self):
            self.gen = torch.Generator().manual_seed(5)

        def randn(self, x, step=0, stage=0):
            z = torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
            zs.append(z)
            return z

    out = ds.sample(m, x_T, "ddpm", times=p.time_of_index(idx), noise=Recorder(), eta=1.0)
    ac = p.alphas_cumprod
    x = x_T
    for j, (k, k_next) in enumerate(zip(idx, [*idx[1:], None])):
        pred = m(x, p.time_of_index([k])[0])
        if k_next is None:
            x = pred.x0
            break
        a_t, a_s = ac[k], ac[k_next]
        beta = 1 - a_t / a_s
        mean = (a_s.sqrt() * beta / (1 - a_t)) * pred.x0 + (
            (a_t / a_s).sqrt() * (1 - a_s) / (1 - a_t)
        ) * x
        var = (1 - a_s) / (1 - a_t) * beta
        x = mean + var.sqrt() * zs[j]
    assert rel_err(out, x) < 1e-12
