"""Masked discrete diffusion, measured against exact answers (issue 13, part A).

Three parts (``python benchmarks/masked.py [mixture|digits|float32|all] [--n N]``):

1. ``mixture``: the exact product-categorical mixture (diffsolve.bench.categorical, K=3, L=6,
   V=4): mean total variation of the 15 pair laws and the largest component-frequency error of
   N samples (default 20,000) for FHS (exact and batched), ancestral and τ-leaping at several
   step counts, beside N exact draws and the analytic sampling-noise level of the pair TV.
2. ``digits``: FD-digits of 512 samples of the shipped ``digits-masked`` network per sampler and
   step count (tokens v → v/8 − 1), and the docs grid ``docs/digits-masked.png``.
3. ``float32``: Zheng et al. 2024's float32 effect on one ancestral step (unmask mass
   δ = 1/steps over Zipf(1.1) tokens). Exact part: which of V = 50257 tokens the float32 race
   can ever produce, decided by ``categorical`` with the most favourable uniforms. Brute-force
   part (``--vocab``, ``--draws``, ``--steps``; ``--draws 0`` skips it): the empirical entropy
   of the unmasked token per dtype (the paper's V = 50257 wants an accelerator, ``--device``).

Everything runs on one thread on the CPU by default. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from diffsolve import MaskedDiffusion, sample_masked
from diffsolve.bench.categorical import pair_tv, pair_tv_noise, product_mixture


def mixture(n: int, seed: int = 0) -> list[dict]:
    m = product_mixture()
    model = MaskedDiffusion(m.net(), vocab_size=m.vocab_size)
    rows = []
    g = torch.Generator().manual_seed(seed)
    noise = float(pair_tv_noise(m, n).mean())
    ex = m.sample(n, g)
    r = m.responsibilities(ex)
    freq_noise = float((r.std(0) / math.sqrt(n)).max())
    rows.append(
        {
            "sampler": "exact draws",
            "steps": None,
            "nfe": 0,
            "pair_tv": float(pair_tv(m, ex).mean()),
            "freq_err": float((r.mean(0) - m.weights).abs().max()),
        }
    )
    runs = [("fhs", None), ("fhs", 3), ("fhs", 2), ("fhs", 1)]
    runs += [(s, k) for s in ("ancestral", "tau_leap") for k in (2, 4, 8, 16, 64, 256)]
    for sampler, steps in runs:
        t0 = time.perf_counter()
        x, info = sample_masked(
            model, n, m.length, sampler, steps=steps, generator=g, return_info=True
        )
        rows.append(
            {
                "sampler": sampler,
                "steps": info.steps,
                "nfe": info.nfe,
                "pair_tv": float(pair_tv(m, x).mean()),
                "freq_err": float((m.component_frequencies(x) - m.weights).abs().max()),
                "seconds": time.perf_counter() - t0,
            }
        )
    print(
        f"\nexact mixture K=3 L=6 V=4, N={n}: pair-TV noise level {noise:.4f}, "
        f"component-frequency noise (1 s.e.) {freq_noise:.4f}"
    )
    print(f"{'sampler':12s} {'steps':>5s} {'NFE':>4s} {'pair TV':>8s} {'freq err':>8s}")
    for r_ in rows:
        print(
            f"{r_['sampler']:12s} {r_['steps'] or '-':>5} {r_['nfe']:>4d} "
            f"{r_['pair_tv']:8.4f} {r_['freq_err']:8.4f}"
        )
    return [{"noise_pair_tv": noise, "noise_freq": freq_noise}, *rows]


def digits(n: int = 512, seed: int = 0, grid: str | None = "docs/digits-masked.png") -> list[dict]:
    from diffsolve.bench.digits import fd_digits
    from diffsolve.nets.masked import masked_model, tokens_to_images

    model = masked_model()
    rows = []
    runs = [("fhs", None), ("fhs", 32), ("fhs", 16), ("fhs", 8)]
    runs += [(s, k) for s in ("ancestral", "tau_leap") for k in (8, 16, 32, 64, 128)]
    for sampler, steps in runs:
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            x, info = sample_masked(
                model, n, 64, sampler, steps=steps, generator=g, return_info=True
            )
        img = tokens_to_images(x)
        rows.append(
            {
                "sampler": sampler,
                "steps": info.steps,
                "nfe": info.nfe,
                "fd": fd_digits(img),
                "seconds": time.perf_counter() - t0,
            }
        )
        if grid and sampler == "fhs" and steps is None:
            from diffsolve.cli_sample import save_grid

            save_grid(img[:64], grid)
    from diffsolve.bench.digits import digits_data

    real = digits_data()[0]
    idx = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    ref = fd_digits(real[idx])
    print(f"\ndigits-masked, {n} samples: FD-digits ({n} real digits score {ref:.1f})")
    print(f"{'sampler':10s} {'steps':>5s} {'NFE':>4s} {'FD':>7s} {'sec':>6s}")
    for r in rows:
        print(
            f"{r['sampler']:10s} {r['steps']:>5d} {r['nfe']:>4d} {r['fd']:7.2f} {r['seconds']:6.1f}"
        )
    return [{"real_digits_fd": ref, "n": n}, *rows]


def zipf(v: int, s: float = 1.1, dtype=torch.float64) -> torch.Tensor:
    p = torch.arange(1, v + 1, dtype=torch.float64) ** -s
    return (p / p.sum()).to(dtype)


def float32_reachable(v: int, steps: int) -> dict:
    """Exact: which of v Zipf(1.1) tokens can *ever* win one float32 race against the mask
    (mass 1 − δ, δ = 1/steps), given the most favourable uniforms (u_mask = 2^-24, u_token =
    1 − 2^-24), decided by ``categorical`` itself; float64 reaches every token. Returns the
    count, the probability mass of the unreachable tokens and the entropy of q restricted to
    the reachable ones (an upper bound on the float32 entropy)."""
    from diffsolve.discrete import categorical

    q = zipf(v)
    d = 1.0 / steps
    probs = torch.stack([torch.full_like(q, 1.0 - d), d * q], dim=1)
    u = torch.tensor([2.0**-24, 1.0 - 2.0**-24], dtype=torch.float32).expand(v, 2)
    reach = categorical(probs, dtype=torch.float32, u=u) == 1
    u64 = torch.tensor([2.0**-24, 1.0 - 2.0**-53], dtype=torch.float64).expand(v, 2)
    reach64 = categorical(probs, dtype=torch.float64, u=u64) == 1
    qr = q[reach] / q[reach].sum()
    return {
        "vocab": v,
        "steps": steps,
        "true_entropy": float(-(q * q.log()).sum()),
        "float32_reachable": int(reach.sum()),
        "float64_reachable": int(reach64.sum()),
        "float32_unreachable_mass": float(q[~reach].sum()),
        "float32_entropy_bound": float(-(qr * qr.log()).sum()),
    }


def float32_entropy(v: int, steps: int, draws: int, device: str = "cpu", seed: int = 0) -> dict:
    """Brute force: ``draws`` races over [δ·q, 1 − δ] (q Zipf(1.1) over v tokens, δ = 1/steps);
    entropy (nats) of the unmasked token's empirical law, per dtype, and the unmask rate."""
    from diffsolve.discrete import categorical

    q = zipf(v).to(device)
    d = 1.0 / steps
    probs = torch.cat([q * d, torch.tensor([1.0 - d], dtype=torch.float64, device=device)])
    out = {"vocab": v, "steps": steps, "draws": draws, "true_entropy": float(-(q * q.log()).sum())}
    for dtype in (torch.float64, torch.float32):
        g = torch.Generator(device=device).manual_seed(seed)
        counts = torch.zeros(v + 1, dtype=torch.float64, device=device)
        chunk = max(1, 2**26 // (v + 1))
        done = 0
        while done < draws:
            k = min(chunk, draws - done)
            win = categorical(probs.expand(k, -1), g, dtype)
            counts += torch.bincount(win, minlength=v + 1).to(torch.float64)
            done += k
        tok = counts[:v]
        p_hat = tok / tok.sum()
        nz = p_hat[p_hat > 0]
        name = "float64" if dtype == torch.float64 else "float32"
        out[f"{name}_entropy"] = float(-(nz * nz.log()).sum())
        out[f"{name}_unmask_rate"] = float(tok.sum() / draws)
        out[f"{name}_reached"] = int((tok > 0).sum())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "part", nargs="?", default="all", choices=["all", "mixture", "digits", "float32"]
    )
    p.add_argument("--n", type=int, default=20000, help="mixture samples")
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--draws", type=int, default=0, help="brute-force races (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    res: dict = {}
    if a.part in ("all", "mixture"):
        res["mixture"] = mixture(a.n)
    if a.part in ("all", "digits"):
        res["digits"] = digits()
    if a.part in ("all", "float32"):
        res["float32_reachable"] = []
        print("\nfloat32 race, Zipf(1.1) over V=50257: tokens that can ever be unmasked")
        for steps in (100, 1000, 10000):
            r = float32_reachable(50257, steps)
            res["float32_reachable"].append(r)
            print(
                f"steps {steps:6d}: reachable float32 {r['float32_reachable']} "
                f"(float64 {r['float64_reachable']}), unreachable mass "
                f"{r['float32_unreachable_mass']:.3f}, entropy ≤ {r['float32_entropy_bound']:.3f}"
                f" (true {r['true_entropy']:.3f})"
            )
        if a.draws == 0:
            a.steps = []
        res["float32"] = []
        if a.steps:
            print(f"\nfloat32 vs float64 categorical, Zipf(1.1) over V={a.vocab}, {a.draws} draws")
        for steps in a.steps:
            r = float32_entropy(a.vocab, steps, a.draws, a.device)
            res["float32"].append(r)
            print(
                f"steps {steps:6d}: entropy true {r['true_entropy']:.3f}  float64 "
                f"{r['float64_entropy']:.3f} (rate {r['float64_unmask_rate']:.2e})  float32 "
                f"{r['float32_entropy']:.3f} (rate {r['float32_unmask_rate']:.2e}, "
                f"{r['float32_reached']} tokens reached)"
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
