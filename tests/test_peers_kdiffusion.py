"""k-diffusion's samplers against diffsolve's solvers on the exact gmm64 model.

k-diffusion runs on x/α with noise level ρ = σ/α; the adapter evaluates our Denoiser at the
process time with that ρ. Its grids here are its own ``get_sigmas_karras`` /
``get_sigmas_exponential`` (float32 values, run in float64); ours run with ``times=`` the same ρ
mapped back to process times, so both sides evaluate at identical (α, σ) and agreement is to
float64 round-off.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import diffsolve as ds
from diffsolve.bench import peers
from diffsolve.interop import kdiffusion as kd

from .conftest import prior64, rel_err

if not peers.available()["k-diffusion"]:
    pytest.skip("needs the peers extra (k-diffusion)", allow_module_level=True)

pytestmark = pytest.mark.peers
TOL = 1e-5


def needs(name: str, **options):
    try:
        ds.get_solver(name, **options)
    except ValueError as e:
        pytest.skip(f"solver {name!r} with {options} not available yet: {e}")


@pytest.fixture(scope="module")
def setup(sd, g64):
    return g64.denoiser(sd, "eps"), prior64(sd, n=8, seed=5)


def run_kd(setup, sampler: str, spacing: str, n: int):
    model, x_T = setup
    process = model.process
    sigmas = kd.sigmas_for(process, spacing, n)
    grid = process.t_of_rho(sigmas[:-1])
    kd_model = kd.KDiffusionDenoiser(model)
    fn = getattr(kd.load_sampling(), sampler)
    x = fn(kd_model, x_T / float(process.alpha(grid[0])), sigmas, disable=True)
    return x, grid, kd_model.calls


def test_load_sampling_skips_the_package_init():
    code = (
        "import sys; from diffsolve.interop.kdiffusion import load_sampling; "
        "m = load_sampling(); assert callable(m.sample_dpmpp_2m); "
        "bad = [k for k in sys.modules if k == 'k_diffusion' or k.startswith('k_diffusion.') "
        "or k.split('.')[0] in ('torchvision', 'clip', 'wandb', 'accelerate')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_append_dims_is_the_only_utils_function_used():
    source = kd._sampling_path().read_text()
    assert set(re.findall(r"\butils\.(\w+)", source)) == {"append_dims"}
    x = torch.ones(3)
    assert kd._append_dims(x, 4).shape == (3, 1, 1, 1)


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setattr(kd.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"peers"):
        kd._sampling_path()


def test_adapter_is_exact(setup, g64):
    model, _ = setup
    kd_model = kd.KDiffusionDenoiser(model)
    x = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for rho in (14.6, 2.0, 0.1, 0.03):
        alpha = (1 + rho**2) ** -0.5
        got = kd_model(x, torch.full((4,), rho, dtype=torch.float64))
        exact = g64.x0_mean(x * alpha, alpha, rho * alpha)
        assert rel_err(got, exact) < 1e-12
    assert kd_model.calls == 4


@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_euler(setup, spacing):
    x, grid, calls = run_kd(setup, "sample_euler", spacing, 10)
    ours, info = ds.sample(setup[0], setup[1], "euler", times=grid, return_info=True)
    assert calls == info.nfe == 10
    assert rel_err(ours, x) <= TOL


@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_heun(setup, spacing):
    needs("heun")
    x, grid, calls = run_kd(setup, "sample_heun", spacing, 6)
    ours, info = ds.sample(setup[0], setup[1], "heun", times=grid, return_info=True)
    assert calls == info.nfe == 2 * 6 - 1
    assert rel_err(ours, x) <= TOL


@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_dpmpp_2m(setup, spacing):
    needs("dpmpp_2m")
    x, grid, calls = run_kd(setup, "sample_dpmpp_2m", spacing, 10)
    ours, info = ds.sample(setup[0], setup[1], "dpmpp_2m", times=grid, return_info=True)
    assert calls == info.nfe == 10
    assert rel_err(ours, x) <= TOL


def test_dpm_2(setup):
    """k-diffusion's dpm_2 is DPM-Solver-2 (noise form, λ-midpoint) written as Euler in ρ."""
    spec = peers._KDIFFUSION["sample_dpm_2"][1]
    assert spec is not None
    needs(spec[0], **spec[1])
    x, grid, calls = run_kd(setup, "sample_dpm_2", "karras", 6)
    ours, info = ds.sample(setup[0], setup[1], spec[0], times=grid, return_info=True, **spec[1])
    assert calls == info.nfe == 2 * 6 - 1
    assert rel_err(ours, x) <= TOL


@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_dpmpp_2s(setup, spacing):
    """sample_dpmpp_2s_ancestral with η = 0 is DPM-Solver++(2S) with r = ½."""
    needs("dpmpp_2s")
    model, x_T = setup
    process = model.process
    sigmas = kd.sigmas_for(process, spacing, 6)
    grid = process.t_of_rho(sigmas[:-1])
    kd_model = kd.KDiffusionDenoiser(model)
    x = kd.load_sampling().sample_dpmpp_2s_ancestral(
        kd_model, x_T / float(process.alpha(grid[0])), sigmas, disable=True, eta=0.0
    )
    ours, info = ds.sample(model, x_T, "dpmpp_2s", times=grid, return_info=True)
    assert kd_model.calls == info.nfe == 2 * 6 - 1
    assert rel_err(ours, x) <= TOL


@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_lms_up_to_the_last_step(setup, spacing):
    """sample_lms ≡ lms(order=4) on every step but the last: k-diffusion integrates its order-4
    Lagrange polynomial in ρ down to σ = 0 (``linear_multistep_coeff`` over [σ_{n−1}, 0]), ours
    returns x̂_0 at σ_{n−1} (the project's clean-end rule), so the final samples differ."""
    needs("lms", order=4)
    model, x_T = setup
    process = model.process
    sigmas = kd.sigmas_for(process, spacing, 8)
    grid = process.t_of_rho(sigmas[:-1])
    seen = {}
    out = kd.load_sampling().sample_lms(
        kd.KDiffusionDenoiser(model),
        x_T / float(process.alpha(grid[0])),
        sigmas,
        disable=True,
        callback=lambda d: seen.__setitem__(d["i"], (d["x"].clone(), d["denoised"].clone())),
    )
    x_last, x0_last = seen[7]
    before = ds.sample(model, x_T, "lms", times=grid, final="tmin", order=4)
    assert rel_err(before / float(process.alpha(grid[-1])), x_last) <= TOL
    ours = ds.sample(model, x_T, "lms", times=grid, order=4)
    assert rel_err(ours, x0_last) <= TOL
    assert rel_err(ours, out) > 1e-4  # the final-step conventions really differ


def test_run_peer(sd, g64):
    model = g64.denoiser(sd, "eps")
    x_T = prior64(sd, n=4, seed=7)
    configs = [c for c in peers.peer_configs(sd) if c.library == "k-diffusion"]
    assert {c.algorithm for c in configs} == set(peers._KDIFFUSION)
    for c in configs:
        r = peers.run_peer(c, model, x_T, 7)
        two = c.algorithm in ("sample_heun", "sample_dpm_2", "sample_dpmpp_2s_ancestral")
        assert r.nfe == 7, c.label  # 2n − 1 = 7 for n = 4
        assert r.grid.numel() == (4 if two else 7), c.label
        assert torch.isfinite(r.x).all() and r.x.dtype == torch.float64
        assert abs(float(r.grid[0]) - sd.t_max) < 1e-6 and abs(float(r.grid[-1]) - sd.t_min) < 1e-6
    c = next(c for c in configs if c.algorithm == "sample_euler" and c.spacing == "karras")
    assert c.ours == ("euler", {})
    r = peers.run_peer(c, model, x_T, 7)
    assert rel_err(ds.sample(model, x_T, "euler", times=r.grid), r.x) <= 1e-12


def test_peers_agree_with_each_other(g64):
    """diffusers' DPM++(2M) and k-diffusion's sample_dpmpp_2m on the same timesteps: checks both
    adapters (time maps, scalings) against each other, independently of diffsolve's solvers."""
    diffusers = pytest.importorskip("diffusers")
    from diffsolve.interop.diffusers import process_from_scheduler_config, run_diffusers

    sched = diffusers.DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", solver_order=2
    )
    process = process_from_scheduler_config(sched)
    model = g64.denoiser(process, "eps")
    x_T = prior64(process, n=8, seed=9)
    run = run_diffusers(sched, model, x_T, 10)
    grid = torch.tensor(run.times, dtype=torch.float64)
    sigmas = torch.cat([process.rho(grid), torch.zeros(1, dtype=torch.float64)])
    kd_model = kd.KDiffusionDenoiser(model)
    x = kd.load_sampling().sample_dpmpp_2m(
        kd_model, x_T / float(process.alpha(grid[0])), sigmas, disable=True
    )
    assert kd_model.calls == run.nfe == 10
    assert rel_err(x, run.x) <= TOL


def test_load_external_needs_no_package_init():
    """Issue 11: ``import k_diffusion.external`` fails without scikit-image (the package's
    ``__init__``); ``load_external`` loads the wrappers alone, and a wrapped network samples
    through ``denoiser_from_kdiffusion``."""
    code = (
        "import sys, torch, diffsolve as ds\n"
        "from diffsolve.interop.kdiffusion import load_external, denoiser_from_kdiffusion\n"
        "ext = load_external()\n"
        "assert load_external() is ext\n"
        "ac = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64), 0)\n"
        "net = lambda x, t: 0.1 * x\n"
        "w = ext.DiscreteEpsDDPMDenoiser(net, ac, quantize=False)\n"
        "m = denoiser_from_kdiffusion(w)\n"
        "x = torch.randn(4, 2, dtype=torch.float64) * float(w.sigma_max)\n"
        "out = ds.sample(m, x, 'dpmpp_2m', nfe=6)\n"
        "assert out.shape == (4, 2) and torch.isfinite(out).all()\n"
        "bad = [k for k in sys.modules if k == 'k_diffusion' or k.startswith('k_diffusion.') "
        "or k.split('.')[0] in ('skimage', 'torchvision', 'clip', 'wandb')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
