"""Consistency Trajectory Models and γ-sampling (issue 13 B; Kim et al. 2024; extras brief §10).

Exact models: on rectified flow (α = 1 − t, σ = t, so x_1 = ε and the prior is exact) the exact
flow map of N(μ, sd²) data is G(x, t, s) = α_s·μ + (x − α_t·μ)·v_s/v_t with
v_t = sqrt(α_t²·sd² + σ_t²) (the PF-ODE transports one Gaussian marginal onto the other by the
monotone affine map), and for a Gaussian mixture G is the PF-ODE solved by DOP853 at rtol
1e-10 (``diffsolve.bench.solve_exact``). Either is wrapped as a ``ds.CTM`` whose "network"
returns g = (G − a·x)/b (x0 prediction), so the whole path (JumpPoint, CTM, CTMGamma, the loop,
the noise source) is under test. With an exact G and an exact prior, γ-sampling is exact in
distribution for every γ and grid, and γ = 0 is the ODE solution itself.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffsolve as ds
from diffsolve import nets
from diffsolve.bench import gmm2d, solve_exact
from diffsolve.bench.digits import fd_digits
from diffsolve.ctm import JumpPoint
from diffsolve.noise import NoiseSource

FLOW = ds.FlowMatching()
MU, SD = 1.0, 0.5


def _coefs(t: float, s: float) -> tuple[float, float]:
    if s == t:
        return 1.0, 0.0
    a = float(FLOW.sigma(s)) / float(FLOW.sigma(t))
    return a, float(FLOW.alpha(s)) - float(FLOW.alpha(t)) * a


class _ExactG:
    """An exact flow map as a CTM "network": net(x, t, s) -> g (x0 prediction)."""

    def __init__(self, flow_map, denoise):
        self.flow_map, self.denoise, self.calls = flow_map, denoise, 0

    def __call__(self, x, t_in, s_in, **cond):
        self.calls += 1
        t, s = float(t_in[0]), float(s_in[0])
        if s == t:
            return self.denoise(x, t)
        a, b = _coefs(t, s)
        return (self.flow_map(x, t, s) - a * x) / b


def _v(t: float) -> float:
    return math.hypot(float(FLOW.alpha(t)) * SD, float(FLOW.sigma(t)))


def gaussian_ctm() -> ds.CTM:
    def flow_map(x, t, s):
        at, as_ = float(FLOW.alpha(t)), float(FLOW.alpha(s))
        return as_ * MU + (x - at * MU) * (_v(s) / _v(t))

    def denoise(x, t):
        at = float(FLOW.alpha(t))
        return MU + at * SD**2 / _v(t) ** 2 * (x - at * MU)

    return ds.CTM(_ExactG(flow_map, denoise), FLOW, "x0", time_map=lambda t: t)


def gmm_ctm(g, tol: float = 1e-10) -> ds.CTM:
    def flow_map(x, t, s):
        return solve_exact(g, FLOW, x, t, s, rtol=tol, atol=tol)

    def denoise(x, t):
        return g.x0_mean(x, float(FLOW.alpha(t)), float(FLOW.sigma(t)))

    return ds.CTM(_ExactG(flow_map, denoise), FLOW, "x0", time_map=lambda t: t)


def _x_T(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return ds.prior(
        FLOW, (n, d), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


# -- G(x, t, t) = x, and the parametrisation ------------------------------------------------------
def test_jump_to_the_same_time_is_the_identity_exactly():
    ctm = nets.model("digits-ctm")
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in (1.0, 0.731, 0.25, 0.01, 1e-3):
        assert torch.equal(ctm.jump(x, t, t), x)
    exact = gaussian_ctm()
    y = _x_T(5, 1)
    assert torch.equal(exact.jump(y, 0.4, 0.4), y)


def test_jump_is_the_ctm_parametrisation_of_g():
    """G = (s/t)·x + (1 − s/t)·g on the flow, g the network's x̂_0 at (x, t, s)."""
    ctm = nets.model("digits-ctm")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, s = 0.8, 0.3
    v = ctm.net(x, torch.full((4,), t), torch.full((4,), s))
    g = x - t * v
    assert torch.allclose(ctm.jump(x, t, s), (s / t) * x + (1 - s / t) * g, atol=1e-6)
    g0 = x - t * ctm.net(x, torch.full((4,), t), torch.zeros(4))
    assert torch.allclose(ctm.jump(x, t, 0.0), g0, atol=1e-6)  # s = 0: the consistency output


def test_exact_gaussian_flow_map_and_its_denoiser():
    exact = gaussian_ctm()
    x = _x_T(6, 1, seed=3)
    assert torch.allclose(exact.jump(x, 1.0, 0.0), MU + SD * x, atol=1e-14)
    # as a Denoiser (s = t) it is E[x_0 | x_t]: the closed form at t = 0.5
    t = 0.5
    at, st = 1 - t, t
    d = MU + at * SD**2 / (at**2 * SD**2 + st**2) * (x - at * MU)
    assert torch.allclose(exact(x, t).x0, d, atol=1e-14)


# -- γ-sampling on exact models -------------------------------------------------------------------
@pytest.mark.parametrize("nfe", [1, 2, 4, 8])
def test_gamma0_with_the_exact_gaussian_map_is_the_ode_solution(nfe):
    exact = gaussian_ctm()
    x_T = _x_T(64, 1)
    out, info = ds.sample(exact, x_T, ds.CTMGamma(gamma=0.0), nfe=nfe, return_info=True)
    assert info.nfe == nfe == exact.net.calls
    assert float(info.times[0]) == 1.0 and float(info.times[-1]) == 0.0
    assert torch.allclose(out, MU + SD * x_T, rtol=0, atol=1e-12)


def test_final_tmin_ends_the_last_jump_at_the_last_grid_time():
    """final="tmin" on the "uniform" schedule (1 … t_min) ends at t_min: γ = 0 (and one call
    at any γ) is the exact map from t = 1 to t_min, α·μ + x·v_{t_min}/v_1 (v_1 = 1)."""
    exact = gaussian_ctm()
    x_T = _x_T(32, 1, seed=6)
    for gamma, nfe in ((0.0, 1), (0.0, 2), (0.0, 4), (1.0, 1)):
        out, info = ds.sample(
            exact, x_T, ds.CTMGamma(gamma=gamma), nfe=nfe, schedule="uniform", final="tmin",
            noise=NoiseSource(0), return_info=True,
        )  # fmt: skip
        end = float(info.times[-1])
        assert info.nfe == nfe and end == pytest.approx(FLOW.t_min, rel=1e-12)
        assert torch.allclose(out, (1 - end) * MU + x_T * _v(end), rtol=0, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_gamma_sampling_moments_of_a_gaussian(gamma):
    """Brief §10: N(1, 0.5²) data, 4 steps: mean and variance within 1 % (200,000 samples:
    standard errors 0.1 % and 0.3 %)."""
    out = ds.sample(
        gaussian_ctm(), _x_T(200_000, 1, seed=5), ds.CTMGamma(gamma=gamma), nfe=4,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    assert abs(float(out.mean()) - MU) < 0.01 * MU
    assert abs(float(out.var()) - SD**2) < 0.01 * SD**2


def test_gamma0_with_the_exact_mixture_map_reproduces_the_exact_ode_solution():
    g = gmm2d()
    x_T = _x_T(16, 2, seed=2)
    ref = solve_exact(g, FLOW, x_T, 1.0, 0.0, rtol=1e-11, atol=1e-11)
    for nfe in (1, 2, 4):
        out = ds.sample(gmm_ctm(g), x_T, ds.CTMGamma(gamma=0.0), nfe=nfe)
        err = float((out - ref).norm() / ref.norm())
        assert err < 1e-8, (nfe, err)  # measured 2e-11 … 1.2e-10 (ODE solves at rtol 1e-10)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_gamma_sampling_of_the_exact_mixture_has_the_mode_weights(gamma):
    """Mode frequencies (nearest mean) of 4000 samples against those of 400,000 exact draws of
    the mixture (``g.sample``): the binomial standard error is ≤ 0.006, the bound 0.02 is
    over 3 of them (brief §10 asks for 1 %; 4000 samples cannot resolve that within the time
    budget). G at rtol 1e-6 is far more accurate than the assignment needs."""
    g = gmm2d()
    x_T = _x_T(4000, 2, seed=11)
    out = ds.sample(
        gmm_ctm(g, tol=1e-6), x_T, ds.CTMGamma(gamma=gamma), nfe=2,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip

    def freq(x):
        mode = torch.cdist(x, g.means).argmin(1)
        return torch.bincount(mode, minlength=g.means.shape[0]).double() / x.shape[0]

    ref = freq(g.sample(400_000, generator=torch.Generator().manual_seed(0)).reshape(-1, 2))
    assert float((freq(out) - ref).abs().max()) < 0.02


# -- NFE, determinism, noise objects ------------------------------------------------------------
class _CountingNoise(NoiseSource):
    def __init__(self, seed: int):
        super().__init__(seed)
        self.draws: list[int] = []

    def randn(self, x, step, stage=0):
        self.draws.append(step)
        return super().randn(x, step, stage)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_nfe_counts_and_the_noise_draws(gamma):
    """One network call per step; one draw after every jump but the last when γ > 0, none at
    γ = 0."""
    exact = gaussian_ctm()
    for nfe in (1, 2, 4, 8):
        noise = _CountingNoise(0)
        _, info = ds.sample(
            exact, _x_T(3, 1), ds.CTMGamma(gamma=gamma), nfe=nfe, noise=noise, return_info=True
        )
        assert info.nfe == nfe and info.steps == nfe
        assert noise.draws == ([] if gamma == 0 else list(range(nfe - 1)))
    assert exact.net.calls == 15


def test_determinism_and_batch_split():
    exact = gaussian_ctm()
    x_T = _x_T(6, 1, seed=4)
    solver = ds.CTMGamma(gamma=0.5)
    a = ds.sample(exact, x_T, solver, nfe=4, noise=NoiseSource(42))
    b = ds.sample(exact, x_T, solver, nfe=4, noise=NoiseSource(42))
    c = ds.sample(exact, x_T, solver, nfe=4, noise=NoiseSource(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    parts = [
        ds.sample(exact, x_T[lo:hi], solver, nfe=4, noise=NoiseSource(42, offset=lo))
        for lo, hi in ((0, 2), (2, 6))
    ]
    assert torch.equal(torch.cat(parts), a)
    # γ = 0 draws nothing: the seed does not matter
    d0 = ds.sample(exact, x_T, ds.CTMGamma(), nfe=4, noise=NoiseSource(1))
    d1 = ds.sample(exact, x_T, ds.CTMGamma(), nfe=4, noise=NoiseSource(2))
    assert torch.equal(d0, d1)
    # the shipped net with a generator: the same bits twice
    ctm = nets.model("digits-ctm")
    z = ds.prior(ctm.process, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    runs = [
        ds.sample(
            ctm, z, ds.CTMGamma(), nfe=4, gamma=1.0, generator=torch.Generator().manual_seed(9)
        )
        for _ in range(2)
    ]
    assert torch.equal(*runs)


# -- refusals --------------------------------------------------------------------------------------
def test_bad_input_is_refused_before_any_call():
    calls = []
    teacher = nets.model("digits-flow")
    inner = teacher.net
    teacher.net = lambda *a, **k: calls.append(1) or inner(*a, **k)
    z = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="needs a consistency trajectory model"):
        ds.sample(teacher, z, ds.CTMGamma(gamma=0.5), nfe=2)
    with pytest.raises(ValueError, match="needs a consistency trajectory model"):
        ds.sample(ds.CFG(teacher, 2.0, uncond={"label": torch.tensor(-1)}), z, ds.CTMGamma(), nfe=2)
    assert not calls
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="gamma must be a number in"):
            ds.CTMGamma(gamma=bad)
    ctm = nets.model("digits-ctm")
    with pytest.raises(ValueError, match="backward in time"):
        ctm.jump(z, 0.3, 0.5)
    with pytest.raises(ValueError, match="backward in time"):
        ctm.jump(z, 0.3, -0.1)
    with pytest.raises(ValueError, match="past the process"):
        ctm.jump(z, 1.5, 0.5)
    with pytest.raises(ValueError, match="unknown option"):
        ds.sample(ctm, z, ds.CTMGamma(), nfe=2, eta=1.0)


def test_jump_point_coefficients():
    pt = nets.model("digits-ctm").point_pair(0.8, 0.2, torch.zeros(1, 1, 8, 8))
    assert isinstance(pt, JumpPoint)
    a, b = pt.coefficients
    assert a == pytest.approx(0.25, abs=1e-15) and b == pytest.approx(0.75, abs=1e-15)


# -- the shipped network ---------------------------------------------------------------------
def test_shipped_ctm_runs_as_a_denoiser_with_any_solver():
    """g(x, t, t) is the CTM's denoiser: the loop's ODE solvers run on it."""
    ctm = nets.model("digits-ctm")
    z = ds.prior(ctm.process, (8, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for solver in ("auto", "dpmpp_2m", "heun"):
        x, info = ds.sample(ctm, z, solver, nfe=6, return_info=True)
        assert info.nfe == 6 and bool(torch.isfinite(x).all())


def test_shipped_ctm_fd_in_one_and_two_calls():
    """FD-digits of 256 class-balanced samples (seed 0), measured 20.2 (γ = 0, NFE 1) and 20.5
    (γ = 1, NFE 2); 256 real digits against all score about 21, and the teacher with
    ``solver="auto"`` scores 215 at NFE 1. Bound 30: a margin of ~50 %."""
    ctm, teacher = nets.model("digits-ctm"), nets.model("digits-flow")
    z = ds.prior(ctm.process, (256, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    cond = {"label": torch.arange(256) % 10}
    one = ds.sample(ctm, z, ds.CTMGamma(gamma=0.0), nfe=1, cond=cond)
    two = ds.sample(
        ctm, z, ds.CTMGamma(gamma=1.0), nfe=2, cond=cond, generator=torch.Generator().manual_seed(1)
    )
    assert fd_digits(one) < 30.0 and fd_digits(two) < 30.0
    assert fd_digits(ds.sample(teacher, z, "auto", nfe=1, cond=cond)) > 150.0


def test_guided_ctm_jumps_through_cfg():
    """CFG wraps a CTM (one doubled call per jump): label 7 at w = 3 gives 7s."""
    from diffsolve.bench.digits import class_accuracy

    guided = nets.model("digits-ctm", guidance=3.0)
    z = ds.prior(guided.process, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    x, info = ds.sample(
        guided, z, ds.CTMGamma(), nfe=2, cond={"label": torch.full((64,), 7)}, return_info=True
    )
    assert info.nfe == 2 and class_accuracy(x, 7) > 0.9


def test_the_docs_example_runs():
    """docs/ctm.md's Python block, executed as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "ctm.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(block, "docs/ctm.md", "exec"), scope)
    assert scope["x1"].shape == scope["x4"].shape == scope["x_ode"].shape == (16, 1, 8, 8)


def test_shipped_ctm_denoiser_is_the_teachers():
    """g(x, t, t) against digits-flow's x̂_0 on noised real digits: measured 2.7 %, 5.1 %,
    3.1 %, 1.7 % relative at t = 0.9, 0.5, 0.2, 0.05 (the teacher's own error to the clean
    digits there is 48 %, 33 %, 15 %, 4.4 %); bound 10 %."""
    from diffsolve.nets.data import digits

    ctm, teacher = nets.model("digits-ctm"), nets.model("digits-flow")
    x, y = digits()
    x0, lab = x[:512], {"label": y[:512]}
    g = torch.Generator().manual_seed(0)
    for t in (0.9, 0.5, 0.2, 0.05):
        xt = (1 - t) * x0 + t * torch.randn(x0.shape, generator=g)
        a, b = ctm(xt, t, **lab).x0, teacher(xt, t, **lab).x0
        assert float((a - b).norm() / b.norm()) < 0.1, t


def test_distillation_starts_at_the_teacher_and_is_seeded():
    from diffsolve.nets.ctm import CTMUNet, distil_ctm

    teacher, _, _ = nets.load("digits-flow")
    student = CTMUNet(teacher.config)
    student.load_state_dict(teacher.state_dict(), strict=False)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.4, 0.1])
    with torch.no_grad():  # the silent s branch: the student is the teacher for every s
        for s in (t, torch.zeros(3), 0.5 * t):
            assert torch.equal(
                student(x, t, s, torch.tensor([1, 2, -1])), teacher(x, t, [1, 2, -1])
            )
    runs = [distil_ctm(teacher, 2, 4, 1e-3, seed=5, log=lambda m: None)[0] for _ in range(2)]
    for (k, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.equal(a, b), k
