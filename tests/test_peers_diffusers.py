"""diffusers' schedulers against diffsolve's solvers on the exact gmm64 model.

Each agreement test runs a diffusers scheduler loop with the exact model as its network, then
ours with ``times=`` equal to the timesteps the scheduler evaluated, from the same x_T, and asks
for ≤ 1e-5 relative difference. The process is SD's scaled-linear table *as diffusers holds
it* (float32 β and cumprod, ≈1e-6 from the float64 table of ``conftest.sd``), so both sides use
the same ᾱ; what is left is diffusers' float32 step arithmetic (≈1e-7 per step).
"""

from __future__ import annotations

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.bench import peers

from .conftest import prior64, rel_err

diffusers = pytest.importorskip("diffusers", reason="needs the peers extra (diffusers)")

from diffsolve.interop.diffusers import (  # noqa: E402
    process_from_scheduler_config,
    run_diffusers,
)

pytestmark = [
    pytest.mark.peers,
    # diffusers' own numpy deprecations (DEIS, ...), not ours
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

SD = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
TOL = 1e-5


def needs(name: str, **options):
    """Skip until the solver ``name`` (with these options) is registered."""
    try:
        ds.get_solver(name, **options)
    except ValueError as e:
        pytest.skip(f"solver {name!r} with {options} not available yet: {e}")


@pytest.fixture(scope="module")
def sd32():
    return process_from_scheduler_config(SD)


@pytest.fixture(scope="module")
def setup(sd32, g64):
    model = g64.denoiser(sd32, "eps")
    return model, prior64(sd32, n=8, seed=3)


def agree(scheduler, setup, steps, solver, **options):
    model, x_T = setup
    run = run_diffusers(scheduler, model, x_T, steps)
    grid = torch.tensor(run.times, dtype=torch.float64)
    ours, info = ds.sample(model, x_T, solver, times=grid, return_info=True, **options)
    assert run.nfe == info.nfe == steps
    assert torch.isfinite(run.x).all()
    return rel_err(ours, run.x)


def test_process_from_config_matches_diffusers_table(sd, sd32):
    sched = diffusers.DDIMScheduler(**SD)
    assert torch.equal(sd32.alphas_cumprod, sched.alphas_cumprod.double())
    # float32 table vs our float64 one: the ~1e-6 mismatch every diffusers run carries
    err = float(((sd32.alphas_cumprod - sd.alphas_cumprod) / sd.alphas_cumprod).abs().max())
    assert 1e-8 < err < 5e-6


def test_process_from_config_variants():
    cos = process_from_scheduler_config({"beta_schedule": "squaredcos_cap_v2"})
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    assert torch.equal(cos.alphas_cumprod, ref)
    trained = process_from_scheduler_config({"trained_betas": [0.1, 0.2, 0.3]})
    assert torch.allclose(trained.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504]).double())
    flow = process_from_scheduler_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert isinstance(flow, ds.FlowMatching) and flow.shift == 3.0
    with pytest.raises(ValueError, match="zero_snr"):
        process_from_scheduler_config({**SD, "rescale_betas_zero_snr": True})


# (DDIM's "linspace"/"trailing" with n ∤ N step to t − ⌊N/n⌋, off their own grid: not compared)
@pytest.mark.parametrize(("spacing", "steps"), [("leading", 10), ("trailing", 10), ("leading", 7)])
def test_ddim(setup, spacing, steps):
    sched = diffusers.DDIMScheduler(
        **SD, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
        set_alpha_to_one=True, clip_sample=False,
    )  # fmt: skip
    assert agree(sched, setup, steps, "ddim") <= TOL


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_dpmsolver_2m(setup, spacing):
    needs("dpmpp_2m", solver_type="midpoint")
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
    )  # fmt: skip
    assert agree(sched, setup, 10, "dpmpp_2m", solver_type="midpoint") <= TOL


def test_dpmsolver_2m_heun(setup):
    needs("dpmpp_2m", solver_type="heun")
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD, solver_order=2, algorithm_type="dpmsolver++", solver_type="heun"
    )
    assert agree(sched, setup, 10, "dpmpp_2m", solver_type="heun") <= TOL


@pytest.mark.parametrize("steps", [8, 20])  # < 15 and ≥ 15 steps: lower_order_final differs
def test_dpmsolver_3m(setup, steps):
    needs("dpmpp_3m", reference=True)
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD, solver_order=3, algorithm_type="dpmsolver++", solver_type="midpoint"
    )
    assert agree(sched, setup, steps, "dpmpp_3m", reference=True) <= TOL


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc(setup, variant, order):
    needs("unipc", order=order, variant=variant)
    model, x_T = setup
    sched = diffusers.UniPCMultistepScheduler(**SD, solver_order=order, solver_type=variant)
    run = run_diffusers(sched, model, x_T, 10)
    grid = torch.tensor(run.times, dtype=torch.float64)
    ours = ds.sample(model, x_T, "unipc", times=grid, order=order, variant=variant)
    # bh1's last step is 0·∞ = NaN in diffusers (see peers.run_peer); its finite value is m0
    peer = sched.model_outputs[-1] if variant == "bh1" else run.x
    assert rel_err(ours, peer) <= TOL


def test_unipc_bh1_final_step_is_nan_in_diffusers(setup):
    """Documents why peers.run_peer patches UniPC-bh1: if diffusers fixes B_h·0 = NaN at σ = 0,
    this fails and the workaround can go."""
    model, x_T = setup
    sched = diffusers.UniPCMultistepScheduler(**SD, solver_order=2, solver_type="bh1")
    run = run_diffusers(sched, model, x_T, 6)
    assert torch.isnan(run.x).all()
    assert torch.isfinite(sched.model_outputs[-1]).all()


# -- the benchmark's API ----------------------------------------------------------------------
def test_peer_configs_and_budget(sd, g64):
    configs = peers.peer_configs(sd)
    labels = [c.label for c in configs]
    assert len(labels) == len(set(labels))
    assert "diffusers" in {c.library for c in configs}
    assert ("diffusers", "DDIM", "default") in {
        (c.library, c.algorithm, c.spacing) for c in configs
    }
    model = g64.denoiser(sd, "eps")
    x_T = prior64(sd, n=4, seed=1)
    for c in configs:
        if c.library != "diffusers":
            continue
        for nfe in (5, 6):
            r = peers.run_peer(c, model, x_T, nfe)
            two = c.algorithm == "Heun"
            assert r.nfe == (2 * ((nfe + 1) // 2) - 1 if two else nfe), c.label
            assert r.x.dtype == torch.float64 and torch.isfinite(r.x).all(), c.label
            assert r.grid.dtype == torch.float64 and bool((r.grid[1:] < r.grid[:-1]).all())
            assert r.grid.numel() == ((nfe + 1) // 2 if two else nfe), c.label


@pytest.mark.parametrize("spacing", ["karras", "lu-lambda"])
def test_rounding_is_the_only_difference(sd32, g64, spacing):
    """With the network at the scheduler's own unrounded σ, DPM++(2M) on Karras / Lu-λ σ's
    agrees with ours; with the rounded timesteps a real UNet sees, it does not (≈1e-4..1e-3)."""
    needs("dpmpp_2m", solver_type="midpoint")
    model = g64.denoiser(sd32, "eps")
    x_T = prior64(sd32, n=8, seed=4)
    c = peers.PeerConfig("diffusers", "DPMSolverMultistep-2M", spacing, "x", None)
    exact = run_diffusers(peers.make_scheduler(c, sd32), model, x_T, 8, evaluate_at="sigma")
    ours = ds.sample(model, x_T, "dpmpp_2m", times=torch.tensor(exact.times).double())
    assert rel_err(ours, exact.x) <= TOL
    rounded = run_diffusers(peers.make_scheduler(c, sd32), model, x_T, 8)
    ours_r = ds.sample(model, x_T, "dpmpp_2m", times=torch.tensor(rounded.times).double())
    assert rel_err(ours_r, rounded.x) > 1e-4


def test_karras_timesteps_are_rounded(sd, g64):
    """diffusers rounds Karras timesteps; the network must see the rounded index."""
    c = peers.PeerConfig("diffusers", "DPMSolverMultistep-2M", "karras", "x", None)
    r = peers.run_peer(c, g64.denoiser(sd, "eps"), prior64(sd, n=2), 9)
    idx = r.grid * 1000 - 1
    assert torch.allclose(idx, idx.round(), atol=1e-9)
    sched = peers.make_scheduler(c, sd)
    sched.set_timesteps(9)
    # ... while its update uses the unrounded σ: the two differ
    rho_grid = sd.rho(r.grid)
    assert not torch.allclose(rho_grid.float(), sched.sigmas[:-1], rtol=1e-4)


@pytest.mark.parametrize("algorithm", ["DDIM", "Euler", "Heun"])
def test_run_peer_matches_ours_on_its_grid(sd, g64, algorithm):
    """run_peer + grid: the benchmark's 'same algorithm on the same schedule' (float64 table on
    our side, diffusers' float32 one on theirs). See test_euler_linspace_initial_scale for why
    Euler/Heun use the "default" (leading, offset 1) spacing here."""
    c = next(
        c for c in peers.peer_configs(sd) if c.algorithm == algorithm and c.spacing == "default"
    )
    if c.ours is None:
        pytest.skip(f"no diffsolve equivalent of {c.label} yet")
    model = g64.denoiser(sd, "eps")
    x_T = prior64(sd, n=8, seed=2)
    r = peers.run_peer(c, model, x_T, 10)
    ours = ds.sample(model, x_T, c.ours[0], times=r.grid, **c.ours[1])
    assert rel_err(ours, r.x) <= TOL


def test_flow_peers(g64):
    flow = ds.FlowMatching(shift=3.0, t_min=1e-3)
    model = g64.denoiser(flow, "x0")
    x_T = ds.prior(flow, (4, 64), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    configs = [c for c in peers.peer_configs(flow) if c.library == "diffusers"]
    assert {c.algorithm for c in configs} >= {"FlowMatchEuler", "DPMSolverMultistep-2M"}
    c = next(c for c in configs if c.algorithm == "FlowMatchEuler")
    r = peers.run_peer(c, model, x_T, 8)
    assert r.nfe == 8 and math.isclose(float(r.grid[0]), 1.0)
    ours = ds.sample(model, x_T, "euler", times=r.grid)
    assert rel_err(ours, r.x) <= TOL


def test_euler_linspace_initial_scale(setup):
    """EulerDiscreteScheduler with "linspace"/"trailing" spacing starts from x_T·σ_max, not
    x_T·sqrt(σ_max² + 1) = x_T/α_T (its ``init_noise_sigma``; HeunDiscrete does the same): x_T is
    off by 0.23 % on SD, which alone makes it differ from Euler by ~1e-3. With that scale undone
    it is our Euler."""
    model, x_T = setup
    sched = diffusers.EulerDiscreteScheduler(**SD)
    sched.set_timesteps(10)
    s_max = float(sched.sigmas[0])
    assert float(sched.init_noise_sigma) == s_max
    run = run_diffusers(sched, model, x_T, 10)
    grid = torch.tensor(run.times, dtype=torch.float64)
    ours = ds.sample(model, x_T, "euler", times=grid)
    assert rel_err(ours, run.x) > 1e-4
    fixed = run_diffusers(sched, model, x_T * ((s_max**2 + 1) ** 0.5 / s_max), 10)
    assert rel_err(ours, fixed.x) <= TOL
