"""make_plan keeps what it planned per process (weakly) and per model and batch: a repeated run
skips the set-up, gets the same plan, and bad input is still refused."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import diffsolve as ds
from diffsolve import plan as plan_mod
from diffsolve.solvers.base import get_solver

from .conftest import sd_process


def _model():
    return ds.Denoiser(lambda x, t: 0 * x, sd_process(), "eps")


def test_a_repeated_plan_is_reused_and_equal():
    model = _model()
    solver = get_solver("unipc")
    x = torch.zeros(2, 3)
    first = ds.make_plan(model, x, solver, nfe=10)
    again = ds.make_plan(model, x, solver, nfe=10)
    assert again.rules is first.rules and again.points is first.points  # reused
    assert torch.equal(again.t, first.t)
    other = ds.make_plan(model, torch.zeros(5, 3), solver, nfe=10)  # another batch
    assert other.rules is first.rules and other.points is not first.points
    assert other.points[0][0].t_in.shape == (5,)
    fresh = ds.make_plan(model, x, get_solver("unipc"), nfe=12)
    assert fresh.rules is not first.rules and fresh.nfe == 12
    out1 = ds.sample(model, torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
                     "unipc", nfe=10)  # fmt: skip
    out2 = ds.sample(model, torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
                     "unipc", nfe=10)  # fmt: skip
    assert torch.equal(out1, out2)


def test_bad_input_is_refused_after_a_good_plan():
    model = _model()
    solver = get_solver("dpmpp_2m")
    x = torch.zeros(2, 3)
    ds.make_plan(model, x, solver, nfe=1)
    for bad in (True, 0, -1, 1.5):
        with pytest.raises(ValueError, match="nfe"):
            ds.make_plan(model, x, solver, nfe=bad)
    good = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    ds.make_plan(model, x, solver, times=good)
    with pytest.raises(ValueError):
        ds.make_plan(model, x, solver, times=torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))


def test_the_cache_holds_processes_weakly():
    proc = ds.VPLinear()  # a fresh process (the fixtures' are cached for the session)
    model = ds.Denoiser(lambda x, t: 0 * x, proc, "eps")
    ds.make_plan(model, torch.zeros(2, 3), get_solver("deis"), nfe=8)
    assert proc in plan_mod._GRIDS and model in plan_mod._POINTS
    ref = weakref.ref(proc)
    del proc, model
    gc.collect()
    assert ref() is None
