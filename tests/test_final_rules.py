"""The final-step rules of the multistep solvers (:class:`diffsolve.solvers.base.FinalOrders`).

``euler_at_final`` (diffusers #5433/#5541) makes the last step first order at any step count:
on a 20-step ``final="tmin"`` run the last step must equal one DDIM/Euler step from the state
before it, to float64 round-off, for every multistep solver. (UniPC first applies UniC to the
state it starts from, with the x̂_0 evaluated at the uncorrected point, as it always does; its
last predictor step is then DDIM from the corrected state x̃ + Δ, which its engine folds into
that step's row: :func:`diffsolve.solvers.unipc.fold` gives Δ.)
"""

from __future__ import annotations

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.solvers.base import FinalOrders, Grid
from diffsolve.solvers.engine import combine
from diffsolve.solvers.unipc import fold

from .conftest import prior64, rel_err

MULTISTEP = [
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {}),
    ("dpm_solver", {}),
    ("dpm_solver", {"order": 3}),
    ("unipc", {}),
    ("unipc", {"order": 3}),
    ("deis", {}),
    ("lms", {}),
    ("ipndm", {}),
]
N = 20


def _euler(model, process, x, t_from, t_to, x0=None):
    """One DDIM step t_from → t_to: (σ_t/σ_s)·x + α_t·(1 − e^{−h})·x̂_0(x, s)."""
    t_from, t_to = (torch.tensor(v, dtype=torch.float64) for v in (t_from, t_to))
    a_s, s_s = float(process.alpha(t_from)), float(process.sigma(t_from))
    a_t, s_t = float(process.alpha(t_to)), float(process.sigma(t_to))
    if x0 is None:
        x0 = model(x, model.point(t_from, x)).x0
    return (s_t / s_s) * x + a_t * (1 - s_t * a_s / (s_s * a_t)) * x0


def _run(model, x_T, name, opts):
    seen = []
    out, info = ds.sample(
        model, x_T, name, nfe=N, final="tmin", return_info=True,
        callback=lambda i, x, state: seen.append((x, state)), **opts,
    )  # fmt: skip
    assert info.nfe == N and info.steps == N and len(seen) == N
    return out, info, seen


def _last_step_as_euler(model, sd, name, opts, info, seen):
    t_prev, t_end = float(info.times[-2]), float(info.times[-1])
    if name == "unipc":  # DDIM from the corrected state, with the x̂_0 already evaluated
        # the engine holds x̃; the corrected state is x̃ + Δ·(m(x̃), older x̂_0's) (unipc.fold)
        before, state = seen[-2][1], seen[-1][1]
        solver = ds.get_solver(name, **opts)
        grid = Grid.build(sd, info.times, clean_end=False)
        delta = fold(solver.rules(grid, solver.calls(grid.steps, False)))[1][-1]
        hist = (state.history[0], *before.history)
        x = seen[-2][0] + combine(delta, None, hist, None)
        return _euler(model, sd, x, t_prev, t_end, x0=state.history[0].x0)
    return _euler(model, sd, seen[-2][0], t_prev, t_end)


@pytest.mark.parametrize(("name", "opts"), MULTISTEP)
def test_euler_at_final_makes_the_last_step_euler(g64, sd, name, opts):
    model = g64.denoiser(sd, "eps")
    x_T = prior64(sd, n=4, seed=1)
    plain = dict(opts)
    if "lower_order_final" in ds.get_solver(name).options():
        plain["lower_order_final"] = False  # so that euler_at_final is the only difference
    last = {**plain, "euler_at_final": True}
    out, info, seen = _run(model, x_T, name, last)
    assert rel_err(out, _last_step_as_euler(model, sd, name, last, info, seen)) <= 1e-12
    # without it the last step is of higher order, and the steps before are the same
    out2, info2, seen2 = _run(model, x_T, name, plain)
    assert rel_err(out2, _last_step_as_euler(model, sd, name, plain, info2, seen2)) > 1e-7
    assert torch.equal(seen[-2][0], seen2[-2][0])


@pytest.mark.parametrize(("name", "opts"), MULTISTEP)
def test_euler_at_final_changes_nothing_with_a_clean_end(g64, sd, name, opts):
    model = g64.denoiser(sd, "eps")
    x_T = prior64(sd, n=2, seed=2)
    a = ds.sample(model, x_T, name, nfe=N, **opts)
    b = ds.sample(model, x_T, ds.get_solver(name, euler_at_final=True, **opts), nfe=N)
    assert torch.equal(a, b)  # the step to σ = 0 returns x̂_0 either way


def test_final_orders_caps():
    def caps(rule, n):
        return [rule.cap(i, n) for i in range(n)]

    assert caps(FinalOrders(), 4) == [4, 4, 4, 4]
    assert caps(FinalOrders(lower_below=15), 4) == [4, 3, 2, 1]
    assert caps(FinalOrders(lower_below=15), 20) == [20] * 20
    assert caps(FinalOrders(lower_below=math.inf), 20)[-3:] == [3, 2, 1]
    assert caps(FinalOrders(euler=True), 20)[-2:] == [20, 1]
    assert caps(FinalOrders(lower_below=10, euler=True), 5) == [5, 4, 3, 2, 1]
    assert FinalOrders.of("x", True, 10, False) == FinalOrders(10, False)
    assert FinalOrders.of("x", False, 10, True) == FinalOrders(0.0, True)


def test_orders_reflect_the_rule(sd):
    from diffsolve.solvers.dpm_solver import multistep_orders

    grid = ds.Grid.build(sd, ds.LogSNR()(sd, 21), clean_end=False)
    assert multistep_orders(grid, 3, True, 15) == [1, 2] + [3] * 18
    assert multistep_orders(grid, 3, True, 15, euler_at_final=True) == [1, 2] + [3] * 17 + [1]
    assert ds.UniPC(order=3, euler_at_final=True, lower_order_final=False).orders(5) == [
        1, 2, 3, 3, 1,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("dpmpp_2m", {"euler_at_final": 1}, "euler_at_final must be a bool"),
        ("dpmpp_3m", {"euler_at_final": "yes"}, "euler_at_final must be a bool"),
        ("unipc", {"euler_at_final": None}, "euler_at_final must be a bool"),
        ("unipc", {"lower_order_final": 1}, "lower_order_final must be a bool"),
        ("deis", {"euler_at_final": 0}, "euler_at_final must be a bool"),
        ("lms", {"euler_at_final": 0}, "euler_at_final must be a bool"),
        ("dpm_solver", {"method": "singlestep", "euler_at_final": True}, "multistep"),
        ("unipc", {"predictor": "dpmpp_2m", "euler_at_final": True}, "on the predictor"),
        ("euler", {"euler_at_final": True}, "unknown option"),
    ],
)
def test_rule_options_are_validated(name, opts, match):
    with pytest.raises(ValueError, match=match):
        ds.get_solver(name, **opts)


def test_sample_takes_the_rule_by_keyword(g64, sd):
    model = g64.denoiser(sd, "eps")
    x_T = prior64(sd, n=2, seed=3)
    by_kw = ds.sample(model, x_T, "dpmpp_2m", nfe=N, final="tmin", euler_at_final=True)
    by_obj = ds.sample(model, x_T, ds.DPMSolverPP2M(euler_at_final=True), nfe=N, final="tmin")
    assert torch.equal(by_kw, by_obj)
