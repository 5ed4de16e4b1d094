"""Wall time of ``ds.tune`` per (model, process, NFE), one process alone on the machine.

The issue's targets are per (model, NFE) on 2 CPU cores: ≤ 30 s for a mixture, ≤ 2 minutes for
a digits network, the teacher included. ``benchmarks/tuning.py`` records ``tune_seconds`` too,
but it runs its peers and exact answers around each tuning and is usually run two at a time;
this script does nothing else, with ``torch.set_num_threads(--threads)``:

- the mixtures (gmm2d, gmm64, gmm3072, heldout16/48/128 on the SD or DDPM-linear process):
  ``ds.tune(method="auto")`` on 256 prior noises (``--seed 1``) against their exact answer (the
  mixture's ODE solved exactly, no teacher to run; as in ``benchmarks/tuning.py``);
- the networks (digits-vp, digits-flow): the teacher (``ds.tuning.teacher.teacher``, rk45 at
  rtol 1e-5, timed once per network, as ``ds.tune`` computes it when not given ``target``) on
  256 class-conditional noises (labels 0…9 repeated), then ``ds.tune`` per NFE.

    python benchmarks/tuning_time.py --models digits-vp,digits-flow --nfe 4,5,6,8,10
    python benchmarks/tuning_time.py --models heldout128,gmm3072 --processes sd,ddpm

Prints one line per tuning (with the iterations each gradient phase ran: the time moves with
them) and, with ``--markdown``, a table (results in docs/tuning.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.bench.gmm import HELDOUT, get_gmm, get_heldout
from diffsolve.bench.runner import ExactReference, get_process, prediction_for
from diffsolve.processes import VPDiscrete
from diffsolve.tuning.teacher import teacher

NETWORKS = ("digits-vp", "digits-flow")


def _cases(model: str, processes: list[str], n: int, seed: int):
    """(process name, denoiser, x_calib, cond, target, teacher seconds or None) per process."""
    if model in NETWORKS:
        gen = torch.Generator().manual_seed(seed)
        den = ds.nets.model(model)
        x = den.process.prior((n, 1, 8, 8), generator=gen, dtype=torch.float64)
        cond = {"label": torch.arange(n) % 10}
        start = time.perf_counter()
        target = teacher(den, x, cond=cond)
        yield "own", den, x, cond, target, time.perf_counter() - start
        return
    gmm = get_heldout(model) if model in HELDOUT else get_gmm(model)
    for name in processes:
        proc = get_process(name)
        den = gmm.denoiser(proc, prediction_for(proc))
        gen = torch.Generator().manual_seed(seed)
        x = proc.prior((n, *gmm.shape), generator=gen, dtype=torch.float64)
        ref = ExactReference(gmm, proc, x)
        t_max = float(proc.t_max_finite)
        # a discrete network never sees σ < σ_min: its ODE ends at t_min (tuning.py's truth)
        if isinstance(proc, VPDiscrete):
            target = ref.standard(t_max, float(proc.t_min))
        else:
            target = ref.continued(t_max)
        yield name, den, x, None, target, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits-vp,digits-flow")
    ap.add_argument("--processes", default="sd,ddpm", help="for the mixtures")
    ap.add_argument("--nfe", default="4,5,6,8,10")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nfes = [int(v) for v in args.nfe.split(",")]
    lines = [
        f"| model | process | teacher s | {' | '.join(f'NFE {k} s' for k in nfes)} |",
        "|---|---|---|" + "---|" * len(nfes),
    ]
    for model in args.models.split(","):
        for proc, den, x, cond, target, t_teacher in _cases(
            model, args.processes.split(","), args.calib, args.seed
        ):
            cells = []
            for nfe in nfes:
                start = time.perf_counter()
                tuned = ds.tune(den, x, nfe, cond=cond, target=target)
                sec = time.perf_counter() - start
                cells.append(f"{sec:.0f}")
                # the time moves with the iterations the phases run: print them beside it
                iters = [p["iters"] for p in tuned.info.get("phases", ())]
                print(
                    f"{model} {proc} NFE {nfe}: {sec:.1f} s (teacher "
                    f"{'exact' if t_teacher is None else f'{t_teacher:.1f} s'}), calibration "
                    f"RMSE {tuned.info['calib_rel_rmse_after']:.4f}, phase iterations "
                    f"{'/'.join(map(str, iters))} ({sum(iters)}; "
                    f"{sec / max(sum(iters), 1):.2f} s each)",
                    flush=True,
                )
            teach = "exact" if t_teacher is None else f"{t_teacher:.0f}"
            lines.append(f"| {model} | {proc} | {teach} | {' | '.join(cells)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
