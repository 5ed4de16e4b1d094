"""Measure the shipped digits networks and write the README grids (docs/digits-*.png).

FD-digits of unguided samples at several NFE (UniPC, its default schedule), the noise and
real-data references at the same sample count, class accuracy with and without classifier-free
guidance. Prints JSON; ``--grids`` also writes docs/digits-vp.png and docs/digits-flow.png.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import diffsolve as ds
from diffsolve import nets
from diffsolve.bench.digits import class_accuracy, digits_data, fd_digits
from diffsolve.cli_sample import save_grid


def draw(name, n, nfe, seed=0, guidance=None, labels=None, solver="unipc"):
    model = nets.model(name, guidance=guidance)
    x_T = ds.prior(model.process, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    cond = {} if labels is None else {"label": labels}
    return ds.sample(model, x_T, solver=solver, nfe=nfe, cond=cond)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--nfe", default="10,50")
    ap.add_argument("--grids", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out: dict = {"n": args.n}
    real = digits_data()[0]
    perm = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(0))
    out["fd_real_subset"] = fd_digits(real[perm[: args.n]])
    out["fd_noise"] = fd_digits(
        torch.randn(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    )
    for name in ("digits-vp", "digits-flow"):
        for nfe in (int(s) for s in args.nfe.split(",")):
            t0 = time.perf_counter()
            x = draw(name, args.n, nfe)
            out[f"{name} fd nfe{nfe}"] = fd_digits(x)
            out[f"{name} seconds nfe{nfe}"] = time.perf_counter() - t0
        lab = torch.arange(100) % 10
        for w in (None, 1.0, 3.0):
            x = draw(
                name,
                100,
                10,
                labels=None if w is None else lab,
                guidance=None if w in (None, 1.0) else w,
            )
            key = "uncond" if w is None else f"w{w:g}"
            out[f"{name} acc {key} nfe10"] = class_accuracy(x, lab)
        print(json.dumps(out, indent=1), flush=True)
        if args.grids:
            save_grid(draw(name, 64, 20).numpy(), f"docs/{name}.png", scale=6)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
