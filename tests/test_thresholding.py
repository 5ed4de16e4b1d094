"""Thresholding wrappers: exact numbers, consistency of ε̂, NFE, and diffusers' thresholding.

Hand-built numbers: torch.quantile interpolates linearly, so for |x̂_0| = (0.5, 3, 2, 0.1) the
0.5-quantile is 0.5 + ½·(2 − 0.5) = 1.25 (the sorted values' positions 1 and 2).
"""

from __future__ import annotations

import pytest
import torch

import diffsolve as ds

from .conftest import prior64, rel_err

X0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, 0.3, -0.4, 0.1]], dtype=torch.float64)


@pytest.fixture(scope="module")
def fixed(sd):
    """A Denoiser whose x0-"network" returns X0 whatever x and t."""
    return ds.Denoiser(lambda x, t: X0.clone(), sd, "x0", time_map=lambda t: t)


def _check_eps(pred, x, point):
    torch.testing.assert_close(
        pred.eps, (x - point.alpha * pred.x0) / point.sigma, rtol=1e-14, atol=0
    )


def test_dynamic_threshold_exact_numbers(fixed, sd):
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 4)
    point = fixed.point(0.3, x)
    pred = ds.DynamicThreshold(fixed, ratio=0.5, max_val=1.0)(x, point)
    # row 0: s = max(1.25, 1) = 1.25; row 1: quantile 0.25 < 1, s = 1 (unchanged)
    expected = torch.tensor([[0.4, -1.0, 1.0, 0.08], [0.2, 0.3, -0.4, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(pred.x0, expected, rtol=1e-15, atol=1e-15)
    _check_eps(pred, x, point)
    # a ceiling on s (diffusers' sample_max_value): s = min(1.25, 1.1) = 1.1
    capped = ds.DynamicThreshold(fixed, ratio=0.5, max_val=1.0, s_max=1.1)(x, point).x0
    torch.testing.assert_close(capped[0], torch.tensor([0.5, -1.1, 1.1, 0.1]).double() / 1.1)
    # max_val above the quantile: s = 2 for both rows
    wide = ds.DynamicThreshold(fixed, ratio=0.5, max_val=2.0)(x, 0.3).x0
    torch.testing.assert_close(wide, X0.clamp(-2, 2) / 2)


def test_static_threshold_exact_numbers(fixed):
    x = torch.zeros(2, 4, dtype=torch.float64)
    point = fixed.point(0.7, x)
    pred = ds.StaticThreshold(fixed, max_val=1.0)(x, point)
    expected = torch.tensor([[0.5, -1.0, 1.0, 0.1], [0.2, 0.3, -0.4, 0.1]], dtype=torch.float64)
    assert torch.equal(pred.x0, expected)
    _check_eps(pred, x, point)


def test_threshold_options_are_validated(fixed):
    with pytest.raises(ValueError, match="ratio"):
        ds.DynamicThreshold(fixed, ratio=0.0)
    with pytest.raises(ValueError, match="max_val"):
        ds.DynamicThreshold(fixed, max_val=2.0, s_max=1.0)
    with pytest.raises(ValueError, match="max_val"):
        ds.StaticThreshold(fixed, max_val=-1.0)


def test_threshold_is_per_sample(g64, sd):
    model = ds.DynamicThreshold(g64.denoiser(sd, "eps"))
    x_T = prior64(sd, n=6, seed=1)
    whole = ds.sample(model, x_T, "dpmpp_2m", nfe=8)
    split = torch.cat(
        [ds.sample(model, x_T[:2], "dpmpp_2m", nfe=8), ds.sample(model, x_T[2:], "dpmpp_2m", nfe=8)]
    )
    assert rel_err(split, whole) <= 1e-12


def test_nfe_is_unchanged_and_thresholding_acts(g64, sd):
    base = g64.denoiser(sd, "eps")
    x_T = prior64(sd, n=4, seed=2)
    plain, pi = ds.sample(base, x_T, "dpmpp_3m", nfe=7, return_info=True)
    for wrapped in (ds.DynamicThreshold(base), ds.StaticThreshold(base)):
        before = base.nfe
        out, info = ds.sample(wrapped, x_T, "dpmpp_3m", nfe=7, return_info=True)
        assert info.nfe == pi.nfe == 7
        assert base.nfe - before == 7 and wrapped.nfe == base.nfe
        # gmm64's samples exceed 1 (|x̂_0| quantiles 1.5–2.6), so both rules change the result
        assert rel_err(out, plain) > 0.1
        assert float(out.abs().max()) <= 1.0 + 1e-12  # the last step returns a clipped x̂_0


def test_wraps_cfg(g64, sd):
    """Threshold(CFG): one NFE per step, and x̂_0 is the clipped guided x̂_0."""
    exact = g64.denoiser(sd, "eps")

    def net(x, t, labels):  # a conditional "network": the exact ε̂ scaled per label
        return exact.net(x, t) * (1 + 0.1 * labels[:, None].to(x.dtype))

    base = ds.Denoiser(net, sd, "eps", time_map=lambda t: t, sample_shape=(64,))
    cfg = ds.CFG(base, 3.0, uncond={"labels": torch.zeros(4, dtype=torch.long)})
    model = ds.StaticThreshold(cfg, max_val=1.0)
    assert model.sample_shape == (64,) and model.process is sd
    labels = torch.tensor([1, 2, 3, 4])
    x = prior64(sd, n=4, seed=3)
    point = model.point(0.2, x)
    got, guided = model(x, point, labels=labels), cfg(x, point, labels=labels)
    torch.testing.assert_close(got.x0, guided.x0.clamp(-1, 1), rtol=0, atol=0)
    _check_eps(got, x, point)
    before = base.nfe
    _, info = ds.sample(model, x, "dpmpp_2m", nfe=6, cond={"labels": labels}, return_info=True)
    assert info.nfe == 6 and base.nfe - before == 6


# -- against diffusers -----------------------------------------------------------------------
SD = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("sample_max_value", [1.0, 1.5])
def test_agrees_with_diffusers_thresholding(g64, sample_max_value):
    """diffusers' DPMSolverMultistepScheduler(thresholding=True) running 2M, on the same
    timesteps: s = clamp(quantile_0.995, 1, sample_max_value) there, i.e. DynamicThreshold with
    max_val=1, s_max=sample_max_value (with sample_max_value=1 that is plain clipping)."""
    diffusers = pytest.importorskip("diffusers")
    from diffsolve.interop.diffusers import process_from_scheduler_config, run_diffusers

    sd32 = process_from_scheduler_config(SD)
    exact = g64.denoiser(sd32, "eps")

    def net(x, t):  # diffusers thresholds (B, C, ...) samples only: gmm64 as (B, 4, 16)
        return exact.net(x.reshape(-1, 64), t).reshape(x.shape)

    base = ds.Denoiser(net, sd32, "eps", time_map=exact.time_map, sample_shape=(4, 16))
    x_T = prior64(sd32, n=8, seed=3).reshape(8, 4, 16)
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=sample_max_value,
    )  # fmt: skip
    model = ds.DynamicThreshold(base, ratio=0.995, max_val=1.0, s_max=sample_max_value)
    run = run_diffusers(sched, base, x_T, 10)
    times = torch.tensor(run.times, dtype=torch.float64)
    ours, info = ds.sample(model, x_T, "dpmpp_2m", times=times, return_info=True)
    assert info.nfe == run.nfe == 10
    assert rel_err(ours, run.x) <= 1e-5
    plain = ds.sample(base, x_T, "dpmpp_2m", times=times)
    assert rel_err(plain, run.x) > 0.1  # diffusers' thresholding did act
    # Imagen's / the official DPM-Solver++ rule (s = max(q, 1), no ceiling) differs from both
    imagen = ds.sample(ds.DynamicThreshold(base), x_T, "dpmpp_2m", times=times)
    assert rel_err(imagen, run.x) > 1e-3
    if sample_max_value == 1.0:
        static = ds.sample(ds.StaticThreshold(base), x_T, "dpmpp_2m", times=times)
        assert rel_err(static, ours) <= 1e-12
