"""BrownianTree: one Brownian path per seed, whatever grid queries it.

Checks the hash against splitmix64's published first output, that fine increments sum to the
coarse one (the path refines across step counts), the law of W (variance τ − a, covariance
min(s, t) − a, independent normalised increments), per-sample seeds and the σ/α variable.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.noise import BrownianTree, NoiseSource, _mix, _mix_int, _signed
from diffsolve.solvers.base import Grid

from .conftest import prior64, rel_err, sd_process


def _step(bound, x, i):
    """The normalised increment of grid step i (what a solver's step noise is)."""
    return bound.randn_between(x, i, bound.t[i], bound.t[i + 1])


def _grid(n: int, clean: bool = True, lo: float = 0.01) -> Grid:
    p = sd_process()
    return Grid.build(p, torch.linspace(1.0, lo, n, dtype=torch.float64), clean)


def test_hash_is_splitmix64():
    # splitmix64 seeded with 0 first returns 0xE220A8397B1DCDAF (Steele, Lea & Flood 2014;
    # the reference generator of xoshiro's seeding code), then 0x6E789E6AA1B965F4
    assert _mix_int(0) == 0xE220A8397B1DCDAF
    assert _mix_int(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    v = torch.tensor([0, _signed(0x9E3779B97F4A7C15), 12345, -1], dtype=torch.int64)
    got = [x & ((1 << 64) - 1) for x in _mix(v).tolist()]
    assert got == [_mix_int(0), _mix_int(0x9E3779B97F4A7C15), _mix_int(12345), _mix_int(-1)]


def test_fine_increments_sum_to_the_coarse_one():
    """The path is a function of τ: on a grid with 4× the steps (not nested in the coarse one
    except at its ends) the increments between two coarse points add up to the coarse
    increment; measured max error 4e-16 (float64)."""
    x = torch.zeros(5, 3, dtype=torch.float64)
    tree = BrownianTree.from_seeds([1, 2, 3, 4, 5])
    coarse, fine = tree.bind(_grid(6)), tree.bind(_grid(21))
    tc, tf = coarse.grid.t.tolist(), fine.grid.t.tolist()
    # coarse step 0 spans [t_1, t_0]; the fine grid has t_0 and t_1 among its points (1, 0.802)
    for i in range(coarse.grid.steps - 1):
        lo = tf.index(tc[i])
        hi = tf.index(tc[i + 1])
        total = sum(_step(fine, x, j) * math.sqrt(tf[j] - tf[j + 1]) for j in range(lo, hi))
        want = _step(coarse, x, i) * math.sqrt(tc[i] - tc[i + 1])
        assert float((total - want).abs().max()) < 1e-6
        # and through the sub-step API at arbitrary times
        mid = 0.5 * (tc[i] + tc[i + 1]) + 1e-3
        parts = coarse.increment(x, tc[i], mid) + coarse.increment(x, mid, tc[i + 1])
        assert float((parts - want).abs().max()) < 1e-12
    # the final step to the clean end (t = 0 marker) is the increment to τ = 0
    last = coarse.grid.steps - 1
    assert torch.allclose(
        _step(coarse, x, last) * math.sqrt(tc[last]), coarse.W(x, tc[last]), atol=1e-12
    )


def test_law_of_the_path():
    """W(τ) has variance τ − a and covariance min(s, t) − a; normalised increments of disjoint
    steps are uncorrelated N(0, 1). 60 000 samples: standard errors 0.006 (variance ratio)
    and 0.004 (correlation); tolerances are 5 of them."""
    n = 60_000
    x = torch.zeros(n, 1, dtype=torch.float64)
    b = BrownianTree(11).bind(_grid(9))
    s, t = 0.3, 0.71
    ws, wt = b.W(x, s), b.W(x, t)
    assert abs(float(ws.var()) / s - 1) < 0.03
    assert abs(float(wt.var()) / t - 1) < 0.03
    assert abs(float((ws * wt).mean()) / s - 1) < 0.03
    z = torch.cat([_step(b, x, i) for i in range(b.grid.steps)], dim=1)  # (n, steps)
    assert float(z.mean(0).abs().max()) < 5 / math.sqrt(n)
    assert float((z.var(0) - 1).abs().max()) < 0.03
    c = torch.corrcoef(z.T) - torch.eye(z.shape[1], dtype=z.dtype)
    assert float(c.abs().max()) < 5 / math.sqrt(n)
    # a step 1000× wider than a leaf still has the right variance
    small = b.randn_between(x, 0, 0.5 + 1e-3, 0.5)
    assert abs(float(small.var()) - 1) < 0.03
    # Gaussian tails (P(|z| > 3) = 0.0027)
    assert abs(float((z.abs() > 3).double().mean()) - 0.0027) < 0.001


def test_per_sample_seeds_and_batch_split():
    x = torch.zeros(4, 2, 3)
    seeds = [7, 8, 9, 10]
    g = _grid(5)
    whole = BrownianTree.from_seeds(seeds).bind(g)
    parts = [
        BrownianTree.from_seeds(seeds[:1]).bind(g),
        BrownianTree.from_seeds(seeds[1:]).bind(g),
    ]
    for i in range(g.steps):
        z = _step(whole, x, i)
        assert torch.equal(z, torch.cat([_step(parts[0], x[:1], i), _step(parts[1], x[1:], i)]))
    # same seed ⇒ same path for a sample, different seeds differ
    twin = _step(BrownianTree.from_seeds([9, 9]).bind(g), x[:2], 0)
    assert torch.equal(twin[0], twin[1]) and torch.equal(twin[0], _step(whole, x, 0)[2])
    assert not torch.equal(_step(whole, x, 0)[0], _step(whole, x, 0)[1])
    # the draws do not depend on the sample's dtype beyond rounding
    z64 = _step(whole, x.double(), 1)
    assert float((_step(whole, x, 1).double() - z64).abs().max()) < 1e-5
    # randn: independent of the path and of each other, keyed by the seeds (NoiseSource's)
    e = [whole.randn(x.double(), 1, k) for k in range(2)]
    assert not torch.equal(e[0], e[1]) and not torch.equal(e[0], z64)
    assert torch.equal(e[0][2:], parts[1].randn(x[1:].double(), 1, 0)[1:])
    assert torch.equal(e[1], NoiseSource.from_seeds(seeds).randn(x.double(), 1, 1))


def test_sampling_with_a_tree_is_batch_independent_and_reproducible(g64):
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=4)
    seeds = [1, 2, 3, 4]
    whole = ds.sample(m, x_T, "ddpm", steps=6, noise=BrownianTree.from_seeds(seeds))
    parts = [
        ds.sample(m, x_T[sl], "ddpm", steps=6, noise=BrownianTree.from_seeds(seeds[sl]))
        for sl in (slice(0, 1), slice(1, 4))
    ]
    assert rel_err(torch.cat(parts), whole) < 1e-12  # gmm64's batched matmul, not the noise
    again = ds.sample(m, x_T, "ddpm", steps=6, noise=BrownianTree.from_seeds(seeds))
    assert torch.equal(again, whole)
    stream = ds.sample(m, x_T, "ddpm", steps=6, noise=NoiseSource.from_seeds(seeds))
    assert rel_err(stream, whole) > 1e-3


def test_rho_variable_and_interval():
    """In σ/α (k-diffusion's σ) the tree spans [0, ρ(t_max)]; the clean end is ρ = 0."""
    x = torch.zeros(3, 2, dtype=torch.float64)
    g = _grid(5)
    b = BrownianTree(0, time="rho").bind(g)
    p = g.process
    assert b.a == 0.0 and b.b == pytest.approx(float(p.sigma(1.0) / p.alpha(1.0)), rel=1e-12)
    rho = (g.sigma / g.alpha).tolist()
    for i in range(g.steps):
        want = (b.W(x, float(g.t[i])) - b.W(x, float(g.t[i + 1]))) / math.sqrt(rho[i] - rho[i + 1])
        assert torch.allclose(_step(b, x, i), want, atol=1e-9)
    # a fixed interval makes the path independent of the process's range
    fixed = BrownianTree(0, time="t", interval=(0.0, 2.0))
    assert fixed.bind(g).b == 2.0
    with pytest.raises(ValueError, match="outside its interval"):
        BrownianTree(0).bind(g).W(x, 1.5)


def test_from_noise_and_errors():
    g = _grid(4)
    src = NoiseSource.from_seeds([3, 4])
    tree = BrownianTree.from_noise(src)
    assert tree.seeds == (3, 4)  # the source's keys
    assert BrownianTree.from_noise(tree) is tree
    single = BrownianTree.from_noise(NoiseSource(5, offset=2))
    assert single.seeds is None and (single.seed, single.offset) == (5, 2)
    x = torch.zeros(2, 3)
    assert torch.equal(single.randn(x, 1, 2), NoiseSource(5, offset=2).randn(x, 1, 2))
    with pytest.raises(TypeError, match="bind"):
        tree.randn_between(torch.zeros(2, 1), 0, 0.5, 0.2)
    with pytest.raises(ValueError, match="per-sample seeds"):
        _step(tree.bind(g), torch.zeros(3, 1), 0)
    with pytest.raises(ValueError, match="empty interval"):
        tree.bind(g).randn_between(torch.zeros(2, 1), 0, 0.5, 0.5)
    with pytest.raises(ValueError, match="unknown time"):
        BrownianTree(time="lambda")
    with pytest.raises(ValueError, match="tol"):
        BrownianTree(tol=0.0)
    assert BrownianTree(tol=1e-6).depth == 20


def test_batch_split_with_one_seed_needs_the_offset(g64):
    """What "one seed, any batch split" means for ``BrownianTree(seed)`` (issue 11): sample b is
    keyed by (seed, b + offset), so a piece ``x[lo:hi]`` reproduces the whole batch exactly with
    ``BrownianTree(seed, offset=lo)`` or ``tree.take(range(lo, hi))``; a bare
    ``BrownianTree(seed)`` on each piece keys them by their position in the piece and gives other
    samples (measured: relative change 0.3–1.1 on the 2 + 4 split's second piece)."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=6)
    tree = BrownianTree(7)

    def run(x, noise):
        return ds.sample(m, x, "sde_dpm_solver", steps=6, noise=noise)

    whole = run(x_T, tree)
    for second in (BrownianTree(7, offset=2), tree.take(range(2, 6))):
        parts = torch.cat([run(x_T[:2], BrownianTree(7)), run(x_T[2:], second)])
        assert rel_err(parts, whole) < 1e-12
    bare = run(x_T[2:], BrownianTree(7))
    assert rel_err(bare, whole[2:]) > 0.1
    for b in range(4):  # each sample of the bare piece differs from its own in the whole
        assert rel_err(bare[b : b + 1], whole[2 + b : 3 + b]) > 0.05


@pytest.mark.parametrize("snr_norm, split_exact", [("batch", False), ("sample", True)])
def test_pc_batch_norm_makes_samples_depend_on_the_batch(g64, snr_norm, split_exact):
    """``pc``'s default ``snr_norm="batch"`` (the official code's) averages the Langevin step's
    norms over the batch, so even with the offset a split batch gives other samples;
    ``snr_norm="sample"`` is split-exact."""
    p = sd_process()
    m = g64.denoiser(p)
    x_T = prior64(p, n=6)

    def run(x, noise):
        return ds.sample(m, x, "pc", steps=4, noise=noise, snr_norm=snr_norm)

    whole = run(x_T, NoiseSource(3))
    parts = torch.cat([run(x_T[:2], NoiseSource(3)), run(x_T[2:], NoiseSource(3, offset=2))])
    if split_exact:
        assert rel_err(parts, whole) < 1e-12
    else:
        assert rel_err(parts, whole) > 1e-4
