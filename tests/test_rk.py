"""Runge–Kutta tableaux and adaptive Dormand–Prince on the exact benchmark."""

from __future__ import annotations

import math

import pytest

import diffsolve as ds
from diffsolve.solvers.adaptive import RK45
from diffsolve.solvers.rk import RK, TABLEAUX

from .conftest import prior64, reference, rel_err, sd_process


def _order(g64, solver, ns=(16, 32, 64), schedule="logsnr"):
    """Log-log slope of the error at t_min (final='tmin') between the last two step counts."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    errs = []
    for n in ns:
        x, info = ds.sample(
            m, x_T, solver, steps=n, final="tmin", return_info=True, schedule=schedule
        )
        errs.append(rel_err(x, reference(g64, p, x_T, float(info.times[-1]))))
    return math.log(errs[-2] / errs[-1]) / math.log(ns[-1] / ns[-2]), errs


@pytest.mark.parametrize("tableau", [k for k in TABLEAUX if k != "euler"])
def test_rk_tableau_order_in_lambda(g64, tableau):
    # rk38's leading error nearly cancels on this problem: its slope reaches 4 only past ~100
    # steps (3.57, 3.69, 3.79, 3.85 from 64 to 256), so the pair is taken there for every tableau
    slope, errs = _order(g64, RK(tableau=tableau, variable="lambda"), ns=(96, 192))
    assert abs(slope - TABLEAUX[tableau].order) < 0.3, errs


@pytest.mark.parametrize("tableau", ["heun2", "ssprk3", "rk4"])
def test_rk_tableau_order_in_sigma(g64, tableau):
    slope, errs = _order(g64, RK(tableau=tableau, variable="sigma"), ns=(96, 192))
    assert abs(slope - TABLEAUX[tableau].order) < 0.3, errs


def test_rk_tableaux_are_consistent():
    for name, tab in TABLEAUX.items():
        assert math.isclose(sum(tab.b), 1.0), name
        for row, c in zip(tab.a, tab.c):
            assert math.isclose(sum(row), c, abs_tol=1e-15), name


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 6, 9, 10, 13, 25])
def test_rk4_meets_budgets_exactly(g64, nfe):
    p = sd_process()
    _, info = ds.sample(g64.denoiser(p), prior64(p, n=2), "rk4", nfe=nfe, return_info=True)
    assert info.nfe == nfe


def test_rk45_error_follows_tolerance_and_needs_no_call_for_the_jump(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    ref = reference(g64, p, x_T, p.t_min)
    prev = None
    for tol in (1e-4, 1e-6, 1e-8):
        x, info = ds.sample(m, x_T, "rk45", rtol=tol, atol=tol, final="tmin", return_info=True)
        x_clean, info_clean = ds.sample(m, x_T, "rk45", rtol=tol, atol=tol, return_info=True)
        err = rel_err(x, ref)
        assert err < 50 * tol
        assert info_clean.nfe == info.nfe  # FSAL gives x̂0 at t_min
        assert prev is None or info.nfe > prev
        prev = info.nfe
    # tight tolerance reproduces the independent DOP853 reference at the standard endpoint
    assert rel_err(x_clean, reference(g64, p, x_T, p.t_min, x0=True)) < 1e-6


def test_rk45_rejects_budgets():
    p = sd_process()
    with pytest.raises(ValueError, match="chooses its own steps"):
        ds.sample(ds.Denoiser(lambda x, t: x, p), prior64(p, n=1), "rk45", nfe=10)
    with pytest.raises(ValueError, match="unknown variable"):
        RK45(variable="time")


def test_rk_refuses_a_start_where_alpha_is_zero():
    """y = x/α has no value at a flow path's t = 1: a clear error, not a ZeroDivisionError."""
    p = ds.FlowMatching()
    m = ds.Denoiser(lambda x, t: 0 * x, p, prediction="velocity")
    x = p.prior((2, 3), generator=None)
    with pytest.raises(ValueError, match=r"undefined at t = 1\.0 where α = 0"):
        ds.sample(m, x, "rk", times=[1.0, 0.5, 0.1])
    assert ds.sample(m, x, "rk", steps=4).shape == x.shape  # the default grid starts below
