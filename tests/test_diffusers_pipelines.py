"""DiffsolveScheduler driven the way diffusers' img2img / inpainting / SD3 / Flux pipelines drive
a scheduler, against ``ds.sample`` on the same grid.

The Stable Diffusion, SD3 and Flux pipeline classes need ``transformers`` (text encoders), which
the test environment does not have; each test here makes exactly the scheduler calls those
pipelines make (``diffusers`` 0.3x: ``get_timesteps``, ``set_begin_index``, ``add_noise`` /
``scale_noise`` at the first kept timestep, the inpainting blend after every step) around a
randomly initialised tiny ``UNet2DModel`` or an analytic flow network.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.schedules import Karras, LogSNR, Uniform

from .conftest import rel_err

diffusers = pytest.importorskip("diffusers", reason="needs the peers extra (diffusers)")

from diffsolve.interop.diffusers_scheduler import DiffsolveScheduler  # noqa: E402

pytestmark = [pytest.mark.peers, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TOL = 1e-5
SHAPE = (2, 1, 8, 8)
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,),
        layers_per_block=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
        norm_num_groups=4, add_attention=False,
    )  # fmt: skip
    return net.eval().requires_grad_(False)


def get_timesteps(sched, n: int, strength: float, begin: bool = True):
    """``StableDiffusionImg2ImgPipeline.get_timesteps`` (also SD3/Flux img2img, SD inpaint)."""
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    timesteps = sched.timesteps[t_start * sched.order :]
    if begin and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    return timesteps, t_start


def remaining_grid(model, x, solver, nfe, k, **kw):
    """The process times of the plan ``ds.sample(nfe=nfe)`` uses, from grid point k on (the
    clean end t = 0 is not a time: ds.sample appends it)."""
    _, info = ds.sample(model, x, solver, nfe=nfe, return_info=True, **kw)
    t = info.times
    return t[k:-1] if float(t[-1]) == 0.0 else t[k:]


@pytest.mark.parametrize(
    ("solver", "strength"),
    [("dpmpp_2m", 0.6), ("unipc", 0.6), ("euler", 0.6), ("dpmpp_3m", 0.6), ("ddim", 0.3),
     ("heun", 0.7)],
)  # fmt: skip
@pytest.mark.parametrize("begin", [True, False])
def test_img2img_strength_starts_mid_schedule(unet, solver, strength, begin):
    """strength 0.6 of 10 calls: the run starts at call 4, from ``add_noise(x0, ε, τ_4)``, and
    equals ``ds.sample`` from there on the rest of the grid with an empty history; without
    ``set_begin_index`` (pipelines that do not call it) the first timestep places the run.
    (Heun at strength 0.7: call 3 is the first call of its step 1.)"""
    sched = DiffsolveScheduler.from_config(diffusers.DDIMScheduler(**SD).config, solver=solver)
    assert sched.begin_index is None
    sched.set_timesteps(10)
    timesteps, t_start = get_timesteps(sched, 10, strength, begin=begin)
    assert len(timesteps) == 10 - t_start
    assert sched.begin_index == (t_start if begin else None)
    i = sched._step_of[t_start]  # the solver step starting at that call
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(SHAPE, generator=g).clamp(-1, 1), torch.randn(SHAPE, generator=g)
    x = x_start = sched.add_noise(x0, noise, timesteps[:1].repeat(SHAPE[0]))
    with torch.no_grad():
        for k, t in enumerate(timesteps):
            x = sched.step(unet(x, t).sample, t, x).prev_sample
            assert sched.step_index == t_start + k + 1
        model = ds.Denoiser(lambda y, t: unet(y, t).sample, sched.process)
        times = remaining_grid(model, x_start, solver, 10, i)
        ours, info = ds.sample(model, x_start, solver, times=times, return_info=True)
    assert info.nfe == len(timesteps)  # the pipeline's calls: what the stock scheduler makes
    assert rel_err(x, ours) <= TOL


def test_sdxl_denoising_end_then_refiner_denoising_start(unet):
    """SDXL's ensemble of experts: the base pipeline keeps the timesteps ≥ the cutoff of
    ``denoising_end=0.7`` and returns its last latents; the refiner (``denoising_start=0.7``)
    keeps the rest, ``set_begin_index`` there, and continues from those latents (no re-noising).
    Equal to the full ds.sample run up to the cutoff, then ds.sample over the rest of the
    grid, history restarted."""
    n, frac, N = 10, 0.7, 1000
    cutoff = round(N - frac * N)
    config = diffusers.EulerDiscreteScheduler(**SD).config
    base = DiffsolveScheduler.from_config(config, solver="dpmpp_2m")
    base.set_timesteps(n)
    kept = base.timesteps[: len([t for t in base.timesteps if t >= cutoff])]
    x = x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for t in kept:
            x = base.step(unet(x, t).sample, t, x).prev_sample
        refiner = DiffsolveScheduler.from_config(config, solver="dpmpp_2m")
        refiner.set_timesteps(n)
        m = int((refiner.timesteps < cutoff).sum())
        t_start = len(refiner.timesteps) - m
        refiner.set_begin_index(t_start)
        for t in refiner.timesteps[t_start:]:
            x = refiner.step(unet(x, t).sample, t, x).prev_sample
        model = ds.Denoiser(lambda y, t: unet(y, t).sample, base.process)
        grid = remaining_grid(model, x_T, "dpmpp_2m", n, 0)
        k = len(kept)
        seen = {}

        def keep(i, y, state):  # the full run's x at grid point k (lower-order-final aside)
            seen.setdefault(i, y)

        ds.sample(model, x_T, "dpmpp_2m", nfe=n, callback=keep)
        ours = ds.sample(model, seen[k - 1], "dpmpp_2m", times=grid[k:])
    assert k == t_start and 0 < k < n
    assert rel_err(x, ours) <= TOL


def test_inpainting_blend_mid_schedule(unet):
    """SD inpainting (4-channel UNet branch) at strength 0.7: after each step the known region is
    re-noised to the next timestep (``add_noise`` at ``timesteps[i + 1]``) and blended in; equal
    to ds.sample on the remaining grid with the same blend as a callback after each step."""
    sched = DiffsolveScheduler.from_config(diffusers.DDPMScheduler(**SD).config, solver="unipc")
    sched.set_timesteps(10)
    timesteps, t_start = get_timesteps(sched, 10, 0.7)
    g = torch.Generator().manual_seed(2)
    image, noise = torch.randn(SHAPE, generator=g).clamp(-1, 1), torch.randn(SHAPE, generator=g)
    mask = torch.zeros(SHAPE)
    mask[..., :, 4:] = 1.0  # 1: repaint

    def blend(latents, tau):
        proper = sched.add_noise(image, noise, torch.tensor([float(tau)]))
        return (1 - mask) * proper + mask * latents

    x = x_start = sched.add_noise(image, noise, timesteps[:1].repeat(SHAPE[0]))
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            x = sched.step(unet(x, t).sample, t, x).prev_sample
            if i < len(timesteps) - 1:
                x = blend(x, timesteps[i + 1])
        model = ds.Denoiser(lambda y, t: unet(y, t).sample, sched.process)
        times = remaining_grid(model, x_start, "unipc", 10, t_start)
        n = len(timesteps)

        def callback(i, y, state):
            return (blend(y, timesteps[i + 1]), state) if i < n - 1 else None

        ours = ds.sample(model, x_start, "unipc", times=times, callback=callback)
    assert rel_err(x, ours) <= TOL


def flow_net(x, t):
    return torch.tanh(x) * (1 + t.reshape(-1, *([1] * (x.ndim - 1))) / 1000)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_sd3_img2img_scale_noise(solver):
    """SD3 img2img: ``set_timesteps(n)`` on a shifted flow config, the grid sliced at strength,
    ``scale_noise`` (the flow path's forward noising (1 − t)·x_0 + t·ε) at the first kept
    timestep; equal to ds.sample on the remaining shifted grid."""
    stock = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = DiffsolveScheduler.from_config(stock.config, solver=solver)
    sched.set_timesteps(8)
    timesteps, t_start = get_timesteps(sched, 8, 0.5)
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    tau = timesteps[:1].repeat(3)
    x = x_start = sched.scale_noise(x0, tau, noise)
    t = float(tau[0]) / 1000
    assert rel_err(x_start, (1 - t) * x0 + t * noise) <= 1e-6
    # the stock scheduler at the same σ noises the same way
    stock.set_timesteps(8)
    stock.set_begin_index(0)
    ref = stock.scale_noise(x0, stock.timesteps[:1].repeat(3), noise)
    s0 = float(stock.sigmas[0])
    assert rel_err(ref, (1 - s0) * x0 + s0 * noise) <= 1e-6
    for tt in timesteps:
        x = sched.step(flow_net(x, tt.expand(3)), tt, x).prev_sample
    model = ds.Denoiser(flow_net, sched.process, "velocity", time_map=lambda u: 1000 * u)
    grid = Uniform(trailing=True)
    times = remaining_grid(model, x_start, solver, 8, t_start, schedule=grid)
    ours, info = ds.sample(model, x_start, solver, times=times, return_info=True)
    assert info.nfe == len(timesteps) == 4
    assert rel_err(x, ours) <= TOL


def test_flux_img2img_sigmas_mu_and_strength():
    """Flux img2img: custom ``sigmas = linspace(1, 1/n, n)`` with dynamic shift ``mu``, then
    the strength slice; the run follows e^μ and starts at the kept grid point."""
    stock = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched = DiffsolveScheduler.from_config(stock.config, solver="dpmpp_2m")
    n, mu = 8, 0.9
    sig = np.linspace(1.0, 1 / n, n)
    sched.set_timesteps(sigmas=sig, mu=mu)
    timesteps, t_start = get_timesteps(sched, n, 0.6)
    proc = ds.FlowMatching(shift=float(np.exp(mu)), t_min=1e-3)
    x0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    x = x_start = sched.scale_noise(x0, timesteps[:1].repeat(3), noise)
    for tt in timesteps:
        x = sched.step(flow_net(x, tt.expand(3)), tt, x).prev_sample
    model = ds.Denoiser(flow_net, proc, "velocity", time_map=lambda u: 1000 * u)
    times = proc.shift_time(torch.tensor(sig))[t_start:]
    ours = ds.sample(model, x_start, "dpmpp_2m", times=times)
    assert rel_err(x, ours) <= TOL
    # a named solver without custom sigmas follows μ too (a shifted flow grid)
    sched.set_timesteps(6, mu=mu)
    plain = DiffsolveScheduler.from_config(stock.config, solver="dpmpp_2m")
    plain.set_timesteps(6, mu=0.0)
    assert float(sched.timesteps[2]) > float(plain.timesteps[2]) + 50


def test_index_for_timestep_and_begin_index():
    sched = DiffsolveScheduler(solver="heun")
    sched.set_timesteps(9)
    ts = sched.timesteps
    assert sched.begin_index is None and sched.step_index is None
    # Heun's second call of step 0 shares its time with step 1's first call: the step start
    assert float(ts[1]) == float(ts[2]) and sched.index_for_timestep(ts[1]) == 2
    assert sched.index_for_timestep(ts[0]) == 0
    # another schedule: diffusers' rule (the second of repeated entries)
    assert sched.index_for_timestep(5.0, torch.tensor([9.0, 5.0, 5.0, 1.0])) == 2
    sched.set_begin_index(2)
    assert sched.begin_index == 2
    sched.set_timesteps(9)  # a new run forgets it, as diffusers' schedulers do
    assert sched.begin_index is None
    with pytest.raises(ValueError, match="not in the schedule"):
        sched.index_for_timestep(123.4)


def test_mid_schedule_starts_a_solver_cannot_make_are_refused_clearly():
    """Where the calls of a restarted run would differ from the rest of ``timesteps``
    (DPM-Solver++(2S) and PNDM plan their calls from the whole budget) or the entry is an
    intermediate stage of a step, a clear error, never a wrong sample."""
    for solver, k, error, words in (
        ("dpmpp_2s", 2, NotImplementedError, "multistep"),
        ("pndm", 3, NotImplementedError, "multistep"),
        ("heun", 2, ValueError, "intermediate stage"),
    ):
        sched = DiffsolveScheduler(solver=solver)
        sched.set_timesteps(10)
        with pytest.raises(error, match=words):
            sched.set_begin_index(k)
            sched.step(torch.zeros(1, 4), sched.timesteps[k], torch.randn(1, 4))


def test_attributes_pipelines_read():
    """``sigmas`` (diffusers' convention), ``betas``/``alphas``/``alphas_cumprod``,
    ``compatibles``, ``config.variance_type``, ``init_noise_sigma``, ``order``."""
    ref = diffusers.EulerDiscreteScheduler(**SD)
    sched = DiffsolveScheduler.from_config(ref.config, solver="dpmpp_2m")
    assert torch.allclose(sched.sigmas, ref.sigmas, rtol=1e-5)  # the training table, + 0
    ddpm = diffusers.DDPMScheduler(**SD)
    assert torch.allclose(sched.betas, ddpm.betas, rtol=1e-4, atol=1e-7)
    assert torch.allclose(sched.alphas, ddpm.alphas, rtol=1e-6)
    assert torch.equal(sched.alphas_cumprod, ddpm.alphas_cumprod)
    sched.set_timesteps(7)
    abar = sched.alphas_cumprod.double()
    t = sched.timesteps.double()
    lo = t.floor().long().clamp(max=998)
    assert len(sched.sigmas) == len(sched.timesteps) + 1 and float(sched.sigmas[-1]) == 0.0
    # each σ lies between the table's σ at the neighbouring integer indices
    s = ((1 - abar) / abar).sqrt()
    assert torch.all(sched.sigmas[:-1].double() >= s[lo] * (1 - 1e-5))
    assert torch.all(sched.sigmas[:-1].double() <= s[(lo + 1).clamp(max=999)] * (1 + 1e-5))
    names = {c.__name__ for c in sched.compatibles}
    assert {"DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
            "FlowMatchEulerDiscreteScheduler"} <= names  # fmt: skip
    assert "variance_type" in sched.config and sched.config.variance_type is None
    assert sched.init_noise_sigma == 1.0 and sched.order == 1
    flow = DiffsolveScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler().config)
    flow.set_timesteps(5)
    assert torch.allclose(flow.sigmas[:-1], flow.timesteps / 1000, rtol=1e-6)
    with pytest.raises(AttributeError):
        flow.betas  # noqa: B018


def protocol_loop(sched, unet, x, nfe):
    sched.set_timesteps(nfe)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def test_rescale_betas_zero_snr_config(unet):
    """A zero-terminal-SNR table (SD 2.x v-prediction fine-tunes): ᾱ_T = 0 held as 2⁻²⁴, as
    diffusers' DPM-Solver/UniPC do, so the run starts at t_max from N(0, I); equal to ds.sample
    on that process."""
    cfg = {**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    stock = diffusers.DPMSolverMultistepScheduler(**cfg)
    sched = DiffsolveScheduler.from_config(stock.config, solver="dpmpp_2m")
    assert torch.equal(sched.alphas_cumprod, stock.alphas_cumprod)
    assert sched.init_noise_sigma == 1.0
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    x = protocol_loop(sched, unet, x_T, 6)
    assert float(sched.timesteps[0]) == pytest.approx(999.0, abs=1e-3)
    model = ds.Denoiser(lambda y, t: unet(y, t).sample, sched.process, "v")
    with torch.no_grad():
        ours = ds.sample(model, x_T, "dpmpp_2m", nfe=6)
    assert rel_err(x, ours) <= TOL
    # a short linear table whose second-to-last ᾱ is below 2⁻²⁴ stays strictly decreasing
    lin = DiffsolveScheduler(rescale_betas_zero_snr=True)
    assert torch.all(lin.process.alphas_cumprod.diff() < 0)


def test_sigma_spacing_flags_are_honoured_or_refused():
    cfg = diffusers.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True).config
    sched = DiffsolveScheduler.from_config(cfg, solver="dpmpp_2m")
    ref = DiffsolveScheduler.from_config(
        diffusers.DPMSolverMultistepScheduler(**SD).config, solver="dpmpp_2m", schedule="karras"
    )
    sched.set_timesteps(8)
    ref.set_timesteps(8)
    assert torch.equal(sched.timesteps, ref.timesteps)
    lu = DiffsolveScheduler.from_config(
        diffusers.DPMSolverMultistepScheduler(**SD, use_lu_lambdas=True).config, solver="euler"
    )
    assert isinstance(lu._schedule, LogSNR)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DiffsolveScheduler.from_config(cfg, solver="dpmpp_2m", schedule="uniform")
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        DiffsolveScheduler.from_config(
            diffusers.DPMSolverMultistepScheduler(**SD, use_beta_sigmas=True).config
        )


@pytest.mark.parametrize("kind", ["clip_sample", "thresholding"])
def test_clip_sample_and_thresholding_are_honoured(unet, kind):
    """``clip_sample`` / ``thresholding`` in the config act as diffsolve's StaticThreshold /
    DynamicThreshold wrappers in ds.sample (x̂_0 clipped, ε̂ recomputed from it)."""
    if kind == "clip_sample":
        stock = diffusers.DDPMScheduler(**SD, clip_sample=True, clip_sample_range=1.5)
    else:
        stock = diffusers.DDPMScheduler(
            **SD, clip_sample=False, thresholding=True, sample_max_value=2.0
        )
    sched = DiffsolveScheduler.from_config(stock.config, solver="unipc")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    x = protocol_loop(sched, unet, x_T, 6)
    model = ds.Denoiser(lambda y, t: unet(y, t).sample, sched.process)
    if kind == "clip_sample":
        wrapped = ds.StaticThreshold(model, 1.5)
    else:
        wrapped = ds.DynamicThreshold(model, 0.995, 1.0, 2.0)
    with torch.no_grad():
        ours = ds.sample(wrapped, x_T, "unipc", nfe=6)
        plain = ds.sample(model, x_T, "unipc", nfe=6)
    assert rel_err(x, ours) <= TOL
    assert rel_err(plain, ours) > 1e-3  # the clipping acted


def test_consistency_model_configs_are_refused():
    for cls in (diffusers.LCMScheduler, diffusers.TCDScheduler):
        with pytest.raises(ValueError, match="consistency"):
            DiffsolveScheduler.from_config(cls().config)


def test_schedule_objects_and_solver_options_round_trip(tmp_path):
    """A schedule object and a solver-valued option are stored as name + fields (JSON) and
    come back equal after save/load."""
    grid = Karras(rho=5.0, sigma_min=0.05)
    predictor = ds.get_solver("dpmpp_2m")
    sched = DiffsolveScheduler(
        solver="unipc", schedule=grid, solver_options={"predictor": predictor}
    )
    assert sched.config.schedule == {"__schedule__": "karras", "rho": 5.0, "sigma_min": 0.05,
                                     "sigma_max": None}  # fmt: skip
    assert sched.config.solver_options["predictor"]["__solver__"] == predictor.name
    sched.save_pretrained(tmp_path)
    loaded = DiffsolveScheduler.from_pretrained(tmp_path)
    assert loaded._schedule == grid and loaded.solver == sched.solver
    sched.set_timesteps(7)
    loaded.set_timesteps(7)
    assert torch.equal(sched.timesteps, loaded.timesteps)
    obj = DiffsolveScheduler(solver=ds.get_solver("unipc", predictor=predictor))
    assert obj.solver == sched.solver


class _TinyPipeline(diffusers.DiffusionPipeline):
    """Plans its timesteps the way SD-family pipelines do: ``_guidance_scale`` set first, read
    through ``do_classifier_free_guidance``."""

    def __init__(self, scheduler):
        super().__init__()
        self.register_modules(scheduler=scheduler)

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1

    def __call__(self, guidance_scale, n):
        self._guidance_scale = guidance_scale
        self.scheduler.set_timesteps(n)
        return self.scheduler.solver


def test_auto_detects_guidance_from_the_pipeline():
    from diffsolve.auto import recommend

    sched = DiffsolveScheduler.from_config(diffusers.DDIMScheduler(**SD).config, solver="auto")
    assert sched.config.guided is None
    pipe = _TinyPipeline(sched)
    for scale, n in ((7.5, 10), (1.0, 10), (4.0, 20), (1.0, 20)):
        assert pipe(scale, n) == recommend(sched.process, n, scale > 1).solver, (scale, n)
    # NFE 20: guided → DPM-Solver++(2M), unguided → UniPC-3 (at NFE 8–11 both are 2M on SD)
    assert pipe(7.5, 20) != pipe(1.0, 20)
    # an explicit setting wins; outside a pipeline: unguided
    pipe.scheduler = DiffsolveScheduler.from_config(sched.config, guided=False)
    assert pipe(7.5, 20) == recommend(sched.process, 20, False).solver
    sched.set_timesteps(20)
    assert sched.solver == recommend(sched.process, 20, False).solver
