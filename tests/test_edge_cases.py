"""Edge cases every registered fixed-step solver must survive (exact gmm64 model, SD process).

Parametrized over ``ds.solvers()`` at collection time, so a newly registered solver is tested
without touching this file. Adaptive solvers are skipped (they choose their own steps);
stochastic ones run only in the tests that say so (the seed/batch-split test).

Measured on the reference machine (CPU, float64 unless stated):
- nfe = 1, 2, 3 budgets are met exactly and the output is finite, for both end conditions;
- 1000 steps stay finite; ``final="tmin"`` ends at the last grid time (t_min, σ > 0) and its
  error to the exact ODE solution *there* shrinks from 24 to 48 NFE (x and x̂_0 at t_min differ
  by 7.6e-3 relative, so converging to the wrong one would stall);
- float16 / bfloat16 networks with float32 solver arithmetic, relative difference to the
  float32 run at 10 NFE (x_T float32, 4 samples): ≤ 1.6e-3 / 1.4e-2 for every solver except
  ``pndm`` (3.1e-3 / 2.4e-2). One network call's ε̂ carries a relative rounding error of
  2.9e-4 (fp16) / 2.3e-3 (bf16), ~0.6 of the unit roundoff, and the trajectory amplifies it at
  most ~11× (pndm); the bounds (1e-2, 6e-2) leave a factor ~3 above the worst solver;
- batch independence (1 vs many, 256 split in two), thread safety of a shared solver object,
  and ``state.select`` mid-run agree to ≤ 1e-12 in float64.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import diffsolve as ds
from diffsolve.noise import NoiseSource

from .conftest import prior64, reference, rel_err

ALL = sorted(ds.solvers())
FIXED = [n for n in ALL if not ds.get_solver(n).adaptive]
DETERMINISTIC = [n for n in FIXED if not ds.get_solver(n).stochastic]
BATCH_EXACT = 1e-12
# a budget every deterministic solver can meet with ≥ 3 steps (1, 2, 3 and 4 calls per step)
NFE = 12


@pytest.fixture(scope="module")
def model(sd, g64):
    return g64.denoiser(sd, "eps")


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


@pytest.mark.parametrize("final", ["standard", "tmin"])
@pytest.mark.parametrize("nfe", [1, 2, 3])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_tiny_budgets_are_met_exactly(model, sd, name, nfe, final):
    x_T = prior64(sd, n=2, seed=1)
    out, info = ds.sample(model, x_T, name, nfe=nfe, final=final, return_info=True)
    assert info.nfe == nfe
    assert out.shape == x_T.shape and out.dtype == x_T.dtype
    assert _finite(out)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_thousand_steps_stay_finite(model, sd, name):
    x_T = prior64(sd, n=1, seed=2)
    out, info = ds.sample(model, x_T, name, steps=1000, return_info=True)
    assert info.steps == 1000 and _finite(out)
    assert info.nfe == ds.get_solver(name).nfe_of(1000, True)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_clean_end_and_tmin(model, sd, g64, name):
    x_T = prior64(sd, n=4, seed=3)
    clean, ic = ds.sample(model, x_T, name, nfe=24, return_info=True)
    assert _finite(clean) and ic.nfe == 24
    assert float(ic.times[-1]) == 0.0  # the clean end marker σ = 0
    err = []
    for nfe in (24, 48):
        tmin, it = ds.sample(model, x_T, name, nfe=nfe, final="tmin", return_info=True)
        assert _finite(tmin) and it.nfe == nfe
        t_end = float(it.times[-1])
        assert float(sd.sigma(torch.tensor(t_end, dtype=torch.float64))) > 0
        assert abs(t_end - sd.t_min) < 1e-12  # every default schedule ends at t_min
        err.append(rel_err(tmin, reference(g64, sd, x_T, t_end)))
    # the tmin run converges to the ODE solution at its last grid time (x there, which differs
    # from x̂_0 there by 7.6e-3: an error that would stop shrinking)
    assert err[1] < 3e-2 and err[1] < 0.75 * err[0]


@pytest.fixture(scope="module")
def half_models(sd, g64):
    exact = g64.denoiser(sd, "eps")

    def wrap(dtype):
        return ds.Denoiser(
            exact.net, sd, "eps", time_map=exact.time_map, net_dtype=dtype, sample_shape=(64,)
        )

    return {torch.float16: wrap(torch.float16), torch.bfloat16: wrap(torch.bfloat16)}


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_half_precision_networks(model, half_models, sd, name, dtype, tol):
    x_T = prior64(sd, n=4, seed=4).float()
    ref = ds.sample(model, x_T, name, nfe=10)
    seen = []
    half = half_models[dtype]
    net = half.net

    class Spy:  # record the dtype the network receives
        def __call__(self, x, t):
            seen.append(x.dtype)
            return net(x, t)

    half.net = Spy()
    try:
        out, info = ds.sample(half, x_T, name, nfe=10, return_info=True)
    finally:
        half.net = net
    assert set(seen) == {dtype}
    assert out.dtype == torch.float32 and info.nfe == 10 and _finite(out)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_batch_of_one_and_256_and_split(model, sd, name):
    x_T = prior64(sd, n=256, seed=5)
    full = ds.sample(model, x_T, name, nfe=NFE)
    assert _finite(full)
    halves = torch.cat(
        [ds.sample(model, x_T[:128], name, nfe=NFE), ds.sample(model, x_T[128:], name, nfe=NFE)]
    )
    assert rel_err(halves, full) <= BATCH_EXACT
    one = ds.sample(model, x_T[7:8], name, nfe=NFE)
    assert one.shape == (1, 64)
    assert rel_err(one, full[7:8]) <= BATCH_EXACT


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_solver_object_is_reusable_across_threads(model, sd, name):
    solver = ds.get_solver(name)
    xs = [prior64(sd, n=3, seed=6), prior64(sd, n=3, seed=7)]
    fresh = [ds.sample(model, x, ds.get_solver(name), nfe=NFE) for x in xs]
    with ThreadPoolExecutor(2) as pool:
        shared = list(pool.map(lambda x: ds.sample(model, x, solver, nfe=NFE), xs))
    for a, b in zip(shared, fresh):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_state_select_mid_run_equals_the_permuted_batch(model, sd, name):
    x_T = prior64(sd, n=5, seed=8)
    perm = torch.tensor([3, 0, 4, 1, 2])
    expected, info = ds.sample(model, x_T[perm], name, nfe=NFE, return_info=True)
    at = info.steps // 2
    calls = []

    def steer(i, x, state):
        if i != at:
            return None
        calls.append(i)
        return x[perm], state.select(perm)

    got = ds.sample(model, x_T, name, nfe=NFE, callback=steer)
    assert calls == [at]
    assert rel_err(got, expected) <= BATCH_EXACT
    # the permutation really acted (a no-op hook would leave the original order)
    plain = ds.sample(model, x_T, name, nfe=NFE)
    assert rel_err(plain, expected) > 0.1
    # a callback returning anything but a tuple (here x itself) does not steer
    assert torch.equal(ds.sample(model, x_T, name, nfe=NFE, callback=lambda i, x, s: x), plain)


STOCHASTIC = [("ddpm", {}), ("heun", {"s_churn": 10.0})]


@pytest.mark.parametrize(("name", "opts"), STOCHASTIC)
def test_same_seed_same_sample_whatever_the_split(model, sd, name, opts):
    assert ds.get_solver(name, **opts).stochastic
    x_T = prior64(sd, n=6, seed=9)
    seeds = [11, 12, 13, 14, 15, 16]

    def run(lo, hi):
        noise = NoiseSource.from_seeds(seeds[lo:hi])
        return ds.sample(model, x_T[lo:hi], name, nfe=NFE, noise=noise, **opts)

    whole = run(0, 6)
    split = torch.cat([run(0, 2), run(2, 3), run(3, 6)])
    assert _finite(whole)
    assert rel_err(split, whole) <= BATCH_EXACT
    # and the noise matters: other seeds give other samples
    other = ds.sample(model, x_T, name, nfe=NFE, noise=NoiseSource.from_seeds(range(6)), **opts)
    assert rel_err(other, whole) > 1e-3


def test_the_suite_covers_every_family():
    # a registry import failure would otherwise shrink the parametrization silently
    families = {"euler", "ddim", "dpmpp_2m", "dpmpp_3m", "dpm_solver", "unipc", "heun", "deis"}
    assert families | {"lms", "ipndm", "rk", "rk4", "dpmpp_2s"} <= set(DETERMINISTIC)
    assert "rk45" in ALL and "rk45" not in FIXED  # adaptive: chooses its own steps
    assert "ddpm" in FIXED and "ddpm" not in DETERMINISTIC  # stochastic: seed test only


def test_times_accept_float32_rounding_and_refuse_real_excursions():
    """Issue 11: a float32 σ list (k-diffusion's own grids) mapped to t lands a few ulps outside
    [t_min, t_max]; validate_times clamps within a relative 1e-5 and still refuses more."""
    import diffsolve as ds
    from diffsolve.schedules import validate_times

    p = ds.EDM(0.002, 80.0)
    sig = torch.tensor([80.0 * (1 + 3e-6), 10.0, 1.0, 0.002 * (1 - 3e-6)], dtype=torch.float32)
    t = validate_times(p, sig)
    assert t.dtype == torch.float64
    assert float(t[0]) == p.t_max and float(t.min()) >= p.t_min - 1e-7
    for bad in ([80.5, 1.0, 0.01], [80.0, 1.0, 0.0019]):
        with pytest.raises(ValueError, match="must lie in"):
            validate_times(p, torch.tensor(bad, dtype=torch.float64))
