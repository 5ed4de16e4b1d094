"""Masked discrete diffusion against exact answers (issue 13 A; extras brief §7).

The exact model is a product-categorical mixture whose clean-token posterior is closed-form
(diffsolve.bench.categorical); tolerances come from the sampling noise of N draws.
"""

import math

import pytest
import torch

import diffsolve as ds
from diffsolve.bench.categorical import pair_tv, pair_tv_noise, product_mixture
from diffsolve.discrete import Cosine, MaskedDiffusion, categorical, sample_masked

N = 4000


@pytest.fixture(scope="module")
def mix():
    torch.set_num_threads(1)
    return product_mixture()  # K=3, L=6, V=4


def _model(m, sharpen: float = 1.0, schedule="linear"):
    net = m.net()
    return MaskedDiffusion(lambda x, t: net(x, t) * sharpen, m.vocab_size, schedule=schedule)


def _tv(m, x):
    return float(pair_tv(m, x).mean()), float(pair_tv_noise(m, x.shape[0]).mean())


def test_fhs_samples_the_mixture_exactly(mix):
    g = torch.Generator().manual_seed(1)
    model = _model(mix)
    x, info = sample_masked(model, N, mix.length, "fhs", generator=g, return_info=True)
    assert info.nfe == mix.length and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < mix.vocab_size
    tv, noise = _tv(mix, x)
    # FHS over seeds 0…7 measures 0.95–1.24 × the analytic noise level; wrong samplers 5–8 ×
    assert tv < 1.5 * noise, (tv, noise)
    r = mix.responsibilities(x)
    se = r.std(0) / math.sqrt(N)
    assert bool(((r.mean(0) - mix.weights).abs() < 4.5 * se).all())


def test_wrong_samplers_fail_the_same_check(mix):
    g = torch.Generator().manual_seed(2)
    # the batched FHS with two tokens per call replaces pair joints by products of marginals
    x = sample_masked(_model(mix), N, mix.length, "fhs", steps=3, generator=g)
    tv, noise = _tv(mix, x)
    assert tv > 2.0 * noise  # 2.7 × measured; the pass bound is 1.5 ×
    # a posterior at temperature 1/1.5 (an over-confident network) is caught too
    x = sample_masked(_model(mix, sharpen=1.5), N, mix.length, "fhs", generator=g)
    tv, noise = _tv(mix, x)
    assert tv > 3.0 * noise


@pytest.mark.parametrize("sampler", ["ancestral", "tau_leap"])
def test_grid_samplers_converge(mix, sampler):
    g = torch.Generator().manual_seed(3)
    coarse = sample_masked(_model(mix), N, mix.length, sampler, steps=2, generator=g)
    fine = sample_masked(_model(mix), N, mix.length, sampler, steps=64, generator=g)
    tv2, noise = _tv(mix, coarse)
    tv64, _ = _tv(mix, fine)
    assert tv2 > 3.0 * noise
    assert tv64 < 1.5 * noise


class _Recorder:
    def __init__(self, m):
        self.net, self.t, self.masked = m.net(), [], []

    def __call__(self, x, t):
        self.t.append(t.to(torch.float64).clone())
        self.masked.append((x == 4).to(torch.float64).mean())
        return self.net(x, t)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_fhs_first_hitting_time_law(mix, schedule):
    # from all L masked at t = 1, the first unmasking time τ has P(τ ≤ s) = κ(s)^L
    rec = _Recorder(mix)
    model = MaskedDiffusion(rec, mix.vocab_size, schedule=schedule)
    sample_masked(model, N, mix.length, "fhs", generator=torch.Generator().manual_seed(4))
    tau = rec.t[0].sort().values
    kappa = model.schedule.kappa(tau)
    cdf = kappa**mix.length
    emp = torch.arange(1, N + 1, dtype=torch.float64) / N
    ks = float(torch.maximum((emp - cdf).abs(), (emp - 1.0 / N - cdf).abs()).max())
    assert ks < 1.95 / math.sqrt(N)  # Kolmogorov–Smirnov, 99.9 %
    # the event times decrease along the run
    assert bool((torch.stack(rec.t).diff(dim=0) <= 0).all())


@pytest.mark.parametrize(
    ("sampler", "expected"), [("ancestral", 0.75), ("tau_leap", math.exp(-0.25))]
)
def test_first_step_unmask_fraction(mix, sampler, expected):
    # one step 1 → 0.75 on κ(t) = t: a token stays masked w.p. κ(s)/κ(t) = 0.75 (ancestral),
    # exp(−h·κ'/κ) = e^{−1/4} (τ-leaping)
    rec = _Recorder(mix)
    model = MaskedDiffusion(rec, mix.vocab_size)
    sample_masked(
        model, N, mix.length, sampler, steps=4, generator=torch.Generator().manual_seed(5)
    )
    frac = float(rec.masked[1])
    se = math.sqrt(expected * (1 - expected) / (N * mix.length))
    assert abs(frac - expected) < 4.5 * se


def test_categorical_float64_law():
    p = torch.tensor([0.5, 0.3, 0.15, 0.049, 0.001], dtype=torch.float64)
    n = 200_000
    draws = categorical(p.expand(n, -1), torch.Generator().manual_seed(6))
    freq = torch.bincount(draws, minlength=5).to(torch.float64) / n
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() < 4.5 * se).all())


def test_float32_race_cuts_rare_tokens():
    # the float32 race: E = −log u ≥ −log(1 − 2^-24) ≈ 5.96e-8, E ≤ −log(2^-24) ≈ 16.6, so a
    # token of mass p against a mask of mass 1 − δ can never win when p/5.96e-8 < (1 − δ)/16.6,
    # even with the most favourable uniforms; float64 reaches it.
    delta, p_tok = 1e-3, 3e-9
    probs = torch.tensor([1 - delta, p_tok], dtype=torch.float64)
    u32 = torch.tensor([2.0**-24, 1 - 2.0**-24], dtype=torch.float32)
    u64 = torch.tensor([2.0**-24, 1 - 2.0**-53], dtype=torch.float64)
    assert int(categorical(probs, dtype=torch.float32, u=u32)) == 0
    assert int(categorical(probs, dtype=torch.float64, u=u64)) == 1
    # just above the threshold float32 reaches it as well
    probs[1] = 4e-9
    assert int(categorical(probs, dtype=torch.float32, u=u32)) == 1


def test_determinism_and_infilling(mix):
    model = _model(mix)
    a = sample_masked(model, 8, 6, "ancestral", steps=5, generator=torch.Generator().manual_seed(7))
    b = sample_masked(model, 8, 6, "ancestral", steps=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    start = torch.full((8, 6), 4)
    start[:, 0] = torch.arange(8) % 4
    out = sample_masked(model, sampler="fhs", tokens=start, generator=torch.Generator())
    assert torch.equal(out[:, 0], start[:, 0]) and bool((out < 4).all())
    assert ds.MaskedDiffusion is MaskedDiffusion and ds.sample_masked is sample_masked


@pytest.mark.parametrize(("sampler", "steps"), [("fhs", None), ("fhs", 3), ("tau_leap", 4)])
def test_same_samples_whatever_the_batch_split(mix, sampler, steps):
    """Draws are keyed by (seed, sample, call, draw): the halves of a batch sampled apart equal
    the whole batch, and a list of generators gives each sample its own seed."""
    model = _model(mix)
    whole = sample_masked(model, 8, 6, sampler, steps=steps, noise=ds.NoiseSource(5))
    lo = sample_masked(model, 3, 6, sampler, steps=steps, noise=ds.NoiseSource(5))
    hi = sample_masked(model, 5, 6, sampler, steps=steps, noise=ds.NoiseSource(5, offset=3))
    assert torch.equal(whole, torch.cat([lo, hi]))
    gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    both = sample_masked(model, 3, 6, sampler, steps=steps, generator=gens)
    one = sample_masked(model, 1, 6, sampler, steps=steps,
                        generator=[torch.Generator().manual_seed(12)])  # fmt: skip
    assert torch.equal(both[1:2], one)
    with pytest.raises(ValueError, match="not both"):
        sample_masked(model, 2, 6, sampler, steps=steps, noise=ds.NoiseSource(1),
                      generator=torch.Generator())  # fmt: skip


def test_bad_input(mix):
    net = mix.net()
    with pytest.raises(ValueError, match="inside the vocabulary"):
        MaskedDiffusion(net, vocab_size=4, mask_id=2)
    with pytest.raises(ValueError, match="unknown masking schedule"):
        MaskedDiffusion(net, vocab_size=4, schedule="cosin")
    model = MaskedDiffusion(net, vocab_size=4, schedule=Cosine())
    bad = torch.full((2, 6), 4)
    bad[1, 3] = 9
    with pytest.raises(ValueError, match="sample 1, position 3"):
        sample_masked(model, tokens=bad)
    with pytest.raises(ValueError, match="unknown masked sampler"):
        sample_masked(model, 2, 6, "fsh")
    with pytest.raises(ValueError, match="at most L = 6"):
        sample_masked(model, 2, 6, "fhs", steps=7)
    with pytest.raises(ValueError, match="need steps"):
        sample_masked(model, 2, 6, "ancestral")
    with pytest.raises(ValueError, match="dtype"):
        sample_masked(model, 2, 6, dtype=torch.float16)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        sample_masked(model, 0, 6)
    wrong = MaskedDiffusion(lambda x, t: net(x, t)[..., :3], vocab_size=4)
    with pytest.raises(ValueError, match=r"shape \(2, 6, 3\) at step 0, expected \(2, 6, 4\)"):
        sample_masked(wrong, 2, 6, "fhs")

    calls = []

    def nan_at_third_call(x, t):
        out = net(x, t)
        calls.append(1)
        if len(calls) == 3:
            out = out.clone()
            out[1, :] = float("nan")
        return out

    with pytest.raises(ValueError, match=r"NaN .* at step 2, sample 1, position"):
        sample_masked(MaskedDiffusion(nan_at_third_call, 4), 2, 6, "ancestral", steps=4)
    calls.clear()
    with pytest.raises(ValueError, match=r"NaN .* at step 2, sample 1, position"):
        sample_masked(MaskedDiffusion(nan_at_third_call, 4), 2, 6, "fhs")

    def nan_at_position_4(x, t):
        out = net(x, t).clone()
        out[0, 4] = float("nan")
        return out

    with pytest.raises(ValueError, match="sample 0, position 4"):
        sample_masked(MaskedDiffusion(nan_at_position_4, 4), 2, 6, "fhs")


def test_docs_example_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "masked.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/masked.md", "exec"), {})
