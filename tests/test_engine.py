"""The weight-table engine and the plan: one plan per run, rows that are the solver.

* ``make_plan`` is what ``ds.sample`` runs: the plan's rows applied by hand reproduce the sample;
* the weight table is plain data: a solver rebuilt from ``plan.weights`` (a tuned solver with
  the same grid and rows) gives the same samples, which is what tuning saves and loads;
* a reused solver object, one plan for two runs and a split batch give identical results;
* the budget is planned once: ``calls`` sum to the NFE for every solver on the engine.
"""

from __future__ import annotations

import json

import pytest
import torch

import diffsolve as ds
from diffsolve.bench import gmm64
from diffsolve.solvers.engine import Row, RowSolver, StepRule, combine
from diffsolve.tuning import Tuned

from .conftest import rel_err, sd_process

ENGINE = sorted(n for n in ds.solvers() if isinstance(ds.get_solver(n), RowSolver) and n != "tuned")


@pytest.fixture(scope="module")
def setup():
    p = sd_process()
    model = gmm64().denoiser(p)
    x = ds.prior(p, (6, 64), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return p, model, x


def test_the_engine_holds_the_exponential_integrators():
    for name in ("euler", "dpm_solver", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_3s",
                 "unipc", "deis", "lms", "ipndm", "sa_solver", "dpmpp_2m_sde", "mrs", "heun",
                 "rk", "pndm", "ddpm", "euler_maruyama"):  # fmt: skip
        assert name in ENGINE, name


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc", "dpm_fast", "deis", "heun"])
def test_plan_rows_applied_by_hand_reproduce_sample(setup, name):
    _p, model, x = setup
    solver = ds.get_solver(name)
    plan = ds.make_plan(model, x, solver, nfe=7)
    assert sum(plan.calls) == 7 == sum(r.calls for r in plan.rules)
    hist, xc, x_prev = [], x, None
    for _i, rule in enumerate(plan.rules):
        hist.insert(0, model(xc, float(rule.t[0])))
        if rule.correct is not None and x_prev is not None:
            xc = combine(rule.correct, x_prev, hist, None)
        start = xc
        for k, row in enumerate(rule.stages):
            hist.insert(0, model(combine(row, start, hist, None), float(rule.t[k + 1])))
        if rule.update is None:
            xc = hist[0].x0
            break
        x_prev, xc = start, combine(rule.update, start, hist, None)
    ref = ds.sample(model, x, name, nfe=7)
    assert rel_err(xc, ref) <= 1e-13


@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc", "dpmpp_3s", "sa_solver", "heun"])
def test_a_table_rebuilt_from_plain_data_is_the_same_solver(setup, name):
    _p, model, x = setup
    solver = ds.get_solver(name)
    if name == "sa_solver":
        solver = ds.get_solver(name, tau=0.0)
    plan = ds.make_plan(model, x, solver, nfe=8)
    data = json.loads(json.dumps(plan.weights))  # printable, serialisable
    steps = tuple(
        StepRule(
            tuple(w["t"]),
            tuple(Row.from_dict(r) for r in w["stages"]),
            None if w["update"] is None else Row.from_dict(w["update"]),
            None if w["correct"] is None else Row.from_dict(w["correct"]),
        )
        for w in data
    )
    times = tuple(plan.t[:-1].tolist())
    table = Tuned(times=times, steps=steps)
    ref = ds.sample(model, x, solver, nfe=8)
    assert rel_err(ds.sample(model, x, table), ref) <= 1e-13
    assert "step 0" in plan.describe() and "update" in plan.describe()


def test_reused_solver_and_plan_give_identical_runs(setup):
    _p, model, x = setup
    solver = ds.get_solver("dpmpp_3m")
    a = ds.sample(model, x, solver, nfe=6)
    b = ds.sample(model, x[:3], solver, nfe=6)
    c = ds.sample(model, x, solver, nfe=6)
    assert torch.equal(a, c)
    assert rel_err(a[:3], b) <= 1e-12
    plan = ds.make_plan(model, x, solver, nfe=6)
    runs = []
    for _ in range(2):
        state = solver.init(x, plan, model)
        xc = x
        for i in range(plan.steps):
            xc, state = solver.step(xc, i, state, model)
        runs.append(xc)
    assert torch.equal(runs[0], runs[1]) and rel_err(runs[0], a) <= 1e-13


@pytest.mark.parametrize("name", ENGINE)
def test_every_engine_solver_spends_its_budget_through_the_plan(setup, name):
    _p, model, x = setup
    solver = ds.get_solver(name)
    for nfe in (3, 4, 7, 10):
        try:
            calls = solver.budget(nfe, True)
        except ValueError:
            continue  # a budget the method cannot spend exactly says so
        assert sum(calls) == nfe, (name, nfe, calls)
        plan = ds.make_plan(model, x, solver, nfe=nfe)
        assert sum(r.calls for r in plan.rules) == nfe
        assert len(plan.rules) == plan.steps


def test_plan_validates_before_any_work(setup):
    _p, model, x = setup
    solver = ds.get_solver("dpmpp_2m")
    with pytest.raises(ValueError, match="exactly one"):
        ds.make_plan(model, x, solver, nfe=5, steps=5)
    with pytest.raises(ValueError, match="positive integer"):
        ds.make_plan(model, x, solver, nfe=0)
    with pytest.raises(ValueError, match="final"):
        ds.make_plan(model, x, solver, nfe=5, final="zero")
