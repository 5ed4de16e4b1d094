"""Noise as a value: a draw is a function of (seed, step, stage, sample index), the protocol
every source offers, and sampling runs that are bit-identical whatever the batch split."""

from __future__ import annotations

import pytest
import torch

import diffsolve as ds
from diffsolve.noise import BrownianTree, Noise, NoiseSource

from .conftest import sd_process


def test_a_draw_is_a_function_of_its_keys():
    x = torch.zeros(3, 2, 5, dtype=torch.float64)
    src = NoiseSource(7)
    z = src.randn(x, 2, 1)
    assert z.shape == x.shape and z.dtype == x.dtype
    # no state: the same keys give the same draw, on this object or a fresh one
    assert torch.equal(z, src.randn(x, 2, 1)) and torch.equal(z, NoiseSource(7).randn(x, 2, 1))
    others = [src.randn(x, 2, 0), src.randn(x, 3, 1), NoiseSource(8).randn(x, 2, 1)]
    assert all(not torch.equal(z, o) for o in others)
    assert not torch.equal(z[0], z[1])  # samples differ
    # stage defaults to 0; without a path randn_between is the step's stage draw
    assert torch.equal(src.randn(x, 4), src.randn(x, 4, 0))
    assert torch.equal(src.randn_between(x, 2, 0.7, 0.4, stage=1), z)
    assert src.bind(object()) is src and not src.path


def test_offsets_indices_and_take_split_a_batch():
    x = torch.zeros(6, 3)
    whole = NoiseSource(11)
    z = whole.randn(x, 1, 2)
    for lo, hi in ((0, 1), (1, 4), (4, 6)):
        piece = x[lo:hi]
        assert torch.equal(NoiseSource(11, offset=lo).randn(piece, 1, 2), z[lo:hi])
        assert torch.equal(NoiseSource(11, indices=range(lo, hi)).randn(piece, 1, 2), z[lo:hi])
        assert torch.equal(whole.take(range(lo, hi)).randn(piece, 1, 2), z[lo:hi])
    pick = [5, 0, 3]
    assert torch.equal(whole.take(pick).randn(x[pick], 1, 2), z[pick])
    assert torch.equal(whole.take(pick).take([1]).randn(x[:1], 1, 2), z[[0]])
    # an offset source of any batch size continues the same global indices
    longer = NoiseSource(11, offset=2).randn(torch.zeros(9, 3), 1, 2)
    assert torch.equal(longer[:4], z[2:])


def test_per_sample_seeds_do_not_depend_on_the_batch():
    x = torch.zeros(4, 2, 3, dtype=torch.float64)
    seeds = [10, 11, 12, 13]
    whole = NoiseSource.from_seeds(seeds)
    first, rest = NoiseSource.from_seeds(seeds[:1]), NoiseSource.from_seeds(seeds[1:])
    for step in range(3):
        z = whole.randn(x, step)
        assert torch.equal(z, torch.cat([first.randn(x[:1], step), rest.randn(x[1:], step)]))
    # a sample's noise is its seed's, wherever it sits; take selects seeds
    twin = NoiseSource.from_seeds([12, 12]).randn(x[:2], 0)
    assert torch.equal(twin[0], twin[1]) and torch.equal(twin[0], whole.randn(x, 0)[2])
    assert torch.equal(whole.take([3, 2]).randn(x[:2], 0), whole.randn(x, 0)[[3, 2]])
    assert whole.take([3, 2]).seeds == (13, 12)


def test_a_generator_is_read_once():
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    src = NoiseSource(g)
    assert src.seed == int(torch.randint(0, 2**62, (1,), generator=ref))
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=ref))  # one draw
    x = torch.zeros(2, 4)
    assert torch.equal(src.randn(x, 0), NoiseSource(src.seed).randn(x, 0))
    torch.manual_seed(3)
    a = NoiseSource()
    torch.manual_seed(3)
    assert NoiseSource.from_generator(None).seed == a.seed
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    per = NoiseSource.from_generator(gens)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(s)))
             for s in (1, 2)]  # fmt: skip
    assert per.seeds == tuple(seeds)
    one = NoiseSource.from_generator([torch.Generator().manual_seed(2)])
    assert one.seeds == (seeds[1],)  # a list always means one seed per sample
    assert torch.equal(one.randn(x[:1], 3), per.randn(x, 3)[1:])


def test_dtype_shape_and_moments():
    src = NoiseSource.from_seeds([1, 2])
    z16 = src.randn(torch.zeros(2, 3, dtype=torch.float16), 0)
    assert z16.dtype == torch.float16 and z16.shape == (2, 3)
    # half precision gets the float32 draws, rounded; float32 and float64 agree to ~1e-6
    z32 = src.randn(torch.zeros(2, 3), 0)
    assert torch.equal(z16, z32.to(torch.float16))
    z64 = src.randn(torch.zeros(2, 3, dtype=torch.float64), 0)
    assert float((z64 - z32.double()).abs().max()) < 1e-5
    big = NoiseSource(0).randn(torch.zeros(4, 50_000, dtype=torch.float64), 3, 2)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01
    c = torch.corrcoef(big)  # the samples' streams are uncorrelated
    assert float((c - torch.eye(4, dtype=c.dtype)).abs().max()) < 0.02
    odd = NoiseSource(0).randn(torch.zeros(2, 1, 3, 3), 0)  # odd element count
    assert odd.shape == (2, 1, 3, 3) and bool(torch.isfinite(odd).all())


def test_errors():
    with pytest.raises(ValueError, match="per-sample seeds"):
        NoiseSource.from_seeds([1, 2]).randn(torch.zeros(3, 1), 0)
    with pytest.raises(ValueError, match="sample indices"):
        NoiseSource(0, indices=[1, 2]).randn(torch.zeros(3, 1), 0)
    with pytest.raises(ValueError, match="at least one seed"):
        NoiseSource.from_seeds([])
    with pytest.raises(ValueError, match="not both"):
        NoiseSource(0, offset=1, indices=[0])
    with pytest.raises(ValueError, match=">= 0"):
        NoiseSource(0).randn(torch.zeros(1, 1), -1)
    with pytest.raises(TypeError, match="integer"):
        NoiseSource(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Noise()  # type: ignore[abstract]


def test_the_protocol_for_custom_sources():
    """A subclass implements ``randn``; ``bind`` and ``randn_between`` come from the base."""

    class Ones(Noise):
        def randn(self, x, step, stage=0):
            return torch.full_like(x, float(step + 10 * stage))

    src = Ones()
    x = torch.zeros(2, 2)
    assert src.bind(None) is src and not src.path
    assert float(src.randn_between(x, 3, 0.5, 0.2, stage=1)[0, 0]) == 13.0
    assert BrownianTree.path and BrownianTree(0).bind(_grid()).path


def _grid():
    from diffsolve.solvers.base import Grid

    return Grid.build(sd_process(), torch.linspace(1.0, 0.01, 5, dtype=torch.float64), True)


def _elementwise_model():
    """The exact denoiser of data N(0.5, 0.1²) per coordinate: x̂_0 = m + α·v/(α²v + σ²)·(x − α·m),
    elementwise in x, so a batch split cannot change its rounding (unlike a matmul over the
    batch, whose BLAS kernels depend on the batch size)."""
    p = sd_process()

    def net(x, t):
        tt = float(t.reshape(-1)[0])
        a, s = float(p.alpha(tt)), float(p.sigma(tt))
        return 0.5 + a * 0.01 / (a * a * 0.01 + s * s) * (x - a * 0.5)

    return p, ds.Denoiser(net, p, "x0", time_map=lambda t: t)


STOCHASTIC = [
    *((n, {}) for n in ds.solvers() if ds.get_solver(n).stochastic and n != "pc"),
    ("pc", {"snr_norm": "sample"}),  # the default normalises over the batch, by design
    ("heun", {"s_churn": 10.0}),
    ("sa_solver", {"tau": 1.0}),
    ("mrs", {"solver_type": "sde"}),
]


@pytest.mark.parametrize(("name", "opts"), STOCHASTIC, ids=str)
def test_split_runs_are_bit_identical(name, opts):
    """Whole batch vs pieces: per-sample seeds, a seeded source with offsets (and ``take``), a
    Brownian tree with offsets: identical bits. The same solver object and noise source used
    for a second run give the same result (noise is a value)."""
    p, m = _elementwise_model()
    x_T = ds.prior(p, (6, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solver = ds.get_solver(name, **opts)
    kw = {"nfe": 6}
    seeds = [3, 1, 4, 1, 5, 9]
    pieces = ((0, 2), (2, 3), (3, 6))
    makers = [
        (NoiseSource.from_seeds(seeds), lambda lo, hi: NoiseSource.from_seeds(seeds[lo:hi])),
        (NoiseSource(42), lambda lo, hi: NoiseSource(42, offset=lo)),
        (NoiseSource(42), lambda lo, hi: NoiseSource(42).take(range(lo, hi))),
        (BrownianTree(42), lambda lo, hi: BrownianTree(42, offset=lo)),
    ]
    for whole_noise, piece_noise in makers:
        whole = ds.sample(m, x_T, solver, noise=whole_noise, **kw)
        parts = [ds.sample(m, x_T[lo:hi], solver, noise=piece_noise(lo, hi), **kw)
                 for lo, hi in pieces]  # fmt: skip
        assert torch.equal(torch.cat(parts), whole), whole_noise
        assert torch.equal(ds.sample(m, x_T, solver, noise=whole_noise, **kw), whole)
    # generator= reads the generator once: the same generator state, the same sample
    a = ds.sample(m, x_T, solver, generator=torch.Generator().manual_seed(1), **kw)
    b = ds.sample(m, x_T, solver, generator=torch.Generator().manual_seed(1), **kw)
    c = ds.sample(m, x_T, solver, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_uniform_draws_are_keyed_like_the_normals():
    """NoiseSource.rand: U[0, 1) moments, float32 on torch.rand's 2^-24 grid, the same rows
    whatever the batch split, and a stream apart from randn's."""
    src = ds.NoiseSource(3)
    u = src.rand(torch.empty(64, 4096, dtype=torch.float64), step=2, stage=1)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 4 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 4 * (1 / 180 / n) ** 0.5
    f = src.rand(torch.empty(4, 1000, dtype=torch.float32), step=0)
    assert f.dtype == torch.float32 and torch.equal(f * 2**24, (f * 2**24).round())
    part = ds.NoiseSource(3, offset=10).rand(torch.empty(6, 4096, dtype=torch.float64), 2, 1)
    assert torch.equal(part, u[10:16])
    z = src.randn(torch.empty(64, 4096, dtype=torch.float64), step=2, stage=1)
    assert abs(float(torch.corrcoef(torch.stack([u.reshape(-1), z.reshape(-1)]))[0, 1])) < 0.01
