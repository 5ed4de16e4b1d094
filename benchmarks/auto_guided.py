"""Which solver under classifier-free guidance? The numbers behind ``solver="auto"``'s guided rule.

On the shipped digits-vp network with CFG scale 3 and 7.5 (256 class-conditional samples, seed
0), each candidate's relative RMSE to the guided ODE solved by rk45 (rtol 1e-5), FD-digits, class
accuracy and max |x| at NFE 5, 10, 20:

- UniPC-2 on uniform λ over the whole range (the usual guided default),
- UniPC-2 on the unguided NFE band's grid (``recommend(process, nfe).schedule``),
- DPM-Solver++(2M) on that grid — what ``solver="auto"`` runs with guidance on.

    python benchmarks/auto_guided.py   # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse

import torch

import diffsolve as ds
from diffsolve.auto import recommend
from diffsolve.bench.digits import class_accuracy, fd_digits
from diffsolve.schedules import LogSNR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = torch.arange(args.n) % 10
    cond = {"label": labels}
    for w in (3.0, 7.5):
        model = ds.nets.model("digits-vp", guidance=w)
        gen = torch.Generator().manual_seed(0)
        x_T = ds.prior(model.process, (args.n, 1, 8, 8), generator=gen)
        ref = ds.sample(model, x_T, "rk45", rtol=1e-5, atol=1e-6, cond=cond)
        for nfe in (5, 10, 20):
            grid = recommend(model.process, nfe).schedule
            candidates = {
                "unipc-2, uniform λ": ("unipc", {"order": 2}, LogSNR()),
                "unipc-2, band grid": ("unipc", {"order": 2}, grid),
                "dpmpp_2m, band grid (auto)": ("dpmpp_2m", {}, grid),
            }
            for label, (solver, opts, sched) in candidates.items():
                x = ds.sample(model, x_T, solver, nfe=nfe, schedule=sched, cond=cond, **opts)
                err = float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
                print(
                    f"w={w:<4} NFE {nfe:2d}  {label:28s} rmse {err:.4f}  FD {fd_digits(x):6.1f}  "
                    f"acc {class_accuracy(x, labels):.3f}  max|x| {float(x.abs().max()):.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
