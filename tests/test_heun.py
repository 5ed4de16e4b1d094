"""EDM Heun: order 2, NFE accounting (2n − 1, budgets met exactly), churn reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.noise import NoiseSource

from .conftest import prior64, reference, rel_err, sd_process


def test_order_two(g64):
    """Log-log slope of relative RMSE at the solver's own end (final="tmin", karras) over
    20/40/80 steps; measured 2.02–2.08."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p)
    ref = reference(g64, p, x_T, p.t_min)
    steps = [20, 40, 80]
    errs = [rel_err(ds.sample(m, x_T, "heun", steps=n, final="tmin"), ref) for n in steps]
    slope = -float(np.polyfit(np.log(steps), np.log(errs), 1)[0])
    assert abs(slope - 2.0) <= 0.3, errs


def test_steps_and_nfe_accounting(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=2)
    for n in (1, 2, 5):
        _, info = ds.sample(m, x_T, "heun", steps=n, return_info=True)
        assert info.nfe == 2 * n - 1 == ds.Heun().nfe_of(n, True)
        _, info = ds.sample(m, x_T, "heun", steps=n, final="tmin", return_info=True)
        assert info.nfe == 2 * n == ds.Heun().nfe_of(n, False)
    for nfe in range(1, 10):
        for final in ("standard", "tmin"):
            _, info = ds.sample(m, x_T, "heun", nfe=nfe, final=final, return_info=True)
            assert info.nfe == nfe


def test_even_budget_makes_the_first_step_euler(g64):
    """nfe = 10 with a clean end: 6 points, the first step Euler (DDIM) and then Heun."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=2)
    seen = {}
    _, info = ds.sample(
        m, x_T, "heun", nfe=10, return_info=True, callback=lambda i, x, s: seen.setdefault(i, x)
    )
    assert info.steps == 6
    euler = ds.sample(m, x_T, "euler", times=info.times[:2], final="tmin")
    assert rel_err(seen[0], euler) < 1e-14
    heun = ds.sample(m, x_T, "heun", times=info.times[:2], final="tmin")
    assert rel_err(seen[0], heun) > 1e-6


def test_last_step_returns_x0(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=2)
    assert torch.equal(ds.sample(m, x_T, "heun", steps=1), m(x_T, p.t_max).x0)


def test_churn_reproducible_and_stochastic(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    opts = {"steps": 6, "s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 10.0}
    assert ds.Heun(s_churn=2.0).stochastic and not ds.Heun().stochastic
    a = ds.sample(m, x_T, "heun", noise=NoiseSource.from_seeds([1, 2, 3, 4]), **opts)
    b = ds.sample(m, x_T, "heun", noise=NoiseSource.from_seeds([1, 2, 3, 4]), **opts)
    c = ds.sample(m, x_T, "heun", noise=NoiseSource.from_seeds([5, 6, 7, 8]), **opts)
    half = ds.sample(m, x_T[2:], "heun", noise=NoiseSource.from_seeds([3, 4]), **opts)
    assert torch.equal(a, b)
    assert rel_err(half, a[2:]) < 1e-14
    assert rel_err(c, a) > 1e-3
    det = ds.sample(m, x_T, "heun", steps=6)
    assert rel_err(a, det) > 1e-3


def test_no_churn_is_deterministic_and_reusable(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=3)
    solver = ds.Heun()
    a = ds.sample(m, x_T, solver, steps=5, generator=torch.Generator().manual_seed(1))
    b = ds.sample(m, x_T, solver, steps=5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_churn_is_clamped_to_t_max(g64):
    """ρ̂ = ρ_0·(1 + γ) would leave the process's range at the first step; it is clamped."""
    p = sd_process()
    calls = []

    class Spy:
        def __init__(self, model):
            self.model, self.process = model, model.process

        def point(self, t, like):
            calls.append(float(t))
            return self.model.point(t, like)

        def __call__(self, x, t, **cond):
            return self.model(x, t, **cond)

    x_T = prior64(p, n=2)
    out = ds.sample(Spy(g64.denoiser(p)), x_T, "heun", steps=3, s_churn=10.0)
    assert max(calls) <= p.t_max and torch.isfinite(out).all()
    # churn only at the first point (ρ ≥ 10 there alone): clamped to ρ(t_max) = ρ_0, no noise
    only_first = ds.sample(g64.denoiser(p), x_T, "heun", steps=3, s_churn=10.0, s_tmin=10.0)
    assert torch.equal(only_first, ds.sample(g64.denoiser(p), x_T, "heun", steps=3))


def test_bad_options():
    with pytest.raises(ValueError, match="s_churn"):
        ds.get_solver("heun", s_churn=-1.0)
    with pytest.raises(ValueError, match="s_tmin"):
        ds.get_solver("heun", s_tmin=2.0, s_tmax=1.0)
