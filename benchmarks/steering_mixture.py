"""Reward steering against the exact tilted mixture: FK, SVDD and best-of-N on gmm2d.

The unconditional gmm2d model (eight anisotropic Gaussians on a ring, exact denoiser on the SD
scaled-linear process) is steered by the Gaussian reward r(x) = −‖x − y‖²/(2τ²) with y the mean
of component 1 (a minority component), τ = 1 and λ = 1. The target p(x)·exp(λ·r(x)) is again a
Gaussian mixture in closed form (:func:`diffsolve.bench.tilted.tilted`), so every row is measured
against the truth. Each method makes n output samples with ``ddpm`` at NFE 20 per trajectory:

1. unsteered ``ddpm``;
2. :class:`diffsolve.FK` (difference potential, adaptive resampling, λ = 1) with K particles per
   output: the population is resampled by the final weights and the first particle of each
   block is the output;
3. :class:`diffsolve.SVDD` with M = K candidates per step, softmax selection at scale λ = 1 (the
   exact target's temperature) and at scale ∞ (the argmax, the paper's image setting);
4. best-of-N with N = K: K independent ``ddpm`` samples per output, the one of highest reward
   kept.

Columns: cost (network evaluations per output sample, counted as rows through the denoiser
divided by n: FK and best-of-N K·NFE, SVDD 1 + (NFE − 1)·K because its first call runs on the n
samples and the step to σ = 0 reuses the kept candidate's evaluation), the mean reward and its
error against the exact tilted mean reward (:func:`diffsolve.bench.tilted.mean_reward`), the total
variation ½·Σ_k|ŵ_k − w_k| between the component weights of the samples (mean posterior
responsibilities under the tilted mixture) and the tilted weights, W2 to n exact tilted samples
(exact assignment by ``scipy.optimize.linear_sum_assignment``), and wall seconds. The reference
row ``exact`` is n other exact tilted samples: its W2 is the floor at this n.

    python benchmarks/steering_mixture.py          # full run (n = 2000), writes the JSON
    python benchmarks/steering_mixture.py --quick  # n = 256, K = 2, 4: a smoke run

The full run writes ``docs/steering-mixture.json`` (``--json`` for another path; ``--quick``
writes only when ``--json`` is given); the table is printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

import diffsolve as ds
from diffsolve.bench import gmm2d
from diffsolve.bench.gmm import GaussianMixture
from diffsolve.bench.tilted import gaussian_reward, mean_reward, tilted

NFE = 20
TAU = 1.0
SCALE = 1.0
DEFAULT_JSON = Path(__file__).resolve().parent.parent / "docs" / "steering-mixture.json"


def sd_process() -> ds.VPDiscrete:
    return ds.VPDiscrete.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012, steps=1000)


class Counted:
    """The exact denoiser's network with a row counter (network evaluations per sample)."""

    def __init__(self, net: Any):
        self.net, self.rows = net, 0

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        self.rows += int(x.shape[0])
        return self.net(x, t, **cond)


def component_weights(mix: GaussianMixture, x: Tensor) -> Tensor:
    """Mean posterior responsibilities of x (B, D) under ``mix`` (as tests/test_steering.py)."""
    lam = mix.eigvals[None]
    d = x.to(torch.float64)[:, None, :] - mix.means[None]
    if mix.eigvecs is not None:
        d = torch.einsum("bkd,kdj->bkj", d, mix.eigvecs)
    logp = torch.log(mix.weights)[None] - 0.5 * (d * d / lam + torch.log(lam)).sum(-1)
    return torch.softmax(logp, dim=1).mean(0)


def w2(a: Tensor, b: Tensor) -> float:
    """Exact W2 between two equal-size point clouds (optimal assignment)."""
    cost = torch.cdist(a.to(torch.float64), b.to(torch.float64)) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    return math.sqrt(float(cost[rows, cols].mean()))


class Bench:
    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        g = gmm2d()
        self.y = g.means[1].clone()
        self.reward = gaussian_reward(self.y, TAU)
        self.target = tilted(g, self.y, TAU, SCALE)
        self.exact = mean_reward(self.target, self.y, TAU)
        den = g.denoiser(sd_process())
        self.counter = Counted(den.net)
        self.model = ds.Denoiser(self.counter, den.process, den.prediction,
                                 time_map=lambda t: t, sample_shape=g.shape)  # fmt: skip
        ref = self.target.sample(2 * n, generator=torch.Generator().manual_seed(seed + 100))
        self.ref, self.other = ref[:n].to(torch.float64), ref[n:].to(torch.float64)

    def prior(self, rows: int, salt: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1000 + salt)
        return ds.prior(self.model.process, (rows, 2), generator=gen, dtype=torch.float64)

    def gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + 500 + salt)

    def row(self, method: str, k: int | None, x: Tensor, rows: int | None, sec: float) -> dict:
        x = x.to(torch.float64)
        r = float(self.reward(x).mean())
        tv = 0.5 * float((component_weights(self.target, x) - self.target.weights).abs().sum())
        return {
            "method": method,
            "K": k,
            "cost": None if rows is None else rows / self.n,
            "mean_reward": r,
            "reward_error": r - self.exact,
            "weight_tv": tv,
            "w2": w2(x, self.ref),
            "seconds": sec,
        }

    def run(self, method: str, k: int | None, salt: int) -> dict:
        n, reward = self.n, self.reward
        self.counter.rows = 0
        t0 = time.perf_counter()
        if method == "unsteered":
            x = ds.sample(
                self.model, self.prior(n, salt), "ddpm", nfe=NFE, generator=self.gen(salt)
            )
        elif method == "FK":
            assert k is not None
            fk = ds.FK(reward, particles=k, scale=SCALE, potential="difference")
            pop = ds.sample(self.model, self.prior(n * k, salt), "ddpm", nfe=NFE, steer=fk,
                            generator=self.gen(salt))  # fmt: skip
            x = pop[::k]
        elif method.startswith("SVDD"):
            assert k is not None
            lam = SCALE if method.endswith("λ=1") else math.inf
            sv = ds.SVDD(reward, candidates=k, scale=lam)
            x = ds.sample(self.model, self.prior(n, salt), "ddpm", nfe=NFE, steer=sv,
                          generator=self.gen(salt))  # fmt: skip
        elif method == "best-of-N":
            assert k is not None
            many = ds.sample(self.model, self.prior(n * k, salt), "ddpm", nfe=NFE,
                             generator=self.gen(salt))  # fmt: skip
            best = reward(many).reshape(n, k).argmax(dim=1)
            x = many.reshape(n, k, 2)[torch.arange(n), best]
        else:
            raise ValueError(method)
        sec = time.perf_counter() - t0
        return self.row(method, k, x, self.counter.rows, sec)

    def reference(self) -> dict:
        return self.row("exact", None, self.other, None, 0.0)


METHODS = ("FK", "SVDD λ=1", "SVDD λ=∞", "best-of-N")


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(rows: list[dict], exact: float) -> str:
    lines = [
        f"exact tilted mean reward {exact:.3f}",
        "",
        "| method | K | cost (NFE per sample) | mean reward | reward error | weight TV | W2 | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_fmt(r['K'], 'd')} | {_fmt(r['cost'], '.0f')} "
            f"| {r['mean_reward']:.3f} | {r['reward_error']:+.3f} | {r['weight_tv']:.3f} "
            f"| {r['w2']:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n = 256, K = 2, 4 (a smoke run)")
    ap.add_argument("--n", type=int, default=None, help="output samples per row (2000)")
    ap.add_argument("--ks", default=None, help="comma-separated K (2,4,8,16,32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help=f"default {DEFAULT_JSON}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.n or (256 if args.quick else 2000)
    ks = [int(k) for k in (args.ks or ("2,4" if args.quick else "2,4,8,16,32")).split(",")]
    out = args.json if args.json is not None else (None if args.quick else DEFAULT_JSON)

    start = time.perf_counter()
    b = Bench(n, args.seed)
    rows = [b.reference(), b.run("unsteered", None, 0)]
    for i, k in enumerate(ks):
        for j, m in enumerate(METHODS):
            rows.append(b.run(m, k, 1 + 10 * i + j))
            r = rows[-1]
            print(f"{m:10s} K={k:3d}  reward {r['mean_reward']:+.3f}  TV {r['weight_tv']:.3f}  "
                  f"W2 {r['w2']:.3f}  ({r['seconds']:.1f} s)", flush=True)  # fmt: skip
    total = time.perf_counter() - start
    print()
    print(markdown(rows, b.exact))
    print(f"\n{total:.0f} s in all")
    if out is not None:
        result = {
            "model": "gmm2d",
            "process": "VPDiscrete scaled_linear (SD)",
            "solver": "ddpm",
            "nfe": NFE,
            "reward": {"kind": "gaussian", "y": b.y.tolist(), "tau": TAU},
            "scale": SCALE,
            "n": n,
            "ks": ks,
            "seed": args.seed,
            "exact_mean_reward": b.exact,
            "tilted_weights": b.target.weights.tolist(),
            "rows": rows,
            "seconds": total,
            "torch": torch.__version__,
            "threads": args.threads,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
