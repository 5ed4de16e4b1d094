"""Train ``digits-masked`` (masked discrete diffusion on the digits' grey levels) on the CPU.

One thread, 3500 Adam steps, a few minutes; writes
``src/diffsolve/nets/weights/digits-masked.safetensors`` (SHA-256 in its header) and the
``digits-masked`` entry of ``training.json``. See :mod:`diffsolve.nets.masked`.

    python scripts/train_digits_masked.py [--steps 2500] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffsolve.nets._io import save_weights
from diffsolve.nets.masked import MaskedConfig, train_masked

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "diffsolve" / "nets" / "weights"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=WEIGHTS / "digits-masked.safetensors")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = MaskedConfig()
    net, report = train_masked(a.steps, a.batch, a.lr, a.seed, cfg)
    meta = {
        "name": "digits-masked",
        "arch": "DigitsMaskedNet",
        "config": report.pop("config"),
        "data": "sklearn load_digits grey levels 0..16 as tokens (V=17, mask id 17), length 64",
        "dtype": "float16",
        "training": report,
    }
    # float16 on disk (loaded into the float32 module): the shipped networks stay under 5 MB
    save_weights(a.out, net, meta, torch.float16)
    print(f"wrote {a.out} ({a.out.stat().st_size} bytes)")
    if a.out.parent == WEIGHTS:
        log = WEIGHTS / "training.json"
        record = json.loads(log.read_text())
        nets = [n for n in record["networks"] if n.get("name") != "digits-masked"]
        nets.append({"name": "digits-masked", **report, "dtype": "float16 (stored)"})
        record["networks"] = nets
        log.write_text(json.dumps(record, indent=1) + "\n")
        print(f"updated {log}")


if __name__ == "__main__":
    main()
