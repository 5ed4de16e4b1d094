"""Solver overhead per step: the time a sampling loop spends outside the network.

A near-free network (ε̂ = 0·x, one elementwise kernel) stands in for the UNet on an SD-sized
latent, so what is measured is the sampler itself: the plan (grid, calls per step, rows of
weights, evaluation points), the Denoiser's prediction conversion, the update arithmetic and
Python. Every diffsolve ODE solver is timed through ``ds.sample`` (set-up included), diffusers'
schedulers through the usual pipeline loop (``set_timesteps`` included) and k-diffusion's
samplers on its Karras σ's, on the same latent, process (SD's scaled-linear VP, ε-prediction)
and step count. The network's own cost (timed alone) is subtracted:

    overhead per step = (T_run − NFE · T_net) / steps.

Set-up is what ``ds.sample`` does before its loop: ``ds.make_plan`` + ``solver.init`` (on a
diffsolve without ``make_plan``, e.g. commit 5f7b423: schedule, ``Grid.build``, the evaluator's
point prefetch, ``solver.init``).

Usage:
    python benchmarks/overhead.py                        # CPU, (2, 4, 64, 64) float32, 20 steps
    python benchmarks/overhead.py --device cuda --cuda-graph --json overhead.json
    # before/after: another diffsolve source tree against this one, interleaved in one session
    git worktree add /tmp/before 5f7b423
    python benchmarks/overhead.py --threads 1 --compare-to /tmp/before/src \\
        --shapes 2,4,64,64 16,3,64,64 --json compare.json

``--compare-to SRC`` starts two worker processes, one importing diffsolve from SRC ("before")
and one from this checkout's ``src`` ("after"), and alternates them item by item, round after
round (before, after, after, before, ...), so both see the same machine load; each number is
the fastest over all rounds. The NaN watch (``check_finite=True``, ds.sample's default) is timed
as a separate run and reported as its extra cost per step.

``--cold`` times the set-up of a *first* run instead (no plan cache: ``diffsolve.plan``'s
``_GRIDS`` and ``_POINTS`` and dpm_solver_v3's ``_TABLES`` are emptied before each repetition),
CPU time, median of at least 20
repetitions, for every solver that takes ``steps=`` (or ``--solvers``); with ``--compare-to``,
before and after interleaved as above:

    python benchmarks/overhead.py --cold --threads 1
    python benchmarks/overhead.py --cold --threads 1 --compare-to /tmp/before/src --rounds 3

``--cuda-graph`` also captures diffsolve's whole step loop (after ``init``) in one CUDA graph and
times its replay; solvers whose ``step`` syncs with the host cannot be captured and say so.
Never run from the unit tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import diffsolve as ds

HAS_PLAN = hasattr(ds, "make_plan")  # the plan engine (issue 9); before it, the grid internals
if not HAS_PLAN:
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
# the reference of the ratios, and a variant whose model converts ε̂ → x̂_0 itself (c_in, c_out
# as k-diffusion's DiscreteEpsDDPMDenoiser, minus its σ → t lookup): the work ds.sample's
# Denoiser does inside its loop
KREF = "sample_dpmpp_2m"
KEPS = "sample_dpmpp_2m+eps"
# what a before/after comparison times by default (the list and a few more)
COMPARE = "euler,dpmpp_2m,dpmpp_3m,unipc,deis,heun,dpm_fast,dpm_solver,dpmpp_2s,lms,ipndm"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Fastest time of fn() in seconds, after warm-up, with the device synchronised.

    The minimum (as ``timeit`` advises) is the run least disturbed by other processes. The
    clock is wall time, or with ``--clock cpu`` this process's CPU time (CPU runs only): on a
    busy machine it leaves out the time the process waits for a core.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        _sync(device)
        times.append(CLOCK() - start)
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


def _setup(name: str, model: Any, x_T: torch.Tensor, steps: int):
    """What ds.sample does before its loop; returns (solver, plan or grid, initial state)."""
    solver = ds.get_solver(name)
    if HAS_PLAN:  # the plan (grid, calls, rules, evaluation points) made once, then init
        plan = ds.make_plan(model, x_T, solver, steps=steps)
        return solver, plan, solver.init(x_T, plan, model)
    # before the plan engine: schedule, grid, the evaluator's point prefetch, init
    times = get_schedule(solver.default_schedule)(model.process, steps)
    grid = Grid.build(model.process, times, clean_end=True)
    ev = _Evaluator(model, {}, False, 0)
    ev.prefetch(grid.t[:-1], x_T)
    return solver, grid, solver.init(x_T, grid, ev)


def cold_setup(name: str, model: Any, x_T: torch.Tensor, steps: int, repeats: int) -> float:
    """Median CPU time of a first run's set-up: the plan caches emptied before each repetition
    (a diffsolve without them, e.g. before commit d8cc51e, has nothing to empty)."""
    from diffsolve import plan as plan_module

    caches = [getattr(plan_module, c, None) for c in ("_GRIDS", "_POINTS")] if HAS_PLAN else []
    try:  # dpm_solver_v3 keeps its per-element rows (after commit 7f15e04)
        from diffsolve.solvers import dpm_solver_v3

        caches.append(getattr(dpm_solver_v3, "_TABLES", None))
    except ImportError:
        pass
    _setup(name, model, x_T, steps)  # imports, lazily built tables: not what a run pays
    times = []
    for _ in range(max(repeats, 20)):
        for cache in caches:
            if cache is not None:
                cache.clear()
        start = time.process_time()
        _setup(name, model, x_T, steps)
        times.append(time.process_time() - start)
    return statistics.median(times)


def bench_diffsolve(
    name, model, x_T, steps, device, warmup, repeats, check: bool = False
) -> tuple[float, float, int]:
    """(whole ds.sample call, its set-up alone, NFE) in seconds."""
    kw = {"steps": steps, "check_finite": check}
    _, info = ds.sample(model, x_T, name, return_info=True, **kw)
    run = lambda: ds.sample(model, x_T, name, **kw)  # noqa: E731
    setup = _time(lambda: _setup(name, model, x_T, steps), device, warmup, repeats)
    return _time(run, device, warmup, repeats), setup, info.nfe


def step_loop(name: str, model: ds.Denoiser, x_static: torch.Tensor, steps: int):
    """diffsolve's loop after set-up, as a closure over x_static (what a CUDA graph captures).

    Returns ``(loop, calls)``: ``loop()`` runs every ``step`` from x_static and returns the
    sample; ``calls[0]`` counts network calls made since it was last reset.
    """
    # points and coefficients go host → device here, before any capture (a capture forbids it)
    solver, plan, state0 = _setup(name, model, x_static, steps)
    calls = [0]

    class Counting:
        process = model.process

        def point(self, t, like):
            return model.point(t, like)

        def points(self, ts, like):
            return model.points(ts, like)

        def __call__(self, x, t):
            calls[0] += 1
            return model(x, t)

    counting = Counting()

    def loop() -> torch.Tensor:
        x, state = x_static, state0
        for i in range(plan.steps):
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
    own parameterisation of the same near-free network (denoised = x·0). ``KEPS`` runs
    ``sample_dpmpp_2m`` on an ε-network wrapper instead (x̂_0 = x + c_out·ε̂(c_in·x), ε̂ = 0·x)."""
    from diffsolve.interop.kdiffusion import load_sampling

    sampling = load_sampling()
    s_min, s_max = float(process.rho(process.t_min)), float(process.rho(process.t_max))
    calls = [0]

    def model(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        calls[0] += 1
        return x * 0.0

    def eps_model(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        calls[0] += 1
        s = sigma[:, None, None, None] if x.ndim == 4 else sigma.reshape(-1, *[1] * (x.ndim - 1))
        eps = (x * (s * s + 1) ** -0.5) * 0.0
        return x + eps * -s

    def sigmas() -> torch.Tensor:
        return sampling.get_sigmas_karras(steps, s_min, s_max, device=device)

    fn = getattr(sampling, KREF if name == KEPS else name)
    net = eps_model if name == KEPS else model
    extra = {"eta": 0.0} if name.endswith("ancestral") else {}

    def run() -> torch.Tensor:
        calls[0] = 0
        return fn(net, x_T * s_max, sigmas(), disable=True, **extra)

    run()
    setup = _time(sigmas, device, warmup, repeats)
    return _time(run, device, warmup, repeats), setup, calls[0]


class Bench:
    """One latent on one device: the model, x_T and the network's own time."""

    def __init__(
        self, device: str, shape: tuple[int, ...], steps: int, threads: int = 0, clock: str = "wall"
    ):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device available")
        if threads:
            torch.set_num_threads(threads)
        if clock != "wall" and device.startswith("cuda"):
            raise SystemExit("--clock cpu times CPU runs only; use --clock wall on CUDA")
        global CLOCK
        CLOCK = CLOCKS[clock]
        self.device, self.shape, self.steps = torch.device(device), shape, steps
        self.process = ds.VPDiscrete.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
        self.model = ds.Denoiser(FreeNet(), self.process, prediction="eps")
        gen = torch.Generator(device=self.device).manual_seed(0)
        self.x_T = ds.prior(
            self.process, shape, generator=gen, device=self.device, dtype=torch.float32
        )

    def net(self, warmup: int, repeats: int) -> float:
        return _time(lambda: self.model.net(self.x_T, None), self.device, warmup, repeats)

    def run(self, library: str, name: str, mode: str, warmup: int, repeats: int):
        """(T_run, T_setup, NFE) in seconds; mode "eager", "check" (NaN watch on), "cuda-graph"."""
        args = (self.x_T, self.steps, self.device, warmup, repeats)
        if library == "diffsolve":
            if mode == "cold":  # (no run, set-up of a first run, no NFE)
                return math.nan, cold_setup(name, self.model, self.x_T, self.steps, repeats), 0
            if mode == "cuda-graph":
                return bench_graph(name, self.model, *args)
            return bench_diffsolve(name, self.model, *args, check=mode == "check")
        if library == "diffusers":
            return bench_diffusers(name, self.model, *args)
        if library == "k-diffusion":
            return bench_kdiffusion(name, self.process, *args)
        raise ValueError(f"unknown library {library!r}")


def _row(library, name, mode, steps, t_net, seconds, setup, nfe) -> dict[str, Any]:
    overhead = 1e6 * (seconds - nfe * t_net) / steps
    setup_us = 1e6 * setup / steps
    return {
        "library": library,
        "name": name,
        "mode": mode,
        "steps": steps,
        "nfe": nfe,
        "seconds": seconds,
        "setup_seconds": setup,
        "us_per_step": overhead,
        "setup_us_per_step": setup_us,
        "loop_us_per_step": overhead - setup_us,
    }


def _peers_available(args) -> tuple[bool, bool]:
    have_diffusers = have_k = False
    if not args.no_diffusers:
        try:
            import diffusers  # noqa: F401

            have_diffusers = True
        except ImportError:
            print(
                "diffusers not installed: skipping its schedulers (pip install 'diffsolve[peers]')"
            )
    if not args.no_kdiffusion:
        try:
            from diffsolve.interop.kdiffusion import load_sampling

            load_sampling()
            have_k = True
        except ImportError as e:
            print(f"k-diffusion not available: skipping its samplers ({e})")
    return have_diffusers, have_k


def run_single(args) -> list[dict[str, Any]]:
    if args.cuda_graph and not args.device.startswith(("cuda", "auto")):
        raise SystemExit("--cuda-graph needs --device cuda")
    shape = tuple(int(s) for s in args.shape.split(","))
    bench = Bench(args.device, shape, args.steps, args.threads, args.clock)
    device = bench.device
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("--cuda-graph needs --device cuda")
    w, r, n = args.warmup, args.repeats, args.steps
    t_net = bench.net(w, 10 * r)
    rows: list[dict[str, Any]] = []

    def add(library: str, name: str, mode: str) -> None:
        rows.append(_row(library, name, mode, n, t_net, *bench.run(library, name, mode, w, r)))

    if args.cold:
        return run_cold(args, bench)
    names = [s for s in args.solvers.split(",") if s] or ode_solvers()
    for name in names:
        try:
            add("diffsolve", name, "check" if args.check_finite else "eager")
        except ValueError as e:  # adaptive solvers choose their own steps
            print(f"  {name}: skipped ({e})")
            continue
        if args.cuda_graph:
            try:
                add("diffsolve", name, "cuda-graph")
            except Exception as e:  # a solver that syncs with the host cannot be captured
                print(f"  {name}: CUDA graph capture failed: {type(e).__name__}: {e}")
                torch.cuda.synchronize(device)
    have_diffusers, have_k = _peers_available(args)
    for label in DIFFUSERS if have_diffusers else ():
        add("diffusers", label, "eager")
    for name in [*KDIFFUSION, KEPS] if have_k else ():
        add("k-diffusion", name, "eager")

    print(
        f"\nsolver overhead, {args.shape} float32 on {device}, {n} steps, SD scaled-linear VP, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.clock} clock; "
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
        meta = {
            "device": str(device),
            "shape": bench.shape,
            "steps": n,
            "net_us": 1e6 * t_net,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "clock": args.clock,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


def run_cold(args, bench: Bench) -> list[dict[str, Any]]:
    """``--cold``: each solver's first-run set-up (see :func:`cold_setup`), one table."""
    rows = []
    for name in [s for s in args.solvers.split(",") if s] or list(ds.solvers()):
        try:
            setup = bench.run("diffsolve", name, "cold", 0, args.repeats)[1]
        except (ValueError, TypeError) as e:  # adaptive solvers choose their own steps
            print(f"  {name}: skipped ({e})")
            continue
        rows.append(_row("diffsolve", name, "cold", args.steps, 0.0, math.nan, setup, 0))
    print(
        f"\ncold set-up (no plan cache), {args.shape} float32 on {bench.device}, "
        f"{args.steps} steps, SD scaled-linear VP, {torch.get_num_threads()} CPU threads, "
        f"CPU time, median of {max(args.repeats, 20)}\n\n| solver | set-up µs/step |\n|---|--:|"
    )
    for row in rows:
        print(f"| {row['name']} | {row['setup_us_per_step']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"mode": "cold", "steps": args.steps}, "rows": rows}, f, indent=1)
    return rows


# -- before/after: two worker processes, interleaved ------------------------------------------


def worker() -> None:
    """Serve timing requests, one JSON object per line on stdin, answers on stdout."""
    bench: Bench | None = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "init":
                bench = Bench(
                    req["device"], tuple(req["shape"]), req["steps"], req["threads"], req["clock"]
                )
                out: dict[str, Any] = {
                    "diffsolve": ds.__file__,
                    "plan_api": HAS_PLAN,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                }
                out["peers"] = _peers_available(argparse.Namespace(**req["peers"]))
            elif req["op"] == "net":
                assert bench is not None
                out = {"net": bench.net(req["warmup"], req["repeats"])}
            else:
                assert bench is not None
                run, setup, nfe = bench.run(
                    req["library"], req["name"], req["mode"], req["warmup"], req["repeats"]
                )
                out = {"run": run, "setup": setup, "nfe": nfe}
        except Exception as e:  # a solver the tree does not have, an adaptive one, ...
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


class Worker:
    def __init__(self, label: str, src: str):
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH", "")])),
        )
        self.label = label
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def ask(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} worker died")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def compare(args) -> list[dict[str, Any]]:
    after_src = str(Path(__file__).resolve().parents[1] / "src")
    names = [s for s in (args.solvers or COMPARE).split(",") if s]
    if args.cold and not args.solvers:
        names = list(ds.solvers())
    shapes = args.shapes or [args.shape]
    w, r, n = args.warmup, args.repeats, args.steps
    peers = {"no_diffusers": args.no_diffusers, "no_kdiffusion": args.no_kdiffusion}
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "device": args.device,
        "steps": n,
        "rounds": args.rounds,
        "repeats": r,
        "warmup": w,
        "clock": args.clock,
        "before": args.compare_to,
        "after": after_src,
        "shapes": {},
    }
    for shape_text in shapes:
        shape = [int(s) for s in shape_text.split(",")]
        workers = [Worker("before", args.compare_to), Worker("after", after_src)]
        info = {}
        for wk in workers:
            info[wk.label] = wk.ask(
                op="init",
                device=args.device,
                shape=shape,
                steps=n,
                threads=args.threads,
                clock=args.clock,
                peers=peers,
            )
            if "error" in info[wk.label]:
                raise SystemExit(f"{wk.label}: {info[wk.label]['error']}")
            print(f"{wk.label}: diffsolve from {info[wk.label]['diffsolve']}", flush=True)
        have_diffusers, have_k = info["after"]["peers"]
        # (library, name, mode, which workers): k-diffusion's reference in both, as a control
        modes = ("cold",) if args.cold else ("eager", "check")
        items = [("diffsolve", s, m, ("before", "after")) for s in names for m in modes]
        items += [
            ("diffusers", label, "eager", ("after",))
            for label in DIFFUSERS
            if have_diffusers and not args.cold
        ]
        if have_k and not args.cold:
            items += [("k-diffusion", KREF, "eager", ("before", "after"))]
            items += [
                ("k-diffusion", k, "eager", ("after",)) for k in [*KDIFFUSION, KEPS] if k != KREF
            ]
        best: dict[tuple, list[float]] = {}
        nfe: dict[tuple, int] = {}
        errors: dict[tuple, str] = {}
        net = {wk.label: float("inf") for wk in workers}
        start = time.perf_counter()
        for k in range(args.rounds):
            order = workers if k % 2 == 0 else workers[::-1]
            for wk in order:
                net[wk.label] = min(
                    net[wk.label], wk.ask(op="net", warmup=w, repeats=10 * r)["net"]
                )
            for library, name, mode, who in items:
                for wk in order:
                    key = (wk.label, library, name, mode)
                    if wk.label not in who or key in errors:
                        continue
                    res = wk.ask(
                        op="run", library=library, name=name, mode=mode, warmup=w, repeats=r
                    )
                    if "error" in res:
                        errors[key] = res["error"]
                        print(f"  {wk.label} {name} {mode}: {res['error'][:100]}", flush=True)
                        continue
                    old = best.get(key, [float("inf")] * 2)
                    best[key] = [min(old[0], res["run"]), min(old[1], res["setup"])]
                    nfe[key] = res["nfe"]
            print(
                f"  {shape_text}: round {k + 1}/{args.rounds} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        for wk in workers:
            wk.close()
        for key, (run, setup) in best.items():
            label, library, name, mode = key
            row = _row(library, name, mode, n, net[label], run, setup, nfe[key])
            rows.append({"version": label, "shape": shape_text, **row})
        meta["shapes"][shape_text] = {
            "net_us": {k: 1e6 * v for k, v in net.items()},
            "workers": info,
        }
        if args.cold:
            print_cold_compare(rows, shape_text, n, names)
        else:
            print_compare(rows, shape_text, n, net, names)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


def print_compare(rows, shape: str, steps: int, net: dict[str, float], names) -> None:
    get = {
        (r["version"], r["library"], r["name"], r["mode"]): r for r in rows if r["shape"] == shape
    }
    ref = get.get(("after", "k-diffusion", KREF, "eager"))
    ref_us = ref["us_per_step"] if ref else float("nan")

    def f(v: float | None) -> str:
        return "—" if v is None else f"{v:.0f}"

    print(
        f"\n{shape} float32, {steps} steps, SD scaled-linear VP (ε-prediction); net alone "
        + ", ".join(f"{k} {1e6 * v:.1f} µs/call" for k, v in net.items())
        + f"; ratio: total µs/step over k-diffusion {KREF}'s ({ref_us:.0f})\n"
    )
    print(
        "| solver | NFE | set-up µs/step before → after | loop µs/step before → after | "
        "total µs/step before → after | after / k-diff 2M | NaN watch µs/step before → after |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name in names:
        b, a = (
            get.get(("before", "diffsolve", name, "eager")),
            get.get(("after", "diffsolve", name, "eager")),
        )
        if a is None and b is None:
            continue
        bc, ac = (
            get.get(("before", "diffsolve", name, "check")),
            get.get(("after", "diffsolve", name, "check")),
        )

        def pair(key: str, x=b, y=a) -> str:
            return f"{f(x[key] if x else None)} → {f(y[key] if y else None)}"

        def watch(e, c) -> str:
            return f(c["us_per_step"] - e["us_per_step"]) if e and c else "—"

        ratio = f"{a['us_per_step'] / ref_us:.2f}" if a else "—"
        print(
            f"| {name} | {(a or b)['nfe']} | {pair('setup_us_per_step')} | "
            f"{pair('loop_us_per_step')} | {pair('us_per_step')} | {ratio} | "
            f"{watch(b, bc)} → {watch(a, ac)} |"
        )
    print(
        "\n| library | sampler / scheduler | NFE | set-up µs/step | loop µs/step | total µs/step | "
        "/ k-diff 2M |"
    )
    print("|---|---|--:|--:|--:|--:|--:|")
    for (version, library, name, _), row in get.items():
        if library == "diffsolve":
            continue
        tag = f" ({version} worker)" if library == "k-diffusion" and name == KREF else ""
        print(
            f"| {library} | {name}{tag} | {row['nfe']} | {f(row['setup_us_per_step'])} | "
            f"{f(row['loop_us_per_step'])} | {f(row['us_per_step'])} | "
            f"{row['us_per_step'] / ref_us:.2f} |"
        )


def print_cold_compare(rows, shape: str, steps: int, names) -> None:
    get = {(r["version"], r["name"]): r for r in rows if (r["shape"], r["mode"]) == (shape, "cold")}
    print(
        f"\n{shape} float32, {steps} steps, SD scaled-linear VP: cold set-up (no plan cache), "
        "CPU time, the median of each round's repetitions, fastest round\n"
    )
    print("| solver | cold set-up µs/step before → after |\n|---|--:|")
    for name in names:
        b, a = get.get(("before", name)), get.get(("after", name))
        if a is not None or b is not None:
            shown = [f"{r['setup_us_per_step']:.1f}" if r else "—" for r in (b, a)]
            print(f"| {name} | {shown[0]} → {shown[1]} |")


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
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or the process's CPU time (CPU only; steadier under load)",
    )
    p.add_argument("--cuda-graph", action="store_true", help="also time diffsolve in a CUDA graph")
    p.add_argument(
        "--cold", action="store_true", help="time a first run's set-up (no plan cache) instead"
    )
    p.add_argument("--check-finite", action="store_true", help="time ds.sample with its NaN watch")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' schedulers")
    p.add_argument("--no-kdiffusion", action="store_true", help="skip k-diffusion's samplers")
    p.add_argument("--solvers", default="", help="comma-separated diffsolve solvers (default all)")
    p.add_argument("--json", default="", help="write the rows as JSON to this path")
    p.add_argument(
        "--compare-to",
        default="",
        metavar="SRC",
        help="before/after: time the diffsolve under SRC (a source tree's src/) "
        "against this checkout's, interleaved",
    )
    p.add_argument("--shapes", nargs="*", default=None, help="--compare-to: several latent shapes")
    p.add_argument("--rounds", type=int, default=6, help="--compare-to: interleaved rounds")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker()
        return []
    if args.compare_to:
        return compare(args)
    return run_single(args)


if __name__ == "__main__":
    main()
