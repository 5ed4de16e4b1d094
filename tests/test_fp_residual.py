"""The Fokker–Planck residual (papers/extras.md §13): zero for the exact mixture density and its
exact score, clearly nonzero for a score scaled by 1.1 (whose ODE and SDE samples then differ),
and the Hutchinson estimates agree with the exact divergence within their standard error."""

from __future__ import annotations

import pytest
import torch

import diffsolve as ds
from diffsolve.bench.gmm import GaussianMixture
from diffsolve.bench.metrics import sliced_w2
from diffsolve.fp_residual import fp_residual, fp_residual_path

F64 = torch.float64
TIMES = (0.02, 0.1, 0.3, 0.6, 1.0)


def log_density(gmm: GaussianMixture, process, scale: float = 1.0):
    """u(x, t) = scale·log p_t(x): the exact marginal log-density (scale 1.1: a perturbed one)."""

    def u(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
        return scale * gmm.log_prob(x, a, s)

    return u


def scaled(model: ds.Denoiser, scale: float) -> ds.Denoiser:
    """The exact mixture's ε-network with its output multiplied by ``scale``."""
    net = model.net
    return ds.Denoiser(lambda x, t: scale * net(x, t), model.process, "eps", time_map=lambda t: t)


def marginal_points(gmm: GaussianMixture, process, t: float, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(n, gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=F64)
    return process.alpha(t) * x0 + process.sigma(t) * eps


def two_blobs() -> GaussianMixture:
    """Two diagonal 2-D Gaussians: cheap enough to sample 1e5 points four times in a test."""
    w = torch.tensor([0.4, 0.6], dtype=F64)
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.3]], dtype=F64)
    var = torch.tensor([[0.09, 0.04], [0.05, 0.12]], dtype=F64)
    return GaussianMixture(w, means, var, None, (2,), "two_blobs")


# -- (a) the exact mixture: zero residual ---------------------------------------------------------
@pytest.mark.parametrize("t", TIMES)
def test_exact_mixture_has_zero_residual(g2, t):
    proc = ds.VPLinear()
    x = marginal_points(g2, proc, t, 64, seed=1)
    r_log = fp_residual(proc, x, t, log_density=log_density(g2, proc))
    r2_score = fp_residual(g2.denoiser(proc), x, t)
    assert r_log.shape == r2_score.shape == (64,)
    assert float(r_log.abs().max()) <= 1e-6
    assert float(r2_score.max().sqrt()) <= 1e-6  # ‖r‖ ≤ 1e-6
    # the same density checked against another process's f_t, g_t² is far from a solution
    wrong = fp_residual(ds.VPCosine(), x, t, log_density=log_density(g2, proc))
    assert float(wrong.abs().mean()) > 1e-2


def test_per_sample_times_and_velocity_prediction(g2):
    """(B,) times in the log-density form; a velocity network on flow matching (its ε̂ uses
    dα/dt and dσ/dt, which must follow t through autograd) in the score form."""
    proc = ds.VPLinear()
    t = torch.tensor([0.05, 0.4, 0.9], dtype=F64)
    x = torch.cat([marginal_points(g2, proc, float(ti), 1, seed=i) for i, ti in enumerate(t)])
    assert float(fp_residual(proc, x, t, log_density=log_density(g2, proc)).abs().max()) < 1e-6
    flow = ds.FlowMatching()
    x = marginal_points(g2, flow, 0.5, 16, seed=3)
    assert float(fp_residual(g2.denoiser(flow, "velocity"), x, 0.5).max().sqrt()) < 1e-6


# -- (b) a perturbed score: nonzero residual, nonzero ODE–SDE gap -------------------------------
def test_perturbed_score_has_nonzero_residual(g2):
    proc = ds.VPLinear()
    den = g2.denoiser(proc)
    for t in TIMES:
        x = marginal_points(g2, proc, t, 64, seed=2)
        r_log = fp_residual(proc, x, t, log_density=log_density(g2, proc, 1.1))
        r2 = fp_residual(scaled(den, 1.1), x, t)
        assert float(r_log.pow(2).mean()) > 0.1
        assert float(r2.mean()) > 0.1
    x_T = ds.prior(proc, (128, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = fp_residual_path(den, x_T, "dpmpp_2m", 10)
    pert = fp_residual_path(scaled(den, 1.1), x_T, "dpmpp_2m", 10)
    assert exact.times.numel() == pert.times.numel() >= 9  # the clean end is skipped
    assert exact.mean < 1e-12 and exact.integral < 1e-12
    assert pert.mean > 1.0 and pert.integral > 0.1
    # dimensionless: the share of ‖∂_t s‖² the equation leaves unexplained
    assert exact.mean_relative < 1e-20 and bool((exact.scale > 0).all())
    assert 1e-3 < pert.mean_relative < 1.0
    # the log-density form along the same path: R² of the perturbed density
    pert_log = fp_residual_path(
        scaled(den, 1.1), x_T, "dpmpp_2m", 10, log_density=log_density(g2, proc, 1.1)
    )
    assert pert_log.mean > 0.1


def test_perturbed_score_splits_ode_and_sde_laws():
    """1e5 samples from one x_T: the exact model's ODE–SDE gap is at the Monte-Carlo floor
    (sliced W2 between two exact sample sets), the ×1.1 model's is an order of magnitude above
    it. Measured (32 directions): exact 0.0050, floor 0.0081, ×1.1 0.206."""
    gmm, proc, n = two_blobs(), ds.VPLinear(), 100_000
    den = gmm.denoiser(proc)
    x_T = ds.prior(proc, (n, 2), generator=torch.Generator().manual_seed(0), dtype=F64)

    def gap(model: ds.Denoiser) -> float:
        ode = ds.sample(model, x_T, "dpmpp_2m", nfe=100)
        gen = torch.Generator().manual_seed(1)
        sde = ds.sample(model, x_T, "euler_maruyama", nfe=100, generator=gen)
        return sliced_w2(ode, sde, projections=32)

    floor = sliced_w2(
        gmm.sample(n, torch.Generator().manual_seed(5)),
        gmm.sample(n, torch.Generator().manual_seed(6)),
        projections=32,
    )
    exact, pert = gap(den), gap(scaled(den, 1.1))
    assert exact < 2.5 * floor, (exact, floor)
    assert pert > 10 * floor and pert > 10 * exact, (pert, exact, floor)


# -- (c) Hutchinson against the exact divergence --------------------------------------------------
def test_hutchinson_agrees_with_exact_within_its_error(g64):
    proc = ds.VPLinear()
    t = 0.3
    x = marginal_points(g64, proc, t, 32, seed=4)
    gen = torch.Generator().manual_seed(0)
    u = log_density(g64, proc, 1.1)
    r_ex = fp_residual(proc, x, t, log_density=u, method="exact")
    r_hu, se = fp_residual(
        proc, x, t, log_density=u, method="hutchinson", probes=32, generator=gen, stderr=True
    )
    z = (r_hu - r_ex) / se
    assert float(z.abs().max()) < 4.5 and float(z.pow(2).mean()) < 2.5, z
    assert float(r_ex.abs().mean()) > 5 * float(se.mean())  # a residual well above the noise
    model = scaled(g64.denoiser(proc), 1.1)
    q_ex = fp_residual(model, x, t, method="exact")
    q_hu, se = fp_residual(model, x, t, method="hutchinson", probes=32, generator=gen, stderr=True)
    z = (q_hu - q_ex) / se
    assert float(z.abs().max()) < 4.5 and float(z.pow(2).mean()) < 2.5, z
    assert float(z.mean().abs()) < 1.0  # the U-statistic is unbiased: no drift upward
    # where the true ‖r‖² is 0 (the exact model) the probe noise alone must average out;
    # ‖mean of r̂_k‖² would be positive on every sample (biased by the probes' variance / P)
    q0, se0 = fp_residual(
        g64.denoiser(proc), x, t, method="hutchinson", probes=8, generator=gen, stderr=True
    )
    assert abs(float(q0.mean())) < 3 * float(se0.pow(2).sum().sqrt()) / len(q0), (q0, se0)
    assert float((q0 < 0).float().mean()) > 0.2


# -- the time derivative: autograd, its fallback, central differences ----------------------------
def test_central_difference_fallback(g2):
    """A network whose time input is cut from the graph falls back to central differences in t
    and agrees with autograd; so does ``time_derivative="central"`` and a CFG wrapper."""
    proc = ds.VPLinear()
    den = scaled(g2.denoiser(proc), 1.1)
    net = den.net
    cut = ds.Denoiser(lambda x, t: net(x, t.detach()), proc, "eps", time_map=lambda t: t)
    x = marginal_points(g2, proc, 0.3, 32, seed=5)
    ref = fp_residual(den, x, 0.3)
    for other in (
        fp_residual(cut, x, 0.3),
        fp_residual(den, x, 0.3, time_derivative="central"),
        fp_residual(ds.CFG(den, 1.0, uncond={}), x, 0.3),
    ):
        assert float(((other - ref) / ref).abs().max()) < 1e-6


def test_digits_network_autograd_matches_central_difference():
    from diffsolve import nets

    model = nets.model("digits-vp")
    x = ds.prior(model.process, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(probes=4, generator=torch.Generator().manual_seed(0))
    auto = fp_residual(model, x, 0.5, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    central = fp_residual(model, x, 0.5, time_derivative="central", **kw)
    assert auto.dtype == torch.float32 and auto.shape == (4,)
    assert float(((auto - central) / central).abs().max()) < 0.05


def test_validation(g2):
    proc = ds.VPLinear()
    x = marginal_points(g2, proc, 0.3, 4, seed=0)
    with pytest.raises(ValueError, match="method"):
        fp_residual(g2.denoiser(proc), x, 0.3, method="nope")
    with pytest.raises(ValueError, match="probes"):
        fp_residual(g2.denoiser(proc), x, 0.3, method="hutchinson", probes=1)
    with pytest.raises(ValueError, match="shape"):
        fp_residual(g2.denoiser(proc), x, torch.tensor([0.1, 0.2]))
