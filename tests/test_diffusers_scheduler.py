"""DiffsolveScheduler in stock diffusers pipelines, against ``ds.sample`` on the same network.

The pipelines are built offline from a randomly initialised tiny ``UNet2DModel`` (1 channel,
8×8). Each test runs the pipeline with the scheduler and ``ds.sample`` with a Denoiser wrapping
the same UNet, from the same x_T (the pipeline's own ``randn_tensor`` draw from the seeded
generator, which then also feeds stochastic solvers on both sides). The pipeline's output is
clamped to [0, 1], so the comparison is on the last ``prev_sample`` (recorded by a spy on
``step``) and, separately, on the images against the same post-processing of ours.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.noise import NoiseSource
from diffsolve.schedules import Leading, Uniform

from .conftest import rel_err

diffusers = pytest.importorskip("diffusers", reason="needs the peers extra (diffusers)")

from diffsolve.interop.diffusers_scheduler import DiffsolveScheduler  # noqa: E402

pytestmark = [pytest.mark.peers, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TOL = 1e-5
SHAPE = (2, 1, 8, 8)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=4,
        add_attention=False,  # half the cost; the skip connections stay
    )
    return net.eval().requires_grad_(False)


def make_pipe(unet, kind: str = "ddpm", **config):
    if kind == "ddpm":
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**config))
    else:
        pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipe(pipe, nfe: int, seed: int, **kw):
    """The pipeline's images and its last ``prev_sample`` (before the [0, 1] post-processing)."""
    sched = pipe.scheduler
    seen: dict[str, torch.Tensor] = {}
    step = sched.step

    def spy(*args, **kwargs):
        out = step(*args, **kwargs)
        seen["x"] = out.prev_sample if hasattr(out, "prev_sample") else out[0]
        return out

    sched.step = spy
    try:
        gen = torch.Generator().manual_seed(seed)
        images = pipe(
            batch_size=SHAPE[0], num_inference_steps=nfe, generator=gen, output_type="np", **kw
        ).images
    finally:
        del sched.step
    return images, seen["x"]


def run_ours(unet, sched, solver, nfe, seed, prediction="eps", **options):
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(SHAPE, generator=gen)
    model = ds.Denoiser(lambda x, t: unet(x, t).sample, sched.process, prediction)
    with torch.no_grad():
        return ds.sample(model, x_T, solver, nfe=nfe, generator=gen, return_info=True, **options)


SOLVERS = [
    ("euler", {}),
    ("dpmpp_2m", {}),
    ("unipc", {}),
    ("unipc", {"order": 3}),
    ("dpmpp_3m", {}),
    ("heun", {}),
    ("dpmpp_2s", {}),
    ("ddpm", {}),
]


@pytest.mark.parametrize(("solver", "options"), SOLVERS)
def test_ddpm_pipeline_equals_sample(unet, solver, options):
    pipe = make_pipe(unet)
    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver=solver, **options)
    images, x_pipe = run_pipe(pipe, 7, seed=1)
    ours, info = run_ours(unet, pipe.scheduler, solver, 7, seed=1, **options)
    assert info.nfe == len(pipe.scheduler.timesteps) == 7
    assert rel_err(x_pipe, ours) <= TOL
    post = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(images - post).max() <= 1e-6


@pytest.mark.parametrize("solver", ["unipc", "dpmpp_2m"])
def test_ddim_pipeline_equals_sample(unet, solver):
    pipe = make_pipe(unet, "ddim")
    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver=solver)
    _, x_pipe = run_pipe(pipe, 6, seed=2)  # DDIMPipeline passes eta=0.0 to step: accepted
    ours, _ = run_ours(unet, pipe.scheduler, solver, 6, seed=2)
    assert rel_err(x_pipe, ours) <= TOL
    with pytest.raises(ValueError, match="eta"):
        run_pipe(pipe, 6, seed=2, eta=1.0)


@pytest.mark.parametrize("final", ["extrapolate", "tmin"])
def test_schedule_and_final_from_the_config(unet, final):
    """``schedule`` and ``final`` config keys act as in ds.sample; ``schedule="timestep_spacing"``
    reads the original config's spacing and ``steps_offset`` (SD: leading, offset 1)."""
    pipe = make_pipe(unet, timestep_spacing="leading", steps_offset=1)
    config = pipe.scheduler.config
    for schedule, ours_schedule in (
        ("karras", "karras"),
        ("timestep_spacing", Leading(steps_offset=1)),
    ):
        pipe.scheduler = DiffsolveScheduler.from_config(
            config, solver="dpmpp_3m", schedule=schedule, final=final
        )
        _, x_pipe = run_pipe(pipe, 6, seed=13)
        ours, info = run_ours(
            unet, pipe.scheduler, "dpmpp_3m", 6, seed=13, schedule=ours_schedule, final=final
        )
        assert rel_err(x_pipe, ours) <= TOL, schedule
        t_model = pipe.scheduler.process.model_time(info.times[:6]).float()
        assert torch.equal(pipe.scheduler.timesteps, t_model), schedule


def test_v_prediction_config(unet):
    pipe = make_pipe(unet, prediction_type="v_prediction", beta_schedule="scaled_linear",
                     beta_start=0.00085, beta_end=0.012)  # fmt: skip
    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver="dpmpp_3m")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    _, x_pipe = run_pipe(pipe, 6, seed=3)
    ours, _ = run_ours(unet, pipe.scheduler, "dpmpp_3m", 6, seed=3, prediction="v")
    assert rel_err(x_pipe, ours) <= TOL
    # read as ε instead, the same network gives another sample: the prediction type matters
    eps, _ = run_ours(unet, pipe.scheduler, "dpmpp_3m", 6, seed=3, prediction="eps")
    assert rel_err(eps, ours) > 1e-2


def test_half_precision_pipeline(unet):
    """A bfloat16 network and latents: the solver runs in float32 inside (as ds.sample does) and
    prev_sample comes back in the pipeline's dtype."""
    half = copy.deepcopy(unet).to(torch.bfloat16)
    pipe = make_pipe(half)
    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver="unipc")
    gen = torch.Generator().manual_seed(12)
    out = pipe(batch_size=2, num_inference_steps=6, generator=gen, output_type="pt").images
    gen = torch.Generator().manual_seed(12)
    x_T = torch.randn(SHAPE, generator=gen, dtype=torch.bfloat16)
    model = ds.Denoiser(
        lambda x, t: half(x, t).sample, pipe.scheduler.process, net_dtype=torch.bfloat16
    )
    with torch.no_grad():
        ours = ds.sample(model, x_T, "unipc", nfe=6)
    assert out.dtype == ours.dtype == torch.bfloat16
    assert rel_err(out, (ours / 2 + 0.5).clamp(0, 1)) <= TOL


def test_timesteps_list_every_network_call(unet):
    """Heun and DPM-Solver++(2S) make two calls per step: ``timesteps`` lists both, and equals
    the network times ``ds.sample`` feeds, call by call."""
    for solver in ("heun", "dpmpp_2s", "rk4"):
        sched = DiffsolveScheduler(solver=solver)
        sched.set_timesteps(9)
        seen: list[float] = []

        def net(x, t, seen=seen):
            seen.append(float(t[0]))
            return torch.zeros_like(x)

        model = ds.Denoiser(net, sched.process)
        ds.sample(model, torch.zeros(1, 4), solver, nfe=9)
        assert sched.timesteps.tolist() == pytest.approx(seen, rel=1e-6, abs=1e-4)
        assert len(seen) == 9 and sched.order == 1 and sched.solver_order >= 2


def test_config_round_trip(tmp_path, unet):
    pipe = make_pipe(unet, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = DiffsolveScheduler.from_config(
        pipe.scheduler.config, solver="unipc", order=3, disable_corrector=(0,), schedule="karras"
    )
    assert sched.config.solver_options == {"order": 3, "disable_corrector": (0,)}
    sched.save_pretrained(tmp_path)
    loaded = DiffsolveScheduler.from_pretrained(tmp_path)
    assert loaded.solver == sched.solver  # options survive JSON (the tuple comes back a list)
    for key in ("beta_schedule", "beta_start", "beta_end", "schedule", "solver", "final"):
        assert loaded.config[key] == sched.config[key], key
    assert torch.equal(loaded.process.alphas_cumprod, sched.process.alphas_cumprod)
    pipe.scheduler = sched
    _, a = run_pipe(pipe, 5, seed=4)
    pipe.scheduler = loaded
    _, b = run_pipe(pipe, 5, seed=4)
    assert torch.equal(a, b)
    # naming another solver drops the saved solver's options; naming the same one keeps them
    assert DiffsolveScheduler.from_config(loaded.config, solver="euler").solver == ds.get_solver(
        "euler"
    )
    assert DiffsolveScheduler.from_config(loaded.config, variant="bh1").solver == ds.get_solver(
        "unipc", order=3, disable_corrector=(0,), variant="bh1"
    )
    obj = DiffsolveScheduler(solver=ds.get_solver("dpmpp_3m", reference=True))
    assert obj.config.solver == "dpmpp_3m" and obj.config.solver_options["reference"] is True
    with pytest.raises(ValueError, match="unknown option"):
        DiffsolveScheduler.from_config(pipe.scheduler.config, solver="euler", order=3)


def test_no_stale_state(unet):
    """Consecutive runs on one scheduler equal fresh schedulers' runs, even after an abandoned
    run; a finished run refuses more calls; a stochastic solver reads its generator afresh."""
    for solver in ("unipc", "ddpm", "dpmpp_2s"):
        pipe = make_pipe(unet)
        config = pipe.scheduler.config
        fresh = []
        for seed, nfe in ((5, 6), (6, 4)):
            pipe.scheduler = DiffsolveScheduler.from_config(config, solver=solver)
            fresh.append(run_pipe(pipe, nfe, seed)[1])
        shared = DiffsolveScheduler.from_config(config, solver=solver)
        shared.set_timesteps(5)  # an abandoned run, two calls in
        x = torch.randn(SHAPE)
        for t in shared.timesteps[:2]:
            x = shared.step(unet(x, t).sample, t, x, generator=torch.Generator()).prev_sample
        pipe.scheduler = shared
        again = [run_pipe(pipe, nfe, seed)[1] for seed, nfe in ((5, 6), (6, 4))]
        for a, b in zip(fresh, again):
            assert torch.equal(a, b), solver
        with pytest.raises(RuntimeError, match="set_timesteps"):
            shared.step(x, shared.timesteps[-1], x)


def test_every_registered_solver_runs(unet):
    """Every registered solver (deterministic or stochastic) drives a pipeline and equals
    ds.sample; the adaptive ones are rejected with a reason."""
    pipe = make_pipe(unet)
    config = pipe.scheduler.config
    ran = []
    for name in ds.solvers():
        if ds.get_solver(name).adaptive:
            with pytest.raises(ValueError, match="chooses its own steps"):
                DiffsolveScheduler.from_config(config, solver=name)
            continue
        pipe.scheduler = DiffsolveScheduler.from_config(config, solver=name)
        _, x_pipe = run_pipe(pipe, 6, seed=7)
        ours, info = run_ours(unet, pipe.scheduler, name, 6, seed=7)
        assert info.nfe == len(pipe.scheduler.timesteps) == 6, name
        assert rel_err(x_pipe, ours) <= TOL, name
        ran.append(name)
    assert {"ddpm", "sa_solver", "heun", "rk4", "pndm", "deis", "dpm_fast"} <= set(ran)


def test_per_sample_generators(unet):
    """A list of generators (one per sample) gives each sample its own noise seed (one draw
    from each, as ``ds.sample(..., generator=gens)`` takes it)."""
    pipe = make_pipe(unet)
    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver="ddpm")
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    out = pipe(batch_size=2, num_inference_steps=5, generator=gens, output_type="pt").images
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    x_T = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens])
    model = ds.Denoiser(lambda x, t: unet(x, t).sample, pipe.scheduler.process)
    with torch.no_grad():
        ours = ds.sample(model, x_T, "ddpm", nfe=5, generator=gens)
    assert rel_err(out, (ours / 2 + 0.5).clamp(0, 1)) <= TOL
    # sample b's noise is its own generator's: the second one alone gets the same noise
    both = NoiseSource.from_generator([torch.Generator().manual_seed(s) for s in (11, 12)])
    solo = NoiseSource.from_generator([torch.Generator().manual_seed(12)])
    assert torch.equal(both.randn(x_T, 2)[1:], solo.randn(x_T[1:], 2))


@pytest.mark.parametrize("solver", ["ddpm", "dpmpp_sde", "pc"])
def test_replayed_steps_draw_the_same_noise(unet, solver):
    """Noise is a function of (seed, step, stage, sample index), not a stream: ``step`` handed
    the same inputs twice (the scheduler and a copy of it at the same call) returns the same
    ``prev_sample``; solvers with several calls per step (dpmpp_sde: two, pc: corrector and
    predictor), whose steps the scheduler re-runs once per call, equal ``ds.sample``; and the
    same scheduler run again with the same generator seed gives the same sample."""
    sched = DiffsolveScheduler(solver=solver)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))

    def loop():
        sched.set_timesteps(6)
        x = x_T
        for t in sched.timesteps:
            out = unet(x, t).sample
            twin = copy.deepcopy(sched)
            a = sched.step(out, t, x, generator=torch.Generator().manual_seed(4)).prev_sample
            b = twin.step(out, t, x, generator=torch.Generator().manual_seed(4)).prev_sample
            assert torch.equal(a, b), t
            x = a
        return x

    with torch.no_grad():
        first = loop()
        assert torch.equal(loop(), first)
        model = ds.Denoiser(lambda x, t: unet(x, t).sample, sched.process)
        ours = ds.sample(model, x_T, solver, nfe=6, generator=torch.Generator().manual_seed(4))
    assert rel_err(first, ours) <= TOL


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_latent_edits_between_calls_are_honoured(unet, solver):
    """An inpainting-style edit of the latents after each call acts like ds.sample's steering
    callback that makes the same edit after each step."""
    sched = DiffsolveScheduler(solver=solver)
    mask = torch.zeros(SHAPE)
    mask[..., :4] = 1.0

    def edit(x):
        return mask * 0.5 * x + (1 - mask) * x

    sched.set_timesteps(6)
    x = x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            x = sched.step(unet(x, t).sample, t, x).prev_sample
            x = edit(x) if k < 5 else x
        model = ds.Denoiser(lambda x, t: unet(x, t).sample, sched.process)
        ours = ds.sample(
            model, x_T, solver, nfe=6, callback=lambda i, y, s: (edit(y), s) if i < 5 else None
        )
    assert rel_err(x, ours) <= TOL
    plain = ds.sample(model, x_T, solver, nfe=6)
    assert rel_err(plain, ours) > 1e-3


def flow_net(x, t):
    return torch.tanh(x) * (1 + t.reshape(-1, 1) / 1000)


def flow_loop(sched, x):
    for t in sched.timesteps:
        x = sched.step(flow_net(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def test_flow_matching_config():
    """A FlowMatch config: the network sees N·t and predicts the velocity ε − x_0."""
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched = DiffsolveScheduler.from_config(flow.config, solver="unipc")
    assert sched.config.prediction_type == "flow_prediction"
    assert sched.process.shift == 3.0
    sched.set_timesteps(6)
    assert 0 < float(sched.timesteps[-1]) < float(sched.timesteps[0]) <= 1000
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))
    model = ds.Denoiser(flow_net, sched.process, "velocity", time_map=lambda t: 1000 * t)
    # a named solver on a flow config steps on diffusers' shifted flow grid (not its λ grid)
    grid = Uniform(trailing=True)
    ours = ds.sample(model, x_T, "unipc", nfe=6, schedule=grid)
    assert rel_err(flow_loop(sched, x_T), ours) <= TOL
    shifted = (1000 * grid(sched.process, 6)).tolist()
    assert sched.timesteps.tolist() == pytest.approx(shifted, rel=1e-6)
    plain = DiffsolveScheduler.from_config(
        diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0).config, solver="dpmpp_2m"
    )
    plain.set_timesteps(6)
    assert float(plain.timesteps[2]) < float(sched.timesteps[2]) - 50  # the shift is followed


def test_custom_sigmas_and_timesteps():
    """diffusers' ``retrieve_timesteps`` arguments: Flux-style ``sigmas`` with dynamic shifting
    ``mu`` (shifted by e^μ, as FlowMatch does), and VP ``timesteps``: the solver steps through
    exactly those points, every call listed (Heun: two per step)."""
    flow = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched = DiffsolveScheduler.from_config(flow.config, solver="dpmpp_2m")
    sig = np.linspace(1.0, 1 / 6, 6)
    sched.set_timesteps(sigmas=sig, mu=0.8)
    proc = ds.FlowMatching(shift=float(np.exp(0.8)), t_min=1e-3)
    times = proc.shift_time(torch.tensor(sig))
    assert sched.timesteps.tolist() == pytest.approx((1000 * times).tolist(), rel=1e-6)
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(10))
    model = ds.Denoiser(flow_net, proc, "velocity", time_map=lambda t: 1000 * t)
    ours = ds.sample(model, x_T, "dpmpp_2m", times=times)
    assert rel_err(flow_loop(sched, x_T), ours) <= TOL

    sched = DiffsolveScheduler(solver="heun")
    sched.set_timesteps(timesteps=[999, 759, 499, 259, 0])
    assert len(sched.timesteps) == sched.num_inference_steps == 2 * 5 - 1
    assert sched.timesteps[:3].tolist() == [999.0, 759.0, 759.0]
    with pytest.raises(ValueError, match="not both"):
        sched.set_timesteps(timesteps=[999, 0], sigmas=[1.0, 0.1])


def test_training_side_helpers_match_diffusers():
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = DiffsolveScheduler.from_config(ref.config)
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    tau = torch.tensor([0, 10, 500, 999])
    assert rel_err(sched.add_noise(x0, eps, tau), ref.add_noise(x0, eps, tau)) < 1e-6
    assert rel_err(sched.get_velocity(x0, eps, tau), ref.get_velocity(x0, eps, tau)) < 1e-6
    assert len(sched) == 1000 and sched.init_noise_sigma == 1.0
    assert sched.scale_model_input(x0, 3) is x0
    assert torch.equal(sched.alphas_cumprod, ref.alphas_cumprod)


def test_misuse_gives_clear_errors(unet):
    sched = DiffsolveScheduler()
    x = torch.zeros(SHAPE)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep"):
        sched.step(x, 500, x)  # on no entry of the schedule
    with pytest.raises(ValueError, match="outside"):
        sched.set_begin_index(9)
    heun = DiffsolveScheduler(solver="heun")
    heun.set_timesteps(5)
    with pytest.raises(ValueError, match="intermediate stage"):
        heun.set_begin_index(1)
    with pytest.raises(ValueError, match="positive integer"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffsolveScheduler(prediction_type="score")
    edm = diffusers.EDMEulerScheduler()
    with pytest.raises(ValueError, match="EDM"):
        DiffsolveScheduler.from_config(edm.config)


def test_auto_in_a_pipeline_equals_ds_sample_auto(unet):
    """``solver="auto"`` resolves per run from the budget, as ``ds.sample(solver="auto")`` does
    (NFE 5 and 20 use different grids and end rules); the config keeps "auto"."""
    pipe = make_pipe(unet)
    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver="auto")
    assert pipe.scheduler.config["solver"] == "auto"
    for nfe in (5, 20):
        _, x_pipe = run_pipe(pipe, nfe, seed=4)
        ours, info = run_ours(unet, pipe.scheduler, "auto", nfe, seed=4)
        assert info.nfe == len(pipe.scheduler.timesteps) == nfe
        assert rel_err(x_pipe, ours) <= TOL, nfe
    guided = DiffsolveScheduler.from_config(pipe.scheduler.config, solver="auto", guided=True)
    guided.set_timesteps(10)
    assert guided.solver.name == "dpmpp_2m"
    with pytest.raises(ValueError, match="no solver options"):
        DiffsolveScheduler.from_config(pipe.scheduler.config, solver="auto", order=3)


def test_a_tuned_solver_with_learned_call_times_runs_in_a_pipeline(unet):
    """A tuned solver whose calls evaluate off its grid (``ds.tune``'s learned call times): the
    pipeline feeds the network exactly those times and ends where ``ds.sample`` ends."""
    from diffsolve.tuning.student import Student

    pipe = make_pipe(unet)
    process = DiffsolveScheduler.from_config(pipe.scheduler.config).process
    model = ds.Denoiser(lambda x, t: unet(x, t).sample, process, "eps")
    lam = process.lambda_(ds.LogSNR()(process, 5))
    student = Student(model, 5, process.t_max_finite, lam, float(lam[-1]) + 1.0, float(lam[1]),
                      start_span=1.0, start_shift=0.2, time_offsets=True)  # fmt: skip
    with torch.no_grad():
        student.omega.copy_(torch.tensor([0.9, -0.7, 0.5, -1.5], dtype=torch.float64))
    tuned = student.export()
    assert tuned.call_times != tuned.times
    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver=tuned)
    _, x_pipe = run_pipe(pipe, 5, seed=4)
    ours, info = run_ours(unet, pipe.scheduler, tuned, 5, seed=4)
    expected = [float(process.model_time(torch.tensor(t))) for t in tuned.call_times]
    assert pipe.scheduler.timesteps.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-4)
    assert info.nfe == 5 and rel_err(x_pipe, ours) <= TOL
    # the config carries the whole table: a saved and reloaded scheduler runs the same calls
    again = DiffsolveScheduler.from_config(dict(pipe.scheduler.config))
    again.set_timesteps(5)
    assert again.solver == tuned and torch.equal(again.timesteps, pipe.scheduler.timesteps)
    with pytest.raises(ValueError, match="5 network calls"):
        pipe.scheduler.set_timesteps(6)
    with pytest.raises(ds.tuning.TunedFileError, match="another process"):
        DiffsolveScheduler.from_config(pipe.scheduler.config, beta_schedule="scaled_linear")
    with pytest.raises(ValueError, match="no solver options"):
        DiffsolveScheduler(solver=tuned, solver_options={"order": 2})
