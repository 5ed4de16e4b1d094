"""digits-ctm: FD-digits of γ-sampling at NFE 1, 2, 4, 8 beside its teacher (issue 13).

For each NFE: the shipped CTM with ``ds.CTMGamma(gamma=γ)`` for γ = 0, 0.5, 1; the CTM as a
plain ODE model (its own denoiser g(x, t, t)) with ``solver="auto"``; the teacher
(``digits-flow``) with ``solver="auto"``; and the teacher's converged ODE solution (``rk45``),
against which every row's relative RMSE is also given (the distance to the teacher's own
trajectory end: γ = 0 approximates it; γ > 0 leaves it by design).
Same x_T (seed 0), balanced labels (i mod 10), FD-digits against all 1797 real digits, and its
noise floor at this sample count (a random subset of the real digits of the same size).

    python benchmarks/ctm.py [--n 1000] [--nfe 1,2,4,8] [--schedule uniform_trailing] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import diffsolve as ds
from diffsolve import nets
from diffsolve.bench.digits import digits_data, fd_digits

SCHEDULES = {
    "uniform_trailing": ds.Uniform(trailing=True),
    "karras": ds.Karras(),
    "logsnr": ds.LogSNR(),
    "quadratic": ds.Quadratic(),
}


def run(n: int, nfes: list[int], gammas: list[float], schedule: str, rtol: float) -> dict:
    torch.set_num_threads(1)
    ctm, teacher = nets.model("digits-ctm"), nets.model("digits-flow")
    x_T = ds.prior(teacher.process, (n, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    cond = {"label": torch.arange(n) % 10}
    rows: list[dict] = []
    t0 = time.perf_counter()
    ref, info = ds.sample(teacher, x_T, "rk45", rtol=rtol, atol=rtol, cond=cond, return_info=True)
    ref_sec, ref_nfe = time.perf_counter() - t0, info.nfe

    def add(what: str, nfe: int | None, x: torch.Tensor, sec: float) -> None:
        fd = fd_digits(x)
        rmse = float((x - ref).norm() / ref.norm())
        rows.append(
            {"what": what, "nfe": nfe, "fd": fd, "rmse_to_teacher_ode": rmse, "seconds": sec}
        )
        print(
            f"{what:32s} NFE {nfe!s:>5}: FD {fd:7.2f}  RMSE to teacher ODE {rmse:.3f}", flush=True
        )

    add(f"teacher rk45 rtol {rtol:g}", ref_nfe, ref, ref_sec)

    sched = SCHEDULES[schedule]
    for nfe in nfes:
        for gamma in gammas:
            t0 = time.perf_counter()
            x, info = ds.sample(
                ctm, x_T, ds.CTMGamma(gamma=gamma), nfe=nfe, schedule=sched, cond=cond,
                generator=torch.Generator().manual_seed(1), return_info=True,
            )  # fmt: skip
            assert info.nfe == nfe
            add(f"ctm gamma={gamma:g}", nfe, x, time.perf_counter() - t0)
        for name, model in (("ctm as ODE model, auto", ctm), ("teacher auto", teacher)):
            t0 = time.perf_counter()
            x = ds.sample(model, x_T, "auto", nfe=nfe, cond=cond)
            add(name, nfe, x, time.perf_counter() - t0)
    real, _ = digits_data()
    pick = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    floor = fd_digits(real[pick])
    print(f"noise floor: {n} real digits against all 1797: FD {floor:.2f}")
    return {"n": n, "schedule": schedule, "rows": rows, "floor": floor}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--nfe", default="1,2,4,8")
    ap.add_argument("--gamma", default="0,0.5,1")
    ap.add_argument("--schedule", default="uniform_trailing", choices=sorted(SCHEDULES))
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = run(
        args.n,
        [int(v) for v in args.nfe.split(",")],
        [float(v) for v in args.gamma.split(",")],
        args.schedule,
        args.rtol,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
