"""Gradients through sampling: ``grad="adjoint"`` (AdjointDPM) and ``grad="backprop"`` against the
exact flow map's gradient, and the memory each holds for the backward pass.

Exact gradient: central finite differences (h = 1e-5) of the flow map x_T → x0 (the PF-ODE to
t_min by scipy's DOP853 at rtol = atol = 1e-12, then x̂0: the samplers' standard end), for
L = Σ c·x0 with a fixed random c, on a 2-D Gaussian (affine flow) and on gmm2d (thin components:
a contracting flow). Errors are ‖g − g_exact‖/‖g_exact‖ per sample, median and max of 16.
Memory: bytes autograd holds between the forward and the backward pass (saved-tensor hooks) on
gmm64 with a batch of 256.

    python benchmarks/adjoint.py --markdown adjoint.md --json docs/adjoint.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.bench import gmm2d, gmm64
from diffsolve.bench.gmm import GaussianMixture
from diffsolve.bench.reference import exact_x0_at, solve_exact

PROCESSES = {"vp-linear": ds.VPLinear, "edm": ds.EDM, "flow": ds.FlowMatching}


def exact_grad(mix, proc, x_T: torch.Tensor, c: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """Central differences of the exact map of the samplers' standard end: the PF-ODE from
    t_max to t_min, then x̂0 there (the flow to σ = 0 differs by a few % in the Jacobian on
    gmm2d's thin components)."""
    g = torch.zeros_like(x_T)
    t0, t1 = float(proc.t_max), float(proc.t_min)

    def flow(x):
        return exact_x0_at(mix, proc, solve_exact(mix, proc, x, t0, t1), t1)

    for k in range(x_T.shape[1]):
        e = torch.zeros_like(x_T)
        e[:, k] = h
        up, dn = flow(x_T + e), flow(x_T - e)
        g[:, k] = ((up - dn) * c).sum(dim=1) / (2 * h)
    return g


def grad_of(model, x_T, c, nfe, grad, solver="dpmpp_2m"):
    """∂(Σ c·x0)/∂x_T through ``ds.sample`` with ``grad``."""
    xx = x_T.clone().requires_grad_(True)
    (ds.sample(model, xx, solver, nfe, grad=grad) * c).sum().backward()
    return xx.grad


def saved_bytes(fn) -> int:
    """Bytes autograd saves for the backward pass while ``fn`` runs."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def gaussian() -> GaussianMixture:
    """One diagonal Gaussian N(μ, diag(s²)) in 2-D: its flow map is affine (exact gradient
    by finite differences of the same reference solve, equal to the closed form)."""
    f64 = torch.float64
    return GaussianMixture(torch.ones(1, dtype=f64), torch.tensor([[0.5, -1.0]], dtype=f64),
                           torch.tensor([[0.3, 1.2]], dtype=f64), None, (2,), "gauss")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    rows = []
    t0 = time.perf_counter()
    methods = (
        ("adjoint", "adjoint"),
        ("adjoint x2", ds.Adjoint(substeps=2)),
        ("backprop", "backprop"),
    )
    for data in (gaussian(), gmm2d()):
        for name, cls in PROCESSES.items():
            proc = cls()
            model = data.denoiser(proc)
            x_T = ds.prior(proc, (16, 2), generator=torch.Generator().manual_seed(7),
                           dtype=torch.float64)  # fmt: skip
            c = torch.randn(16, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
            g_ex = exact_grad(data, proc, x_T, c)
            g_fine = grad_of(model, x_T, c, 500, "backprop")  # through a fine solve
            for nfe in (10, 20, 50):
                row = {"data": data.name, "process": name, "nfe": nfe}
                for label, grad in methods:
                    g = grad_of(model, x_T, c, nfe, grad)
                    e = (g - g_ex).norm(dim=1) / g_ex.norm(dim=1)
                    row[label] = (float(e.median()), float(e.max()))
                    if label == "adjoint":
                        e = (g - g_fine).norm(dim=1) / g_fine.norm(dim=1)
                        row["adjoint vs backprop NFE 500"] = (float(e.median()), float(e.max()))
                rows.append(row)
                print(row, flush=True)
    big = gmm64()
    proc = ds.VPLinear()
    model = big.denoiser(proc)
    x_T = ds.prior(proc, (256, 64), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_T.requires_grad_(True)
    mem = []
    for nfe in (10, 20, 50, 100):
        m = {"nfe": nfe}
        for label, grad in (
            ("adjoint", "adjoint"),
            ("backprop", "backprop"),
        ):
            m[label] = saved_bytes(
                lambda g=grad, n=nfe: ds.sample(model, x_T, "dpmpp_2m", n, grad=g)
            )
        mem.append(m)
        print(m, flush=True)
    seconds = time.perf_counter() - t0
    if args.json:
        args.json.write_text(
            json.dumps({"errors": rows, "memory": mem, "seconds": seconds}, indent=1)
        )
    if args.markdown:
        cols = [m for m, _ in methods] + ["adjoint vs backprop NFE 500"]
        out = [
            "Relative error of ∂L/∂x_T per sample, median / max over 16 samples, against the exact"
            " flow map (the last column: the adjoint against backprop through a 500-step solve):",
            "",
            "| data | process | NFE | " + " | ".join(cols) + " |",
            "|---|---|---|" + "---|" * len(cols),
        ]
        out += [
            f"| {r['data']} | {r['process']} | {r['nfe']} | "
            + " | ".join(f"{r[k][0]:.1e} / {r[k][1]:.1e}" for k in cols)
            + " |"
            for r in rows
        ]
        out += [
            "",
            "| NFE | bytes held for backward: adjoint | backprop |",
            "|---|---|---|",
        ]
        out += [f"| {m['nfe']} | {m['adjoint']:,} | {m['backprop']:,} |" for m in mem]
        args.markdown.write_text("\n".join(out) + "\n")
    print(f"{seconds:.0f} s")


if __name__ == "__main__":
    main()
