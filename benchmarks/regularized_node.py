"""A tiny neural ODE trained with and without Pal et al.'s error regulariser R_E = Σ EEst·|h|
(ICML 2021, §3) and its local form (ICML 2023, Alg. 1), through the project's adaptive
Dormand–Prince 5(4) (discretize-then-optimize: gradients flow through the accepted stages).

Task: learn the time-1 map of the 2-D spiral dz/dt = (z³)·A, A = [[−0.1, 2], [−2, −0.1]]
(torchdiffeq's demo field) from 512 pairs (z(0), z(1)), z(0) uniform in [−1.2, 1.2]²; only the
end point is fitted, so the trajectory between is the model's choice, the freedom the
regulariser uses (Pal et al.'s MNIST and FFJORD models are of this kind). Model: dz/dt = MLP(z),
2 → 64 → 64 → 2, tanh. Training: Adam (lr 3e-3), batches of 128, rtol = atol = 1e-5, gradients
clipped at norm 1, the same seed for every run. Reported on 512 held-out pairs: the end-point
mean squared error, and the accepted steps and calls of f for the batch at rtol = atol = 1e-6.

Task ``classify`` (``--task classify``): the two interleaved 2-D spirals of the classic
benchmark (one arm r = θ/3π, θ in [0.25π, 3π], the other its point reflection, Gaussian jitter
``--jitter``: 0.03 nearly separable, 0.08 overlapping, a held-out loss no model drives to 0),
classified by an augmented neural ODE (Dupont et al. 2019: the point padded with two zeros,
dz/dt = MLP(z), 4 → 64 → 64 → 4, tanh, then a linear read-out of z(1)), trained on the
cross-entropy of 512 points; reported on ``--test`` held-out points: the cross-entropy, the
accuracy, and the accepted steps at rtol = atol = 1e-6, averaged over ``--seeds``. Here, as in
Pal et al.'s MNIST model, only the class of z(1) is scored, so the path is the model's choice.

    python benchmarks/regularized_node.py --iters 2000 --markdown out.md
    python benchmarks/regularized_node.py --task classify --jitter 0.08 --iters 1500 \
        --test 4096 --seeds 0,1,2,3 --lams 0.003,0.03 --local-lams "" --markdown out.md
    (the tables are in docs/diagnostics.md)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from diffsolve.integrate import dormand_prince, local_regularizer

A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)


def pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z(0), z(1)) of the true spiral, z(0) uniform in [−1.2, 1.2]²."""
    g = torch.Generator().manual_seed(seed)
    z0 = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * 1.2
    z1 = dormand_prince(lambda u, z: (z**3) @ A, 0.0, 1.0, z0, rtol=1e-10, atol=1e-10).y
    return z0, z1


def spirals(n: int, seed: int, jitter: float = 0.03) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of the two interleaved spirals (n/2 each) and their classes 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    theta = math.pi * (0.25 + 2.75 * torch.rand(n, generator=g, dtype=torch.float64))
    arm = (theta / (3 * math.pi)).unsqueeze(1) * torch.stack([theta.cos(), theta.sin()], 1)
    label = torch.arange(n) % 2
    x = arm * (1 - 2 * label).unsqueeze(1).to(arm.dtype)
    return x + jitter * torch.randn(n, 2, generator=g, dtype=torch.float64), label


class Field(nn.Module):
    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, dim)
        ).double()

    def forward(self, u: float, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Task:
    """The data, the model (a field and a read-out of z(1)), and the loss of one task."""

    def __init__(self, name: str, jitter: float = 0.03, n_test: int = 512) -> None:
        self.name = name
        if name == "map":
            self.train_xy, self.test_xy = pairs(512, 1), pairs(512, 2)
            self.field, self.readout = Field(2), nn.Identity()
        else:  # classify: augmented by two zeros (a 2-D flow cannot untangle the arms)
            self.train_xy, self.test_xy = spirals(512, 1, jitter), spirals(n_test, 2, jitter)
            self.field, self.readout = Field(4), nn.Linear(4, 2).double()

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.name == "map" else nn.functional.pad(x, (0, 2))

    def loss(self, z1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.readout(z1)
        if self.name == "map":
            return ((out - y) ** 2).mean()
        return nn.functional.cross_entropy(out, y)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.field.parameters(), *self.readout.parameters()]

    def scores(self, z1: torch.Tensor, y: torch.Tensor) -> dict:
        if self.name == "map":
            return {"loss": float(self.loss(z1, y))}
        right = (self.readout(z1).argmax(1) == y).to(torch.float64).mean()
        return {"loss": float(self.loss(z1, y)), "accuracy": float(right)}


def train(
    mode: str,
    iters: int,
    lam: float,
    seed: int = 0,
    decay: bool = False,
    task: str = "map",
    jitter: float = 0.03,
    n_test: int = 512,
) -> dict:
    torch.manual_seed(seed)
    job = Task(task, jitter, n_test)
    (x, y), (x_test, y_test) = job.train_xy, job.test_xy
    f = job.field
    opt = torch.optim.Adam(job.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for it in range(iters):
        w = lam * (1 - it / iters) if decay else lam  # decay: smooth early, fit late
        idx = torch.randint(0, 512, (128,), generator=gen)
        z0 = job.start(x[idx])
        sol = dormand_prince(f, 0.0, 1.0, z0, rtol=1e-5, atol=1e-5, record=mode == "global")
        loss = job.loss(sol.y, y[idx])
        if mode == "global":
            assert sol.diagnostics is not None
            loss = loss + w * sol.diagnostics.error_regularizer()
        elif mode == "local":
            u1 = float(torch.rand((), generator=gen))
            _, reg = local_regularizer(f, 0.0, u1, z0, rtol=1e-5, atol=1e-5)
            loss = loss + w * reg
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(job.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        sol = dormand_prince(f, 0.0, 1.0, job.start(x_test), rtol=1e-6, atol=1e-6)
        scores = job.scores(sol.y, y_test)
    return {
        "mode": mode + (" (λ → 0)" if decay else ""),
        "lambda": lam,
        **scores,
        "steps": sol.steps,
        "nfev": sol.nfev,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=800)
    ap.add_argument("--lams", default="0.01,0.1")
    ap.add_argument("--local-lams", default="0.1,1")
    ap.add_argument("--decay-lams", default="", help="global λ decaying linearly to 0")
    ap.add_argument("--task", choices=("map", "classify"), default="map")
    ap.add_argument("--jitter", type=float, default=0.03, help="classify: the points' noise")
    ap.add_argument("--seeds", default="0", help="initial weights and minibatches; rows average")
    ap.add_argument("--test", type=int, default=512, help="classify: held-out points")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny networks: more threads only contend
    seeds = [int(v) for v in args.seeds.split(",")]
    runs = [("none", 0.0)]
    runs += [("global", float(v)) for v in args.lams.split(",") if v]
    runs += [("local", float(v)) for v in args.local_lams.split(",") if v]
    runs += [("global-decay", float(v)) for v in args.decay_lams.split(",") if v]
    rows = []
    for mode, lam in runs:
        decay = mode == "global-decay"
        kind = "global" if decay else mode
        per_seed = []
        for seed in seeds:
            try:
                per_seed.append(
                    train(
                        kind,
                        args.iters,
                        lam,
                        seed,
                        decay=decay,
                        task=args.task,
                        jitter=args.jitter,
                        n_test=args.test,
                    )
                )
            except FloatingPointError as e:  # a too-strong regulariser can blow the field up
                print(f"{mode} λ={lam} seed {seed}: diverged ({e})", flush=True)
                break
            print(per_seed[-1], flush=True)
        if len(per_seed) < len(seeds):
            continue
        keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float))]
        rows.append({**per_seed[0], **{k: sum(r[k] for r in per_seed) / len(seeds) for k in keys}})
        rows[-1]["per_seed"] = per_seed
    base = rows[0]
    name = "held-out MSE" if args.task == "map" else "held-out cross-entropy"
    acc = args.task == "classify"
    lines = [
        f"| regulariser | λ | {name} | loss vs none |{' accuracy |' if acc else ''} "
        "accepted steps | calls of f | steps vs none | seconds |",
        "|---|---|---|---|" + ("---|" if acc else "") + "---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['lambda']} | {r['loss']:.2e} | {r['loss'] / base['loss']:.2f} |"
            + (f" {r['accuracy']:.3f} |" if acc else "")
            + f" {r['steps']:.4g} | {r['nfev']:.4g} | {r['steps'] / base['steps']:.2f} "
            f"| {r['seconds']:.0f} |"
        )
    if len(seeds) > 1:  # each seed against the unregularised model of the same seed
        lines.append("\nPer seed (loss ÷ none, steps ÷ none):\n")
        for r in rows[1:]:
            pairs_ = zip(r["per_seed"], base["per_seed"])
            cells = ", ".join(
                f"{a['loss'] / b['loss']:.2f} / {a['steps'] / b['steps']:.2f}" for a, b in pairs_
            )
            lines.append(f"- {r['mode']} λ = {r['lambda']}: {cells}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
