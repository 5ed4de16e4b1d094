"""Per-step sampler overhead on a GPU: diffsolve eager and as a CUDA graph, next to diffusers'
``DPMSolverMultistepScheduler`` and a hand-written DPM-Solver++(2M) loop (issue 14).

All four run DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2, data prediction,
midpoint form as diffusers' default) on SD's scaled-linear VP with ε-prediction, on the same
x_T and step count; the hand loop runs on diffsolve's own grid (and is checked against it),
diffusers on its ``trailing`` timesteps with ``set_timesteps`` in the timed loop, as a pipeline
pays it. The network is near-free
(ε̂ = 0·x, one kernel), so what is timed is the sampler; its own time is measured alone and
subtracted:

    overhead per step = (T_run − NFE · T_net) / steps.

Rows:

* ``diffsolve eager``: ``ds.sample(model, x_T, "dpmpp_2m", nfe)`` (set-up included).
* ``diffsolve cuda_graph``: ``ds.sample(..., cuda_graph=True)``; the first call captures, the
  timed calls replay (set-up, the copy of x_T in and of the sample out included). Checked equal
  to the eager sample.
* ``diffusers``: the usual pipeline loop (``set_timesteps``, ``scale_model_input``, ``step``).
* ``hand loop``: DPM-Solver++(2M) written out in 20 lines on host-side float coefficients, the
  least a Python loop can do, eager and captured in a CUDA graph by hand.

Usage (the script is ready; no GPU was available where it was written, so it has CPU numbers
only there):

    python benchmarks/gpu_overhead.py                           # cuda if available, else cpu
    python benchmarks/gpu_overhead.py --shape 1,4,128,128 --steps 10,20,50 --json gpu.json
    python benchmarks/gpu_overhead.py --net digits               # the digits UNet instead

On the CPU the CUDA-graph rows are skipped and say so. Never run from the unit tests.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import diffsolve as ds

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after ``warmup`` (seconds, device synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


class FreeNet(torch.nn.Module):
    """ε̂ = 0·x: one elementwise kernel, the same for every row."""

    def forward(self, x: torch.Tensor, t: Any, **_: Any) -> torch.Tensor:
        return x * 0.0


def _digits_net(device: torch.device) -> tuple[Any, Any, tuple[int, ...]]:
    from diffsolve import nets

    net, proc, _ = nets.load("digits-vp", device=device)
    return net, proc, (1, 8, 8)


def hand_dpmpp_2m(
    net: Any, x: torch.Tensor, a: list[float], s: list[float], t_in: list[torch.Tensor]
) -> torch.Tensor:
    """DPM-Solver++(2M) over a grid with α = ``a``, σ = ``s`` (n + 1 host floats, σ_n = 0: the
    clean end, where the step returns x̂0) and the network's time inputs ``t_in`` (n device
    tensors), ε-prediction; the first step first order, the others second order (Lu et al.
    2022, Algorithm 2)."""
    lam = [math.log(ai / si) for ai, si in zip(a[:-1], s[:-1])]
    n = len(t_in)
    d_prev, h_prev = None, 0.0
    for i in range(n):
        d = (x - s[i] * net(x, t_in[i])) / a[i]  # x̂0
        if i == n - 1:
            return d
        h = math.log(a[i + 1] / s[i + 1]) - lam[i]
        e = -math.expm1(-h)
        if d_prev is None:
            x = (s[i + 1] / s[i]) * x + a[i + 1] * e * d
        else:
            r = h_prev / h
            x = (s[i + 1] / s[i]) * x + a[i + 1] * e * ((1 + 0.5 / r) * d - (0.5 / r) * d_prev)
        d_prev, h_prev = d, h
    return x


def check_replays(device: torch.device) -> bool:
    """``cuda_graph=True`` against eager on the digits UNet: several solvers (stochastic ones
    included), each replayed with other x_T, labels and noise seeds than it was captured with
    (the static-buffer copies); prints the largest difference. True if all are equal."""
    from diffsolve import nets

    model = nets.model("digits-vp", device=device)
    ok = True
    cases = [
        ("dpmpp_2m", {}),
        ("unipc", {}),
        ("dpmpp_3m", {"final": "extrapolate"}),
        ("ddpm", {}),
        ("dpmpp_2m_sde", {}),
    ]
    for solver, kw in cases:
        worst = 0.0
        for seed in (0, 1, 2):
            g = torch.Generator().manual_seed(seed)
            x = ds.prior(model.process, (16, 1, 8, 8), generator=g).to(device)
            cond = {"label": (torch.arange(16, device=device) + seed) % 10}
            args = (model, x, solver, 8)
            eager = ds.sample(*args, cond=cond, noise=ds.NoiseSource(seed), **kw)
            graph = ds.sample(*args, cond=cond, noise=ds.NoiseSource(seed), cuda_graph=True, **kw)
            worst = max(worst, float((graph - eager).abs().max()))
        ok &= worst == 0.0
        print(f"cuda_graph replay vs eager, {solver:14s}: max |difference| {worst:.3g}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="2,4,64,64", help="x_T shape (near-free network)")
    ap.add_argument("--steps", default="10,20,50")
    ap.add_argument("--net", choices=("free", "digits"), default="free")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    if a.net == "digits":
        net, proc, per = _digits_net(device)
        shape = (int(a.shape.split(",")[0]), *per)
        label = torch.arange(shape[0], device=device) % 10

        def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x, t, label=label)
    else:
        proc = ds.VPDiscrete.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
        call = FreeNet().to(device)
        shape = tuple(int(v) for v in a.shape.split(","))
    model = ds.Denoiser(call, proc, "eps")
    x_T = ds.prior(proc, shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    t_net = _time(
        lambda: call(x_T, torch.full((shape[0],), 500.0, device=device)),
        device,
        a.warmup,
        a.repeats * 5,
    )
    graphs = device.type == "cuda"
    if graphs:
        check_replays(device)
    rows: list[dict[str, Any]] = []

    def row(name: str, steps: int, nfe: int, t_run: float | None, note: str = "") -> None:
        per = None if t_run is None else (t_run - nfe * t_net) / steps * 1e6
        rows.append(
            {
                "row": name,
                "steps": steps,
                "nfe": nfe,
                "run_ms": None if t_run is None else t_run * 1e3,
                "overhead_us_per_step": per,
                "note": note,
            }
        )
        shown = "skipped" if per is None else f"{per:9.1f} µs/step  (run {t_run * 1e3:8.2f} ms)"
        print(f"{name:24s} steps {steps:3d}: {shown} {note}", flush=True)

    print(f"device {device}, x_T {tuple(shape)} {a.dtype}, network alone {t_net * 1e6:.1f} µs")

    def measure(steps: int) -> None:
        eager = ds.sample(model, x_T, "dpmpp_2m", steps)
        row(
            "diffsolve eager",
            steps,
            steps,
            _time(lambda: ds.sample(model, x_T, "dpmpp_2m", steps), device, a.warmup, a.repeats),
        )
        if graphs:
            got = ds.sample(model, x_T, "dpmpp_2m", steps, cuda_graph=True)  # captures
            same = (
                "replay == eager"
                if torch.equal(got, eager)
                else (f"replay differs from eager by {float((got - eager).abs().max()):.3g}")
            )
            t = _time(
                lambda: ds.sample(model, x_T, "dpmpp_2m", steps, cuda_graph=True),
                device,
                a.warmup,
                a.repeats,
            )
            row("diffsolve cuda_graph", steps, steps, t, same)
        else:
            row("diffsolve cuda_graph", steps, steps, None, "(no CUDA)")
        # the hand loop on diffsolve's own grid (α, σ, network times), so the samples agree
        plan = ds.make_plan(model, x_T, ds.get_solver("dpmpp_2m"), nfe=steps)
        al, sg = plan.alpha.tolist(), plan.sigma.tolist()
        t_in = [p.t_in for p in model.points(plan.t[:-1], x_T)]
        args = (al, sg, t_in)
        hand = hand_dpmpp_2m(call, x_T, *args)
        diff = float((hand - eager).abs().max() / eager.abs().max())
        row(
            "hand loop eager",
            steps,
            steps,
            _time(lambda: hand_dpmpp_2m(call, x_T, *args), device, a.warmup, a.repeats),
            f"(max rel. difference to diffsolve {diff:.2g})",
        )
        if graphs:
            x_in = x_T.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                hand_dpmpp_2m(call, x_in, *args)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                x_out = hand_dpmpp_2m(call, x_in, *args)

            def replay() -> torch.Tensor:
                x_in.copy_(x_T)
                g.replay()
                return x_out.clone()

            row("hand loop cuda_graph", steps, steps, _time(replay, device, a.warmup, a.repeats))
        else:
            row("hand loop cuda_graph", steps, steps, None, "(no CUDA)")
        try:
            import diffusers
        except ImportError:
            row("diffusers", steps, steps, None, "(diffusers not installed)")
            return
        sched = diffusers.DPMSolverMultistepScheduler(
            **SD, solver_order=2, timestep_spacing="trailing"
        )

        def run_diffusers() -> torch.Tensor:
            sched.set_timesteps(steps, device=device)
            x = x_T * sched.init_noise_sigma
            for t in sched.timesteps:
                out = call(sched.scale_model_input(x, t), t.expand(x.shape[0]))
                x = sched.step(out, t, x, return_dict=False)[0]
            return x

        row(
            "diffusers DPMSolverMS",
            steps,
            steps,
            _time(run_diffusers, device, a.warmup, a.repeats),
            "(trailing timesteps)",
        )

    for steps in (int(v) for v in a.steps.split(",")):
        measure(steps)
    if a.json:
        meta = {
            "device": str(device),
            "shape": list(shape),
            "dtype": a.dtype,
            "net": a.net,
            "net_us": t_net * 1e6,
        }
        if graphs:
            meta["gpu"] = torch.cuda.get_device_name(device)
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
