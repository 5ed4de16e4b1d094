"""SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector, data prediction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.noise import Noise, NoiseSource
from diffsolve.solvers.engine import combine
from diffsolve.solvers.sa_solver import _adams_weights

from .conftest import prior64, reference, rel_err, sd_process


@pytest.mark.parametrize(
    ("predictor", "corrector", "order"), [(1, 0, 1), (2, 0, 2), (3, 0, 3), (1, 2, 2), (2, 3, 3)]
)
def test_global_order(g64, predictor, corrector, order):
    """τ = 0, logsnr grid, final="tmin", lower_order_final off, 128 → 256 steps. Measured:
    (p, c) = (1, 0) 1.00, (2, 0) 2.00, (3, 0) 3.01, (1, 2) 1.99, (2, 3) 3.12. Higher orders
    are masked by the warm-up (the first step's local O(h³) caps the global order at 3; at
    256 → 512, (3, 4) gives 3.64 and (3, 0) 2.65), so they are proven on the step below."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    errs = []
    for n in (128, 256):
        x, info = ds.sample(
            m, x_T, "sa_solver", steps=n, predictor_order=predictor, corrector_order=corrector,
            lower_order_final=False, final="tmin", schedule="logsnr", return_info=True,
        )  # fmt: skip
        errs.append(rel_err(x, reference(g64, p, x_T, float(info.times[-1]))))
    slope = math.log2(errs[0] / errs[1])
    assert abs(slope - order) < 0.3, errs


@pytest.mark.parametrize(
    ("predictor", "corrector", "local"),
    [(4, 0, 5), (3, 0, 4), (2, 2, 3), (2, 3, 4), (3, 3, 4), (3, 4, 5)],
)
def test_step_order_with_exact_history(g64, predictor, corrector, local):
    """One predictor step (and the corrector over it, with x̂_0 at the predicted point) from the
    exact solution with the exact x̂_0 history, in the middle of a karras grid: local error
    O(h^{p+1}) without corrector, O(h^{c+1}) with it (c ≤ p + 1). Measured on 512 → 1024
    steps (the high orders reach their asymptote late; at 128 → 256 (4, 0) still reads 5.7):
    (p, c) = (4, 0) 5.19, (3, 0) 4.11, (2, 2) 3.02, (2, 3) 4.00, (3, 3) 3.97, (3, 4) 5.06."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=2)
    solver = ds.get_solver(
        "sa_solver", predictor_order=predictor, corrector_order=corrector, lower_order_final=False
    )
    errs, hs = [], []
    for n in (512, 1024):
        t = ds.Karras()(p, n + 1)
        i = n // 2
        grid = ds.Grid.build(p, t, clean_end=False)
        xs = {j: reference(g64, p, x_T, float(t[j])) for j in range(i - predictor + 1, i + 2)}
        # the solver's rows, unfolded: step i's predictor and the corrector over step i
        predict, correct = solver.rows(grid)
        hist = tuple(m(xs[j], m.point(t[j], xs[j])) for j in range(i, i - predictor, -1))
        x_next = combine(predict[i], xs[i], hist, None)
        if corrector:
            m_new = m(x_next, m.point(t[i + 1], x_next))
            x_next = combine(correct[i + 1], xs[i], (m_new, *hist), None)
        errs.append(rel_err(x_next, xs[i + 1]))
        hs.append(float(grid.h[i]))
    slope = math.log(errs[-2] / errs[-1]) / math.log(hs[-2] / hs[-1])
    assert abs(slope - local) < 0.3, (errs, hs)


def test_adams_weights_integrate_polynomials_exactly():
    """w_j of c·∫ e^{c(λ−λ_t)}·ℓ_j(λ) dλ against a direct quadrature of each monomial."""
    nodes, lam_s, lam_t, c = [0.3, 0.1, -0.4, -0.6], 0.3, 0.9, 1.5
    w = np.array(_adams_weights(nodes, lam_s, lam_t, c))
    x, wq = np.polynomial.legendre.leggauss(40)
    lam = lam_s + (x + 1) / 2 * (lam_t - lam_s)
    wq = wq * (lam_t - lam_s) / 2
    for k in range(4):
        exact = c * float(wq @ (np.exp(c * (lam - lam_t)) * lam**k))
        assert math.isclose(float(w @ np.array(nodes) ** k), exact, rel_tol=1e-12)


def test_first_order_without_corrector_is_ddim(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=3)
    a = ds.sample(m, x_T, "sa_solver", nfe=8, predictor_order=1, corrector_order=0)
    b = ds.sample(m, x_T, "ddim", nfe=8, schedule="logsnr")
    assert rel_err(a, b) < 1e-13


@pytest.mark.parametrize("nfe", [1, 2, 5, 10])
def test_budget_and_clean_end(g64, nfe):
    p = sd_process()
    m = g64.denoiser(p)
    seen = []
    x, info = ds.sample(
        m, prior64(p, n=2), "sa_solver", nfe=nfe, predictor_order=3, corrector_order=4,
        return_info=True, callback=lambda i, x, s: seen.append(s),
    )  # fmt: skip
    assert info.nfe == nfe and torch.isfinite(x).all()
    assert torch.equal(x, seen[-1].history[0].x0)  # the step to σ = 0 returns x̂_0 at its start


def test_stochastic_mode_draws_from_the_noise_source(g64):
    """τ > 0 samples the SDE: same per-sample seeds, same sample; τ = 0 draws nothing."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=3)
    seeds = [1, 2, 3]
    kw = {"nfe": 10, "tau": 1.0}
    a = ds.sample(m, x_T, "sa_solver", noise=NoiseSource.from_seeds(seeds), **kw)
    b = ds.sample(m, x_T, "sa_solver", noise=NoiseSource.from_seeds(seeds), **kw)
    c = ds.sample(m, x_T, "sa_solver", noise=NoiseSource.from_seeds([4, 5, 6]), **kw)
    assert torch.equal(a, b) and rel_err(a, c) > 1e-2
    assert ds.get_solver("sa_solver", tau=1.0).stochastic
    assert not ds.get_solver("sa_solver").stochastic
    # outside [tau_tmin, tau_tmax] nothing is drawn: the window covering no step is the ODE
    off = ds.sample(m, x_T, "sa_solver", nfe=10, tau=1.0, tau_tmax=0.0, noise=_NoDraws())
    assert torch.equal(off, ds.sample(m, x_T, "sa_solver", nfe=10))


def test_folded_corrector_reuses_the_predictors_noise(g64):
    """The engine folds each SA-Corrector into the next update (x_s and z cancel): equal to the
    corrector applied unfolded, from the predictor's x_s with the predictor's own draw z."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=3)
    times = ds.LogSNR()(p, 9)
    solver = ds.get_solver("sa_solver", predictor_order=3, corrector_order=3, tau=1.0)
    predict, correct = solver.rows(ds.Grid.build(p, times, clean_end=False))
    noise = NoiseSource(11)
    x, hist, x_s, z_s = x_T, (), None, None
    for i in range(len(times) - 1):
        hist = (m(x, m.point(times[i], x)), *hist)
        if correct[i] is not None:
            x = combine(correct[i], x_s, hist, z_s)  # the same z as the predictor of step i − 1
        x_s, z_s = x, noise.randn(x, i)
        x = combine(predict[i], x, hist, z_s)
    assert all(r.noise > 0 for r in predict) and sum(c is not None for c in correct) == 7
    ours = ds.sample(m, x_T, solver, times=times, final="tmin", noise=noise)
    assert rel_err(ours, x) < 1e-12


class _NoDraws(Noise):
    def randn(self, x, step, stage=0):
        raise AssertionError("drew noise")


@pytest.mark.parametrize(
    "options", [{"predictor_order": 5}, {"corrector_order": -1}, {"tau": -1.0}, {"tau": math.nan}]
)
def test_invalid_options(options):
    with pytest.raises(ValueError, match="sa_solver"):
        ds.get_solver("sa_solver", **options)


class _Draws(Noise):
    """The noise diffusers' SASolverScheduler.step draws: one randn per step, in order."""

    def __init__(self, shape, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.z = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]

    def randn(self, x, step, stage=0):
        return self.z[step]


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("predictor", "corrector"), [(1, 1), (2, 2), (3, 3), (3, 4), (4, 4), (2, 1), (1, 3)]
)
@pytest.mark.parametrize("n", [5, 10, 20])
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_agrees_with_diffusers(g64, predictor, corrector, n, tau):
    """diffusers' SASolverScheduler (data prediction, linspace spacing, last σ at index 0: our
    final="tmin" at t_min) on the exact model. τ = 0 via ``tau_func=lambda t: 0``; τ = 1 with
    diffusers' default window (timesteps 200…800) and the same noise draws. Measured ≤ 2.5e-6
    (the largest at 4 corrector nodes and 20 steps: diffusers' float32 Lagrange coefficients)."""
    diffusers = pytest.importorskip("diffusers")
    from diffsolve.interop.diffusers import process_from_scheduler_config, run_diffusers

    cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    p = process_from_scheduler_config(cfg)
    m = g64.denoiser(p, "eps")
    x_T = prior64(p, n=8, seed=3)
    sch = diffusers.SASolverScheduler(
        **cfg, predictor_order=predictor, corrector_order=corrector,
        tau_func=lambda t: tau if 200 <= t <= 800 else 0,
    )  # fmt: skip
    run = run_diffusers(sch, m, x_T, n, generator=torch.Generator().manual_seed(7))
    idx = sch.timesteps.numpy()
    times = torch.cat([p.time_of_index(idx), torch.tensor([p.t_min], dtype=torch.float64)])
    ours = ds.sample(
        m, x_T, "sa_solver", times=times, predictor_order=predictor, corrector_order=corrector,
        tau=tau, tau_tmin=float(p.time_of_index([200])[0]),
        tau_tmax=float(p.time_of_index([800])[0]), final="tmin",
        noise=_Draws(x_T.shape, n, 7),
    )  # fmt: skip
    assert rel_err(ours, run.x) <= 1e-5
