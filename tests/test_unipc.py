"""UniPC: convergence orders (global and of the step itself), identities, bookkeeping.

Orders are measured on the exact gmm64 model with SD's scaled-linear process, float64, against
the exact PF-ODE solution at the solver's own end time (``final="tmin"``).

* Global order (log-log slope of relative RMSE over 40/80/160 logSNR steps,
  ``lower_order_final=False``): UniP-p alone has order p; with UniC, p + 1 (Zhao et al. 2023,
  §3.2: UniC-p raises the order by one). For p = 3 with the corrector the first step (UniP-1 +
  UniC-1, local error O(h³)) masks order 4 (global O(h³) from warm-up), so that case is measured
  on the step itself instead:
* Local order: one step from an *exact* history (exact x and exact x̂_0 at the p previous λ-grid
  points, spacing h), UniP-p then UniC-p with the model evaluated at the predicted point; the
  local error is O(h^{p+2}) with the corrector and O(h^{p+1}) without. Slopes are fitted over
  h = 0.2, 0.1, 0.05 at λ = 2 (where all 8 trajectories are smooth on that scale).

Measured (this file's settings): global 1.92 / 0.99 (p=1 with/without UniC), 2.9 / 1.9–2.0
(p=2), 2.9 (p=3 without UniC); local slopes 3.1, 1.8, 4.1, 3.0, 4.8, 3.9 (p=1…3, with/without).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.bench import solve_pf_ode
from diffsolve.solvers.base import Grid
from diffsolve.solvers.engine import combine
from diffsolve.solvers.unipc import fold

from .conftest import prior64, reference, rel_err, sd_process

STEPS = (40, 80, 160)


def _slope(xs, errs) -> float:
    return -float(np.polyfit(np.log(xs), np.log(errs), 1)[0])


@pytest.fixture(scope="module")
def setup(g64):
    p = sd_process()
    x_T = prior64(p)
    return g64.denoiser(p), x_T, reference(g64, p, x_T, p.t_min)


@pytest.mark.parametrize(
    ("order", "variant", "corrector"),
    [
        (1, "bh1", True),
        (1, "bh2", False),
        (2, "bh1", True),
        (2, "bh2", True),
        (2, "bh2", False),
        (3, "bh1", False),
    ],
)
def test_global_order(setup, order, variant, corrector):
    model, x_T, ref = setup
    opts = {"order": order, "variant": variant, "corrector": corrector}
    errs = [
        rel_err(
            ds.sample(model, x_T, "unipc", steps=n, final="tmin", lower_order_final=False, **opts),
            ref,
        )
        for n in STEPS
    ]
    expected = order + 1 if corrector else order
    assert abs(_slope(STEPS, errs) - expected) <= 0.3, errs


@pytest.fixture(scope="module")
def exact_path(g64):
    """Exact x and the model's predictions there on λ-grids λ_j = 2 + j·h, j = 0…5, for h in H."""
    p = sd_process()
    model = g64.denoiser(p)
    lam_a = 2.0
    x_a = solve_pf_ode(g64, p, prior64(p), p.t_max, float(p.t_of_lambda(lam_a)))
    out = {}
    for h in (0.2, 0.1, 0.05):
        times = p.t_of_lambda(lam_a + h * torch.arange(6, dtype=torch.float64))
        xs = [x_a]
        for j in range(1, 6):
            xs.append(solve_pf_ode(g64, p, xs[-1], float(times[j - 1]), float(times[j])))
        preds = [model(x, model.point(t, x)) for x, t in zip(xs, times)]
        out[h] = (times, xs, preds)
    return model, out


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_local_order_of_the_step(exact_path, order, variant, corrector):
    model, path = exact_path
    errs = []
    for times, xs, preds in path.values():
        p = order
        grid = Grid.build(model.process, times[: p + 3], clean_end=False)
        # the step from point p: no correction of the (exact) x_p, full order p from exact history
        solver = ds.UniPC(
            order=p,
            variant=variant,
            corrector=corrector,
            lower_order_final=False,
            disable_corrector=(p - 1,),
        )
        # the engine's history is newest first: exact evaluations at points p − 1, …, 1
        state = solver.init(xs[0], grid, model).replace(history=tuple(preds[p - 1 : 0 : -1]))
        x_pred, state = solver.step(xs[p], p, state, model)
        if corrector:
            # the engine's x is the uncorrected x̃; step p + 1 evaluates there and its folded
            # row starts from the corrected x̃ + Δ_{p+1}·(m(x̃), m_p, …), rebuilt here
            hist = state.history
            _, state = solver.step(x_pred, p + 1, state, model)
            delta = fold(solver.rules(grid, solver.calls(grid.steps, False)))[1][p + 1]
            x_pred = x_pred + combine(delta, None, (state.history[0], *hist), None)
        errs.append(rel_err(x_pred, xs[p + 1]))
    expected = order + 2 if corrector else order + 1
    slope = _slope([1 / h for h in path], errs)  # error ∝ h^k: slope k against 1/h
    assert abs(slope - expected) <= 0.3, (slope, errs)


def _unfolded(model, x, solver, steps, final):
    """The two-row loop: UniC from the previous start, then the update from the corrected x."""
    from diffsolve.plan import make_plan

    plan = make_plan(model, x, solver, steps=steps, final=final)
    hist, x_prev = (), None
    for rule, pts in zip(plan.rules, plan.points):
        hist = (model(x, pts[0]), *hist)
        if rule.correct is not None:
            x = combine(rule.correct, x_prev, hist, None)
        if rule.update is None:
            return hist[0].x0
        x_prev, x = x, combine(rule.update, x, hist, None)
    return x


@pytest.mark.parametrize("final", ["standard", "tmin"])
@pytest.mark.parametrize(
    "opts",
    [
        {"order": 1},
        {"order": 2, "variant": "bh1"},
        {"order": 3, "disable_corrector": (0, 3)},
        {"order": 3, "lower_order_final": False, "euler_at_final": True},
        {"order": 2, "predictor": "euler"},
    ],
)
def test_folded_rows_equal_the_two_row_loop(setup, opts, final):
    """The engine runs one row per step on x̃ (:func:`fold`): the same sample as applying UniC
    and then the predictor, to round-off."""
    model, x_T, _ = setup
    solver = ds.UniPC(**opts)
    got = ds.sample(model, x_T, solver, steps=7, final=final)
    assert rel_err(got, _unfolded(model, x_T, solver, 7, final)) < 1e-13
    state = solver.init(x_T, Grid.build(model.process, ds.LogSNR()(model.process, 7), False), model)
    assert all(r.correct is None for r in state.rules) and state.x_prev is None


# -- identities --------------------------------------------------------------------------------
@pytest.mark.parametrize("final", ["standard", "tmin"])
def test_order1_without_corrector_is_euler(setup, final):
    model, x_T, _ = setup
    ref = ds.sample(model, x_T, "euler", steps=7, final=final)
    got = ds.sample(model, x_T, "unipc", steps=7, order=1, corrector=False, final=final)
    assert rel_err(got, ref) < 1e-12


def _needs(name: str) -> None:
    if name not in ds.solvers():
        pytest.skip(f"solver {name!r} not registered yet")


@pytest.mark.parametrize(
    ("steps", "final", "lof"),
    [(5, "standard", True), (12, "tmin", True), (20, "tmin", False)],
)
def test_unip2_bh2_is_dpmpp_2m(setup, steps, final, lof):
    _needs("dpmpp_2m")
    model, x_T, _ = setup
    ref = ds.sample(model, x_T, "dpmpp_2m", steps=steps, final=final, lower_order_final=lof)
    got = ds.sample(
        model,
        x_T,
        "unipc",
        steps=steps,
        final=final,
        order=2,
        variant="bh2",
        corrector=False,
        lower_order_final=lof,
    )
    assert rel_err(got, ref) < 1e-12


def test_predictor_option_reproduces_unipc(setup):
    """UniC over an inner solver: over euler it is UniPC-1; over dpmpp_2m it is UniPC-2 (bh2)."""
    model, x_T, _ = setup
    for final in ("standard", "tmin"):
        ref = ds.sample(model, x_T, "unipc", steps=8, order=1, final=final)
        got = ds.sample(model, x_T, "unipc", steps=8, order=1, final=final, predictor="euler")
        assert rel_err(got, ref) < 1e-12
    if "dpmpp_2m" in ds.solvers():
        ref = ds.sample(model, x_T, "unipc", steps=8, order=2)
        got, info = ds.sample(
            model, x_T, "unipc", steps=8, order=2, predictor="dpmpp_2m", return_info=True
        )
        assert rel_err(got, ref) < 1e-12 and info.nfe == 8
    # and a different predictor gives a different (still corrected) result
    other = ds.sample(model, x_T, "unipc", steps=8, order=2, predictor="euler")
    assert rel_err(other, ref) > 1e-4


def test_disabling_every_corrector_is_no_corrector(setup):
    model, x_T, _ = setup
    ref = ds.sample(model, x_T, "unipc", steps=9, order=3, corrector=False)
    got = ds.sample(model, x_T, "unipc", steps=9, order=3, disable_corrector=tuple(range(9)))
    assert rel_err(got, ref) == 0.0
    partial = ds.sample(model, x_T, "unipc", steps=9, order=3, disable_corrector=[0, 1])
    assert 0 < rel_err(partial, ref)


# -- bookkeeping -------------------------------------------------------------------------------
def test_orders_plan_follows_diffusers():
    assert ds.UniPC(order=3).orders(6) == [1, 2, 3, 3, 2, 1]
    assert ds.UniPC(order=3, lower_order_final=False).orders(6) == [1, 2, 3, 3, 3, 3]
    assert ds.UniPC(order=2).orders(1) == [1]
    assert ds.UniPC(order=3).orders(4, start=1) == [1, 1, 2, 1]


@pytest.mark.parametrize("nfe", [1, 2, 5, 10])
def test_corrector_costs_no_call(setup, nfe):
    model, x_T, _ = setup
    for final in ("standard", "tmin"):
        _, info = ds.sample(model, x_T, "unipc", nfe=nfe, final=final, return_info=True)
        assert info.nfe == nfe


def test_solver_object_is_reusable(setup):
    model, x_T, _ = setup
    solver = ds.UniPC(order=3, variant="bh1")
    a = ds.sample(model, x_T, solver, steps=6)
    b = ds.sample(model, x_T, solver, steps=6)
    assert torch.equal(a, b)


def test_state_select_reindexes_history(setup):
    """Resampling particles mid-run (state.select) equals running the permuted batch."""
    model, x_T, _ = setup
    perm = torch.tensor([3, 0, 0, 5, 1, 2, 7, 6])
    for solver in (ds.UniPC(order=3), ds.UniPC(order=2, predictor="euler")):
        grid = Grid.build(model.process, ds.LogSNR()(model.process, 6), clean_end=True)
        x, state = x_T, solver.init(x_T, grid, model)
        for i in range(3):
            x, state = solver.step(x, i, state, model)
        x, state = x[perm], state.select(perm)
        for i in range(3, grid.steps):
            x, state = solver.step(x, i, state, model)
        full = ds.sample(model, x_T, solver, steps=6)
        assert rel_err(x, full[perm]) < 1e-13


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"order": 4}, "order must be 1, 2 or 3"),
        ({"variant": "bh3"}, "variant must be one of"),
        ({"disable_corrector": (-1,)}, "non-negative"),
        ({"predictor": "unipc"}, "another solver"),
        ({"predictor": "heun"}, "one network call per step"),
        ({"predictor": "ddpm"}, "deterministic"),
        ({"predictor": "no-such"}, "unknown solver"),
    ],
)
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        ds.get_solver("unipc", **opts)


def test_flow_start_at_alpha_zero_is_finite():
    """A first point with λ = −∞ (flow matching's t = 1) gets a DDIM step and no node."""
    p = ds.FlowMatching()
    net = lambda x, t: 0.5 * x  # noqa: E731  (a velocity field, finite everywhere)
    model = ds.Denoiser(net, p, "velocity")
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for order in (1, 2, 3):
        out = ds.sample(model, x_T, "unipc", nfe=6, order=order, schedule="uniform")
        assert torch.isfinite(out).all()
    assert math.isinf(float(p.lambda_(torch.tensor(1.0, dtype=torch.float64))))


def test_predictor_off_the_engine_is_refused():
    """A predictor is taken as its rows, so it must be a RowSolver."""
    from dataclasses import dataclass

    from diffsolve.solvers.base import Solver

    @dataclass(frozen=True)
    class Plain(Solver):  # one deterministic call per step, but no rows
        name = "plain"

    with pytest.raises(ValueError, match="weight-table engine"):
        ds.get_solver("unipc", predictor=Plain())
