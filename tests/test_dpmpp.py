"""DPM-Solver++ (2S, 2M, 3M): measured orders, the 3M third-order weight, identities, budgets.

Orders are measured as in ``test_dpm_solver`` (its module docstring): local truncation error of
one step of size h in λ from the exact solution at λ_s = 1 on gmm64 + SD, with the multistep
history evaluated at exact points (the warm-up steps are replaced by the exact reference, so the
measured step is the full-order one); order = log-log slope over h − 1 (h = 0.1…0.025; the
reference 3M at h = 0.025…0.00625, where its small O(h³) term dominates).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import diffsolve as ds
from diffsolve.solvers.dpm_solver import fast_plan

from .conftest import prior64, reference, rel_err, sd_process
from .test_dpm_solver import HS, HS_SMALL, lte_order

CONFIGS = [
    ("dpmpp_2s", {}, 0, 2),
    ("dpmpp_3s", {}, 0, 3),
    ("dpmpp_3s", {"solver_type": "taylor"}, 0, 3),
    ("dpmpp_2m", {"solver_type": "midpoint"}, 1, 2),
    ("dpmpp_2m", {"solver_type": "heun"}, 1, 2),
    ("dpmpp_3m", {}, 2, 3),
    ("dpmpp_3m", {"reference": True}, 2, 2),  # official / diffusers / k-diffusion D2
]


@pytest.mark.parametrize(("name", "opts", "history", "expected"), CONFIGS, ids=str)
def test_measured_order(g64, name, opts, history, expected):
    if name not in ("dpmpp_2s", "dpmpp_3s"):
        opts = {**opts, "lower_order_final": False}
    hs = HS_SMALL if opts.get("reference") else HS
    order, errs = lte_order(ds.get_solver(name, **opts), g64, history, hs=hs)
    assert abs(order - expected) <= 0.3, (order, errs)


def test_3m_corrected_beats_reference_globally(g64, sd):
    """Whole trajectory, 64 uniform-λ steps to t_min (warm-up included): the corrected D2 is
    more accurate than the reference one (measured: 3.0e-4 vs 4.6e-4 on this sample)."""
    x = prior64(sd, n=4)
    ref = reference(g64, sd, x, sd.t_min)
    m = g64.denoiser(sd)
    kw = {"steps": 64, "final": "tmin", "lower_order_final": False}
    ours = rel_err(ds.sample(m, x, "dpmpp_3m", **kw), ref)
    official = rel_err(ds.sample(m, x, "dpmpp_3m", reference=True, **kw), ref)
    assert ours < 0.8 * official, (ours, official)


# -- identities ---------------------------------------------------------------------------------
def _setup(g64):
    p = sd_process()
    return p, g64.denoiser(p), prior64(p, n=3)


def test_2m_first_step_is_euler(g64):
    p, m, x = _setup(g64)
    times = torch.tensor([p.t_max, 0.5], dtype=torch.float64)
    for solver in ("dpmpp_2m", "dpmpp_3m"):
        got = ds.sample(m, x, solver, times=times, final="tmin")
        assert rel_err(got, ds.sample(m, x, "euler", times=times, final="tmin")) < 1e-14
    # and the step to σ = 0 returns x̂_0 at the last point
    got = ds.sample(m, x, "dpmpp_2m", times=times)
    x1 = ds.sample(m, x, "dpmpp_2m", times=times, final="tmin")
    assert rel_err(got, m(x1, 0.5).x0) < 1e-12


def test_2m_is_the_paper_update(g64):
    """Alg. 2 of DPM-Solver++: D = (1 + 1/2r)·x̂_0,i − x̂_0,i−1/(2r), r = h_{i−1}/h_i,
    x_{i+1} = (σ_{i+1}/σ_i)·x_i + α_{i+1}(1 − e^{−h_i})·D."""
    p, m, x = _setup(g64)
    times = torch.tensor([p.t_max, 0.7, 0.45, 0.2, 0.08], dtype=torch.float64)
    got = ds.sample(m, x, "dpmpp_2m", times=times, final="tmin", lower_order_final=False)
    lam = p.lambda_(times)
    prev = None
    for i in range(len(times) - 1):
        x0 = m(x, times[i]).x0
        h = float(lam[i + 1] - lam[i])
        d = x0
        if prev is not None:
            r = float(lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - prev / (2 * r)
        a, s = p.alpha(times[i + 1]), p.sigma(times[i + 1])
        x = (
            float(s / p.sigma(times[i])) * x
            + float(a * -torch.expm1(torch.tensor(-h, dtype=torch.float64))) * d
        )
        prev = x0
    assert rel_err(got, x) < 1e-12


def test_3m_warm_up_is_2m_and_variants_differ(g64):
    _, m, x = _setup(g64)
    kw = {"final": "tmin", "lower_order_final": False}
    two = ds.sample(m, x, "dpmpp_2m", steps=2, **kw)
    for ref in (False, True):
        assert rel_err(ds.sample(m, x, "dpmpp_3m", steps=2, reference=ref, **kw), two) < 1e-14
    ours = ds.sample(m, x, "dpmpp_3m", steps=10, **kw)
    assert rel_err(ds.sample(m, x, "dpmpp_3m", steps=10, reference=True, **kw), ours) > 1e-4
    heun = ds.sample(m, x, "dpmpp_2m", steps=10, solver_type="heun", **kw)
    assert rel_err(heun, ds.sample(m, x, "dpmpp_2m", steps=10, **kw)) > 1e-4


@pytest.mark.parametrize("schedule", ["logsnr", "karras"])
def test_corrected_3m_is_unip3(g64, schedule):
    """With D2 doubled, 3M integrates the quadratic through three x̂_0's exactly, as UniP-3
    (UniPC's predictor, full Vandermonde solve) does: the two agree on any grid."""
    try:
        ds.get_solver("unipc", order=3, corrector=False, variant="bh2")
    except ValueError:
        pytest.skip("unipc not available")
    _, m, x = _setup(g64)
    kw = {"steps": 9, "final": "tmin", "lower_order_final": False, "schedule": schedule}
    ours = ds.sample(m, x, "dpmpp_3m", **kw)
    unip = ds.sample(m, x, "unipc", order=3, corrector=False, variant="bh2", **kw)
    assert rel_err(ours, unip) < 1e-12
    official = ds.sample(m, x, "dpmpp_3m", reference=True, **kw)
    assert rel_err(official, unip) > 1e-4


def test_2s_is_ddim_with_the_midpoint_x0(g64):
    """DPM-Solver++(2S) with r1 = ½ (Alg. 1): x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·x̂_0(u, s1)."""
    p, m, x = _setup(g64)
    times = torch.tensor([p.t_max, 0.6, 0.25, 0.05], dtype=torch.float64)
    got = ds.sample(m, x, "dpmpp_2s", times=times, final="tmin")

    def ddim(x, x0, s, t):
        h = p.lambda_(t) - p.lambda_(s)
        return float(p.sigma(t) / p.sigma(s)) * x + float(p.alpha(t) * -torch.expm1(-h)) * x0

    for s, t in itertools.pairwise(times):
        mid = p.t_of_lambda((p.lambda_(s) + p.lambda_(t)) / 2)
        u = ddim(x, m(x, s).x0, s, mid)
        x = ddim(x, m(u, mid).x0, s, t)
    assert rel_err(got, x) < 1e-12


def test_lower_order_final_below_15_steps(g64):
    _, m, x = _setup(g64)
    for steps, same in ((14, True), (15, False)):
        lof = ds.sample(m, x, "dpmpp_2m", steps=steps, final="tmin")
        full = ds.sample(m, x, "dpmpp_2m", steps=steps, final="tmin", lower_order_final=False)
        assert (rel_err(lof, full) > 1e-6) == same


# -- budgets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("final", ["standard", "tmin"])
def test_budgets_are_exact(final):
    p = sd_process()
    m = ds.Denoiser(lambda x, t: 0.5 * x, p, "eps")  # NFE bookkeeping only
    x = prior64(p, n=2)
    for nfe in range(1, 26):
        for solver in ("dpmpp_2s", "dpmpp_2m", "dpmpp_3m"):
            out, info = ds.sample(m, x, solver, nfe=nfe, final=final, return_info=True)
            assert info.nfe == nfe and torch.isfinite(out).all(), (solver, nfe)
        _, info = ds.sample(m, x, "dpmpp_2s", nfe=nfe, final=final, return_info=True)
        assert info.steps == len(fast_plan(2, nfe, final != "tmin"))


def test_no_nan_on_fine_grids_and_flow(g2):
    for p, pred, schedule in [
        (sd_process(), "eps", "logsnr"),
        (ds.FlowMatching(), "velocity", "uniform"),
    ]:
        m = g2.denoiser(p, pred)
        x = ds.prior(p, (2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for nfe in (1, 2, 3, 5, 29, 1000):
            for solver in ("dpmpp_2s", "dpmpp_3s", "dpmpp_2m", "dpmpp_3m"):
                out = ds.sample(m, x, solver, nfe=nfe, schedule=schedule)
                assert torch.isfinite(out).all(), (p, solver, nfe)


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("dpmpp_2m", {"solver_type": "taylor"}, "solver_type must be one of"),
        ("dpmpp_2m", {"lower_order_final": 1}, "lower_order_final must be a bool"),
        ("dpmpp_3m", {"reference": "yes"}, "reference must be a bool"),
        ("dpmpp_2s", {"order": 3}, "unknown option"),
    ],
)
def test_invalid_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        ds.get_solver(name, **opts)


def test_declared_orders():
    assert ds.get_solver("dpmpp_2s").order == ds.get_solver("dpmpp_2m").order == 2
    assert ds.get_solver("dpmpp_3m").order == 3
    assert ds.get_solver("dpmpp_3m", reference=True).order == 2


def test_state_select_reindexes_the_history(g64):
    """Particle methods reindex the state between steps: the history must follow the samples."""
    p, m, x = _setup(g64)
    grid = ds.Grid.build(p, ds.LogSNR()(p, 8), clean_end=True)
    index = torch.tensor([2, 0])
    for name in ("dpmpp_3m", "dpm_solver"):
        solver = ds.get_solver(name)
        full, sub = solver.init(x, grid, m), None
        xs, xf = None, x
        for i in range(grid.steps):
            if i == 3:  # reindex mid-run, once the history is full
                xs, sub = xf[index], full.select(index)
            if xs is not None:
                xs, sub = solver.step(xs, i, sub, m)
            xf, full = solver.step(xf, i, full, m)
        assert rel_err(xs, xf[index]) < 1e-14


@pytest.mark.parametrize("name", ["dpmpp_2s", "dpmpp_2m", "dpmpp_3m", "dpm_solver"])
def test_float32_samples(g64, name):
    _, m, x = _setup(g64)
    x64 = ds.sample(m, x, name, nfe=12)
    x32 = ds.sample(m, x.float(), name, nfe=12)
    assert x32.dtype == torch.float32 and rel_err(x32, x64) < 1e-5


# -- dpmpp_3s and diffusers' singlestep scheduler (data form) ----------------------------------
def test_3s_budgets_follow_dpm_solver_fast(g64):
    """nfe=M: the DPM-Solver-fast plan and outer grid of dpm_solver singlestep order 3."""
    _, m, x = _setup(g64)
    for nfe in (4, 9, 10, 11):
        for final in ("standard", "tmin"):
            _, info = ds.sample(m, x, "dpmpp_3s", nfe=nfe, final=final, return_info=True)
            _, ref = ds.sample(m, x, "dpm_solver", nfe=nfe, final=final, order=3,
                               method="singlestep", return_info=True)  # fmt: skip
            assert info.nfe == nfe and info.steps == len(fast_plan(3, nfe, final != "tmin"))
            assert torch.equal(info.times, ref.times)


def test_3s_solver_types_differ_and_are_validated(g64):
    _, m, x = _setup(g64)
    a = ds.sample(m, x, "dpmpp_3s", nfe=31)
    b = ds.sample(m, x, "dpmpp_3s", nfe=31, solver_type="taylor")
    assert 1e-8 < rel_err(a, b) < 1e-2
    with pytest.raises(ValueError, match="solver_type must be one of"):
        ds.get_solver("dpmpp_3s", solver_type="heun")


# (order, ours, options, diffusers' solver_type); diffusers' order-3 "midpoint" builds u2 with
# the midpoint weight, not the official one (test_dpm_solver::test_diffusers_order3_midpoint...)
PP_DIFFUSERS = [
    (1, "euler", {}, "midpoint"),
    (2, "dpmpp_2s", {}, "midpoint"),
    (3, "dpmpp_3s", {"solver_type": "taylor"}, "heun"),
]


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("order", "name", "opts", "theirs"), PP_DIFFUSERS, ids=str)
def test_singlestep_agrees_with_diffusers(g64, order, name, opts, theirs):
    """DPMSolverSinglestepScheduler(algorithm_type="dpmsolver++", final σ = 0) against ours with
    a clean end: three outer steps of ``order`` on a Karras grid, then the first-order step to
    σ = 0 (x̂_0), on the same λ-points (measured ≤ 1e-14)."""
    from .test_dpm_solver import run_diffusers_singlestep, stage_times

    p, m, x_T = _setup(g64)
    outer = ds.Karras()(p, 4)
    ts = stage_times(p, outer, [order] * 3 + [1])
    peer = run_diffusers_singlestep(
        m, x_T, ts, 0.0, solver_order=order, algorithm_type="dpmsolver++", solver_type=theirs
    )
    got, info = ds.sample(m, x_T, name, times=outer, return_info=True, **opts)
    assert info.nfe == len(ts) == 3 * order + 1
    assert rel_err(got, peer) <= 1e-5


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_3s_official_type_is_neither_diffusers_type(g64):
    from .test_dpm_solver import run_diffusers_singlestep, stage_times

    p, m, x_T = _setup(g64)
    outer = ds.Karras()(p, 4)
    ts = stage_times(p, outer, [3] * 3 + [1])
    ours = ds.sample(m, x_T, "dpmpp_3s", times=outer)
    for theirs in ("midpoint", "heun"):
        peer = run_diffusers_singlestep(
            m, x_T, ts, 0.0, solver_order=3, algorithm_type="dpmsolver++", solver_type=theirs
        )
        assert rel_err(ours, peer) > 1e-4
