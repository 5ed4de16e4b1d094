"""Sharded sampling (issue 14): throughput for 1 and 2 processes, peak memory against N.

Every run is the real command line in a fresh process,

    python -m diffsolve sample --model M --num-samples N --shard-size S --out-dir DIR ...
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m diffsolve sample ...

(one torch thread per process, the CLI's default), on both shipped networks, NFE 10, labels
0…9 cycled. Throughput is N over the sampling time of the slowest rank (the sum of its shards'
``seconds`` in the manifest: x_T, sampling, writing and hashing each shard); the end-to-end wall
time, process start and model load included, is reported next to it. Peak memory is the peak
resident set size (``ru_maxrss`` of the finished child, from ``os.wait4``) of a one-process run
at N = 1,000 and N = 20,000 with shards of 1,000: flat in N means the same peak.

Usage:
    python benchmarks/shards.py                      # about 3 minutes on 2 cores
    python benchmarks/shards.py --n 2000 --memory-n 1000,20000 --json shards.json

On a GPU machine add ``--device``-free runs as they are: the CLI puts each rank on
``cuda:LOCAL_RANK`` when CUDA is available (NCCL); these numbers are CPU numbers (gloo).
Never run from the unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _cmd(world: int) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "diffsolve"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        "-m",
        "diffsolve",
    ]


def run(model: str, n: int, shard: int, world: int, nfe: int, out: Path) -> dict:
    """One CLI run in a fresh process tree; returns its timings and peak RSS (MiB)."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{SRC}{os.pathsep}" + os.environ.get("PYTHONPATH", ""),
    )
    args = [
        "sample",
        "--model",
        model,
        "--num-samples",
        str(n),
        "--shard-size",
        str(shard),
        "--nfe",
        str(nfe),
        "--label",
        "all",
        "--no-progress",
        "--out-dir",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*_cmd(world), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if status != 0:
        raise RuntimeError(f"{model} N={n} world={world} failed:\n{err[-2000:]}")
    man = json.loads((out / "manifest.json").read_text())
    per_rank: dict[int, float] = {}
    for r in man["shards"]:
        per_rank[r["rank"]] = per_rank.get(r["rank"], 0.0) + r["seconds"]
    slowest = max(per_rank.values())
    return {
        "model": model,
        "n": n,
        "shard_size": shard,
        "world": world,
        "nfe": nfe,
        "samples_per_s": n / slowest,
        "sampling_s": slowest,
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB (torchrun: the launcher's own)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="samples per throughput run")
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--memory-n", default="1000,20000", help="N of the peak-memory runs")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows, mem = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("digits-vp", "digits-flow"):
            for world in (1, 2):
                r = run(model, a.n, a.shard_size, world, a.nfe, Path(tmp) / f"{model}-{world}")
                rows.append(r)
                print(
                    f"{model:12s} {world} process(es): {r['samples_per_s']:8.1f} samples/s "
                    f"(sampling {r['sampling_s']:.1f} s, wall {r['wall_s']:.1f} s)",
                    flush=True,
                )
        for n in (int(v) for v in a.memory_n.split(",")):
            r = run("digits-vp", n, 1000, 1, a.nfe, Path(tmp) / f"mem-{n}")
            mem.append(r)
            print(
                f"digits-vp N={n:6d}: peak RSS {r['peak_rss_mib']:.0f} MiB "
                f"({r['samples_per_s']:.1f} samples/s, wall {r['wall_s']:.1f} s)",
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps({"throughput": rows, "memory": mem}, indent=1))


if __name__ == "__main__":
    main()
