"""Candidate rules for one band of ``solver="auto"`` on the continuous-time processes, scored
against the k-diffusion envelope on many mixtures at once.

``benchmarks/auto_rule.py`` checks the rule ``auto`` uses; this script is how a band of it is
(re)chosen: every candidate (solver × grid × σ/α bottom × end rule) runs on every (mixture,
process, NFE) cell from the same x_T as ``auto_rule.py`` (seed 0, batch 64; gmm3072 16), its
median per-sample error against the exact solution continued to σ = 0 is divided by the least
median error of the 12 k-diffusion configurations on those noises (the envelope), and each
candidate is summarised over the cells by its largest ratio, the number of cells above 1 and
the geometric mean. Robust before tight: candidates are ranked by the largest ratio first.

    python benchmarks/auto_candidates.py --models gmm2d,gmm64,gmm3072 --nfe 4,5 \
        --processes edm,ve,vp-linear,vp-cosine --out candidates.json

(stop 30: the NFE ≤ 5 band re-chosen on the design mixtures and the first two held-out sets,
then judged once on the third, ``heldout32,heldout100,heldout192``; stop 31: the bands above NFE
5 on the first four sets, judged on the fifth: docs/benchmarks.md.) ``--band discrete
--processes sd,ddpm`` scores the discrete-time rule the same way against the diffusers and
k-diffusion envelope, on the exact solution at t_min ended the standard way.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

import diffsolve as ds
from diffsolve.auto import _CONTINUOUS_BANDS, _DISCRETE_TOPS, _bounds, _variance_preserving
from diffsolve.bench import peers
from diffsolve.bench.gmm import HELDOUT, get_gmm, get_heldout
from diffsolve.bench.metrics import per_sample_rel_err
from diffsolve.bench.runner import ExactReference, get_process, prediction_for
from diffsolve.processes import VPDiscrete
from diffsolve.schedules import Karras, LogSNR, Schedule

BATCH = {"gmm2d": 64, "gmm64": 64, "gmm3072": 16}


def candidates(band: str) -> list[dict[str, Any]]:
    """The configurations tried for a band. ``low`` (NFE ≤ 5): second-order multistep solvers
    (a third-order warm-up does not pay at these budgets), Karras ρ = 7 / 12 and uniform λ,
    four bottoms, both ends. ``high`` (NFE ≥ 6): the rule's own solver and top for each NFE
    (UniPC-2 to NFE 11, UniPC-3 with its last corrector from 12; the VP top 12.2 / 14 / 20 /
    none), with the bottom (the process's σ_min or a truncation), the grid (uniform λ, Karras
    ρ = 7 / 12, a tail to σ_min) and the end rule varied — where the rule stops, and what it
    does below. ``discrete`` (SD, DDPM-linear: ended the standard way, the truth at t_min):
    UniPC-2, DPM-Solver++(2M) and UniPC-3 × Karras ρ = 7 / 12 and uniform λ × bottom t_min,
    0.02, 0.05 or 0.1155, under the discrete rule's top for the NFE; every band of that rule is
    one of them."""
    out = []
    bottoms: tuple[Any, ...]
    if band == "discrete":
        solvers = {
            "unipc-2": ("unipc", {"order": 2}),
            "dpmpp_2m": ("dpmpp_2m", {}),
            "unipc-3": ("unipc", {"order": 3, "lower_order_final": False}),
        }
        grids = [("karras7", 7.0), ("karras12", 12.0), ("logsnr", None)]
        return [
            {
                "label": f"{sname} {gname} bottom={bottom} standard",
                "solver": solver,
                "options": opts,
                "grid": gname,
                "rho": rho,
                "bottom": bottom,
                "final": "standard",
                "discrete": True,
            }
            for (sname, (solver, opts)), (gname, rho), bottom in itertools.product(
                solvers.items(), grids, (None, 0.02, 0.05, 0.1155)
            )
        ]
    if band == "low":
        solvers = {"unipc-2": ("unipc", {"order": 2}), "dpmpp_2m": ("dpmpp_2m", {})}
        grids = [("karras7", 7.0), ("karras12", 12.0), ("logsnr", None)]
        bottoms = (None, 0.05, 0.1155, 0.25)
    else:
        solvers = {"rule": ("rule", {})}
        grids = [("karras7", 7.0), ("karras12", 12.0), ("logsnr", None), ("tail", None)]
        bottoms = ("rule", 0.02, 0.01, 0.005, None)
    for (sname, (solver, opts)), (gname, rho), bottom, final in itertools.product(
        solvers.items(), grids, bottoms, ("standard", "extrapolate")
    ):
        if gname == "tail" and (bottom is None or final == "extrapolate"):
            continue  # the tail is the last step from the bottom to σ_min, ended there
        out.append(
            {
                "label": f"{sname} {gname} bottom={bottom} {final}",
                "solver": solver,
                "options": opts,
                "grid": gname,
                "rho": rho,
                "bottom": bottom,
                "final": final,
            }
        )
    return out


def _rule_band(nfe: int) -> tuple[Any, float, float | None]:
    """(solver, bottom, VP top) of the rule's continuous-time band for this NFE, read from
    ``diffsolve.auto`` (the candidates vary the bottom, the grid and the end around it)."""
    for last, order, bottom, top in _CONTINUOUS_BANDS:
        if last is None or nfe <= last:
            return ds.get_solver("unipc", order=order, lower_order_final=order == 2), bottom, top
    raise AssertionError("unreachable: the last band has no upper NFE")


def _configure(cand: dict[str, Any], process: Any, nfe: int) -> tuple[Any, Any]:
    """The solver object and schedule of a candidate at this NFE."""
    if cand["solver"] == "rule":
        solver, bottom, top = _rule_band(nfe)
        bottom = bottom if cand["bottom"] == "rule" else cand["bottom"]
    elif cand.get("discrete"):  # the discrete rule's VP top for this NFE
        solver = ds.get_solver(cand["solver"], **cand["options"])
        bottom = cand["bottom"]
        top = next((t for last, t in _DISCRETE_TOPS if nfe <= last), None)
    else:
        solver = ds.get_solver(cand["solver"], **cand["options"])
        bottom, top = cand["bottom"], 12.2
    bounds = _bounds(process, bottom, top if _variance_preserving(process) else None)
    if cand["grid"] == "tail":
        return solver, Tail(LogSNR(**bounds))
    return solver, (Karras(rho=cand["rho"], **bounds) if cand["rho"] else LogSNR(**bounds))


@dataclass(frozen=True)
class Tail(Schedule):
    """A grid's n − 1 first points, then the process's t_min: one step from the truncated
    bottom down to σ_min, so that a standard end resolves scales below the bottom."""

    base: Schedule
    name: ClassVar[str] = "tail"
    description: ClassVar[str] = "a grid's first n − 1 points, then t_min"

    def times(self, process: Any, n: int) -> torch.Tensor:
        if n < 3:
            return self.base(process, n)
        head = self.base(process, n - 1)
        if float(head[-1]) <= float(process.t_min):  # the bottom is σ_min already
            return self.base(process, n)
        return torch.cat([head, torch.tensor([float(process.t_min)], dtype=torch.float64)])


def run_cell(model: str, process_name: str, nfe: int, cands: list[dict]) -> dict[str, Any]:
    """Every candidate's and peer's median per-sample error on one (mixture, process, NFE)."""
    gmm = get_heldout(model) if model in HELDOUT else get_gmm(model)
    proc = get_process(process_name)
    den = gmm.denoiser(proc, prediction_for(proc))
    gen = torch.Generator().manual_seed(0)
    x_T = proc.prior((BATCH.get(model, 64), *gmm.shape), generator=gen, dtype=torch.float64)
    exact, start = ExactReference(gmm, proc, x_T), float(proc.t_max_finite)
    # the truth: continued to σ = 0, or on a discrete-time process (never trained below σ_min)
    # the exact solution at t_min ended the standard way (auto_rule.py's err_tmin)
    discrete = isinstance(proc, VPDiscrete)
    ref = exact.standard(start, float(proc.t_min)) if discrete else exact.continued(start)

    def med(x: torch.Tensor) -> float:
        v = float(per_sample_rel_err(x.to(torch.float64), ref).median())
        return v if math.isfinite(v) else math.inf

    peer = {}
    for cfg in peers.peer_configs(proc):
        res = peers.run_peer(cfg, den, x_T, nfe)
        if res.nfe == nfe:
            peer[cfg.label] = med(res.x)
    ours = {}
    for c in cands:
        solver, schedule = _configure(c, proc, nfe)
        x = ds.sample(den, x_T, solver, nfe=nfe, schedule=schedule, final=c["final"])
        ours[c["label"]] = med(x)
    x = ds.sample(den, x_T, "auto", nfe=nfe)
    return {"peers": peer, "ours": ours, "auto": med(x), "envelope": min(peer.values())}


def summary(cells: dict[str, dict], labels: list[str]) -> list[tuple]:
    """Per candidate: (largest ratio, cells above 1, geometric mean, label), best first."""
    rows = []
    for label in labels:
        ratios = [c["ours"][label] / c["envelope"] for c in cells.values()]
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        rows.append((max(ratios), sum(r > 1 for r in ratios), geo, label))
    return sorted(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gmm2d,gmm64,gmm3072")
    ap.add_argument("--processes", default="edm,ve,vp-linear,vp-cosine")
    ap.add_argument("--nfe", default="4,5")
    ap.add_argument(
        "--band",
        choices=("low", "high", "discrete"),
        default="low",
        help="continuous NFE ≤ 5 or ≥ 6, or discrete-time (--processes sd,ddpm)",
    )
    ap.add_argument("--out", default="auto_candidates.json")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cands = candidates(args.band)
    cells: dict[str, dict] = {}
    for model in args.models.split(","):
        for pname in args.processes.split(","):
            for nfe in (int(n) for n in args.nfe.split(",")):
                start = time.perf_counter()
                cell = run_cell(model, pname, nfe, cands)
                cells[f"{model}|{pname}|{nfe}"] = cell
                print(
                    f"{model:10s} {pname:9s} NFE {nfe}: envelope {cell['envelope']:.3e}, auto "
                    f"÷ env {cell['auto'] / cell['envelope']:.3f} "
                    f"({time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
    with open(args.out, "w") as f:
        json.dump({"candidates": cands, "cells": cells}, f, indent=1)
    auto = [c["auto"] / c["envelope"] for c in cells.values()]
    print(f"\nauto today: max {max(auto):.3f}, above 1 in {sum(r > 1 for r in auto)}/{len(auto)}")
    print(f"{'max':>6s} {'>1':>3s} {'geo':>6s}  candidate")
    for worst, above, geo, label in summary(cells, [c["label"] for c in cands])[: args.top]:
        print(f"{worst:6.3f} {above:3d} {geo:6.3f}  {label}")


if __name__ == "__main__":
    main()
