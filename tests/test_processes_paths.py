"""Sub-VP, general Gaussian paths, named flow paths, stochastic interpolants and re-timing.

- every new process: λ = log(α/σ) decreasing, closed-form inverse ≡ the base bisection,
  closed-form derivatives ≡ autograd ≡ central differences;
- sub-VP against Score SDE's own formulas (marginal_prob and the SDE's diffusion);
- GaussianPath from user functions: autograd derivatives equal the closed forms; bad paths raise;
- the named flow paths against the flow_matching library's schedulers (re-timed t → 1 − t) and
  against FlowMatching;
- stochastic interpolants: γ² = 2ε, and Albergo et al.'s one-sided identities
  (ε = α(αḃ/b − ȧ) is g²/2; b = (ḃ/b)x + ε·s is the PF-ODE velocity of the exact model);
- the exact mixture denoiser on every new process, all five prediction types;
- dpmpp_2m converges at order 2 to the exact PF-ODE solution on sub-VP, a GaussianPath and an
  interpolant;
- Retimed: a flow-matching velocity model used on VPCosine / SD / sub-VP / the cosine path gives
  the exact B-denoiser's predictions to 1e-10, and sampled with dpmpp_2m the same samples as the
  exact B-model to 1e-10 (so its error to B's exact reference is the solver's own).
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.bench import solve_pf_ode
from diffsolve.denoiser import PREDICTIONS
from diffsolve.processes.interpolant import StochasticInterpolant
from diffsolve.processes.path import FlowPath, GaussianPath
from diffsolve.processes.subvp import SubVP
from diffsolve.retime import Retimed

from .conftest import prior64, rel_err, sd_process


def _quadratic_vp() -> GaussianPath:
    # a VP path with log α = −t²·5/2 − t/20, given only as functions (autograd, bisection)
    return GaussianPath(
        lambda t: torch.exp(-2.5 * t**2 - 0.05 * t),
        lambda t: torch.sqrt(-torch.expm1(-5.0 * t**2 - 0.1 * t)),
        name="quadratic-vp",
    )


PROCESSES = {
    "subvp": SubVP,
    "subvp-short": lambda: SubVP(beta_min=0.5, beta_max=10.0, t_max=0.8),
    "path-custom": _quadratic_vp,
    "flow-linear": lambda: FlowPath("linear"),
    "flow-cosine": lambda: FlowPath("cosine"),
    "flow-poly3": lambda: FlowPath("polynomial", n=3.0),
    "flow-poly-half": lambda: FlowPath("polynomial", n=0.5),
    "flow-cond-ot": lambda: FlowPath("cond-ot", sigma_min=1e-2),
    "si-cosine": lambda: StochasticInterpolant("cosine", epsilon=0.5),
    "si-vp": lambda: StochasticInterpolant("vp", epsilon=lambda t: t * (1 - t)),
}


def _interior(p, n=41):
    lo, hi = p.t_min, p.t_max_finite
    return torch.linspace(lo + 1e-6 * (hi - lo), hi - 1e-6 * (hi - lo), n, dtype=torch.float64)


# -- generic identities ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", PROCESSES)
def test_lambda_inverse_and_derivatives(name):
    p = PROCESSES[name]()
    t = _interior(p)
    lam = p.lambda_(t)
    assert torch.allclose(lam, torch.log(p.alpha(t) / p.sigma(t)), rtol=1e-12, atol=1e-12)
    assert bool((lam[1:] < lam[:-1]).all())
    assert float((p.t_of_lambda(lam) - t).abs().max()) < 1e-12
    generic = ds.GaussianProcess.t_of_lambda(p, lam)
    assert float((generic - t).abs().max()) < 1e-12
    ti = t[1:-1:4]
    h = 1e-6
    for f, df in ((p.alpha, p.d_alpha), (p.sigma, p.d_sigma)):
        auto = ds.GaussianProcess._autograd(f, ti)
        assert torch.allclose(df(ti), auto, rtol=1e-12, atol=1e-13), (f.__name__, df(ti), auto)
        fd = (f(ti + h) - f(ti - h)) / (2 * h)
        assert torch.allclose(df(ti), fd, rtol=1e-6, atol=1e-8)


def test_subvp_matches_score_sde():
    """score_sde_pytorch sde_lib.subVPSDE: marginal_prob and sde (drift, diffusion)."""
    p = SubVP(0.1, 20.0)
    assert (p.t_min, p.t_max) == (1e-3, 1.0)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    log_mean = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    assert torch.allclose(p.alpha(t), torch.exp(log_mean), rtol=1e-14)
    assert torch.allclose(p.sigma(t), 1 - torch.exp(2 * log_mean), rtol=1e-12)
    beta = 0.1 + t * 19.9
    discount = 1 - torch.exp(-2 * 0.1 * t - 19.9 * t**2)
    # the base class derives g² = dσ²/dt − 2fσ² from the marginals; Score SDE states it
    assert torch.allclose(p.diffusion_sq(t), beta * discount, rtol=1e-12)
    assert torch.allclose(ds.GaussianProcess.drift_coef(p, t), -0.5 * beta, rtol=1e-12)
    # sub-VP: variance below the VP's 1 − α² (strictly, for t > 0)
    assert bool((p.sigma(t) ** 2 < 1 - p.alpha(t) ** 2).all())
    assert p.prior_std() == 1.0


# -- GaussianPath and the named flow paths -------------------------------------------------------
def test_gaussian_path_autograd_equals_closed_forms():
    k = math.pi / 2
    user = GaussianPath(lambda t: torch.cos(k * t), lambda t: torch.sin(k * t), name="cos")
    named = FlowPath("cosine")
    t = _interior(named, 23)
    for a, b in (
        (user.alpha, named.alpha),
        (user.sigma, named.sigma),
        (user.d_alpha, named.d_alpha),
        (user.d_sigma, named.d_sigma),
    ):
        assert torch.allclose(a(t), b(t), rtol=1e-12, atol=1e-15)
    lam = named.lambda_(t)
    assert torch.allclose(user.t_of_lambda(lam), named.t_of_lambda(lam), atol=1e-13)
    # cos(π/2) rounds to 6e-17: still treated as α = 0 at t_max, like FlowMatching
    assert math.isclose(user.t_max_finite, 1 - user.t_min, rel_tol=1e-12)
    assert math.isclose(named.t_max_finite, 1 - named.t_min, rel_tol=1e-12)
    assert float(named.alpha(1.0)) == 0.0


def test_gaussian_path_rejects_bad_paths():
    with pytest.raises(ValueError, match="strictly decreasing"):
        GaussianPath(lambda t: 1 - t, lambda t: 0.5 + 0.4 * torch.sin(8 * t))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        GaussianPath(lambda t: 1 - t, lambda t: t, t_min=0.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        GaussianPath(lambda t: 0.5 - t, lambda t: t)
    with pytest.raises(ValueError, match="autograd"):
        GaussianPath(
            lambda t: torch.from_numpy(np.cos(t.detach().numpy())),
            lambda t: torch.from_numpy(np.sin(t.detach().numpy())),
            t_max=1.5,
        )
    with pytest.raises(ValueError, match="t_min < t_max"):
        GaussianPath(lambda t: 1 - t, lambda t: t, t_min=0.5, t_max=0.5)
    with pytest.raises(ValueError, match="unknown flow path"):
        FlowPath("quadratic")
    with pytest.raises(ValueError, match="positive"):
        FlowPath("polynomial", n=0.0)


def test_flow_paths_match_flow_matching_library_and_flow_matching():
    """flow_matching.path.scheduler (data at s = 1): CondOT α=s, σ=1−s; Cosine α=sin(πs/2),
    σ=cos(πs/2); PolynomialConvex α=sⁿ, σ=1−sⁿ; here s = 1 − t."""
    t = torch.linspace(0.01, 0.99, 17, dtype=torch.float64)
    s = 1 - t
    cases = {
        FlowPath("linear"): (s, 1 - s),
        FlowPath("cosine"): (torch.sin(math.pi / 2 * s), torch.cos(math.pi / 2 * s)),
        FlowPath("polynomial", n=2.5): (s**2.5, 1 - s**2.5),
        # Lipman et al. 2023, eq. 20: μ = s·x_1, σ = 1 − (1 − σ_min)·s
        FlowPath("kinetic-optimal", sigma_min=0.05): (s, 1 - 0.95 * s),
    }
    for p, (a, sig) in cases.items():
        assert torch.allclose(p.alpha(t), a, rtol=1e-13), p
        assert torch.allclose(p.sigma(t), sig, rtol=1e-13), p
    fm, lin, poly1 = ds.FlowMatching(), FlowPath("linear"), FlowPath("polynomial", n=1.0)
    for p in (lin, poly1):
        assert torch.allclose(p.alpha(t), fm.alpha(t)) and torch.allclose(p.sigma(t), fm.sigma(t))
        assert torch.allclose(p.t_of_lambda(fm.lambda_(t)), t, atol=1e-14)
        assert math.isclose(p.t_max_finite, fm.t_max_finite, rel_tol=1e-12)
    cot = FlowPath("cond-ot", sigma_min=0.05)
    assert cot.t_min == 0.0 and cot.t_max_finite < 1.0 and repr(cot).startswith("FlowPath(")
    assert math.isclose(float(cot.lambda_(0.0)), -math.log(0.05), rel_tol=1e-14)
    # closures inside, yet picklable by constructor arguments (as the other processes are)
    si = StochasticInterpolant("polynomial", epsilon=0.2, n=3.0)
    back = pickle.loads(pickle.dumps(si))
    assert repr(back) == repr(si) and torch.equal(back.sigma(t), si.sigma(t))


# -- stochastic interpolants ----------------------------------------------------------------------
def test_interpolant_gamma_is_twice_epsilon():
    t = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    si = StochasticInterpolant("linear", epsilon=0.7)
    assert torch.equal(si.gamma_sq(t), torch.full_like(t, 1.4))
    si_fn = StochasticInterpolant("cosine", epsilon=lambda t: t**2)
    assert torch.allclose(si_fn.gamma_sq(t), 2 * t**2, rtol=0, atol=0)
    ode = StochasticInterpolant("cosine", epsilon=0.0)
    assert float(ode.gamma_sq(t).abs().max()) == 0.0
    default = StochasticInterpolant("vp")
    assert isinstance(default.path, ds.VPLinear)
    assert torch.equal(default.gamma_sq(t), default.path.diffusion_sq(t))
    pair = StochasticInterpolant((lambda t: 1 - t, lambda t: t), epsilon=1.0)
    assert isinstance(pair.path, GaussianPath)
    assert torch.allclose(pair.alpha(t), 1 - t) and torch.allclose(pair.d_sigma(t), t**0)
    wrapped = StochasticInterpolant(ds.FlowMatching(shift=3.0), epsilon=0.1)
    assert torch.equal(wrapped.shift_time(t), ds.FlowMatching(shift=3.0).shift_time(t))
    assert wrapped.t_max_finite == ds.FlowMatching().t_max_finite
    with pytest.raises(ValueError, match="≥ 0"):
        StochasticInterpolant("linear", epsilon=-1.0)
    with pytest.raises(ValueError, match="≥ 0"):
        StochasticInterpolant("linear", epsilon=lambda t: t - 0.5)
    with pytest.raises(ValueError, match="unknown path"):
        StochasticInterpolant("brownian")


@pytest.mark.parametrize("path", ["cosine", "vp", "polynomial"])
def test_interpolant_one_sided_identities(g64, path):
    """Albergo et al. (2023), one-sided interpolant x_τ = a(τ)z + b(τ)x_1, τ = 1 − t:
    ε* = a(a·ḃ/b − ȧ) is the diffusion g²/2, and the velocity b_τ(x) = (ḃ/b)·x + ε*·s(x)
    equals −dx/dt of the exact model's PF-ODE (dx/dt = α'·x̂_0 + σ'·ε̂, s = −ε̂/σ)."""
    si = StochasticInterpolant(path, epsilon=0.3)
    taus = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)

    def a(tau):
        return si.sigma(1 - tau)

    def b(tau):
        return si.alpha(1 - tau)

    # derivatives in τ by autograd of the composed maps (independent of d_alpha / d_sigma)
    da = ds.GaussianProcess._autograd(a, taus)
    db = ds.GaussianProcess._autograd(b, taus)
    eps_star = a(taus) * (a(taus) * db / b(taus) - da)
    assert torch.allclose(eps_star, si.diffusion_sq(1 - taus) / 2, rtol=1e-10)
    x = prior64(si, n=4, seed=5)
    for k, tau in enumerate(taus.tolist()):
        t = 1 - tau
        pred = g64.denoiser(si, "x0")(x, t)
        s = -pred.eps / float(si.sigma(t))
        b_tau = float(db[k] / b(taus)[k]) * x + float(eps_star[k]) * s
        dxdt = float(si.d_alpha(t)) * pred.x0 + float(si.d_sigma(t)) * pred.eps
        assert rel_err(b_tau, -dxdt) < 1e-10


# -- the exact mixture model on the new processes ------------------------------------------------
@pytest.mark.parametrize("name", PROCESSES)
def test_exact_gmm_denoiser_on_new_processes(g64, name):
    p = PROCESSES[name]()
    gen = torch.Generator().manual_seed(1)
    for t in _interior(p, 5)[1:-1].tolist():
        x = torch.randn(4, 64, generator=gen, dtype=torch.float64) * p.prior_std()
        a, s = float(p.alpha(t)), float(p.sigma(t))
        x0 = g64.x0_mean(x, a, s)
        for pred in PREDICTIONS:
            out = g64.denoiser(p, pred)(x, t)
            assert rel_err(out.x0, x0) < 1e-10, (name, pred, t)
            assert rel_err(out.eps, (x - a * x0) / s) < 1e-10, (name, pred, t)


# -- convergence of a high-order solver ------------------------------------------------------------
ORDER_CASES = {
    "subvp": SubVP,
    "path-custom": _quadratic_vp,
    "si-cosine": lambda: StochasticInterpolant("cosine", epsilon=0.5),
}


@pytest.mark.parametrize("name", ORDER_CASES)
def test_dpmpp_2m_order_two_on_new_processes(g64, name):
    p = ORDER_CASES[name]()
    x_T = prior64(p, n=8)
    m = g64.denoiser(p)
    # wide λ ranges (14 for sub-VP, 13 for the cosine path): 2M is asymptotic from ~80 steps
    steps = (80, 160, 320)
    errs = []
    ref = None
    for n in steps:
        x, info = ds.sample(
            m, x_T, "dpmpp_2m", steps=n, final="tmin", lower_order_final=False, return_info=True
        )
        if ref is None:  # the grid starts at t_max_finite (the logsnr default)
            ref = solve_pf_ode(g64, p, x_T, float(info.times[0]), p.t_min)
        errs.append(rel_err(x, ref))
    slope = -float(np.polyfit(np.log(steps), np.log(errs), 1)[0])
    assert abs(slope - 2.0) <= 0.3, (slope, errs)
    assert errs[-1] < 1e-3, errs


# -- re-timing ------------------------------------------------------------------------------------
TARGETS = {
    "vp-cosine": ds.VPCosine,
    "sd": sd_process,
    "subvp": SubVP,
    "flow-cosine": lambda: FlowPath("cosine"),
}


@pytest.mark.parametrize("target", TARGETS)
def test_retimed_predictions_equal_the_exact_target_denoiser(g64, target):
    fm = ds.FlowMatching()
    b = TARGETS[target]()
    retimed = Retimed(g64.denoiser(fm, "velocity"), b)
    exact_b = g64.denoiser(b)
    gen = torch.Generator().manual_seed(2)
    ts = b.t_min + (b.t_max_finite - b.t_min) * torch.rand(6, generator=gen, dtype=torch.float64)
    for t in ts.tolist():
        x = torch.randn(4, 64, generator=gen, dtype=torch.float64)
        got, want = retimed(x, t), exact_b(x, t)
        assert rel_err(got.x0, want.x0) < 1e-10, (target, t)
        assert rel_err(got.eps, want.eps) < 1e-10, (target, t)
        t_a = float(retimed.source_time(t))
        assert math.isclose(float(fm.lambda_(t_a)), float(b.lambda_(t)), rel_tol=1e-12)


@pytest.mark.parametrize("target", ["vp-cosine", "sd"])
def test_retimed_flow_model_samples_the_target_process(g64, target):
    """A cond-OT velocity model sampled on VPCosine / SD with dpmpp_2m gives the exact
    B-model's samples (to 1e-10; extras §11 test (a) asks for 1e-4), hence the same error to B's
    exact reference as the native run, with the same NFE."""
    b = TARGETS[target]()
    x_T = prior64(b, n=8)
    retimed = Retimed(g64.denoiser(ds.FlowMatching(), "velocity"), b)
    kw = {"steps": 40, "final": "tmin", "return_info": True}
    x_r, info = ds.sample(retimed, x_T, "dpmpp_2m", **kw)
    x_b, _ = ds.sample(g64.denoiser(b), x_T, "dpmpp_2m", **kw)
    assert info.nfe == 40
    assert rel_err(x_r, x_b) < 1e-10
    ref = solve_pf_ode(g64, b, x_T, float(info.times[0]), b.t_min)
    err = rel_err(x_r, ref)
    assert err < 2e-2 and math.isclose(err, rel_err(x_b, ref), rel_tol=1e-6), err


def test_retimed_outside_the_source_range_raises(g64):
    sd = sd_process()
    retimed = Retimed(g64.denoiser(sd), ds.FlowMatching())
    x_T = prior64(ds.FlowMatching(), n=2)
    with pytest.raises(ValueError, match="outside the λ range"):
        ds.sample(retimed, x_T, "dpmpp_2m", steps=5)
    # inside SD's λ range it works, and λ = −∞ of a flow target maps onto a flow source's t = 1
    to_flow = Retimed(g64.denoiser(FlowPath("cosine")), ds.FlowMatching())
    assert float(to_flow.source_time(1.0)) == 1.0
    x = torch.randn(2, 64, dtype=torch.float64)
    got, want = to_flow(x, 1.0), g64.denoiser(ds.FlowMatching())(x, 1.0)
    assert rel_err(got.eps, want.eps) < 1e-12
