"""Memory and time of one differentiated tuning iteration, with and without ``checkpoint``.

``ds.tune(checkpoint=True)`` recomputes each network call's activations in the backward pass
instead of keeping all N calls'. This script measures, for the tuning student on a shipped
network, the bytes of tensors autograd saves for the backward pass (counted by a
``saved_tensors_hooks`` pack hook: what a differentiated run holds beyond its inputs), the
fastest of a few forward + backward passes, and that the gradients agree::

    python benchmarks/tuning_memory.py --model digits-vp --nfe 10 --batch 192

(docs/tuning.md: 385 MB → 6.4 MB at 1.3–1.6× the time per iteration, the same gradients.)

``--unfrozen`` makes the network's weights require grad, as a user's freshly loaded model's
do, and also times ``loss.backward()`` — what ``ds.tune`` called before stop 26, which computed
and accumulated a gradient for every weight — against the gradient of the student's own
parameters that it asks for now::

    python benchmarks/tuning_memory.py --unfrozen --nfe 8
"""

from __future__ import annotations

import argparse
import time

import torch

import diffsolve as ds
from diffsolve.schedules import get_schedule
from diffsolve.tuning.student import Student


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-vp", choices=("digits-vp", "digits-flow"))
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--batch", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unfrozen", action="store_true", help="the network's weights require grad")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = ds.nets.model(args.model)
    if args.unfrozen:
        model.net.requires_grad_(True)
    proc = model.process
    gen = torch.Generator().manual_seed(0)
    x = proc.prior((args.batch, 1, 8, 8), generator=gen, dtype=torch.float64)
    cond = {"label": torch.arange(args.batch) % 10}
    lam = proc.lambda_(get_schedule("logsnr")(proc, args.nfe))
    lam_hi = float(proc.lambda_(torch.tensor(proc.t_min, dtype=torch.float64)))
    student = Student(
        model, args.nfe, float(proc.t_max_finite), lam, lam_hi, float(lam[-1]) - 1.0,
        time_offsets=True,
    )  # fmt: skip
    params = student.grid_parameters()
    grads = {}
    for on in (False, True):
        student.checkpoint = on
        saved = [0]

        def pack(v: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved[0] += v.numel() * v.element_size()
            return v

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            loss = student(x, cond).pow(2).mean()
        grads[on] = torch.autograd.grad(loss, params)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            torch.autograd.grad(student(x, cond).pow(2).mean(), params)
            times.append(time.perf_counter() - start)
        print(
            f"{args.model} NFE {args.nfe} batch {args.batch} checkpoint={on}: "
            f"saved {saved[0] / 2**20:.1f} MB, {min(times):.3f} s per forward + backward"
        )
    worst = max(
        float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())
        for a, b in zip(grads[False], grads[True])
    )
    print(f"largest relative gradient difference: {worst:.1e}")
    if args.unfrozen:
        student.checkpoint = False
        for name, run in (("loss.backward()", "all"), ("autograd.grad(own parameters)", "own")):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                loss = student(x, cond).pow(2).mean()
                if run == "all":
                    loss.backward()
                else:
                    torch.autograd.grad(loss, params)
                times.append(time.perf_counter() - start)
            print(f"unfrozen weights, {name}: {min(times):.3f} s per forward + backward")


if __name__ == "__main__":
    main()
