"""FD-digits of a tuned solver, untuned ``auto`` and the converged sampler on the networks.

For each shipped network (``--models``, default digits-vp and digits-flow) and budget (``--nfe``,
default 5):
``ds.tune`` (``method="auto"`` unless ``--method``) calibrates on ``--calib`` class-conditional
noises drawn as ``diffsolve tune`` draws them (``manual_seed(1_000_000 + seed)``, labels
``arange(B) % 10``), then ``--n`` other noises (``manual_seed(seed)``, the same balanced labels)
are sampled three ways — the tuned solver, ``solver="auto"`` at the same NFE, and ``rk45`` at
rtol 1e-6 (the converged sampler: the ODE both others approximate) — and each set is scored
by FD-digits (:func:`diffsolve.bench.digits.fd_digits`, against the real digits of the classes
asked for) and by its relative RMSE and median per-sample error to the rk45 samples. Unguided.

    python benchmarks/tuning_fd.py --models digits-vp,digits-flow --nfe 5 --n 512

About 5 minutes per network and budget on 2 CPU cores (the tuning is most of it).
"""

from __future__ import annotations

import argparse
import time

import torch

import diffsolve as ds
from diffsolve.bench.digits import fd_digits
from diffsolve.bench.metrics import per_sample_rel_err, rel_rmse
from diffsolve.cli import CALIB_SEED_OFFSET  # ``diffsolve tune``'s: never the x_T of bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits-vp,digits-flow")
    ap.add_argument("--nfe", default="5")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--n", type=int, default=512, help="evaluation samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'model':12s} {'sampler':14s} {'FD-digits':>9s} {'RMSE':>9s} {'median':>9s}")
    for name in args.models.split(","):
        den = ds.nets.model(name)
        shape = ds.nets.SAMPLE_SHAPE
        gen = torch.Generator().manual_seed(CALIB_SEED_OFFSET + args.seed)
        x_cal = den.process.prior((args.calib, *shape), generator=gen, dtype=torch.float64)
        cond_cal = {"label": torch.arange(args.calib) % 10}
        gen = torch.Generator().manual_seed(args.seed)
        x_T = den.process.prior((args.n, *shape), generator=gen, dtype=torch.float64)
        labels = torch.arange(args.n) % 10
        cond = {"label": labels}
        exact = ds.sample(den, x_T, "rk45", cond=cond, rtol=1e-6, atol=1e-6)
        rows = [("rk45", exact, None)]
        for nfe in (int(v) for v in args.nfe.split(",")):
            t0 = time.perf_counter()
            tuned = ds.tune(den, x_cal, nfe, method=args.method, cond=cond_cal)
            secs = time.perf_counter() - t0
            rows.append((f"tuned {nfe}", ds.sample(den, x_T, solver=tuned, cond=cond), secs))
            rows.append((f"auto {nfe}", ds.sample(den, x_T, "auto", nfe=nfe, cond=cond), None))
        for label, x, secs in rows:
            fd = fd_digits(x.float(), labels)
            err = rel_rmse(x, exact)
            med = float(per_sample_rel_err(x, exact).median())
            extra = f"  (tuning {secs:.0f} s, teacher included)" if secs is not None else ""
            print(f"{name:12s} {label:14s} {fd:9.2f} {err:9.2e} {med:9.2e}{extra}", flush=True)


if __name__ == "__main__":
    main()
