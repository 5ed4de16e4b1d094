"""Minority guidance on the 1-D mixture 0.95·N(−2, 0.5²) + 0.05·N(2, 0.5²) (extras §6).

For α_p = 0.53 and 0.98 (the perturbation level of the minority score) and guidance scales w,
with the exact classifier (diffsolve.bench.minority.MinorityCase) and in the self-guided form
(no classifier): the fraction of samples in the rare component (x > 0), in the minority class
(top decile of the score) and their median log-density under the true mixture, next to that of
the exact minority-class law (mixture samples with l ≥ q), and the samples thrown off the data
(|x| > 6: the exact classifier's log-probability is steep where it is near 0, and a fractional
w leaves that stiffness uncancelled). 4000 samples, dpmpp_2m at NFE 50
(classifier) and 20 (self-guided), the same x_T for every row.

    python benchmarks/minority.py --markdown minority.md  (tables in docs/steering.md)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.bench.gmm import GaussianMixture
from diffsolve.bench.minority import MinorityCase, log_density_1d, t_of_alpha


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--n", type=int, default=4000)
    args = ap.parse_args()
    f64 = torch.float64
    mix = GaussianMixture(
        torch.tensor([0.95, 0.05], dtype=f64),
        torch.tensor([[-2.0], [2.0]], dtype=f64),
        torch.tensor([[0.25], [0.25]], dtype=f64),
        None,
        (1,),
        "rare",
    )
    proc = ds.VPLinear()
    x_T = ds.prior(proc, (args.n, 1), generator=torch.Generator().manual_seed(0), dtype=f64)
    data = mix.sample(200_000, generator=torch.Generator().manual_seed(3)).double()
    lines = [
        "| α_p | form | w | rare mode | minority class | median log p | exact class law's "
        "| off the data (abs(x) > 6) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    t0 = time.perf_counter()
    for a in (0.53, 0.98):
        case = MinorityCase(mix, proc, t_of_alpha(proc, a))
        ll_target = float(log_density_1d(mix, data[case.is_minority(data)]).median())
        for form, scales, nfe in (("classifier", (0.0, 0.5, 1.0, 3.5), 50),
                                  ("self-guided", (0.5, 1.0, 2.0, 4.0), 20)):  # fmt: skip
            for w in scales:
                kw = {"classifier": case.classifier} if form == "classifier" else {"n_iter": 4}
                g = ds.MinorityGuidance(case.denoiser, w, t_p=case.t_p, **kw)
                x = ds.sample(g, x_T, "dpmpp_2m", nfe)
                row = (
                    f"| {a} | {form} | {w} | {float((x > 0).double().mean()):.3f} | "
                    f"{float(case.is_minority(x).double().mean()):.3f} | "
                    f"{float(log_density_1d(mix, x).median()):.2f} | {ll_target:.2f} | "
                    f"{int((x.abs() > 6).sum())} |"
                )
                lines.append(row)
                print(row, flush=True)
    text = "\n".join(lines) + "\n"
    if args.markdown:
        args.markdown.write_text(text)
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
