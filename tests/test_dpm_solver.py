"""DPM-Solver (noise prediction): measured orders, identities, budgets and robustness.

Orders are measured on the *local* truncation error: on gmm64 with SD's scaled-linear process,
one step of size h in λ from the exact solution at λ_s = 1 (σ/α ≈ 0.37), with the multistep
history evaluated at the exact solution at λ_s − h, λ_s − 2h (the warm-up steps are replaced by
exact reference values, so the step measured is the full-order one). The error of that step is
C·h^{p+1}; the order is the log-log slope over h = 0.1, 0.05, 0.025 minus one. (Global errors
over the whole trajectory are still pre-asymptotic at 64 steps on gmm64, and low-order warm-up
steps would mask a multistep method's order there.) Near λ_s = 0 some trajectories of gmm64
cross a sharp change of component responsibilities, where h = 0.1 is not yet asymptotic; at
λ_s = 1 the measured orders are within ±0.11 of theory for every seed tried (0, 3, 5, 11).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import diffsolve as ds
from diffsolve.bench import solve_pf_ode
from diffsolve.solvers.base import Grid
from diffsolve.solvers.dpm_solver import SOLVER_TYPES, fast_plan

from .conftest import prior64, rel_err, sd_process

LAM_S = 1.0
HS = (0.1, 0.05, 0.025)
# the official 3rd-order multistep: its O(h³) local term has a small constant next to the O(h⁴)
# ones, so its asymptotic slope shows at smaller h (errors 1e-8…1e-10, still far above the
# reference's 1e-12)
HS_SMALL = (0.025, 0.0125, 0.00625)
_EXACT: dict = {}


def _lte_times(process, h: float, history: int, lam_s: float) -> torch.Tensor:
    lam = torch.tensor([lam_s + (j - history) * h for j in range(history + 2)], dtype=torch.float64)
    return process.t_of_lambda(lam)


def exact_at(gmm, process, x_T: torch.Tensor, times: list[float]) -> dict[float, torch.Tensor]:
    """Exact PF-ODE solution at ``times`` from x_T at t_max, one chained pass (cached)."""
    key = (gmm.name, repr(process), float(x_T.sum()))
    known = _EXACT.setdefault(key, {})
    todo = sorted({float(t) for t in times} - set(known), reverse=True)
    t_prev, x = process.t_max, x_T
    for t in todo:
        done = [s for s in known if s >= t]
        if done:  # restart from the nearest solved point above t
            t_prev = min(done)
            x = known[t_prev]
        known[t] = x = solve_pf_ode(gmm, process, x, t_prev, t)
        t_prev = t
    return known


def lte_order(
    solver: ds.Solver,
    gmm,
    history: int,
    *,
    n: int = 4,
    seed: int = 0,
    lam_s: float = LAM_S,
    hs: tuple[float, ...] = HS,
) -> tuple[float, list[float]]:
    """Measured order (slope − 1) of one step from exact data, and the errors per h."""
    p = sd_process()
    model = gmm.denoiser(p, "eps")
    x_T = prior64(p, n=n, seed=seed)
    all_t = [float(t) for h in hs for t in _lte_times(p, h, 2, lam_s)]
    exact = exact_at(gmm, p, x_T, all_t)
    errs = []
    for h in hs:
        times = _lte_times(p, h, history, lam_s)
        grid = Grid.build(p, times, clean_end=False)
        state = solver.init(x_T, grid, model)
        x = exact[float(times[0])]
        for i in range(grid.steps):
            x, state = solver.step(x, i, state, model)
            if i < history:  # warm-up replaced: exact x, so the history is exact evaluations
                x = exact[float(times[i + 1])]
        errs.append(rel_err(x, exact[float(times[-1])]))
    logs = torch.tensor([[math.log(h), 1.0] for h in hs], dtype=torch.float64)
    fit = torch.linalg.lstsq(logs, torch.tensor(errs, dtype=torch.float64).log()[:, None])
    return float(fit.solution[0, 0]) - 1.0, errs


# (options, history evaluations before the measured step, theoretical order)
CONFIGS = [
    ({"order": 1}, 0, 1),
    ({"order": 2}, 1, 2),
    ({"order": 2, "solver_type": "taylor"}, 1, 2),
    ({"order": 3}, 2, 3),
    ({"order": 3, "reference": True}, 2, 2),  # the official multistep D2: 2nd order
    ({"order": 1, "method": "singlestep"}, 0, 1),
    ({"order": 2, "method": "singlestep"}, 0, 2),
    ({"order": 2, "method": "singlestep", "solver_type": "taylor"}, 0, 2),
    ({"order": 3, "method": "singlestep"}, 0, 3),
    ({"order": 3, "method": "singlestep", "solver_type": "taylor"}, 0, 3),
]


@pytest.mark.parametrize(("opts", "history", "expected"), CONFIGS, ids=lambda v: str(v))
def test_measured_order(g64, opts, history, expected):
    solver = ds.get_solver("dpm_solver", lower_order_final=False, **opts)
    hs = HS_SMALL if opts.get("reference") else HS
    order, errs = lte_order(solver, g64, history, hs=hs)
    assert abs(order - expected) <= 0.3, (order, errs)


def test_corrected_multistep_3_beats_the_official_one(g64):
    solver = ds.get_solver("dpm_solver", order=3, lower_order_final=False)
    official = ds.get_solver("dpm_solver", order=3, lower_order_final=False, reference=True)
    _, ours = lte_order(solver, g64, 2)
    _, ref = lte_order(official, g64, 2)
    assert ours[-1] < ref[-1] / 3  # h = 0.025: an order of h apart


# -- identities ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["multistep", "singlestep"])
@pytest.mark.parametrize(
    ("process", "prediction", "schedule"),
    [("sd", "eps", "logsnr"), ("sd", "eps", "karras"), ("flow", "velocity", "uniform")],
)
def test_order_one_is_euler(g64, method, process, prediction, schedule):
    """DPM-Solver-1 is DDIM (Lu et al. 2022, eq. 3.7), also from α = 0 (flow at t = 1)."""
    p = sd_process() if process == "sd" else ds.FlowMatching()
    m = g64.denoiser(p, prediction)
    x = ds.prior(p, (3, 64), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for kw in ({"nfe": 6}, {"steps": 5, "final": "tmin"}):
        ref = ds.sample(m, x, "euler", schedule=schedule, **kw)
        got = ds.sample(m, x, "dpm_solver", schedule=schedule, order=1, method=method, **kw)
        assert rel_err(got, ref) < 1e-12


def test_singlestep_2_is_the_lambda_midpoint_rule(g64):
    """DPM-Solver-2 with r1 = ½ (Alg. 1) in ρ = σ/α on x/α: x_t/α_t = x_s/α_s + (ρ_t − ρ_s)·ε̂(u),
    u/α_m = x_s/α_s + (ρ_m − ρ_s)·ε̂_s with λ_m = (λ_s + λ_t)/2 (k-diffusion's ``dpm_2``)."""
    p = sd_process()
    m = g64.denoiser(p)
    x = prior64(p, n=3)
    times = torch.tensor([p.t_max, 0.6, 0.25, 0.05], dtype=torch.float64)
    got = ds.sample(m, x, "dpm_solver", times=times, final="tmin", order=2, method="singlestep")
    for s, t in itertools.pairwise(times):
        mid = p.t_of_lambda((p.lambda_(s) + p.lambda_(t)) / 2)
        a_s, a_m, a_t = (float(p.alpha(u)) for u in (s, mid, t))
        r_s, r_m, r_t = (float(p.rho(u)) for u in (s, mid, t))
        u = a_m * (x / a_s + (r_m - r_s) * m(x, s).eps)
        x = a_t * (x / a_s + (r_t - r_s) * m(u, mid).eps)
    assert rel_err(got, x) < 1e-12


def test_reference_differs_only_from_third_order_steps(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x = prior64(p, n=2)
    kw = {"order": 3, "final": "tmin", "lower_order_final": False}
    two = ds.sample(m, x, "dpm_solver", steps=2, **kw)  # warm-up only (orders 1, 2)
    assert rel_err(ds.sample(m, x, "dpm_solver", steps=2, reference=True, **kw), two) < 1e-14
    ours = ds.sample(m, x, "dpm_solver", steps=8, **kw)
    assert rel_err(ds.sample(m, x, "dpm_solver", steps=8, reference=True, **kw), ours) > 1e-4


# -- budgets and plans --------------------------------------------------------------------------
def _cheap_model(process):
    # the NFE bookkeeping does not depend on the network: a linear ε-predictor costs nothing
    return ds.Denoiser(lambda x, t: 0.5 * x, process, "eps")


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final", ["standard", "tmin"])
def test_singlestep_budget_is_exact(order, final):
    p = sd_process()
    m = _cheap_model(p)
    x = prior64(p, n=2)
    for nfe in range(1, 26):
        for schedule in ("logsnr", "uniform"):
            out, info = ds.sample(
                m, x, "dpm_solver", nfe=nfe, order=order, method="singlestep",
                final=final, schedule=schedule, return_info=True,
            )  # fmt: skip
            assert info.nfe == nfe, (nfe, schedule)
            assert info.steps == len(fast_plan(order, nfe, final != "tmin"))
            assert torch.isfinite(out).all()


def test_fast_plan_matches_the_official_rule():
    # final="tmin": DPM-Solver's get_orders_and_timesteps_for_singlestep_solver
    assert fast_plan(3, 9, False) == [3, 3, 2, 1]
    assert fast_plan(3, 10, False) == [3, 3, 3, 1]
    assert fast_plan(3, 11, False) == [3, 3, 3, 2]
    assert fast_plan(2, 7, False) == [2, 2, 2, 1]
    # clean end: the step to σ = 0 is one first-order call
    assert fast_plan(3, 9, True) == [3, 3, 2, 1]
    assert fast_plan(3, 10, True) == [3, 3, 3, 1]
    assert fast_plan(3, 11, True) == [3, 3, 3, 1, 1]
    assert fast_plan(3, 1, True) == [1] and fast_plan(3, 2, True) == [1, 1]
    for order in (1, 2, 3):
        for clean in (True, False):
            for nfe in range(1, 40):
                plan = fast_plan(order, nfe, clean)
                assert sum(plan) == nfe and max(plan) <= order
                assert not clean or plan[-1] == 1


def test_outer_grid_subsamples_the_schedule_at_cumulative_orders():
    p = sd_process()
    solver = ds.get_solver("dpm_solver", order=3, method="singlestep")
    every = ds.Uniform()(p, 10)

    def plan_times(schedule, nfe, clean):
        return solver.grid_times(p, schedule, solver.budget(nfe, clean), clean)

    outer = plan_times(ds.Uniform(), 10, True)  # plan [3, 3, 3, 1]
    assert torch.equal(outer, every[[0, 3, 6, 9]])
    lam = p.lambda_(plan_times(ds.LogSNR(), 10, False))  # 4 steps uniform in λ
    assert lam.numel() == 5 and torch.allclose(lam.diff(), lam.diff()[0].expand(4), rtol=1e-9)


@pytest.mark.parametrize("final", ["standard", "tmin"])
def test_steps_and_times_use_order_everywhere(g64, final):
    p = sd_process()
    m = g64.denoiser(p)
    x = prior64(p, n=2)
    for steps in (2, 5, 8, 11):  # 3n − 1 (diffusers #9007)
        out, info = ds.sample(
            m, x, "dpm_solver", steps=steps, order=3, method="singlestep", final=final,
            return_info=True,
        )  # fmt: skip
        assert info.nfe == (3 * (steps - 1) + 1 if final == "standard" else 3 * steps)
        assert torch.isfinite(out).all()


def test_no_nan_up_to_1000_calls(g2):
    """Representative budgets 1…1000 (3n−1 and its neighbours), the clean end, the flow-matching
    start at α = 0 (λ = −∞, stages placed in t) and a Karras grid, on the exact gmm2d model."""
    cases = [
        (sd_process(), "eps", "logsnr"),
        (ds.FlowMatching(), "velocity", "uniform"),
        (sd_process(), "eps", "karras"),
    ]
    for p, pred, schedule in cases:
        m = g2.denoiser(p, pred)
        x = ds.prior(p, (2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for nfe in (1, 2, 3, 4, 5, 8, 29, 30, 31, 299, 1000):
            for order in (2, 3):
                out, info = ds.sample(
                    m, x, "dpm_solver", nfe=nfe, order=order, method="singlestep",
                    schedule=schedule, return_info=True,
                )  # fmt: skip
                assert info.nfe == nfe and torch.isfinite(out).all(), (p, nfe, order)
        for order in (2, 3):
            out = ds.sample(m, x, "dpm_solver", nfe=299, order=order, schedule=schedule)
            assert torch.isfinite(out).all()


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"order": 4}, "order must be 1, 2 or 3"),
        ({"method": "adaptive"}, "method must be one of"),
        ({"solver_type": "midpoint"}, "solver_type must be one of"),
        ({"lower_order_final": "yes"}, "lower_order_final must be a bool"),
        ({"order": 2, "reference": True}, "reference=True"),
        ({"order": 3, "method": "singlestep", "reference": True}, "reference=True"),
    ],
)
def test_invalid_options(opts, match):
    with pytest.raises(ValueError, match=match):
        ds.get_solver("dpm_solver", **opts)


def test_lower_order_final_follows_the_official_threshold():
    from diffsolve.solvers.dpm_solver import multistep_orders

    p = sd_process()
    for n, expected in [(6, [1, 2, 3, 3, 2, 1]), (10, [1, 2] + [3] * 8)]:
        grid = Grid.build(p, ds.LogSNR()(p, n + 1), clean_end=False)
        assert multistep_orders(grid, 3, True, 10) == expected
    grid = Grid.build(p, ds.LogSNR()(p, 5), clean_end=True)  # the step to σ = 0 counts
    assert multistep_orders(grid, 3, True, 10) == [1, 2, 3, 2, 0]


# -- peers: diffusers' singlestep scheduler, k-diffusion's dpm_fast and dpm_2 ---------------------
def stage_times(process, outer: torch.Tensor, orders: list[int]) -> list[float]:
    """Every evaluation time of a singlestep run, in order: each outer step's start, then its
    λ-uniform stages (what ``singlestep_init`` evaluates)."""
    lam = process.lambda_(outer).tolist()
    out = []
    for i, k in enumerate(orders):
        out.append(float(outer[i]))
        if k > 1:
            targets = [lam[i] + j / k * (lam[i + 1] - lam[i]) for j in range(1, k)]
            out += process.t_of_lambda(torch.tensor(targets, dtype=torch.float64)).tolist()
    return out


def run_diffusers_singlestep(model, x_T, ts: list[float], last_rho: float, **config):
    """diffusers' DPMSolverSinglestepScheduler evaluating the exact model at the process times
    ``ts`` (its σ's set to ρ(ts) in float64, then ``last_rho``): the same λ-points as ours."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverSinglestepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **config
    )
    sched.set_timesteps(timesteps=[999 - 10 * k for k in range(len(ts))])
    p = model.process
    rho = p.rho(torch.tensor(ts, dtype=torch.float64))
    sched.sigmas = torch.cat([rho, torch.tensor([last_rho], dtype=torch.float64)])
    x = x_T
    for t, tau in zip(ts, sched.timesteps):
        eps = model(x, model.point(t, x)).eps
        x = sched.step(eps, tau, x, return_dict=False)[0]
    return x


# (order, our solver_type, diffusers' solver_type): diffusers' order-3 "midpoint" is neither
# official type (its u2 uses the midpoint weight), its "heun" is the official "taylor"
DIFFUSERS_TYPES = [
    (1, "dpmsolver", "midpoint"),
    (2, "dpmsolver", "midpoint"),
    (2, "taylor", "heun"),
    (3, "taylor", "heun"),
]


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers deprecates "dpmsolver"
@pytest.mark.parametrize(("order", "ours", "theirs"), DIFFUSERS_TYPES)
def test_singlestep_agrees_with_diffusers(g64, order, ours, theirs):
    """algorithm_type="dpmsolver" (noise form, final σ = σ_min: our final="tmin"), three outer
    steps on a Karras grid, the same λ-points on both sides (measured ≤ 1e-13)."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    outer = ds.Karras()(p, 4)
    ts = stage_times(p, outer, [order] * 3)
    peer = run_diffusers_singlestep(
        m, x_T, ts, float(p.rho(outer[-1])), solver_order=order, algorithm_type="dpmsolver",
        solver_type=theirs, final_sigmas_type="sigma_min",
    )  # fmt: skip
    got, info = ds.sample(m, x_T, "dpm_solver", times=outer, final="tmin", order=order,
                          method="singlestep", solver_type=ours, return_info=True)  # fmt: skip
    assert info.nfe == len(ts) == 3 * order
    assert rel_err(got, peer) <= 1e-5


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_diffusers_order3_midpoint_is_not_official(g64):
    """diffusers' order-3 ``midpoint`` builds u2 with (e^{r2h} − 1)/2·(r2/r1) in place of the
    official (r2/r1)·P(2, r2h)/(r2h): it differs from both official types (≈1e-3 here)."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    outer = ds.Karras()(p, 4)
    ts = stage_times(p, outer, [3] * 3)
    peer = run_diffusers_singlestep(
        m, x_T, ts, float(p.rho(outer[-1])), solver_order=3, algorithm_type="dpmsolver",
        solver_type="midpoint", final_sigmas_type="sigma_min",
    )  # fmt: skip
    for st in SOLVER_TYPES:
        got = ds.sample(m, x_T, "dpm_solver", times=outer, final="tmin", order=3,
                        method="singlestep", solver_type=st)  # fmt: skip
        assert rel_err(got, peer) > 1e-5


def kd_sampling():
    """k-diffusion's sampling module (skip if k-diffusion is missing)."""
    kdiff = pytest.importorskip("diffsolve.interop.kdiffusion")
    try:
        return kdiff.load_sampling()
    except ImportError:
        pytest.skip("k-diffusion not installed")


def kd_denoiser(gmm):
    """The exact x̂_0 in k-diffusion's scale: D(x/α, ρ) with α = 1, σ = ρ."""

    def denoise(x, s):
        return gmm.x0_mean(x, 1.0, float(s[0]))

    return denoise


@pytest.mark.peers
def test_dpm_fast_is_k_diffusion_sample_dpm_fast(g64):
    """k-diffusion's ``sample_dpm_fast`` (η = 0) is DPM-Solver-fast: K = ⌊M/3⌋ + 1 steps uniform
    in λ between σ_max and σ_min, orders [3…3, 2, 1] / [3…3, 1] / [3…3, 2], each the official
    ``dpmsolver`` update; that is ``dpm_fast`` = dpm_solver(order=3, method="singlestep") with
    ``nfe=M`` on the logsnr schedule and final="tmin" (its default clean end replaces the last
    step by the call at t_min returning x̂_0). Measured ≤ 3.6e-6 (k-diffusion's float32 λ-grid)."""
    K = kd_sampling()
    p = sd_process()
    x_T = prior64(p, n=4)
    s_max, s_min = float(p.rho(p.t_max_finite)), float(p.rho(p.t_min))

    denoise = kd_denoiser(g64)
    assert ds.get_solver("dpm_fast") == ds.get_solver("dpm_solver", order=3, method="singlestep")
    for nfe in (5, 6, 7, 10, 20):
        x_k = K.sample_dpm_fast(denoise, x_T / float(p.alpha(p.t_max_finite)), s_min, s_max, nfe,
                                disable=True)  # fmt: skip
        ours, info = ds.sample(g64.denoiser(p), x_T, "dpm_fast", nfe=nfe, final="tmin",
                               return_info=True)  # fmt: skip
        assert info.nfe == nfe
        assert rel_err(ours / float(p.alpha(p.t_min)), x_k) < 1e-5, nfe


@pytest.mark.peers
def test_dpm2_is_k_diffusion_sample_dpm_2(g64):
    """``dpm2`` (alias of dpm_solver order 2 singlestep) on k-diffusion's Karras σ's: the last
    step of sample_dpm_2 (to σ = 0) is Euler, i.e. x̂_0, as our clean end (measured 4e-15)."""
    K = kd_sampling()
    from diffsolve.interop.kdiffusion import sigmas_for

    assert ds.get_solver("dpm2") == ds.get_solver("dpm_solver", order=2, method="singlestep")
    p = sd_process()
    x_T = prior64(p, n=4)
    sig = sigmas_for(p, "karras", 6)
    times = p.t_of_rho(sig[:-1])

    denoise = kd_denoiser(g64)
    x_k = K.sample_dpm_2(denoise, x_T / float(p.alpha(times[0])), sig, disable=True)
    ours, info = ds.sample(g64.denoiser(p), x_T, "dpm2", times=times, return_info=True)
    assert info.nfe == 2 * 5 + 1
    assert rel_err(ours, x_k) < 1e-12, rel_err(ours, x_k)


def test_new_singlestep_budgets_and_no_nan():
    """dpm_fast, dpm2, dpmpp_3s: nfe 1…25 met exactly, 3n − 1 steps, 1000 calls, finite."""
    p = sd_process()
    m = _cheap_model(p)
    x = prior64(p, n=2)
    for name in ("dpm_fast", "dpm2", "dpmpp_3s"):
        for nfe in [*range(1, 26), 1000]:
            for final in ("standard", "tmin"):
                out, info = ds.sample(m, x, name, nfe=nfe, final=final, return_info=True)
                assert info.nfe == nfe and torch.isfinite(out).all(), (name, nfe, final)
        for steps in (2, 5, 8, 11):
            out = ds.sample(m, x, name, steps=steps)
            assert torch.isfinite(out).all()


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy use, not ours
def test_dpm2_agrees_with_diffusers_kdpm2(g64):
    """diffusers' KDPM2DiscreteScheduler: DPM-Solver-2 in ρ with σ_interpol = √(σ_i·σ_{i+1})
    (the λ-midpoint), Euler (x̂_0) to σ = 0. Its network sees the interpolated σ through a
    log-σ-interpolated timestep; here the exact model is evaluated at the process time of the
    scheduler's own σ's, and ours runs ``dpm2`` with times = those of its outer σ's. Measured
    3.8e-8 (diffusers' float32 σ's and log-lerp)."""
    diffusers = pytest.importorskip("diffusers")
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    sched = diffusers.KDPM2DiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1,
    )  # fmt: skip
    sched.set_timesteps(8)
    x = x_T * sched.init_noise_sigma
    for tau in sched.timesteps:
        x_in = sched.scale_model_input(x, tau)
        first = sched.state_in_first_order
        rho = (sched.sigmas if first else sched.sigmas_interpol)[sched.step_index]
        eps = m(x_in, float(p.t_of_rho(float(rho)))).eps
        x = sched.step(eps, tau, x, return_dict=False)[0]
    outer = sched.sigmas.double()
    outer = outer[torch.cat([outer[:1] > 0, outer[1:] != outer[:-1]]) & (outer > 0)]
    ours, info = ds.sample(m, x_T, "dpm2", times=p.t_of_rho(outer), return_info=True)
    assert info.nfe == len(sched.timesteps) == 2 * 8 - 1
    assert rel_err(ours, x) <= 1e-5, rel_err(ours, x)
