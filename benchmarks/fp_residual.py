"""Fokker–Planck residual along the sampling path, next to the ODE–SDE gap (issue 15, part B).

For each model: the score-form residual ‖r‖² (:mod:`diffsolve.fp_residual`) averaged over
``--path-n`` samples at every grid time of a ``dpmpp_2m`` run of ``--path-nfe`` steps (its mean
over the grid times, and the dimensionless ``relative`` residual
E‖lhs − rhs‖² / E(‖lhs‖² + ‖rhs‖²)), beside the gap between the laws of ODE samples
(``dpmpp_2m``) and reverse-SDE samples (``euler_maruyama``, the Score-SDE sampler Deveney et
al. use) from the same x_T:

* ``gmm2d`` on the continuous VP process (β 0.1…20), the exact mixture and the same ε-network
  ×1.1: sliced W2 (64 directions) between ODE and SDE samples, and each against independent
  exact samples; the Monte-Carlo floor is the sliced W2 between two exact sets of the same size.
  Exact divergence (D = 2).
* the shipped ``digits-vp`` and ``digits-flow`` networks (class-conditional, labels i mod 10):
  the Fréchet distance between the shipped classifier's features of the ODE and the SDE sample
  sets (FD ODE–SDE), its floor (two SDE sets with different noise), and FD-digits of each set
  against the real digits. Hutchinson divergence (D = 64, ``--probes`` probes).

    python benchmarks/fp_residual.py --markdown docs/fp-residual.md --reading READING.md

(about 3 minutes on one CPU thread; ``--reading`` appends a hand-written reading of the tables).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

import diffsolve as ds
from diffsolve import nets
from diffsolve.bench.digits import digits_features, fd_digits, frechet_distance
from diffsolve.bench.gmm import gmm2d
from diffsolve.bench.metrics import sliced_w2
from diffsolve.fp_residual import FPPath, fp_residual_path

ODE, SDE = "dpmpp_2m", "euler_maruyama"


def scaled(model: ds.Denoiser, scale: float) -> ds.Denoiser:
    """The exact mixture's ε-network with its output multiplied by ``scale``."""
    net = model.net
    return ds.Denoiser(lambda x, t: scale * net(x, t), model.process, "eps", time_map=lambda t: t)


def fd_between(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between the classifier features of two digit sample sets."""
    fa, fb = (digits_features(v).double().numpy() for v in (a, b))
    return frechet_distance(fa.mean(0), np.cov(fa.T), fb.mean(0), np.cov(fb.T))


def path_summary(p: FPPath) -> dict[str, Any]:
    return {
        "r2_mean": p.mean,
        "r2_integral": p.integral,
        "relative_mean": p.mean_relative,
        "times": p.times.tolist(),
        "r2": p.r2.tolist(),
        "relative": p.relative.tolist(),
    }


def mixture_rows(args: argparse.Namespace, log) -> list[dict[str, Any]]:
    gmm, proc = gmm2d(), ds.VPLinear()
    exact_model = gmm.denoiser(proc)
    n = args.n_mixture
    x_T = ds.prior(proc, (n, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = gmm.sample(n, torch.Generator().manual_seed(2))
    floor = sliced_w2(gmm.sample(n, torch.Generator().manual_seed(3)), ref, projections=64)
    rows = []
    for label, model in (("gmm2d exact", exact_model), ("gmm2d ε̂×1.1", scaled(exact_model, 1.1))):
        t0 = time.perf_counter()
        ode = ds.sample(model, x_T, ODE, nfe=args.nfe_mixture)
        sde = ds.sample(
            model, x_T, SDE, nfe=args.nfe_mixture, generator=torch.Generator().manual_seed(1)
        )
        path = fp_residual_path(model, x_T[: args.path_n], ODE, args.path_nfe)
        rows.append(
            {
                "model": label,
                "gap": sliced_w2(ode, sde, projections=64),
                "floor": floor,
                "ode_vs_data": sliced_w2(ode, ref, projections=64),
                "sde_vs_data": sliced_w2(sde, ref, projections=64),
                **path_summary(path),
            }
        )
        log(f"{label}: {time.perf_counter() - t0:.0f} s")
    return rows


def digits_rows(args: argparse.Namespace, log) -> list[dict[str, Any]]:
    rows = []
    n = args.n_digits
    labels = torch.arange(n) % 10
    for name in ("digits-vp", "digits-flow"):
        t0 = time.perf_counter()
        model = nets.model(name)
        x_T = ds.prior(model.process, (n, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        cond = {"label": labels}
        ode = ds.sample(model, x_T, ODE, nfe=args.nfe_digits, cond=cond)
        # euler_maruyama refuses flow matching's t = 1 on a uniform grid; logSNR starts at
        # t_max_finite (it is the default grid of dpmpp_2m too)
        sde_kw = dict(nfe=args.nfe_digits, cond=cond, schedule="logsnr")
        sde = ds.sample(model, x_T, SDE, generator=torch.Generator().manual_seed(1), **sde_kw)
        sde2 = ds.sample(model, x_T, SDE, generator=torch.Generator().manual_seed(2), **sde_kw)
        k = args.path_n_digits
        path = fp_residual_path(
            model,
            x_T[:k],
            ODE,
            args.path_nfe,
            cond={"label": labels[:k]},
            probes=args.probes,
            generator=torch.Generator().manual_seed(0),
        )
        rows.append(
            {
                "model": name,
                "gap": fd_between(ode, sde),
                "floor": fd_between(sde, sde2),
                "ode_vs_data": fd_digits(ode, labels),
                "sde_vs_data": fd_digits(sde, labels),
                **path_summary(path),
            }
        )
        log(f"{name}: {time.perf_counter() - t0:.0f} s")
    return rows


def _command(argv: list[str]) -> str:
    """The command line that made the tables (``--reading``, a hand-written text, left out)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--reading":
            skip = True
        elif not a.startswith("--reading="):
            keep.append(a)
    return " ".join(["python benchmarks/fp_residual.py", *keep])


def _g(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    out = [
        "# Fokker–Planck residual and the ODE–SDE gap",
        "",
        "Generated by `benchmarks/fp_residual.py` (issue 15, part B; papers/extras.md §13):",
        "",
        "    " + res["command"],
        "",
        f"{res['device']}; {res['seconds']:.0f} s in all.",
        "",
        "**Residual** (`diffsolve.fp_residual`): the score form ‖r‖², r = ∂_t s − "
        "∇[−f·x·s + (g²/2)(∇·s + ‖s‖²)], s = −ε̂/σ, averaged over "
        f"{a['path_n']} (mixture) / {a['path_n_digits']} (digits) samples at every grid time "
        f"of a `{ODE}` run with {a['path_nfe']} steps. *mean ‖r‖²*: its mean over the grid "
        "times; *∫ ‖r‖² dt*: trapezoid in t; *relative*: mean over the grid times of "
        "E‖lhs − rhs‖² / E(‖lhs‖² + ‖rhs‖²) (0 exact, ≈ 1 unrelated sides). Mixture: exact "
        f"divergence; digits: Hutchinson, {a['probes']} Rademacher probes (unbiased "
        "U-statistic).",
        "",
        f"**Gap**: ODE = `{ODE}`, SDE = `{SDE}` (reverse SDE, Score SDE), both from the same x_T "
        f"at NFE {a['nfe_mixture']} (mixture, {a['n_mixture']} samples) / {a['nfe_digits']} "
        f"(digits, {a['n_digits']} samples, logSNR grid). Mixture: sliced W2 (64 directions); "
        "floor = two independent exact sample sets. Digits: Fréchet distance of the shipped "
        "classifier's features; floor = two SDE runs with different noise; *vs data* is "
        "FD-digits against the real digits of the requested classes.",
        "",
        "| model | mean ‖r‖² | ∫ ‖r‖² dt | relative | ODE–SDE gap | floor | ODE vs data "
        "| SDE vs data |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        out.append(
            f"| {r['model']} | {_g(r['r2_mean'])} | {_g(r['r2_integral'])} | "
            f"{_g(r['relative_mean'])} | {_g(r['gap'])} | {_g(r['floor'])} | "
            f"{_g(r['ode_vs_data'])} | {_g(r['sde_vs_data'])} |"
        )
    out += ["", "Along the path (t: ‖r‖², relative):", ""]
    for r in res["rows"]:
        cells = ", ".join(
            f"{t:.3g}: {_g(v)}, {_g(q)}" for t, v, q in zip(r["times"], r["r2"], r["relative"])
        )
        out.append(f"- {r['model']} — {cells}")
    if res.get("reading"):
        out += ["", "## Reading (written by hand from the tables above)", "", res["reading"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-mixture", type=int, default=50_000)
    ap.add_argument("--nfe-mixture", type=int, default=100)
    ap.add_argument("--n-digits", type=int, default=2000)
    ap.add_argument("--nfe-digits", type=int, default=50)
    ap.add_argument("--path-n", type=int, default=256)
    ap.add_argument("--path-n-digits", type=int, default=64)
    ap.add_argument("--path-nfe", type=int, default=10)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--reading", default=None, help="a text file appended as the reading")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    start = time.perf_counter()
    rows = mixture_rows(args, log) + digits_rows(args, log)
    res: dict[str, Any] = {
        "args": vars(args),
        "command": _command(argv if argv is not None else sys.argv[1:]),
        "device": f"CPU, {args.threads} thread(s), torch {torch.__version__}",
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    if args.reading:
        with open(args.reading) as f:
            res["reading"] = f.read().strip()
    text = markdown(res)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return res


if __name__ == "__main__":
    main()
