"""Adaptive DPM-Solver-12/23: the pair's orders, error against tolerance, k-diffusion agreement.

Orders are measured on one step from the exact solution at λ_s = 1 on gmm64 + SD (as in
``test_dpm_solver``): x_high has local error O(h^{order+1}), the error estimate x_high − x_low
is O(h^{order}). Whole runs are checked against the exact PF-ODE solution at t_min.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.solvers.dpm_adaptive import _point

from .conftest import prior64, reference, rel_err, sd_process
from .test_dpm_solver import HS, LAM_S, _lte_times, exact_at, kd_denoiser, kd_sampling, lte_order

ONE_STEP = {"atol": 1e9, "h_init": 100.0}  # every attempt accepted, the first spans the interval


def _slope(hs, errs) -> float:
    return math.log(errs[0] / errs[-1]) / math.log(hs[0] / hs[-1])


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("data", [False, True])
def test_pair_orders(g64, order, data):
    """x_high: local error O(h^{order+1}) (measured 2.0x / 3.0x); the estimate x_high − x_low:
    O(h^{order}) (DPM-Solver-12: DDIM's O(h²) local error; -23: DPM-Solver-2's O(h³))."""
    solver = ds.get_solver("dpm_adaptive", order=order, data=data, **ONE_STEP)
    measured, _ = lte_order(solver, g64, 0)
    assert abs(measured - order) <= 0.3
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    exact = exact_at(g64, p, x_T, [float(t) for h in HS for t in _lte_times(p, h, 0, LAM_S)])
    est = []
    for h in HS:
        t_s, t_t = (float(u) for u in _lte_times(p, h, 0, LAM_S))
        x = exact[t_s]
        s = _point(p, t_s)
        low, high = solver._pair(p, x, s, _point(p, t_t), m(x, t_s), m)
        est.append(rel_err(high, low))
    assert abs(_slope(HS, est) - order) <= 0.3, est


def test_one_accepted_step_is_singlestep_dpm_solver(g64):
    """With a tolerance that accepts everything and h_init over the whole range, one step of
    dpm_adaptive is dpm_solver singlestep (r = ⅓, ⅔ or ½ in λ) on [t_max, t_min]."""
    p = sd_process()
    m = g64.denoiser(p)
    x = prior64(p, n=3)
    times = torch.tensor([p.t_max, 0.3], dtype=torch.float64)
    for order in (2, 3):
        for st in ("dpmsolver", "taylor"):
            got, info = ds.sample(
                m, x, "dpm_adaptive", times=times, final="tmin", order=order, solver_type=st,
                return_info=True, **ONE_STEP,
            )  # fmt: skip
            want = ds.sample(m, x, "dpm_solver", times=times, final="tmin", order=order,
                             method="singlestep", solver_type=st)  # fmt: skip
            assert info.nfe == order and rel_err(got, want) < 1e-13
        got = ds.sample(m, x, "dpm_adaptive", times=times, final="tmin", data=True, **ONE_STEP)
        want = ds.sample(m, x, "dpmpp_3s", times=times, final="tmin")
        assert rel_err(got, want) < 1e-13


@pytest.mark.parametrize("order", [2, 3])
def test_error_follows_the_tolerance(g64, order):
    """atol = rtol = tol ∈ {1e-3, 1e-4, 1e-5}: the error to the exact solution at t_min stays
    below tol (measured 0.2–0.8·tol) and falls ~10× per decade; the calls grow like
    tol^{−1/order} (measured exponents 0.26 for DPM-Solver-23, 0.46 for -12)."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    ref = reference(g64, p, x_T, p.t_min)
    errs, nfes = [], []
    tols = (1e-3, 1e-4, 1e-5)
    for tol in tols:
        x, info = ds.sample(
            m, x_T, "dpm_adaptive", order=order, rtol=tol, atol=tol, final="tmin",
            return_info=True,
        )  # fmt: skip
        errs.append(rel_err(x, ref))
        nfes.append(info.nfe)
        assert errs[-1] < tol, (tol, errs)
    assert 0.7 < _slope(tols, errs) < 1.3, errs
    assert abs(-_slope(tols, nfes) - 1 / order) < 0.12, nfes


def test_defaults_and_clean_end(g64):
    """Official defaults (order 3, h_init 0.05, atol 0.0078, rtol 0.05, θ = 0.9): 35 calls to
    t_min on this sample (error 3.4e-3), and the step to σ = 0 is one more call returning x̂_0
    at t_min."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    solver = ds.get_solver("dpm_adaptive")
    assert (solver.order, solver.h_init, solver.atol, solver.rtol, solver.theta) == (
        3, 0.05, 0.0078, 0.05, 0.9,
    )  # fmt: skip
    x1, i1 = ds.sample(m, x_T, "dpm_adaptive", final="tmin", return_info=True)
    x0, i0 = ds.sample(m, x_T, "dpm_adaptive", return_info=True)
    assert i0.nfe == i1.nfe + 1 and i0.steps == 2
    assert rel_err(x0, m(x1, p.t_min).x0) < 1e-12
    assert rel_err(x1, reference(g64, p, x_T, p.t_min)) < 1e-2
    assert rel_err(x0, reference(g64, p, x_T, p.t_min, x0=True)) < 1e-2


def test_times_pass_through_and_budget_errors(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=2)
    times = torch.tensor([p.t_max, 0.5, 0.1, p.t_min], dtype=torch.float64)
    x, info = ds.sample(m, x_T, "dpm_adaptive", times=times, rtol=1e-4, atol=1e-4,
                        return_info=True)  # fmt: skip
    assert torch.isfinite(x).all() and info.steps == 4
    assert rel_err(x, reference(g64, p, x_T, p.t_min, x0=True)) < 1e-3
    with pytest.raises(ValueError, match="chooses its own steps"):
        ds.sample(m, x_T, "dpm_adaptive", nfe=10)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        ds.get_solver("dpm_adaptive", order=1)
    with pytest.raises(ValueError, match="controller"):
        ds.get_solver("dpm_adaptive", controller="pid")


def test_no_nan_on_other_processes(g2):
    for p, pred in [(ds.FlowMatching(), "velocity"), (sd_process(), "eps")]:
        m = g2.denoiser(p, pred)
        x = ds.prior(p, (4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out, info = ds.sample(m, x, "dpm_adaptive", return_info=True)
        assert torch.isfinite(out).all() and info.nfe > 3


def test_select_reindexes_the_state(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x = prior64(p, n=3)
    seen = []
    ds.sample(m, x, "dpm_adaptive", callback=lambda i, x, s: seen.append(s))
    state = seen[0]
    assert state.x_prev.shape[0] == 3 and state.accepted > 0
    picked = state.select(torch.tensor([2, 0]))
    assert torch.equal(picked.x_prev, state.x_prev[[2, 0]]) and picked.h == state.h


@pytest.mark.peers
@pytest.mark.parametrize("order", [2, 3])
def test_agrees_with_k_diffusion(g64, order):
    """k-diffusion's ``sample_dpm_adaptive`` (x/α and ρ = σ/α, its PID controller and batch-wide
    RMS: ``controller="k-diffusion"``) on the exact gmm64 model, t_max → t_min (measured
    1.2e-7 / 3.1e-8: its float32 λ arithmetic). Our rejected attempts reuse the evaluation at
    λ_s: NFE = its count − its rejections."""
    K = kd_sampling()
    p = sd_process()
    x_T = prior64(p, n=4)
    s_max, s_min = float(p.rho(p.t_max_finite)), float(p.rho(p.t_min))

    x_k, kinfo = K.sample_dpm_adaptive(
        kd_denoiser(g64), x_T / float(p.alpha(p.t_max_finite)), s_min, s_max, order=order,
        disable=True, return_info=True,
    )  # fmt: skip
    ours, info = ds.sample(
        g64.denoiser(p), x_T, "dpm_adaptive", order=order, controller="k-diffusion",
        final="tmin", return_info=True,
    )  # fmt: skip
    assert rel_err(ours / float(p.alpha(p.t_min)), x_k) < 1e-5
    assert info.nfe == kinfo["nfe"] - kinfo["n_reject"]
