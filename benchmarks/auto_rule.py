"""Check ``solver="auto"`` against the lower envelope of every peer configuration.

For gmm2d, gmm64 and gmm3072 on the SD scaled-linear process (``--process`` for another), runs
``auto`` and every diffusers / k-diffusion configuration of ``diffsolve bench --peers`` at each
NFE, and prints, per model and NFE, auto's error, the best peer configuration's and the ratio
auto / best peer. The truth depends on the process (``auto.py`` says why):

- a discrete-time process (``sd``, ``ddpm``: ``VPDiscrete``; its network never saw σ < σ_min):
  the exact solution at t_min ended the standard way (``err_tmin``);
- a continuous-time process: the exact solution continued to σ = 0 (``err_continued``).

The error ranked is the **median per-sample** relative error (``err_tmin_median``,
``err_continued_median``: one mixture sample that ends at another component sets a batch's RMSE;
``bench.runner``); the RMSE ratio is printed beside it.

Writes the rows to ``--out`` as JSON. ``--models`` also takes the held-out mixtures
(``heldout16``, ``heldout48``, ``heldout128``; ``diffsolve.bench.gmm.HELDOUT``), batch 64: test
data for the rule, never a source for it.

    python benchmarks/auto_rule.py [--nfe 4,5,6,8,10,12,15,20,25] [--process sd] [--out F.json]
    python benchmarks/auto_rule.py --models heldout16,heldout48,heldout128 --process ddpm
    python benchmarks/auto_rule.py --process vp-cosine --nfe 4,5,6,8,10,12,13,14,15,17,20,25 \
        --models gmm2d,gmm64,gmm3072,heldout16,heldout48,heldout128

About 1–3 minutes per process on 2 CPU cores (the peers dominate).
"""

from __future__ import annotations

import argparse
import json

import torch

from diffsolve.bench.gmm import HELDOUT, get_heldout
from diffsolve.bench.runner import get_process, run_benchmark
from diffsolve.processes import VPDiscrete

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
    print(f"process {args.process}: ", end="")
    print(head + f" {'RMSE':>6s}  best peer config (RMSE: the ratio of the relative RMSEs)")
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
        discrete = isinstance(get_process(args.process), VPDiscrete)
        truth = "err_tmin" if discrete else "err_continued"
        key, rmse = truth + "_median", truth
        for n in nfes:
            rows = [r for r in res.rows if r["nfe"] == n and r[key] is not None]
            ours = next(r for r in rows if r["kind"] == "diffsolve")
            peers = [r for r in rows if r["kind"] == "peer" and r["nfe_used"] == n]
            best = min(peers, key=lambda r: r[key])
            ratio = ours[key] / best[key]
            by_rmse = ours[rmse] / min(r[rmse] for r in peers)
            print(
                f"{model:10s} {n:3d} {ours[key]:9.3e} {best[key]:9.3e} "
                f"{ratio:6.3f} {by_rmse:6.3f}  {best['label']}",
                flush=True,
            )
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
