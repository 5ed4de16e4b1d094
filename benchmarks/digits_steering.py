"""Reward steering on the shipped digits-vp network: which method reaches a digit at which cost.

The unconditional digits-vp model (no label) is steered toward digit D by the reward
r(x0) = log p_clean(D | x0), the shipped clean classifier's log-probability (as
``diffsolve sample --steer … --reward digit=D`` builds it; the sample is not clipped). Each
method makes n output samples at NFE 20 per trajectory:

1. unsteered ``ddpm``;
2. best-of-N: N independent ``ddpm`` samples per output, the one of highest reward kept;
3. :class:`diffsolve.FK` with K particles per output (``ddpm``; the returned population is
   resampled by the final weights, the first particle of each block is the output), λ chosen
   by a sweep on another seed;
4. :class:`diffsolve.SVDD` with M candidates per step (``ddpm``, argmax);
5. :class:`diffsolve.ClassifierGuidance` toward D with the shipped noise-conditional classifier
   (``dpmpp_2m``), its scale chosen by a sweep on another seed;
6. :func:`diffsolve.optimize_noise` (``dpmpp_2m``, ``grad="adjoint"``, norm-preserving Adam),
   S steps, its lr chosen by a sweep on another seed.

Cost: network evaluations per output sample, counted by a forward hook on the U-Net (rows seen
/ n), so it is exact for every method (SVDD's first call runs on the n samples, the others on
the n·M candidates; the adjoint's backward pass makes forward calls with a vector–Jacobian
product, which cost about twice a plain call more and are listed separately). The reward's
classifier calls (a 122k-parameter CNN against the U-Net's 310k) are not counted.

Columns: mean reward, class accuracy (the clean classifier's argmax is D, on the samples clipped
to [−1, 1]), FD-digits against the real digits of class D (``diffsolve.bench.digits``) and wall
seconds. The reference row is the real class-D digits: their reward, accuracy, and FD-digits of
n of them drawn with replacement (there are only about 180) against all of them — the floor at
this n.

    python benchmarks/digits_steering.py --json docs/digits-steering.json \
        --markdown docs/digits-steering.md

About 90 s on one thread (``--threads``, default 1: on a shared 2-core machine two threads were
several times slower). ``--quick``: n = 32, a smoke run of every row (about 20 s).
``--render FILE.json --markdown …`` rewrites the markdown from a results file; a ``findings``
text in it is printed at the top and kept when a full run rewrites the same file (written by
hand from the tables: check it against new numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import diffsolve as ds
from diffsolve import nets
from diffsolve.bench.digits import class_accuracy, digits_features, fd_digits, frechet_distance
from diffsolve.nets.data import digits

SHAPE = (1, 8, 8)


class Counter:
    """Rows through a network's forward (a forward hook): network evaluations, and those made
    while autograd records (the adjoint's vector–Jacobian products)."""

    def __init__(self, net: torch.nn.Module):
        self.rows = self.grad_rows = 0
        net.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: tuple, out: Any) -> None:
        b = int(args[0].shape[0])
        self.rows += b
        if torch.is_grad_enabled() and args[0].requires_grad:
            self.grad_rows += b

    def reset(self) -> None:
        self.rows = self.grad_rows = 0


class Bench:
    def __init__(self, n: int, digit: int, nfe: int, log):
        self.n, self.digit, self.nfe, self.log = n, digit, nfe, log
        self.model = nets.model("digits-vp")
        self.process = self.model.process
        self.clf = nets.classifier()
        self.noisy, _ = nets.noisy_classifier()
        self.count = Counter(self.model.net)
        self.count_clf = Counter(self.noisy)

    # -- pieces ------------------------------------------------------------------------------------

    def reward(self, x: Tensor) -> Tensor:
        """log p_clean(D | x0), (B,); differentiable in x (no clipping, as cli_sample)."""
        return torch.log_softmax(self.clf(x.to(torch.float32)), dim=1)[:, self.digit].to(x.dtype)

    def x_T(self, rows: int, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return ds.prior(self.process, (rows, *SHAPE), generator=gen)

    def ddpm(self, x_T: Tensor, seed: int, **kw: Any) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return ds.sample(self.model, x_T, "ddpm", nfe=self.nfe, generator=gen, **kw)

    def metrics(self, x: Tensor, fd: bool = True) -> dict[str, Any]:
        with torch.no_grad():
            r = self.reward(x)
        out: dict[str, Any] = {
            "reward": float(r.mean()),
            "acc": class_accuracy(x, self.digit),
        }
        if fd:
            out["fd"] = fd_digits(x, self.digit)
        return out

    def timed(self, fn, n: int) -> tuple[Tensor, dict[str, Any]]:
        """fn() -> samples (n, ...), with wall time and network evaluations per sample."""
        self.count.reset()
        self.count_clf.reset()
        t0 = time.perf_counter()
        x = fn()
        sec = time.perf_counter() - t0
        cost = {"cost": self.count.rows / n, "seconds": sec}
        if self.count.grad_rows:
            cost["cost_vjp"] = self.count.grad_rows / n
        if self.count_clf.rows:
            cost["classifier_calls"] = self.count_clf.rows / n
        return x, cost

    # -- the methods -------------------------------------------------------------------------------

    def best_of(self, n: int, ns: tuple[int, ...], seed: int) -> list[dict[str, Any]]:
        """N = 1 (unsteered) and best-of-N: groups of n independent ddpm samples, group 0 on
        x_T of ``seed`` (the unsteered row); best-of-N keeps the best of the first N groups."""
        groups, rewards, secs, costs = [], [], [], []
        for j in range(max(ns)):
            x, c = self.timed(lambda j=j: self.ddpm(self.x_T(n, seed + 1000 * j), seed + j), n)
            with torch.no_grad():
                rewards.append(self.reward(x))
            groups.append(x)
            secs.append(c["seconds"])
            costs.append(c["cost"])
        rows = []
        for k in ns:
            r = torch.stack(rewards[:k], 1)  # (n, k)
            best = r.argmax(1)
            x = torch.stack(groups[:k], 1)[torch.arange(n), best]
            name = "ddpm (unsteered)" if k == 1 else "best-of-N, ddpm"
            row = {"method": name, "setting": "" if k == 1 else f"N = {k}"}
            row.update(self.metrics(x), cost=sum(costs[:k]), seconds=sum(secs[:k]))
            rows.append(row)
        return rows

    def fk(self, n: int, k: int, scale: float, seed: int, fd: bool = True) -> dict[str, Any]:
        steer = ds.FK(self.reward, particles=k, scale=scale, seed=seed)
        info: list[Any] = []

        def run() -> Tensor:
            x, inf = self.ddpm(self.x_T(n * k, seed), seed, steer=steer, return_info=True)
            info.append(inf)
            return x[::k]  # one draw of each block's resampled population

        x, c = self.timed(run, n)
        ess = info[0].ess  # (steps, blocks)
        extra = {"scale": scale, "mean_final_ess": float(ess[-1].mean())}
        return {"method": "FK, ddpm", "setting": f"K = {k}, λ = {scale:g}",
                **self.metrics(x, fd), **c, **extra}  # fmt: skip

    def svdd(self, n: int, m: int, seed: int) -> dict[str, Any]:
        steer = ds.SVDD(self.reward, candidates=m)
        x, c = self.timed(lambda: self.ddpm(self.x_T(n, seed), seed, steer=steer), n)
        return {"method": "SVDD-PM, ddpm", "setting": f"M = {m}, argmax", **self.metrics(x), **c}

    def classifier(self, n: int, scale: float, seed: int, fd: bool = True) -> dict[str, Any]:
        model = ds.ClassifierGuidance(self.model, self.noisy, scale, label=self.digit)

        def run() -> Tensor:
            with torch.no_grad():
                return ds.sample(model, self.x_T(n, seed), "dpmpp_2m", nfe=self.nfe)

        x, c = self.timed(run, n)
        return {"method": "classifier guidance, dpmpp_2m", "setting": f"w = {scale:g}",
                "scale": scale, **self.metrics(x, fd), **c}  # fmt: skip

    def noise_opt(
        self, n: int, steps: int, lr: float, nfe: int, seed: int, fd: bool = True
    ) -> dict[str, Any]:
        last: list[Tensor] = []

        def reward(x0: Tensor) -> Tensor:
            last[:] = [x0.detach()]  # the final call scores the optimised x_T's sample
            return self.reward(x0)

        curve: list[float] = []

        def run() -> Tensor:
            _, cv = ds.optimize_noise(
                self.model, self.x_T(n, seed), reward, steps=steps, lr=lr,
                solver="dpmpp_2m", nfe=nfe, grad="adjoint",
            )  # fmt: skip
            curve.extend(cv)
            return last[0]

        x, c = self.timed(run, n)
        return {"method": "noise optimisation (adjoint), dpmpp_2m",
                "setting": f"S = {steps}, NFE {nfe}, lr = {lr:g}", "lr": lr,
                **self.metrics(x, fd), **c,
                "curve_first": curve[0], "curve_last": curve[-1], "curve": curve}  # fmt: skip

    def real(self) -> dict[str, Any]:
        """The real class-D digits: reward, accuracy, and FD of n drawn with replacement."""
        x, y = digits()
        xd = x[y == self.digit]
        feats = digits_features(xd).double().numpy()
        idx = torch.randint(0, xd.shape[0], (self.n,), generator=torch.Generator().manual_seed(0))
        sub = feats[idx.numpy()]
        stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (sub, feats)]
        row = {"method": f"real digits {self.digit} (reference)", "setting": f"{xd.shape[0]}"}
        row.update(self.metrics(xd, fd=False), fd=frechet_distance(*stats[0], *stats[1]))
        return row

    # -- the sweeps (another seed, fewer samples) -------------------------------------------

    def sweep(self, quick: bool, seed: int = 1) -> dict[str, Any]:
        n = 16 if quick else 128
        out: dict[str, Any] = {"n": n, "seed": seed}
        fk = [self.fk(n, 4, lam, seed) for lam in (1.0, 3.0, 10.0, 30.0, 100.0)]
        cg = [self.classifier(n, w, seed) for w in (1.0, 3.0, 10.0, 30.0)]
        no = [self.noise_opt(n, 5, lr, 10, seed) for lr in (0.1, 0.2, 0.4, 0.8)]
        for name, rows in (("fk", fk), ("classifier", cg), ("noise_opt", no)):
            for r in rows:
                r.pop("curve", None)
                self.log(f"sweep {name} {r['setting']}: {_short(r)}")
            out[name] = rows
        return out


def _pick(rows: list[dict[str, Any]], key: str) -> float:
    """The value of ``key`` in the row of highest mean reward."""
    return float(max(rows, key=lambda r: r["reward"])[key])


def _short(m: dict[str, Any]) -> str:
    keys = ("reward", "acc", "fd", "cost", "seconds")
    return ", ".join(f"{k}={m[k]:.3g}" for k in keys if k in m)


# -- report ----------------------------------------------------------------------------------------


def _fmt(v: Any, digits_: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits_}g}" if math.isfinite(v) else str(v)
    return str(v)


def _cost(r: dict[str, Any]) -> str:
    if "cost" not in r:
        return "—"
    s = f"{r['cost']:.0f}"
    if r.get("cost_vjp"):
        s += f" ({r['cost_vjp']:.0f} of them with a VJP)"
    if r.get("classifier_calls"):
        s += f" + {r['classifier_calls']:.0f} classifier fwd+bwd"
    return s


def markdown(res: dict[str, Any]) -> str:
    d, n = res["digit"], res["n"]
    cmd = "python benchmarks/digits_steering.py --json docs/digits-steering.json " + (
        "--markdown docs/digits-steering.md"
    )
    if n != 256 or res["nfe"] != 20 or d != 3:
        cmd += f" --n {n} --nfe {res['nfe']} --digit {d}"
    parts = [
        f"# Reward steering on digits-vp: toward digit {d}\n",
        f"Generated by `benchmarks/digits_steering.py` (n = {n} output samples per row, NFE "
        f"{res['nfe']} per trajectory, {res['device']}, total {res['total_seconds']:.0f} s). "
        "Unconditional digits-vp, reward r(x0) = log p_clean(digit | x0) of the shipped clean "
        "classifier (`diffsolve sample --steer … --reward digit=D` builds the same). "
        "**cost**: network (U-Net) evaluations per output sample, counted by a forward hook; "
        "the reward's classifier calls are not counted. **acc**: the clean classifier's argmax "
        f"is {d} (samples clipped to [−1, 1]). **FD**: FD-digits against the real digits of "
        f"class {d} (lower is better); the reference row's FD is {n} real {d}s drawn with "
        "replacement against all of them, the floor at this n.\n",
        f"Reproduce: `{cmd}`\n",
    ]
    if res.get("findings"):
        parts += ["## Findings\n", res["findings"], ""]
    cols = ["method", "setting", "cost", "reward", "acc", "FD", "seconds"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in res["rows"]:
        sec = _fmt(r["seconds"], 2) if "seconds" in r else "—"
        vals = [r["method"], r["setting"], _cost(r), _fmt(r["reward"]), _fmt(r["acc"]),
                _fmt(r.get("fd", float("nan"))), sec]  # fmt: skip
        body += "| " + " | ".join(vals) + " |\n"
    parts += ["## Results\n", head + body]
    no = [r for r in res["rows"] if "curve" in r]
    for r in no:
        parts.append(
            f"Noise optimisation's mean reward per Adam step ({r['setting']}): "
            + " → ".join(f"{v:.2f}" for v in r["curve"])
            + ".\n"
        )
    sw = res.get("sweep")
    if sw:
        parts.append(
            f"## Sweeps (seed {sw['seed']}, n = {sw['n']}; the setting of highest mean reward "
            "is used above)\n"
        )
        scols = ["method", "setting", "reward", "acc", f"FD (n = {sw['n']})", "cost"]
        shead = "| " + " | ".join(scols) + " |\n|" + "---|" * len(scols) + "\n"
        sbody = ""
        for name in ("fk", "classifier", "noise_opt"):
            for r in sw[name]:
                vals = [r["method"], r["setting"], _fmt(r["reward"]), _fmt(r["acc"]),
                        _fmt(r.get("fd", float("nan"))), _cost(r)]  # fmt: skip
                sbody += "| " + " | ".join(vals) + " |\n"
        parts.append(shead + sbody)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="output samples per row")
    ap.add_argument("--digit", type=int, default=3)
    ap.add_argument("--nfe", type=int, default=20, help="NFE per trajectory")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 were slower on a shared box)"
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--quick", action="store_true", help="n = 32, small sweeps: a smoke run")
    ap.add_argument("--render", default=None, help="a results JSON: write --markdown from it")
    args = ap.parse_args(argv)
    if args.render:
        res: dict[str, Any] = json.loads(Path(args.render).read_text())
        if args.markdown:
            Path(args.markdown).write_text(markdown(res))
        return res
    if not 0 <= args.digit <= 9:
        ap.error("--digit takes 0…9")
    torch.set_num_threads(args.threads)
    n = 32 if args.quick else args.n

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.perf_counter()
    b = Bench(n, args.digit, args.nfe, log)
    res = {
        "n": n,
        "digit": args.digit,
        "nfe": args.nfe,
        "device": f"CPU, {args.threads} thread(s), torch {torch.__version__}",
    }
    sweep = b.sweep(args.quick)
    res["sweep"] = sweep
    lam = _pick(sweep["fk"], "scale")
    w = _pick(sweep["classifier"], "scale")
    lr = _pick(sweep["noise_opt"], "lr")
    log(f"chosen: FK λ = {lam:g}, classifier guidance w = {w:g}, noise-optimisation lr = {lr:g}")
    # S·(forward + backward ≈ 3·NFE) ≈ 8·20: at NFE 10, S = 5 (29 network calls per step)
    nfe_opt = max(args.nfe // 2, 1)
    steps = max(round(8 * args.nfe / (3 * nfe_opt)), 1)
    rows: list[dict[str, Any]] = [b.real()]
    rows += b.best_of(n, (1, 4, 8), seed=0)
    rows += [b.fk(n, k, lam, seed=0) for k in (4, 8)]
    rows += [b.svdd(n, m, seed=0) for m in (4, 8)]
    rows.append(b.classifier(n, w, seed=0))
    rows.append(b.noise_opt(n, steps, lr, nfe_opt, seed=0))
    for r in rows:
        log(f"{r['method']} {r['setting']}: {_short(r)}")
    res["rows"] = rows
    res["total_seconds"] = time.perf_counter() - t_all
    log(f"[total {res['total_seconds']:.0f} s]")
    if args.json:
        old = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
        if "findings" in old and not args.quick:
            res["findings"] = old["findings"]
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
