"""Train the shipped digits networks from scratch: ``python -m diffsolve.nets.train``.

Four networks, trained one after the other on scikit-learn's 1797 digits (scaled to [−1, 1]):

- ``digits-vp``: :class:`DigitsUNet`, ε-prediction on the DDPM linear VP schedule (β 1e-4…0.02,
  1000 steps): loss ‖ε̂(√ᾱ_n x_0 + √(1−ᾱ_n) ε, n, y) − ε‖², n ~ U{0…999} (Ho et al. 2020, eq. 14).
- ``digits-flow``: :class:`DigitsUNet`, velocity prediction on rectified flow x_t = (1−t)x_0 + tε:
  loss ‖v̂(x_t, t, y) − (ε − x_0)‖², t ~ U(0, 1) (Liu et al. 2023; Lipman et al. 2023).
- ``digits-classifier``: :class:`DigitsClassifier` on clean digits (FD-digits features, accuracy).
- ``digits-noisy-classifier``: :class:`NoisyDigitsClassifier` on digits noised by the digits-vp
  process (classifier guidance, Dhariwal & Nichol 2021).

The UNets drop the label with probability 0.1 (the null class; classifier-free guidance) and keep
an exponential moving average of the weights, which is what is saved. Adam with warm-up and a
cosine decay; seeds fixed; by default two worker processes of one thread each (two cores).
Wall and CPU seconds are
measured and written into each file's header.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..processes.vp import VPDiscrete
from ._io import save_weights
from .data import digits
from .unet import ClassifierConfig, DigitsClassifier, DigitsUNet, NoisyDigitsClassifier, UNetConfig

WEIGHTS = Path(__file__).with_name("weights")
UNET = {"channels": 20, "emb_dim": 128}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def _ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p, 1.0 - decay)


def _split(n: int, seed: int, test_frac: float = 0.2) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = round(n * test_frac)
    return perm[k:], perm[:k]


def train_unet(
    kind: str, steps: int, batch: int, lr: float, seed: int, log
) -> tuple[DigitsUNet, dict]:
    """Train digits-vp (kind="vp") or digits-flow (kind="flow"); returns the EMA net, a report."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = digits()
    cfg = UNetConfig(**UNET, time_scale=1.0 if kind == "vp" else 1000.0)
    net = DigitsUNet(cfg)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ac = VPDiscrete.from_betas("linear").alphas_cumprod.to(torch.float32)
    ema_decay, p_uncond, warmup = 0.998, 0.1, 200
    t0, c0 = time.perf_counter(), _cpu()
    running = 0.0
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        x0, lab = x[idx], y[idx].clone()
        lab[torch.rand(batch, generator=g) < p_uncond] = -1
        eps = torch.randn(x0.shape, generator=g)
        if kind == "vp":
            n = torch.randint(0, ac.numel(), (batch,), generator=g)
            a = ac[n].sqrt()[:, None, None, None]
            s = (1 - ac[n]).sqrt()[:, None, None, None]
            xt, t_in, target = a * x0 + s * eps, n.to(torch.float32), eps
        else:
            t = torch.rand(batch, generator=g)
            tt = t[:, None, None, None]
            xt, t_in, target = (1 - tt) * x0 + tt * eps, t, eps - x0
        for pg in opt.param_groups:
            pg["lr"] = _lr(step, steps, lr, warmup)
        loss = F.mse_loss(net(xt, t_in, lab), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        _ema_update(ema, net, min(ema_decay, (1 + step) / (10 + step)))
        running = 0.98 * running + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if step % 250 == 0 or step == steps - 1:
            sec = time.perf_counter() - t0
            log(f"  {kind} step {step:5d}/{steps} loss {running:.4f} ({sec:.0f} s)")
    report = {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "ema_decay": ema_decay,
        "label_dropout": p_uncond,
        "optimizer": "Adam, linear warm-up 200 steps, cosine decay, grad-norm clip 1",
        "final_loss_ema": running,
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu() - c0,
    }
    return ema.eval(), report


def train_classifier(
    noisy: bool, steps: int, batch: int, lr: float, seed: int, log
) -> tuple[DigitsClassifier, dict]:
    """The clean classifier (noisy=False) or the noise-conditional one on the digits-vp process."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = digits()
    tr, te = _split(x.shape[0], seed=0)
    net: DigitsClassifier = (
        NoisyDigitsClassifier(ClassifierConfig(emb_dim=64)) if noisy else DigitsClassifier()
    )
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    ac = VPDiscrete.from_betas("linear").alphas_cumprod.to(torch.float32)
    t0, c0 = time.perf_counter(), _cpu()

    def noised(x0: Tensor, n: Tensor, gen: torch.Generator) -> Tensor:
        a = ac[n].sqrt()[:, None, None, None]
        return a * x0 + (1 - ac[n]).sqrt()[:, None, None, None] * torch.randn(
            x0.shape, generator=gen
        )

    for step in range(steps):
        idx = tr[torch.randint(0, tr.numel(), (batch,), generator=g)]
        x0, lab = x[idx], y[idx]
        # one-pixel random shifts: the classifier judges generated digits, which are not centred
        # exactly like the data
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        x0 = torch.roll(x0, shifts=(dy, dx), dims=(2, 3)) if (dx or dy) and step % 2 else x0
        if noisy:
            n = torch.randint(0, ac.numel(), (batch,), generator=g)
            logits = net(noised(x0, n, g), n.to(torch.float32))
        else:
            logits = net(x0)
        for pg in opt.param_groups:
            pg["lr"] = _lr(step, steps, lr, 100)
        loss = F.cross_entropy(logits, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            what = "noisy classifier" if noisy else "classifier"
            log(f"  {what} step {step:5d}/{steps} loss {float(loss.detach()):.4f}")
    net.eval()
    acc: dict[str, float] = {}
    with torch.no_grad():
        if noisy:
            ge = torch.Generator().manual_seed(1)
            for n_ in (0, 250, 500, 750, 999):
                n = torch.full((te.numel(),), n_)
                pred = net(noised(x[te], n, ge), n.to(torch.float32)).argmax(1)
                acc[f"test_accuracy_n{n_}"] = float((pred == y[te]).float().mean())
        else:
            acc["test_accuracy"] = float((net(x[te]).argmax(1) == y[te]).float().mean())
    report = {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "split": "80/20 by randperm(seed 0); test accuracy on the 20%",
        **acc,
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu() - c0,
    }
    return net, report


TASKS = ("vp", "flow", "classifier", "noisy")
VP_PROCESS = {
    "kind": "VPDiscrete.from_betas",
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "steps": 1000,
}
FLOW_PROCESS = {"kind": "FlowMatching", "shift": 1.0, "t_min": 1e-3, "t_max": 1.0}
DATA = "sklearn load_digits, pixels/8 - 1, shape (1, 8, 8)"


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_task(task: str, out: str, unet_steps: int, batch: int, seed: int, threads: int) -> dict:
    """Train one network and write ``<out>/<name>.safetensors``; returns its training report."""
    torch.set_num_threads(threads)
    env = {"torch": torch.__version__, "threads": threads, "python": sys.version.split()[0]}
    net: nn.Module
    if task in ("vp", "flow"):
        name = f"digits-{task}"
        unet, rep = train_unet(task, unet_steps, batch, 2e-3, seed, _log)
        net = unet
        meta = {
            "name": name,
            "arch": "DigitsUNet",
            "config": unet.config.to_dict(),
            "process": VP_PROCESS if task == "vp" else FLOW_PROCESS,
            "prediction": "eps" if task == "vp" else "velocity",
        }
    elif task in ("classifier", "noisy"):
        noisy = task == "noisy"
        name = "digits-noisy-classifier" if noisy else "digits-classifier"
        clf, rep = train_classifier(noisy, 2000 if noisy else 1000, 128, 2e-3, seed, _log)
        net = clf
        meta = {"name": name, "arch": type(clf).__name__, "config": clf.config.to_dict()}
        if noisy:
            meta["process"] = VP_PROCESS
    else:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    meta.update(data=DATA, training={**rep, **env})
    save_weights(Path(out) / f"{name}.safetensors", net, meta)
    accs = {k: round(v, 4) for k, v in rep.items() if "acc" in k}
    _log(f"{name}: {rep['wall_seconds']:.0f} s wall, {rep['cpu_seconds']:.0f} s CPU {accs or ''}")
    return {"name": name, **rep}


def _run_group(group: list[str], out: str, unet_steps: int, batch: int, seed: int) -> list[dict]:
    return [run_task(t, out, unet_steps, batch, seed, threads=1) for t in group]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(WEIGHTS), help="folder for the .safetensors files")
    ap.add_argument(
        "--only", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS)
    )
    ap.add_argument("--unet-steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="worker processes of one thread each (default 2 = two cores; one process with two "
        "intra-op threads is far slower on a shared machine, whose OpenMP threads spin-wait)",
    )
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    t0 = time.perf_counter()
    if args.jobs <= 1:
        reports = _run_group(only, args.out, args.unet_steps, args.batch, args.seed)
        cpu = _cpu()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # the two UNets dominate: one per worker, each followed by a classifier
        groups: list[list[str]] = [[] for _ in range(args.jobs)]
        for i, task in enumerate(sorted(only, key=TASKS.index)):
            groups[i % args.jobs].append(task)
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = [
                ex.submit(_run_group, g, args.out, args.unet_steps, args.batch, args.seed)
                for g in groups
                if g
            ]
            reports = [r for f in futs for r in f.result()]
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = _cpu() + r.ru_utime + r.ru_stime
    total = {"wall_seconds": time.perf_counter() - t0, "cpu_seconds": cpu, "jobs": args.jobs}
    _log(
        f"all done: {total['wall_seconds']:.0f} s wall, {total['cpu_seconds']:.0f} s CPU "
        f"({args.jobs} worker process(es))"
    )
    result = {"networks": reports, "total": total}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
