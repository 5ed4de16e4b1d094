"""Solver overhead per step: the time a sampling loop spends outside the network.

A near-free network (ε̂ = 0·x, one elementwise kernel) stands in for the UNet on an SD-sized
latent, so what is measured is the sampler itself: grid and coefficient set-up, the Denoiser's
prediction conversion, the update arithmetic and Python. Every diffsolve ODE solver is timed
through ``ds.sample`` (set-up included) and diffusers' schedulers through the usual pipeline loop
(``set_timesteps`` included), on the same latent, process and step count. The network's own cost
(timed alone) is subtracted:

    overhead per step = (T_run − NFE · T_net) / steps.

Usage:
    python benchmarks/overhead.py                        # CPU, (2, 4, 64, 64) float32, 20 steps
    python benchmarks/overhead.py --device cuda --cuda-graph --json overhead.json

``--cuda-graph`` also captures diffsolve's whole step loop (after ``init``) in one CUDA graph and
times its replay; solvers whose ``step`` syncs with the host cannot be captured and say so.
Never run from the unit tests.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

import diffsolve as ds
from diffsolve.sample import _Evaluator
from diffsolve.schedules import get_schedule
from diffsolve.solvers.base import Grid

# diffusers' counterparts of diffsolve solvers: label -> (class, config)
DIFFUSERS = {
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}),
    "DPMSolverMultistep 2M": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "DPMSolverMultistep 3M": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "UniPC bh2 order 2": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "UniPC bh2 order 3": ("UniPCMultistepScheduler", {"solver_order": 3}),
    "DEIS order 2": ("DEISMultistepScheduler", {"solver_order": 2}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
}
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
# k-diffusion's samplers on its Karras σ's (calls per step: 1, or 2 for Heun-type)
KDIFFUSION = {
    "sample_euler": 1,
    "sample_lms": 1,
    "sample_dpmpp_2m": 1,
    "sample_heun": 2,
    "sample_dpm_2": 2,
    "sample_dpmpp_2s_ancestral": 2,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Fastest wall time of fn() in seconds, after warm-up, with the device synchronised.

    The minimum (as ``timeit`` advises) is the run least disturbed by other processes.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


class FreeNet:
    """ε̂ = 0·x: one cheap kernel, the same work for every sampler."""

    def __call__(self, x: torch.Tensor, t: Any, **_: Any) -> torch.Tensor:
        return x * 0.0


def ode_solvers() -> list[str]:
    names = []
    for name in ds.solvers():
        try:
            solver = ds.get_solver(name)
        except (ValueError, TypeError):
            continue
        if not solver.stochastic:
            names.append(name)
    return names


def _setup(name: str, model: ds.Denoiser, x_T: torch.Tensor, steps: int):
    # what ds.sample does before its loop: schedule, grid, init (coefficients, points)
    solver = ds.get_solver(name)
    times = get_schedule(solver.default_schedule)(model.process, steps)
    grid = Grid.build(model.process, times, clean_end=True)
    ev = _Evaluator(model, {}, False, 0)
    ev.prefetch(grid.t[:-1], x_T)
    return solver, grid, solver.init(x_T, grid, ev)


def bench_diffsolve(name, model, x_T, steps, device, warmup, repeats) -> tuple[float, float, int]:
    """(whole ds.sample call, its set-up alone, NFE) in seconds."""
    _, info = ds.sample(model, x_T, name, steps=steps, check_finite=False, return_info=True)
    run = lambda: ds.sample(model, x_T, name, steps=steps, check_finite=False)  # noqa: E731
    setup = _time(lambda: _setup(name, model, x_T, steps), device, warmup, repeats)
    return _time(run, device, warmup, repeats), setup, info.nfe


def step_loop(name: str, model: ds.Denoiser, x_static: torch.Tensor, steps: int):
    """diffsolve's loop after set-up, as a closure over x_static (what a CUDA graph captures).

    Returns ``(loop, calls)``: ``loop()`` runs every ``step`` from x_static and returns the
    sample; ``calls[0]`` counts network calls made since it was last reset.
    """
    # points and coefficients go host → device here, before any capture (a capture forbids it)
    solver, grid, state0 = _setup(name, model, x_static, steps)
    calls = [0]

    class Counting:
        process = model.process

        def point(self, t, like):
            return model.point(t, like)

        def __call__(self, x, t):
            calls[0] += 1
            return model(x, t)

    counting = Counting()

    def loop() -> torch.Tensor:
        x, state = x_static, state0
        for i in range(grid.steps):
            x, state = solver.step(x, i, state, counting)
        return x

    return loop, calls


def bench_graph(name, model, x_T, steps, device, warmup, repeats) -> tuple[float, float, int]:
    """Replay time of the whole step loop captured in one CUDA graph (set-up outside it)."""
    x_static = x_T.clone()
    loop, calls = step_loop(name, model, x_static, steps)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(2):
            loop()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    calls[0] = 0
    with torch.cuda.graph(graph):
        out = loop()
    nfe = calls[0]
    # the replayed graph must give what the eager loop gives
    graph.replay()
    eager = ds.sample(model, x_static, name, steps=steps, check_finite=False)
    torch.cuda.synchronize(device)
    if not torch.allclose(out, eager, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"{name}: CUDA-graph replay differs from ds.sample")
    return _time(graph.replay, device, warmup, repeats), 0.0, nfe


def bench_diffusers(label, model, x_T, steps, device, warmup, repeats) -> tuple[float, float, int]:
    """(whole loop with set_timesteps, set_timesteps alone, NFE) in seconds."""
    import diffusers

    cls_name, cfg = DIFFUSERS[label]
    scheduler = getattr(diffusers, cls_name)(**SD, **cfg)
    net = model.net
    calls = [0]

    def run() -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        x = x_T * scheduler.init_noise_sigma
        calls[0] = 0
        for t in scheduler.timesteps:
            out = net(scheduler.scale_model_input(x, t), t)
            calls[0] += 1
            x = scheduler.step(out, t, x, return_dict=False)[0]
        return x

    run()
    setup = _time(lambda: scheduler.set_timesteps(steps, device=device), device, warmup, repeats)
    return _time(run, device, warmup, repeats), setup, calls[0]


def bench_kdiffusion(name, process, x_T, steps, device, warmup, repeats):
    """(whole run with get_sigmas_karras, the σ's alone, NFE) in seconds; the model is k-diffusion's
    own parameterisation of the same near-free network (denoised = x·0)."""
    from diffsolve.interop.kdiffusion import load_sampling

    sampling = load_sampling()
    s_min, s_max = float(process.rho(process.t_min)), float(process.rho(process.t_max))
    calls = [0]

    def model(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        calls[0] += 1
        return x * 0.0

    def sigmas() -> torch.Tensor:
        return sampling.get_sigmas_karras(steps, s_min, s_max, device=device)

    fn = getattr(sampling, name)
    extra = {"eta": 0.0} if name.endswith("ancestral") else {}

    def run() -> torch.Tensor:
        calls[0] = 0
        return fn(model, x_T * s_max, sigmas(), disable=True, **extra)

    run()
    setup = _time(sigmas, device, warmup, repeats)
    return _time(run, device, warmup, repeats), setup, calls[0]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (cuda if available)"
    )
    p.add_argument("--shape", default="2,4,64,64", help="latent shape (default 2,4,64,64)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--cuda-graph", action="store_true", help="also time diffsolve in a CUDA graph")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' schedulers")
    p.add_argument("--no-kdiffusion", action="store_true", help="skip k-diffusion's samplers")
    p.add_argument("--solvers", default="", help="comma-separated diffsolve solvers (default all)")
    p.add_argument("--json", default="", help="write the rows as JSON to this path")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("--cuda-graph needs --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    process = ds.VPDiscrete.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = ds.Denoiser(FreeNet(), process, prediction="eps")
    gen = torch.Generator(device=device).manual_seed(0)
    x_T = ds.prior(process, shape, generator=gen, device=device, dtype=torch.float32)
    t_net = _time(lambda: model.net(x_T, None), device, args.warmup, 10 * args.repeats)
    w, r, n = args.warmup, args.repeats, args.steps

    rows: list[dict[str, Any]] = []

    def add(library: str, name: str, mode: str, seconds: float, setup: float, nfe: int) -> None:
        overhead = 1e6 * (seconds - nfe * t_net) / n
        setup_us = 1e6 * setup / n
        rows.append(
            {"library": library, "name": name, "mode": mode, "steps": n, "nfe": nfe,
             "seconds": seconds, "setup_seconds": setup, "us_per_step": overhead,
             "setup_us_per_step": setup_us, "loop_us_per_step": overhead - setup_us}
        )  # fmt: skip

    names = [s for s in args.solvers.split(",") if s] or ode_solvers()
    for name in names:
        try:
            result = bench_diffsolve(name, model, x_T, n, device, w, r)
        except ValueError as e:  # adaptive solvers choose their own steps
            print(f"  {name}: skipped ({e})")
            continue
        add("diffsolve", name, "eager", *result)
        if args.cuda_graph:
            try:
                result = bench_graph(name, model, x_T, n, device, w, r)
            except Exception as e:  # a solver that syncs with the host cannot be captured
                print(f"  {name}: CUDA graph capture failed: {type(e).__name__}: {e}")
                torch.cuda.synchronize(device)
                continue
            add("diffsolve", name, "cuda-graph", *result)
    if not args.no_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print(
                "diffusers not installed: skipping its schedulers (pip install 'diffsolve[peers]')"
            )
        else:
            for label in DIFFUSERS:
                add(
                    "diffusers",
                    label,
                    "eager",
                    *bench_diffusers(label, model, x_T, n, device, w, r),
                )

    if not args.no_kdiffusion:
        try:
            from diffsolve.interop.kdiffusion import load_sampling

            load_sampling()
        except ImportError as e:
            print(f"k-diffusion not available: skipping its samplers ({e})")
        else:
            for name in KDIFFUSION:
                add(
                    "k-diffusion",
                    name,
                    "eager",
                    *bench_kdiffusion(name, process, x_T, n, device, w, r),
                )

    print(
        f"\nsolver overhead, {args.shape} float32 on {device}, {n} steps, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
        f"net alone {1e6 * t_net:.1f} µs/call\n"
    )
    print(
        f"| {'library':11} | {'solver / scheduler':24} | {'mode':10} | NFE | µs/step | "
        "set-up µs/step | loop µs/step |"
    )
    print(f"|{'-' * 13}|{'-' * 26}|{'-' * 12}|----:|--------:|---------------:|-------------:|")
    for row in rows:
        print(
            f"| {row['library']:11} | {row['name']:24} | {row['mode']:10} | {row['nfe']:3d} | "
            f"{row['us_per_step']:7.0f} | {row['setup_us_per_step']:14.0f} | "
            f"{row['loop_us_per_step']:12.0f} |"
        )
    if args.json:
        meta = {"device": str(device), "shape": shape, "steps": n, "net_us": 1e6 * t_net,
                "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
