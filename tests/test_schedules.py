"""Schedules put the evaluations exactly where the papers and peers do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.schedules import get_schedule

from .conftest import sd_process

ALL = list(ds.schedules())
CONTINUOUS = ["uniform", "logsnr", "karras", "quadratic", "exponential"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_schedule_is_decreasing_inside_range(name, n):
    p = sd_process()
    t = get_schedule(name)(p, n)
    assert t.dtype == torch.float64 and t.shape == (n,)
    assert bool((t[1:] < t[:-1]).all())
    assert float(t.min()) >= p.t_min - 1e-12 and float(t.max()) <= p.t_max + 1e-12


@pytest.mark.parametrize("name", CONTINUOUS)
@pytest.mark.parametrize(
    "proc", [ds.VPLinear(), ds.VPCosine(), ds.VE(), ds.EDM(), ds.FlowMatching(shift=3.0)], ids=repr
)
def test_continuous_schedules_span_the_process(name, proc):
    t = get_schedule(name)(proc, 9)
    assert bool((t[1:] < t[:-1]).all())
    assert (
        abs(
            float(t[-1])
            - (
                proc.shift_time(torch.tensor(proc.t_min, dtype=torch.float64))
                if name == "uniform"
                else proc.t_min
            )
        )
        < 1e-9
    )


def test_karras_matches_edm_formula_in_sigma_over_alpha():
    """k-diffusion get_sigmas_karras(n, σ_min, σ_max, ρ=7) without its trailing zero."""
    p = sd_process()
    n, rho = 10, 7.0
    smin, smax = float(p.rho(p.t_min)), float(p.rho(p.t_max))
    ramp = np.linspace(0, 1, n)
    expected = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    got = p.rho(ds.Karras()(p, n)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    edm = ds.EDM()
    got = ds.Karras(rho=7)(edm, 18).numpy()
    ramp = np.linspace(0, 1, 18)
    np.testing.assert_allclose(
        got, (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rtol=1e-12
    )


def test_logsnr_is_uniform_in_lambda_and_exponential_equals_it():
    p = sd_process()
    lam = p.lambda_(ds.LogSNR()(p, 12))
    d = lam[1:] - lam[:-1]
    assert float((d - d.mean()).abs().max()) < 1e-9
    assert torch.allclose(ds.Exponential()(p, 12), ds.LogSNR()(p, 12))


def test_quadratic_is_power_two_in_t():
    p = ds.VPLinear()
    t = ds.Quadratic()(p, 5)
    s = torch.sqrt(t)
    assert torch.allclose(s[1:] - s[:-1], (s[1] - s[0]).expand(4), atol=1e-12)


@pytest.mark.peers
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [4, 10, 25])
def test_discrete_spacings_equal_diffusers(scheduler, spacing, n):
    diffusers = pytest.importorskip("diffusers")
    offset = 1 if spacing == "leading" else 0
    sch = getattr(diffusers, scheduler)(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    sch.set_timesteps(n)
    p = sd_process()
    ddim = scheduler == "DDIMScheduler"
    sched = {
        "leading": ds.Leading(steps_offset=1, include_zero=ddim),
        "trailing": ds.Trailing(),
        "linspace": ds.Linspace(include_zero=ddim),
    }[spacing]
    ours = p.model_time(sched(p, n)).round().long().numpy()
    np.testing.assert_array_equal(ours, sch.timesteps.numpy())


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid: .*karras"):
        get_schedule("cosine-ish")


def test_discrete_spacing_needs_discrete_process():
    with pytest.raises(ValueError, match="VPDiscrete"):
        ds.Trailing()(ds.EDM(), 5)


def test_schedule_needs_a_point():
    with pytest.raises(ValueError):
        ds.Karras()(sd_process(), 0)
