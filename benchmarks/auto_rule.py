"""Check ``solver="auto"`` against the lower envelope of every peer configuration.

For gmm2d, gmm64 and gmm3072 on the SD scaled-linear process (``--process`` for another), runs
``auto`` and every diffusers / k-diffusion configuration of ``diffsolve bench --peers`` at each
NFE, and prints, per model and NFE, auto's error (continued to σ = 0, against the trajectory of
x_T from t_max), the best peer configuration and the ratio auto / best peer, then the same ratio
against the standard-end truth at t_min (``err_tmin``: what a discrete-time network's own ODE
gives). Writes the rows to
``--out`` as JSON. ``--models`` also takes the held-out mixtures (``heldout16``, ``heldout48``,
``heldout128``; ``diffsolve.bench.gmm.HELDOUT``), batch 64: test data for the rule, never a
source for it.

    python benchmarks/auto_rule.py [--nfe 4,5,6,8,10,12,15,20,25] [--process sd] [--out F.json]
    python benchmarks/auto_rule.py --models heldout16,heldout48,heldout128 --nfe 5,10,20

About 10 minutes on 2 CPU cores (the peers dominate).
"""

from __future__ import annotations

import argparse
import json

import torch

from diffsolve.bench.gmm import HELDOUT, get_heldout
from diffsolve.bench.runner import run_benchmark

BATCH = {"gmm2d": 64, "gmm64": 64, "gmm3072": 16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nfe", default="4,5,6,8,10,12,15,20,25")
    ap.add_argument("--models", default="gmm2d,gmm64,gmm3072")
    ap.add_argument("--process", default="sd", help="sd, ddpm, vp-linear, vp-cosine, ve, edm, flow")
    ap.add_argument("--out", default="auto_rule.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nfes = [int(n) for n in args.nfe.split(",")]
    out = {}
    head = f"{'model':10s} {'NFE':>3s} {'auto':>9s} {'best peer':>9s} {'ratio':>6s}"
    print(head + f" {'t_min':>6s}  best peer config (ratio t_min: both against the err_tmin truth)")
    for model in args.models.split(","):
        mix = get_heldout(model) if model in HELDOUT else model
        res = run_benchmark(
            mix,
            args.process,
            solver_names=["auto"],
            nfes=nfes,
            batch=BATCH.get(model, 64),
            peers=True,
        )
        out[model] = res.to_json()
        for n in nfes:
            rows = [r for r in res.rows if r["nfe"] == n and r["err_continued"] is not None]
            ours = next(r for r in rows if r["kind"] == "diffsolve")
            best = min((r for r in rows if r["kind"] == "peer"), key=lambda r: r["err_continued"])
            ratio = ours["err_continued"] / best["err_continued"]
            at_tmin = ours["err_tmin"] / min(r["err_tmin"] for r in rows if r["kind"] == "peer")
            print(
                f"{model:10s} {n:3d} {ours['err_continued']:9.3e} {best['err_continued']:9.3e} "
                f"{ratio:6.3f} {at_tmin:6.3f}  {best['label']}",
                flush=True,
            )
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
