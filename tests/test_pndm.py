"""PNDM (Liu et al. 2022): PLMS, F-PNDM, S-PNDM, PRK on the DDIM transfer."""

from __future__ import annotations

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.denoiser import Prediction

from .conftest import prior64, reference, rel_err, sd_process

T_END = 0.05  # data side of the order tests: ρ(t) ~ sqrt(t) is far from smooth near t_min


@pytest.mark.parametrize("variant", ["plms", "fpndm", "spndm", "prk"])
def test_global_order_on_uniform_t(g64, variant):
    """Uniform t from t_max to 0.05, 64 → 128 steps. Measured slopes: plms 2.03, fpndm 2.04,
    spndm 1.92, prk 2.00. Second order, not fourth: the equal-step AB weights and the PRK
    t-midpoint are exact for equal steps in ρ = σ/α (where the transfer is exact for constant
    ε), and a uniform t-grid is not one; the local defect is O(Δ³) (see the step test below)."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    ref = reference(g64, p, x_T, T_END)
    errs = []
    for n in (64, 128):
        times = torch.linspace(p.t_max, T_END, n + 1, dtype=torch.float64)
        errs.append(
            rel_err(ds.sample(m, x_T, "pndm", times=times, variant=variant, final="tmin"), ref)
        )
    slope = math.log2(errs[0] / errs[1])
    assert abs(slope - 2) < 0.3, errs


def _local_times(p, t_c: float, d: float, equal: str) -> torch.Tensor:
    """Five times around t_c, equally spaced by d in t or (d·ρ'(t_c)) in ρ; step 3 → 4 is the
    tested step, the three before supply the history."""
    k = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    if equal == "t":
        return t_c + d * k
    rho_c = float(p.rho(t_c))
    drho = float(p.rho(t_c + d)) - rho_c
    return p.t_of_rho(rho_c + drho * k)


@pytest.mark.parametrize(
    ("variant", "equal", "local_order"),
    [("plms", "rho", 5), ("plms", "t", 3), ("spndm", "t", 3), ("prk", "t", 3), ("prk", "rho", 3)],
)
def test_step_order_with_exact_history(g64, variant, equal, local_order):
    """One step from the exact solution with the exact ε̂ history (AB4 for plms, AB2 for
    spndm, one PRK step for prk), local error vs Δ. Measured slopes: plms on equal ρ-steps 5.16
    (AB4 is fourth order there), on equal t-steps 3.00; spndm 3.00; prk 3.04 (equal t) and 3.10
    (equal ρ): its midpoint is in t, Simpson's weights need it in ρ."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=2)
    solver = ds.get_solver("pndm", variant=variant)
    errs, ds_ = [], []
    for d in (0.02, 0.01, 0.005):
        t = _local_times(p, 0.4, d, equal)
        grid = ds.Grid.build(p, t, clean_end=False)
        xs = [reference(g64, p, x_T, float(tj)) for tj in t]
        state = solver.init(xs[3], grid, m)
        if variant != "prk":
            # the run's evaluations newest first: step j's e1 below its later stages, which the
            # AB rows weigh 0 (NaN placeholders here, so a row reading them would show)
            calls = solver.calls(grid.steps, grid.clean_end)
            nan = torch.full_like(xs[0], float("nan"))
            hist = []
            for j in (2, 1, 0):
                hist += [Prediction(nan, nan)] * (calls[j] - 1) + [m(xs[j], state.points[j][0])]
            state = state.replace(history=tuple(hist))
        x_next, _ = solver.step(xs[3], 3, state, m)
        errs.append(rel_err(x_next, xs[4]))
        ds_.append(d)
    slope = math.log(errs[-2] / errs[-1]) / math.log(ds_[-2] / ds_[-1])
    assert abs(slope - local_order) < 0.3, errs


def _kind(rule) -> tuple[str, int]:
    """A step's kind from its rule: the step to σ = 0, PRK (4 calls), pseudo improved Euler (2)
    or AB with its number of nonzero history weights."""
    if rule.update is None:
        return ("final", 1)
    if rule.calls > 1:
        return ({4: "prk", 2: "heun"}[rule.calls], 1)
    return ("ab", sum(w != 0 for w in rule.update.eps))


def test_plan_kinds(sd):
    """Which steps are PRK / pseudo improved Euler / AB, as the paper and diffusers lay them."""
    grid = ds.Grid.build(sd, ds.Uniform()(sd, 8), clean_end=True)
    kinds = {}
    for v in ("plms", "fpndm", "spndm", "prk"):
        solver = ds.get_solver("pndm", variant=v)
        kinds[v] = [_kind(r) for r in solver.rules(grid, solver.calls(grid.steps, True))]
    assert kinds["plms"] == [("heun", 1), ("ab", 2), ("ab", 3), *[("ab", 4)] * 4, ("final", 1)]
    assert kinds["fpndm"] == [*[("prk", 1)] * 3, *[("ab", 4)] * 4, ("final", 1)]
    assert kinds["spndm"] == [("heun", 1), *[("ab", 2)] * 6, ("final", 1)]
    assert kinds["prk"] == [*[("prk", 1)] * 7, ("final", 1)]


@pytest.mark.parametrize("variant", ["plms", "fpndm", "spndm", "prk"])
@pytest.mark.parametrize("final", ["standard", "tmin"])
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 10, 12, 13, 14, 21])
def test_budgets_are_met_exactly(g64, variant, final, nfe):
    p = sd_process()
    x, info = ds.sample(
        g64.denoiser(p), prior64(p, n=2), "pndm", nfe=nfe, variant=variant, final=final,
        return_info=True,
    )  # fmt: skip
    assert info.nfe == nfe and torch.isfinite(x).all()


def test_nfe_of_matches_the_paper():
    for v, extra in (("plms", 1), ("spndm", 1), ("fpndm", 9)):
        assert ds.get_solver("pndm", variant=v).nfe_of(20, clean_end=False) == 20 + extra
    assert ds.get_solver("pndm", variant="prk").nfe_of(20, clean_end=False) == 80
    # with the clean end the step to σ = 0 is one call (x̂_0)
    assert ds.get_solver("pndm", variant="fpndm").nfe_of(20, clean_end=True) == 20 + 9


def test_last_step_returns_x0_at_its_start(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=2)
    seen = []
    out = ds.sample(m, x_T, "pndm", steps=6, callback=lambda i, x, s: seen.append(x))
    assert torch.equal(out, m(seen[-2], m.point(ds.Uniform()(p, 6)[-1], x_T)).x0)


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        ds.get_solver("pndm", variant="fon")


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("skip_prk", [True, False])
@pytest.mark.parametrize("steps", [10, 20, 25])
def test_agrees_with_diffusers(g64, skip_prk, steps):
    """diffusers' PNDMScheduler, leading spacing with steps_offset=1 (SD), on the exact model:
    skip_prk_steps=True is our "plms", False our "fpndm". Its last step goes to ᾱ[0] (index 0,
    set_alpha_to_one=False), i.e. our final="tmin" at t_min. Measured ≤ 1.6e-7. (diffusers puts
    the PRK midpoint at ⌊⌊N/n⌋/2⌋ timesteps, off the middle when N/n is odd, e.g. n = 8, where
    the two differ by 5e-4: the step counts here have even ⌊N/n⌋.)"""
    diffusers = pytest.importorskip("diffusers")
    from diffsolve.interop.diffusers import process_from_scheduler_config, run_diffusers

    cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    p = process_from_scheduler_config(cfg)
    m = g64.denoiser(p, "eps")
    x_T = prior64(p, n=8, seed=3)
    sch = diffusers.PNDMScheduler(**cfg, skip_prk_steps=skip_prk, steps_offset=1)
    run = run_diffusers(sch, m, x_T, steps)
    idx = sorted(set(sch._timesteps.tolist()), reverse=True)
    times = torch.cat([p.time_of_index(idx), torch.tensor([p.t_min], dtype=torch.float64)])
    variant = "plms" if skip_prk else "fpndm"
    ours, info = ds.sample(
        m, x_T, "pndm", times=times, variant=variant, final="tmin", return_info=True
    )
    assert info.nfe == run.nfe == steps + (1 if skip_prk else 9)
    assert rel_err(ours, run.x) <= 1e-5
