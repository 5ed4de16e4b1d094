"""Distil the shipped ``digits-ctm`` network from ``digits-flow`` on the CPU (one thread).

    python scripts/train_digits_ctm.py [--steps N] [--out DIR]

Writes ``<out>/digits-ctm.safetensors`` (SHA-256 in its header) and prints the training record
(seconds, final loss) as JSON for ``training.json``. Seeded: the same command gives the same
bits on the same torch build. Objective and schedule: :mod:`diffsolve.nets.ctm`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from diffsolve.nets import WEIGHTS_DIR, load
from diffsolve.nets._io import save_weights
from diffsolve.nets.ctm import distil_ctm
from diffsolve.nets.train import DATA, FLOW_PROCESS


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="folder for the .safetensors file")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    teacher, _, _ = load("digits-flow")
    net, rep = distil_ctm(teacher, args.steps, args.batch, args.lr, args.seed)
    env = {"torch": torch.__version__, "threads": 1, "python": sys.version.split()[0]}
    meta = {
        "name": "digits-ctm",
        "arch": "CTMUNet",
        "config": net.config.to_dict(),
        "process": FLOW_PROCESS,
        "prediction": "velocity",
        "data": DATA,
        "dtype": "float16",
        "training": {**rep, **env},
    }
    # float16 on disk (loaded into the float32 module): the shipped networks stay under 5 MB
    path = save_weights(Path(args.out) / "digits-ctm.safetensors", net, meta, torch.float16)
    record = {"name": "digits-ctm", **rep}
    print(json.dumps(record, indent=1))
    print(f"wrote {path}: {rep['wall_seconds']:.0f} s wall, {rep['cpu_seconds']:.0f} s CPU")
    return record


if __name__ == "__main__":
    main()
