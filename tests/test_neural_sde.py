"""Stable neural SDE classes (Oh et al., ICLR 2024; extras §15): the numbers they must give.

(a) LNSDE with γ = −kz and constant σ is geometric Brownian motion: E z_t = z0·e^{−kt},
    E z_t² = z0²·e^{(σ² − 2k)t} (Monte Carlo within its standard error, at irregular output
    times), and Euler–Maruyama converges weakly at order 1 to those moments.
(b) GSDE stepped in log space never leaves z > 0 (10⁶ paths at a large step); Euler–Maruyama
    on z at the same step does.
(c) LSDE with γ(z) = −z and constant σ reaches the stationary variance σ²/2.
(d) Determinism per seed, batch-split invariance, backprop, input validation; the example's
    quick run; the docs' code blocks.

Monte Carlo runs draw N independent coordinates of one sample, z (1, N): with diagonal noise
and element-wise coefficients they are N independent paths, and the keyed draws are cheaper
per element along a row than down a batch.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from diffsolve.neural_sde import (
    DriftMLP,
    GeometricSDE,
    LangevinSDE,
    LinearNoiseSDE,
    LinearPath,
    TimeSigma,
    sdeint,
)
from diffsolve.noise import BrownianTree, NoiseSource

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _slope(hs: list[float], errs: list[float]) -> float:
    x = torch.tensor(hs, dtype=F64).log()
    y = torch.tensor(errs, dtype=F64).log()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


# -- (a) LNSDE = geometric Brownian motion ------------------------------------------------------
K, SIG, Z0 = 1.0, 0.3, 1.0


def _gbm() -> LinearNoiseSDE:
    return LinearNoiseSDE(1, drift=lambda t, z: -K * z, sigma=SIG)


def _em_moments(t: float, h: float) -> tuple[float, float]:
    """Euler–Maruyama's exact moments after t/h steps of GBM: E z ← (1 − kh)·E z and
    E z² ← ((1 − kh)² + σ²h)·E z²."""
    n = round(t / h)
    return Z0 * (1 - K * h) ** n, Z0**2 * ((1 - K * h) ** 2 + SIG**2 * h) ** n


def test_lnsde_gbm_moments_at_irregular_times():
    n, h = 200_000, 1 / 64
    ts = [0.0, 0.25, 0.375, 0.75, 1.0]  # irregular; every gap a multiple of h
    z0 = torch.full((1, n), Z0, dtype=F64)
    sde = LinearNoiseSDE(n, drift=lambda t, z: -K * z, sigma=SIG)
    path = sdeint(sde, z0, ts, dt=h, noise=NoiseSource(1))
    assert path.shape == (1, len(ts), n)
    assert torch.equal(path[:, 0], z0)
    for j, t in enumerate(ts[1:], start=1):
        z = path[0, j]
        for p, exact in ((1, Z0 * math.exp(-K * t)), (2, Z0**2 * math.exp((SIG**2 - 2 * K) * t))):
            est = float((z**p).mean())
            se = float((z**p).std()) / math.sqrt(n)
            em = _em_moments(t, h)[p - 1]
            # the estimate is EM's moment within 4 SE; EM's moment is the exact one within O(h)
            assert abs(est - em) < 4 * se, (t, p, est, em, se)
            assert abs(est - exact) < 4 * se + abs(em - exact), (t, p, est, exact)
            assert abs(em - exact) < h * exact  # relative bias ≤ 0.83·h·t here


def test_lnsde_gbm_weak_order_one():
    n, t_end = 200_000, 1.0
    hs = [1 / 2, 1 / 4, 1 / 8, 1 / 16]
    z0 = torch.full((1, n), Z0, dtype=F64)
    sde = LinearNoiseSDE(n, drift=lambda t, z: -K * z, sigma=SIG)
    err1, err2 = [], []
    for h in hs:
        z = sdeint(sde, z0, [0.0, t_end], dt=h, noise=NoiseSource(7))[0, -1]
        err1.append(abs(float(z.mean()) - Z0 * math.exp(-K * t_end)))
        err2.append(abs(float((z**2).mean()) - Z0**2 * math.exp((SIG**2 - 2 * K) * t_end)))
    s1, s2 = _slope(hs, err1), _slope(hs, err2)
    assert abs(s1 - 1) < 0.3 and abs(s2 - 1) < 0.3, (s1, s2, err1, err2)


# -- (b) GSDE: the log step keeps z > 0 ---------------------------------------------------------
def test_gsde_log_step_stays_positive_euler_does_not():
    n, mu, sig, h = 1_000_000, 0.5, 1.5, 0.5  # P(1 + μh + σ√h·ε ≤ 0) = Φ(−1.18) ≈ 0.12 per step
    sde = GeometricSDE(n, drift=lambda t, z: torch.full_like(z, mu), sigma=sig)
    z0 = torch.ones(1, n)
    ts = [0.0, 1.0, 2.0]
    log_path = sdeint(sde, z0, ts, dt=h, noise=NoiseSource(3))
    em_path = sdeint(sde, z0, ts, dt=h, noise=NoiseSource(3), method="euler")
    assert int((log_path <= 0).sum()) == 0
    assert bool(torch.isfinite(log_path).all())
    assert int((em_path[:, 1:] <= 0).sum()) > 0.05 * n


def test_gsde_log_step_is_exact_on_a_brownian_path():
    """Constant γ, σ: log z_T = log z0 + (γ − σ²/2)T + σ·W_T exactly, so on one Brownian-tree
    path the log step gives the same z_T for every dt; Euler–Maruyama on z converges to it
    at strong order ½."""
    n, mu, sig = 400, 0.2, 0.8
    sde = GeometricSDE(1, drift=lambda t, z: torch.full_like(z, mu), sigma=sig)
    z0 = torch.full((n, 1), 2.0, dtype=F64)
    tree = BrownianTree(5, interval=(0.0, 1.0))
    exact = sdeint(sde, z0, [0.0, 1.0], dt=1.0, noise=tree)[:, -1]
    fine = sdeint(sde, z0, [0.0, 0.5, 1.0], dt=1 / 64, noise=tree)[:, -1]
    assert float((fine - exact).abs().max()) < 1e-12 * float(exact.abs().max())
    hs = [1 / 4, 1 / 16, 1 / 64]
    errs = []
    for h in hs:
        em = sdeint(sde, z0, [0.0, 1.0], dt=h, noise=tree, method="euler")[:, -1]
        errs.append(float((em - exact).square().mean().sqrt()))
    assert abs(_slope(hs, errs) - 0.5) < 0.2, errs


# -- (c) LSDE: stationary variance σ²/2 ---------------------------------------------------------
def test_lsde_ou_reaches_stationary_variance():
    n, sig, h, t_end = 100_000, 0.7, 0.05, 8.0
    sde = LangevinSDE(n, drift=lambda z: -z, sigma=sig)
    z = sdeint(sde, torch.zeros(1, n, dtype=F64), [0.0, t_end], dt=h, noise=NoiseSource(11))
    z = z[0, -1]
    var = float(z.var())
    se = var * math.sqrt(2 / (n - 1))
    a, steps = 1 - h, round(t_end / h)
    em_var = sig**2 * h * (1 - a ** (2 * steps)) / (1 - a * a)  # EM's AR(1) variance
    target = sig**2 / 2
    assert abs(var - em_var) < 4 * se, (var, em_var, se)
    assert abs(var - target) < 4 * se + abs(em_var - target), (var, target)
    assert abs(float(z.mean())) < 4 * math.sqrt(var / n)


# -- (d) determinism, batch split, gradients, validation ---------------------------------------
def _default(cls, dim=3, control_dim=2):
    torch.manual_seed(0)
    return cls(dim, control_dim=control_dim, sigma_init=0.3).double()


def _control(b: int) -> LinearPath:
    g = torch.Generator().manual_seed(1)
    vals = torch.randn(b, 6, 2, generator=g, dtype=F64)
    vals[torch.rand(b, 6, 2, generator=g) < 0.4] = float("nan")
    vals[:, 0] = 0.5
    return LinearPath(torch.linspace(0, 2, 6), vals)


@pytest.mark.parametrize("cls", [LangevinSDE, LinearNoiseSDE, GeometricSDE])
def test_deterministic_per_seed_and_batch_split_invariant(cls):
    sde, b = _default(cls), 6
    z0 = torch.rand(b, 3, dtype=F64) + 0.5
    ctrl = _control(b)
    ts = [0.0, 0.3, 1.1, 2.0]
    run = sdeint(sde, z0, ts, dt=0.1, noise=NoiseSource(4), control=ctrl)
    assert run.shape == (b, len(ts), 3)
    assert torch.equal(run, sdeint(sde, z0, ts, dt=0.1, noise=NoiseSource(4), control=ctrl))
    other = sdeint(sde, z0, ts, dt=0.1, noise=NoiseSource(5), control=ctrl)
    assert not torch.allclose(run, other)
    src = NoiseSource(4)
    pieces = []
    for lo, hi in ((0, 2), (2, 6)):
        piece = LinearPath(ctrl.times, ctrl.values[lo:hi])
        noise = src.take(range(lo, hi))
        pieces.append(sdeint(sde, z0[lo:hi], ts, dt=0.1, noise=noise, control=piece))
    torch.testing.assert_close(torch.cat(pieces), run, rtol=1e-12, atol=1e-12)


def test_substeps_respect_dt_and_default_to_smallest_gap():
    """With zero noise the path is a deterministic Euler solution: the number of sub-steps
    shows in z_T = (1 − kh)^{steps}."""
    sde = LinearNoiseSDE(1, drift=lambda t, z: -z, sigma=0.0)
    z0 = torch.ones(1, 1, dtype=F64)
    ts = [0.0, 0.1, 0.5]  # default dt = 0.1: 1 + 4 sub-steps of 0.1
    assert float(sdeint(sde, z0, ts, noise=0)[0, -1]) == pytest.approx(0.9**5, rel=1e-14)
    # dt = 0.3: ceil(0.1/0.3) = 1 step of 0.1, ceil(0.4/0.3) = 2 steps of 0.2
    assert float(sdeint(sde, z0, ts, dt=0.3, noise=0)[0, -1]) == pytest.approx(0.9 * 0.8**2)


@pytest.mark.parametrize("cls", [LangevinSDE, LinearNoiseSDE, GeometricSDE])
def test_backprop_matches_finite_differences(cls):
    sde, b = _default(cls), 3
    ctrl = _control(b)
    z0 = (torch.rand(b, 3, dtype=F64) + 0.5).requires_grad_()

    def loss(z0):
        path = sdeint(sde, z0, [0.0, 0.7, 1.5], dt=0.25, noise=NoiseSource(2), control=ctrl)
        return (path**2).sum()

    assert torch.autograd.gradcheck(loss, (z0,))
    loss(z0).backward()
    grads = [p.grad for p in sde.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_default_networks_are_bounded():
    torch.manual_seed(0)
    net = DriftMLP(4, 3, hidden=8, depth=3, time=True, scale=2.0)
    with torch.no_grad():
        out = net(torch.randn(5, 1), 100 * torch.randn(5, 4))
    assert out.shape == (5, 3) and float(out.abs().max()) <= 2.0
    sig = TimeSigma(3, sigma_init=0.2, sigma_max=0.5)
    with torch.no_grad():
        s = sig(torch.linspace(-10, 10, 7)[:, None])
    torch.testing.assert_close(s, torch.full((7, 3), 0.2))


def test_linear_path_fills_gaps_and_holds_the_ends():
    nan = float("nan")
    vals = torch.tensor([[[nan], [1.0], [nan], [3.0], [nan]]], dtype=F64)
    path = LinearPath([0.0, 1.0, 2.0, 4.0, 5.0], vals)
    assert path.values.flatten().tolist() == pytest.approx([1.0, 1.0, 5 / 3, 3.0, 3.0], 1e-15)
    assert float(path(1.5)) == pytest.approx(1 + 0.5 * 2 / 3)
    assert float(path(-3)) == 1.0 and float(path(9)) == 3.0
    with pytest.raises(ValueError, match="at least one observation"):
        LinearPath([0.0, 1.0], torch.full((1, 2, 1), nan))
    with pytest.raises(ValueError, match="shape"):
        LinearPath([0.0, 1.0], torch.zeros(2, 3, 1))


def test_runs_under_torchsde():
    """The modules speak torchsde's protocol (f, g, noise_type, sde_type) without control."""
    torchsde = pytest.importorskip("torchsde")
    n = 4000
    sde = _gbm()
    z0 = torch.full((n, 1), Z0, dtype=F64)
    zs = torchsde.sdeint(sde, z0, torch.tensor([0.0, 1.0], dtype=F64), method="euler", dt=1 / 32)
    z = zs[-1, :, 0]
    se = float(z.std()) / math.sqrt(n)
    assert abs(float(z.mean()) - math.exp(-K)) < 4 * se + 0.02


def test_bad_inputs_raise():
    sde = _gbm()
    z0 = torch.ones(2, 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        sdeint(sde, z0, [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        sdeint(sde, z0, [1.0, 0.0])
    with pytest.raises(ValueError, match="1-D"):
        sdeint(sde, z0, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="empty"):
        sdeint(sde, z0, [])
    with pytest.raises(ValueError, match="finite"):
        sdeint(sde, z0, [0.0, math.inf])
    for dt in (0.0, -0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="dt"):
            sdeint(sde, z0, [0.0, 1.0], dt=dt)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        sdeint(sde, torch.ones(2), [0.0, 1.0])
    with pytest.raises(ValueError, match="channels"):
        sdeint(sde, torch.ones(2, 3), [0.0, 1.0])
    with pytest.raises(ValueError, match="floating"):
        sdeint(sde, torch.ones(2, 1, dtype=torch.int64), [0.0, 1.0])
    with pytest.raises(ValueError, match="method 'log'"):
        sdeint(sde, z0, [0.0, 1.0], method="log")
    with pytest.raises(ValueError, match="method 'milstein'"):
        sdeint(GeometricSDE(1, drift=lambda t, z: z, sigma=0.1), z0, [0.0, 1.0], method="milstein")
    with pytest.raises(ValueError, match="z0 > 0"):
        sdeint(GeometricSDE(1, drift=lambda t, z: z, sigma=0.1), -z0, [0.0, 1.0])
    with pytest.raises(TypeError, match="noise"):
        sdeint(sde, z0, [0.0, 1.0], noise="seed")
    with pytest.raises(ValueError, match="time 't'"):
        sdeint(sde, z0, [0.0, 1.0], noise=BrownianTree(0, time="sigma"))
    with pytest.raises(ValueError, match="control_dim 0"):
        sdeint(sde, z0, [0.0, 1.0], control=lambda t: torch.zeros(2, 1))
    ctl_sde = LangevinSDE(1, control_dim=2)
    with pytest.raises(ValueError, match="pass control="):
        sdeint(ctl_sde, z0, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"shape \(B, C\)"):
        sdeint(ctl_sde, z0, [0.0, 1.0], control=lambda t: torch.zeros(2, 3))
    with pytest.raises(ValueError, match="dim is required"):
        LangevinSDE(drift=lambda z: z)
    with pytest.raises(ValueError, match="sigma_init"):
        TimeSigma(2, sigma_init=2.0, sigma_max=1.0)


# -- the example and the docs -------------------------------------------------------------------
def _load_example():
    path = ROOT / "examples" / "stable_sde_timeseries.py"
    spec = importlib.util.spec_from_file_location("stable_sde_timeseries", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_quick_run_trains_every_class(capsys):
    out = _load_example().main(["--quick"])
    assert "LSDE" in capsys.readouterr().out
    assert set(out["models"]) == {"LSDE", "LNSDE", "GSDE"}
    for kind, r in out["models"].items():
        losses = r["losses"]
        assert all(math.isfinite(v) for v in losses), kind
        assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), (kind, losses[:5], losses[-5:])
        assert r["train_mse"] < r["initial_train_mse"], (kind, r)


def test_docs_python_blocks_run():
    doc = ROOT / "docs" / "neural-sde.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(doc), "exec"), {"__name__": "docs"})
