"""The analytic models and their exact references.

- the mixture's E[x_0 | x_t] equals the Gaussian posterior-mean formula (one component) and a
  direct Bayes computation with torch.distributions.MultivariateNormal (mixtures);
- all five prediction types round-trip through the Denoiser to the same x̂_0 on six processes;
- the PF-ODE reference matches the closed-form flow of a Gaussian data distribution, and the two
  independent integrators (scipy DOP853, our Dormand–Prince 5(4)) agree and are converged;
- the held-out mixtures (test data for rules and tuned solvers) are valid mixtures, not built
  in, and their exact denoisers agree with Bayes and across the five prediction types.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import diffsolve as ds
from diffsolve.bench import (
    GMMS,
    HELDOUT,
    GaussianMixture,
    check_reference,
    dopri5,
    get_gmm,
    get_heldout,
    heldout_mixtures,
    solve_exact,
    solve_pf_ode,
)
from diffsolve.denoiser import PREDICTIONS

from .conftest import rel_err, sd_process

PROCESSES = {
    "sd": sd_process,
    "vp-linear": ds.VPLinear,
    "vp-cosine": ds.VPCosine,
    "ve": ds.VE,
    "edm": ds.EDM,
    "flow": ds.FlowMatching,
}


def _covs(g: GaussianMixture) -> torch.Tensor:
    """Full covariance matrices Q·diag(Λ)·Qᵀ, (K, D, D)."""
    if g.eigvecs is None:
        return torch.diag_embed(g.eigvals)
    return g.eigvecs @ torch.diag_embed(g.eigvals) @ g.eigvecs.transpose(1, 2)


def _bayes_x0(g: GaussianMixture, x: torch.Tensor, a: float, s: float) -> torch.Tensor:
    """E[x_0 | x_t] by brute force: dense covariances, MultivariateNormal, linalg.solve."""
    covs = _covs(g)
    eye = torch.eye(g.dim, dtype=torch.float64)
    xf = x.reshape(x.shape[0], -1)
    logp, means = [], []
    for k in range(g.weights.numel()):
        c_t = a**2 * covs[k] + s**2 * eye
        mvn = MultivariateNormal(a * g.means[k], covariance_matrix=c_t)
        logp.append(torch.log(g.weights[k]) + mvn.log_prob(xf))
        # x_0 | x_t, k ~ N(m + a·S·C_t⁻¹·(x − a·m), ·)
        gain = torch.linalg.solve(c_t, (xf - a * g.means[k]).T).T @ (a * covs[k])
        means.append(g.means[k] + gain)
    r = torch.softmax(torch.stack(logp, 1), 1)
    return (r[..., None] * torch.stack(means, 1)).sum(1).reshape(x.shape)


def _random_gaussian(d: int, seed: int, diagonal: bool = False) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(1, d, generator=g, dtype=torch.float64)
    lam = torch.rand(1, d, generator=g, dtype=torch.float64) * 0.5 + 0.01
    q = None
    if not diagonal:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        q = q[None]
    return GaussianMixture(torch.ones(1, dtype=torch.float64), m, lam, q, (d,), "gauss")


def test_single_gaussian_posterior_mean_formula():
    g = _random_gaussian(5, 1)
    s_mat = _covs(g)[0]
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for a, s in ((1.0, 0.3), (0.6, 0.8), (0.05, 0.9987), (1.0, 1e-4)):
        expect = (
            g.means[0]
            + (
                a
                * s_mat
                @ torch.linalg.solve(
                    a**2 * s_mat + s**2 * torch.eye(5, dtype=torch.float64), (x - a * g.means).T
                )
            ).T
        )
        assert rel_err(g.x0_mean(x, a, s), expect) < 1e-12


@pytest.mark.parametrize("which", ["g2", "g64", "diag"])
def test_mixture_posterior_mean_is_exact_bayes(which, g2, g64):
    if which == "diag":
        g0 = _random_gaussian(6, 3, diagonal=True)
        means = torch.randn(3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        g = GaussianMixture(
            torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64),
            means,
            torch.cat([g0.eigvals, 0.5 * g0.eigvals, 2 * g0.eigvals]),
            None,
            (2, 3),
            "diag",
        )
    else:
        g = g2 if which == "g2" else g64
    x = 1.3 * torch.randn(9, *g.shape, generator=torch.Generator().manual_seed(5)).double()
    for a, s in ((0.99, 0.14), (0.7, 0.71), (0.2, 0.98), (1.0, 0.05)):
        got = g.x0_mean(x, a, s)
        assert rel_err(got, _bayes_x0(g, a * 0 + x, a, s)) < 1e-10
        # log-density: logsumexp of the weighted component densities
        covs = _covs(g)
        xf = x.reshape(x.shape[0], -1)
        lp = torch.stack(
            [
                torch.log(g.weights[k])
                + MultivariateNormal(
                    a * g.means[k], a**2 * covs[k] + s**2 * torch.eye(g.dim, dtype=torch.float64)
                ).log_prob(xf)
                for k in range(g.weights.numel())
            ],
            1,
        )
        assert torch.allclose(g.log_prob(x, a, s), torch.logsumexp(lp, 1), rtol=1e-10, atol=1e-9)


def test_the_diagonal_posterior_mean_is_the_broadcast_form_with_its_gradients():
    """gmm3072's x0_mean runs as matrix products; tuning differentiates it in x and in the time
    (α, σ as tensors): value and both gradients equal the per-component broadcast form."""
    g = GMMS["gmm3072"]()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, *g.shape, generator=gen, dtype=torch.float64)
    for a0 in (0.999, 0.7, 0.05):
        a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
        xs = (x * max(a0, 0.3)).requires_grad_(True)
        got = g.x0_mean(xs, a, (1 - a**2).sqrt())
        ga, gx = torch.autograd.grad(got.square().sum(), [a, xs])
        logp, y, var = g._components(xs, a, (1 - a**2).sqrt())
        r = torch.softmax(logp, 1)
        ref = (r[..., None] * (g.means[None] + a * g.eigvals / var * y)).sum(1).reshape(x.shape)
        ra, rx = torch.autograd.grad(ref.square().sum(), [a, xs])
        assert rel_err(got.detach(), ref.detach()) < 1e-11, a0
        assert abs(float(ga - ra)) <= 1e-9 * abs(float(ra)), a0
        assert rel_err(gx, rx) < 1e-9, a0


@pytest.mark.parametrize("proc_name", list(PROCESSES))
def test_every_prediction_round_trips_to_the_same_x0(proc_name, g64):
    proc = PROCESSES[proc_name]()
    gen = torch.Generator().manual_seed(6)
    lo, hi = proc.t_min, proc.t_max_finite
    for u in (0.05, 0.4, 0.9):
        t = lo + u * (hi - lo)
        a, s = float(proc.alpha(t)), float(proc.sigma(t))
        x0 = g64.sample(5, generator=gen)
        x = a * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        expect = g64.x0_mean(x, a, s)
        for pred in PREDICTIONS:
            got = g64.denoiser(proc, pred)(x, t)
            assert rel_err(got.x0, expect) < 1e-9, (pred, t)
            assert rel_err(got.eps, (x - a * expect) / s) < 1e-9, (pred, t)


def _gaussian_flow(
    g: GaussianMixture, proc, x_T: torch.Tensor, t0: float, t1: float
) -> torch.Tensor:
    """Closed-form PF-ODE of data N(m, Q·diag(λ)·Qᵀ): each eigen-coordinate of x − α·m scales
    with the marginal standard deviation, x_{t1} − α_1·m = Q·diag(sqrt((α_1²λ + σ_1²) /
    (α_0²λ + σ_0²)))·Qᵀ·(x_{t0} − α_0·m); t1 = 0 is the clean end (α = 1, σ = 0).

    Derivation: with x̃ = x/α and ρ = σ/α, x̃ − x̂_0 = ρ²(S + ρ²)⁻¹(x̃ − m), so the PF-ODE
    dx̃/dρ = (x̃ − x̂_0)/ρ reads dy_i/dρ = ρ·y_i/(λ_i + ρ²) for y = Qᵀ(x̃ − m): y_i ∝ sqrt(λ_i + ρ²).
    """
    a0, s0 = float(proc.alpha(t0)), float(proc.sigma(t0))
    a1, s1 = (1.0, 0.0) if t1 == 0 else (float(proc.alpha(t1)), float(proc.sigma(t1)))
    lam, q = g.eigvals[0], g.eigvecs[0]
    scale = torch.sqrt((a1**2 * lam + s1**2) / (a0**2 * lam + s0**2))
    y = (x_T - a0 * g.means) @ q
    return a1 * g.means + (y * scale) @ q.T


@pytest.mark.parametrize(
    ("proc_name", "t_to"),
    [("sd", 0.0), ("sd", "t_min"), ("edm", 0.0), ("vp-cosine", 0.3), ("flow", 0.0)],
)
def test_reference_matches_the_gaussian_closed_form(proc_name, t_to):
    proc = PROCESSES[proc_name]()
    t_to = proc.t_min if t_to == "t_min" else t_to
    g = _random_gaussian(8, 7)
    x_T = proc.prior((6, 8), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    expect = _gaussian_flow(g, proc, x_T, proc.t_max, t_to)
    # our Dormand–Prince is slow in Python (≈ 15k calls at 1e-12): once, on the headline case
    methods = ("dop853", "dopri5") if (proc_name, t_to) == ("sd", 0.0) else ("dop853",)
    for method in methods:
        got = solve_exact(g, proc, x_T, proc.t_max, t_to, method=method)
        assert rel_err(got, expect) < 1e-9, method
    if float(proc.alpha(proc.t_max)) > 0:  # the core entry point (flow's α = 0 start needs x-space)
        assert rel_err(solve_pf_ode(g, proc, x_T, proc.t_max, t_to), expect) < 1e-9


@pytest.mark.parametrize("which", ["g2", "g64"])
def test_the_two_integrators_agree_and_are_converged(which, g2, g64):
    g = g2 if which == "g2" else g64
    proc = sd_process()
    x_T = proc.prior((8, *g.shape), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    chk = check_reference(g, proc, x_T, 0.0)
    assert chk["agreement"] <= 1e-9
    assert chk["halving"] <= 1e-10
    assert chk["halving_dopri5"] <= 1e-10
    # and they are not trivially equal: different methods differ at round-off-plus-tolerance level
    assert chk["agreement"] > 0


def test_dopri5_meets_its_tolerance_with_fifth_order_work():
    """y' = −y·cos(u) ⇒ y = exp(−sin u). The global error stays within 10·tol at every tolerance
    (wrong weights would leave an O(h^p) error far above 1e-12), and the work grows like
    tol^{−1/5} (5th-order steps): ×10^{6/5} ≈ 16 from 1e-6 to 1e-12."""
    exact = math.exp(-math.sin(3.0))
    work = []
    for tol in (1e-6, 1e-9, 1e-12):
        y, nfev = dopri5(
            lambda u, y: -y * math.cos(u),
            0.0,
            3.0,
            torch.ones(1, dtype=torch.float64),
            rtol=tol,
            atol=tol,
        )
        assert abs(float(y[0]) - exact) < 10 * tol
        work.append(nfev)
    assert 6 < work[2] / work[0] < 40


# -- the held-out mixtures (test data for rules and tuned solvers) --------------------------------
@pytest.mark.parametrize("name", list(HELDOUT))
def test_heldout_mixtures_are_valid_and_not_built_in(name):
    g = get_heldout(name)
    assert g.name == name and name not in GMMS
    assert math.prod(g.shape) == g.dim
    k = g.weights.numel()
    assert bool((g.weights > 0).all()) and abs(float(g.weights.sum()) - 1) < 1e-12
    assert g.means.shape == (k, g.dim) and g.eigvals.shape == (k, g.dim)
    assert bool((g.eigvals > 0).all())
    if g.eigvecs is not None:
        eye = torch.eye(g.dim, dtype=torch.float64).expand(k, -1, -1)
        assert torch.allclose(g.eigvecs.transpose(1, 2) @ g.eigvecs, eye, atol=1e-12)
    covs = _covs(g)
    assert torch.allclose(covs, covs.transpose(1, 2), atol=1e-14)
    assert float(torch.linalg.eigvalsh(covs).min()) > 0  # positive definite
    # deterministic: the same numbers on every call
    h = get_heldout(name)
    assert torch.equal(g.means, h.means) and torch.equal(g.eigvals, h.eigvals)
    # exact samples have the mixture's first moment
    x = g.sample(20000, generator=torch.Generator().manual_seed(10)).reshape(20000, -1)
    mean = (g.weights[:, None] * g.means).sum(0)
    var = (g.weights[:, None] * (torch.diagonal(covs, dim1=1, dim2=2) + g.means**2)).sum(0)
    assert float(((x.mean(0) - mean).abs() / (var - mean**2).sqrt()).max()) < 0.05


def test_heldout_mixtures_list_and_unknown_name():
    assert [g.name for g in heldout_mixtures()] == list(HELDOUT)
    with pytest.raises(ValueError, match="held-out"):
        get_heldout("gmm64")


@pytest.mark.parametrize("name", list(HELDOUT))
def test_heldout_posterior_mean_is_exact_bayes(name):
    g = get_heldout(name)
    x = 1.3 * torch.randn(6, *g.shape, generator=torch.Generator().manual_seed(11)).double()
    for a, s in ((0.99, 0.14), (0.7, 0.71), (0.2, 0.98), (1.0, 0.03)):
        assert rel_err(g.x0_mean(x, a, s), _bayes_x0(g, x, a, s)) < 1e-9, (a, s)


@pytest.mark.parametrize("name", list(HELDOUT))
@pytest.mark.parametrize("proc_name", ["sd", "flow", "edm"])
def test_heldout_predictions_round_trip_to_the_same_x0(name, proc_name):
    g = get_heldout(name)
    proc = PROCESSES[proc_name]()
    gen = torch.Generator().manual_seed(12)
    lo, hi = proc.t_min, proc.t_max_finite
    for u in (0.05, 0.5, 0.9):
        t = lo + u * (hi - lo)
        a, s = float(proc.alpha(t)), float(proc.sigma(t))
        x0 = g.sample(4, generator=gen)
        x = a * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        expect = g.x0_mean(x, a, s)
        for pred in PREDICTIONS:
            got = g.denoiser(proc, pred)(x, t)
            assert got.x0.shape == x.shape
            assert rel_err(got.x0, expect) < 1e-9, (pred, t)
            assert rel_err(got.eps, (x - a * expect) / s) < 1e-9, (pred, t)


@pytest.mark.parametrize("name", ["gmm64", "gmm3072"])
@pytest.mark.parametrize("proc_name,pred", [("sd", "eps"), ("edm", "eps"), ("flow", "v")])
def test_network_differentiable_in_time_is_the_plain_formula(name, proc_name, pred):
    """With a time in the graph (a grid phase of ds.tune) the network's output is one
    combination of x and x̂_0 (diffsolve.lincomb); its value and its gradients in x and t are
    those of (x − α·x̂_0)/σ (and α·ε − σ·x̂_0) to rounding."""
    g, proc = get_gmm(name), PROCESSES[proc_name]()
    net = g.denoiser(proc, pred).net
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(5, *g.shape, dtype=torch.float64, generator=gen).requires_grad_()
    t = torch.tensor(0.4 * float(proc.t_max_finite), dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, *g.shape, dtype=torch.float64, generator=gen)
    out = net(x, t.expand(5))
    a, s = proc.alpha(t), proc.sigma(t)
    x0 = g.x0_mean(x, a, s)
    eps = (x - a * x0) / s
    ref = eps if pred == "eps" else a * eps - s * x0
    assert rel_err(out.detach(), ref.detach()) < 1e-14
    got = torch.autograd.grad((out * w).sum(), (x, t))
    want = torch.autograd.grad((ref * w).sum(), (x, t))
    assert rel_err(got[0], want[0]) < 1e-13
    assert abs(float(got[1] - want[1])) < 1e-12 * abs(float(want[1]))
