"""NoiseSource: one stream or one seed per sample; the draws themselves are pinned."""

from __future__ import annotations

import pytest
import torch

from diffsolve.noise import NoiseSource, bind


def test_single_stream_is_the_generator_stream():
    x = torch.zeros(3, 4, dtype=torch.float64)
    src = NoiseSource(torch.Generator().manual_seed(7))
    z0, z1 = src.randn_like(x, 0), src.randn_like(x, 1)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(z0, torch.randn(3, 4, generator=g, dtype=torch.float64))
    assert torch.equal(z1, torch.randn(3, 4, generator=g, dtype=torch.float64))
    assert not torch.equal(z0, z1)


def test_global_rng_when_no_generator():
    x = torch.zeros(2, 5)
    torch.manual_seed(3)
    z = NoiseSource().randn_like(x, 0)
    torch.manual_seed(3)
    assert torch.equal(z, torch.randn_like(x))


def test_per_sample_seeds_do_not_depend_on_the_batch():
    x = torch.zeros(4, 2, 3, dtype=torch.float64)
    seeds = [10, 11, 12, 13]
    whole = NoiseSource.from_seeds(seeds)
    first, second = NoiseSource.from_seeds(seeds[:1]), NoiseSource.from_seeds(seeds[1:])
    for step in range(3):
        z = whole.randn_like(x, step)
        parts = torch.cat([first.randn_like(x[:1], step), second.randn_like(x[1:], step)])
        assert torch.equal(z, parts)
    # sample b's draws are those of its own generator
    g = torch.Generator().manual_seed(12)
    fresh = NoiseSource.from_seeds(seeds).randn_like(x, 0)
    assert torch.equal(fresh[2], torch.randn(2, 3, generator=g, dtype=torch.float64))


def test_dtype_and_shape():
    src = NoiseSource.from_seeds([1, 2])
    z16 = src.randn_like(torch.zeros(2, 3, dtype=torch.float16), 0)
    assert z16.dtype == torch.float16 and z16.shape == (2, 3)
    # half precision gets the float32 draws, rounded
    z32 = NoiseSource.from_seeds([1, 2]).randn_like(torch.zeros(2, 3), 0)
    assert torch.equal(z16, z32.to(torch.float16))
    # moments of many draws
    big = NoiseSource(torch.Generator().manual_seed(0)).randn_like(torch.zeros(200_000), 0)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01


def test_errors_and_bind():
    with pytest.raises(ValueError, match="per-sample seeds"):
        NoiseSource.from_seeds([1, 2]).randn_like(torch.zeros(3, 1), 0)
    with pytest.raises(ValueError, match="at least one seed"):
        NoiseSource.from_seeds([])
    src = NoiseSource()
    assert src.bind(object()) is src and bind(src, None) is src

    class Bare:  # any object with randn_like works as a source
        def randn_like(self, x, step):
            return torch.zeros_like(x)

    bare = Bare()
    assert bind(bare, None) is bare
