"""Stable neural SDEs on an irregularly sampled time series: forecast a damped oscillator.

Each series is x(t) = A·e^{−ζt}·cos(ωt + φ) + 0.05·ε on a grid of ``points`` times over [0, 6],
with A ~ U(0.5, 1.5), ζ ~ U(0.1, 0.3), ω ~ U(1, 2), φ ~ U(0, 2π); every series loses a random
``drop`` fraction (default 40 %) of its points, so each is observed at its own irregular times.
The model sees the observations with t ≤ 3 and forecasts the values at t > 3.

The model, one per class (LSDE, LNSDE, GSDE from :mod:`diffsolve.neural_sde`): the control
c(t) is the linear interpolation of the observed past (held after the last observation); the
latent starts at z0 = W·c(0) (softplus(W·c(0)) + 0.1 for GSDE, whose states are positive),
follows the SDE with the drift γ(t, [z, c(t)]) over the whole grid (sub-steps = the grid gap),
and a linear read-out of z gives the forecast. Training: Adam on the MSE at the observed
future points, one sample path per series per step (fresh noise each step); evaluation: the mean
of ``eval_paths`` paths with a fixed seed. Baselines: the last observed value carried forward,
and zero (the series' long-run mean).

Run: ``python examples/stable_sde_timeseries.py`` (about 30 s per class on one CPU core, under
2 minutes in all; measured numbers in docs/neural-sde.md), ``--quick`` for a ~4 s smoke run
(the test's).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffsolve.neural_sde import (
    GeometricSDE,
    LangevinSDE,
    LinearNoiseSDE,
    LinearPath,
    StableSDE,
    sdeint,
)
from diffsolve.noise import NoiseSource

CLASSES: dict[str, type[StableSDE]] = {
    "LSDE": LangevinSDE,
    "LNSDE": LinearNoiseSDE,
    "GSDE": GeometricSDE,
}
T_END, T_SPLIT = 6.0, 3.0


def make_data(n: int, points: int, drop: float, seed: int) -> dict[str, Tensor]:
    """n series on ``points`` grid times over [0, T_END]: the times (T,), the noisy values
    (n, T, 1) and the observation mask (n, T, 1) (each point dropped with probability
    ``drop``; the first point of every series is kept so the path has a start)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, T_END, points)

    def u(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, generator=g)

    amp, zeta, omega, phi = u(0.5, 1.5), u(0.1, 0.3), u(1.0, 2.0), u(0.0, 2 * math.pi)
    x = amp * torch.exp(-zeta * t) * torch.cos(omega * t + phi)
    x = x + 0.05 * torch.randn(n, points, generator=g)
    mask = torch.rand(n, points, generator=g) >= drop
    mask[:, 0] = True
    return {"t": t, "x": x[..., None], "mask": mask[..., None]}


class Forecaster(nn.Module):
    """z0 from the first control value, an SDE driven by the control, a linear read-out."""

    def __init__(self, kind: str, latent: int = 16, hidden: int = 32):
        super().__init__()
        self.kind = kind
        self.init = nn.Linear(1, latent)
        self.sde = CLASSES[kind](latent, control_dim=1, hidden=hidden, depth=3)
        self.readout = nn.Linear(latent, 1)

    def forward(self, t: Tensor, control: LinearPath, noise: NoiseSource) -> Tensor:
        z0 = self.init(control(float(t[0])))
        if self.kind == "GSDE":
            z0 = nn.functional.softplus(z0) + 0.1
        path = sdeint(self.sde, z0, t, noise=noise, control=control)
        return self.readout(path)  # (B, T, 1)


def past_control(data: dict[str, Tensor]) -> LinearPath:
    """The interpolated observations with t ≤ T_SPLIT (NaN elsewhere)."""
    seen = data["mask"] & (data["t"] <= T_SPLIT)[None, :, None]
    return LinearPath(data["t"], torch.where(seen, data["x"], torch.nan))


def future_mask(data: dict[str, Tensor]) -> Tensor:
    return data["mask"] & (data["t"] > T_SPLIT)[None, :, None]


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    return ((pred - target) ** 2 * mask).sum() / mask.sum()


@torch.no_grad()
def evaluate(model: Forecaster, data: dict[str, Tensor], paths: int, seed: int) -> float:
    control = past_control(data)
    pred = sum(
        model(data["t"], control, NoiseSource(seed, offset=k * 1_000_000)) for k in range(paths)
    )
    return float(masked_mse(pred / paths, data["x"], future_mask(data)))


def baselines(data: dict[str, Tensor]) -> dict[str, float]:
    """MSE at the observed future points of: the last observed past value; zero."""
    control = past_control(data)
    last = control(T_SPLIT)[:, None, :].expand_as(data["x"])
    fut = future_mask(data)
    return {
        "last_value": float(masked_mse(last, data["x"], fut)),
        "zero": float(masked_mse(torch.zeros_like(data["x"]), data["x"], fut)),
    }


def train(
    kind: str,
    train_data: dict[str, Tensor],
    test_data: dict[str, Tensor],
    *,
    iters: int,
    lr: float,
    eval_paths: int,
    seed: int,
) -> dict[str, object]:
    torch.manual_seed(seed)
    model = Forecaster(kind)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    control, fut = past_control(train_data), future_mask(train_data)
    start = time.perf_counter()
    initial = evaluate(model, train_data, eval_paths, seed=10_000)
    losses = []
    for it in range(iters):
        pred = model(train_data["t"], control, NoiseSource(seed * 100_003 + it))
        loss = masked_mse(pred, train_data["x"], fut)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return {
        "initial_train_mse": initial,
        "train_mse": evaluate(model, train_data, eval_paths, seed=10_000),
        "test_mse": evaluate(model, test_data, eval_paths, seed=20_000),
        "losses": losses,
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~4 s smoke run")
    p.add_argument("--iters", type=int, default=None, help="Adam steps per class")
    p.add_argument("--train", type=int, default=None, help="training series")
    p.add_argument("--test", type=int, default=256, help="test series")
    p.add_argument("--points", type=int, default=None, help="grid points over [0, 6]")
    p.add_argument("--drop", type=float, default=0.4, help="fraction of points dropped")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--eval-paths", type=int, default=8)
    p.add_argument("--classes", default="LSDE,LNSDE,GSDE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    quick = args.quick
    iters = args.iters or (40 if quick else 600)
    n_train = args.train or (64 if quick else 256)
    n_test = 64 if quick else args.test
    points = args.points or (25 if quick else 49)
    eval_paths = 2 if quick else args.eval_paths
    if not 0 <= args.drop < 1:
        p.error("--drop must lie in [0, 1)")

    train_data = make_data(n_train, points, args.drop, seed=2 * args.seed)
    test_data = make_data(n_test, points, args.drop, seed=2 * args.seed + 1)
    out: dict[str, object] = {
        "config": {
            "iters": iters,
            "train": n_train,
            "test": n_test,
            "points": points,
            "drop": args.drop,
            "lr": args.lr,
            "eval_paths": eval_paths,
            "seed": args.seed,
        },
        "baselines": {"train": baselines(train_data), "test": baselines(test_data)},
        "models": {},
    }
    models: dict[str, object] = {}
    for kind in args.classes.split(","):
        if kind not in CLASSES:
            p.error(f"unknown class {kind!r}; valid: {', '.join(CLASSES)}")
        models[kind] = train(
            kind,
            train_data,
            test_data,
            iters=iters,
            lr=args.lr,
            eval_paths=eval_paths,
            seed=args.seed,
        )
    out["models"] = models

    if args.json:
        print(json.dumps({**out, "models": {k: _brief(v) for k, v in models.items()}}, indent=1))
    else:
        base = out["baselines"]
        assert isinstance(base, dict)
        print(f"{'model':<18}{'train MSE':>12}{'test MSE':>12}{'seconds':>10}")
        for name in ("last_value", "zero"):
            train_mse, test_mse = base["train"][name], base["test"][name]
            print(f"{'baseline ' + name:<18}{train_mse:>12.4f}{test_mse:>12.4f}")
        for kind, r in models.items():
            assert isinstance(r, dict)
            print(f"{kind:<18}{r['train_mse']:>12.4f}{r['test_mse']:>12.4f}{r['seconds']:>10.1f}")
    return out


def _brief(r: object) -> object:
    assert isinstance(r, dict)
    return {k: v for k, v in r.items() if k != "losses"}


if __name__ == "__main__":
    # one thread: the networks are small, and OpenMP threads spin-wait badly on a busy CPU
    # (measured: 2 threads made a training step 10x slower on a loaded 2-core machine)
    torch.set_num_threads(1)
    main()
