"""diffsolve solvers exported with k-diffusion's sampler signature, against k-diffusion itself.

The model is the exact gmm64 denoiser in k-diffusion's own convention, D(x, σ) = E[x_0 | x_0 +
σ·ε = x] (float64), called by both sides; the σ lists are k-diffusion's ``get_sigmas_karras``
(ending at 0) or that list without its final 0. Agreement is to float64 round-off (≤ 1e-6).
"""

from __future__ import annotations

import pytest
import torch

import diffsolve as ds
from diffsolve.bench import peers
from diffsolve.interop import kdiffusion as kd

from .conftest import rel_err

if not peers.available()["k-diffusion"]:
    pytest.skip("needs the peers extra (k-diffusion)", allow_module_level=True)

pytestmark = pytest.mark.peers
TOL = 1e-6


class Model:
    """A k-diffusion denoiser ``model(x, sigma, **extra) -> x̂_0`` that counts its calls."""

    def __init__(self, gmm):
        self.gmm, self.calls, self.seen = gmm, 0, []

    def __call__(self, x, sigma, scale=1.0):
        self.calls += 1
        self.seen.append(float(sigma[0]))
        return scale * self.gmm.x0_mean(x, 1.0, float(sigma[0]))


@pytest.fixture(scope="module")
def sampling():
    return kd.load_sampling()


@pytest.fixture(scope="module")
def x_T():
    g = torch.Generator().manual_seed(3)
    return 80.0 * torch.randn(6, 64, generator=g, dtype=torch.float64)


def sigmas(sampling, n=8, zero=True):
    s = sampling.get_sigmas_karras(n, 0.002, 80.0).to(torch.float64)
    return s if zero else s[:-1]


def both(sampling, g64, x_T, name, peer, sig, options=None, **kw):
    a, b = Model(g64), Model(g64)
    ours = kd.to_kdiffusion_sampler(name, **(options or {}))(a, x_T, sig, disable=True, **kw)
    theirs = getattr(sampling, peer)(b, x_T, sig, disable=True, **kw)
    return ours, theirs, a, b


@pytest.mark.parametrize(
    ("name", "peer", "options"),
    [
        ("euler", "sample_euler", {}),
        ("heun", "sample_heun", {}),
        ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ],
)
@pytest.mark.parametrize("zero", [True, False], ids=["to-zero", "to-sigma-min"])
def test_exported_equals_kdiffusion(sampling, g64, x_T, name, peer, options, zero):
    if not zero and name == "dpmpp_2m":
        options = {"lower_order_final": False}  # k-diffusion has no lower-order final step
    sig = sigmas(sampling, zero=zero)
    ours, theirs, a, b = both(sampling, g64, x_T, name, peer, sig, options)
    assert rel_err(ours, theirs) <= TOL
    assert a.calls == b.calls and a.seen == pytest.approx(b.seen, rel=1e-12)
    assert ours.dtype == x_T.dtype


def test_callback_reports_what_kdiffusion_reports(sampling, g64, x_T):
    for name, peer in (("euler", "sample_euler"), ("heun", "sample_heun")):
        got, want = [], []
        sig = sigmas(sampling, n=5)
        kd.to_kdiffusion_sampler(name)(Model(g64), x_T, sig, callback=got.append)
        getattr(sampling, peer)(Model(g64), x_T, sig, disable=True, callback=want.append)
        assert [d["i"] for d in got] == [d["i"] for d in want] == list(range(5))
        for d, e in zip(got, want):
            assert float(d["sigma"]) == float(e["sigma"])
            assert float(d["sigma_hat"]) == pytest.approx(float(e["sigma_hat"]), rel=1e-12)
            assert rel_err(d["x"], e["x"]) <= TOL
            assert rel_err(d["denoised"], e["denoised"]) <= TOL


def test_extra_args_and_solver_options(sampling, g64, x_T):
    sig = sigmas(sampling, n=6)
    scaled, theirs, _, _ = both(
        sampling, g64, x_T, "dpmpp_2m", "sample_dpmpp_2m", sig, extra_args={"scale": 0.9}
    )
    assert rel_err(scaled, theirs) <= TOL
    plain = kd.to_kdiffusion_sampler("dpmpp_2m")(Model(g64), x_T, sig)
    assert rel_err(scaled, plain) > 1e-3  # the extra argument really reached the model
    fn = kd.to_kdiffusion_sampler("unipc", order=3)
    assert fn.__name__ == "sample_unipc"
    bh1 = fn(Model(g64), x_T, sig, variant="bh1")  # call-time options override
    assert rel_err(bh1, fn(Model(g64), x_T, sig)) > 1e-8
    with pytest.raises(ValueError, match="unknown option"):
        kd.to_kdiffusion_sampler("euler", order=2)
    with pytest.raises(ValueError, match="decrease"):
        fn(Model(g64), x_T, sig.flip(0))


def test_noise_sampler_drives_stochastic_solvers(sampling, g64, x_T):
    """DDPM (η = 1) over two steps is k-diffusion's sample_dpmpp_2m_sde (η = 1) over the same two
    steps (its first step is the first-order SDE-DPM-Solver++ = DDPM posterior; the second lands
    on σ = 0 with x̂_0), with the same noise_sampler."""
    sig = torch.tensor([20.0, 1.5, 0.0], dtype=torch.float64)
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    calls = []

    def noise_sampler(s, s_next):
        calls.append((float(s), float(s_next)))
        return z

    x = x_T / 4
    ours = kd.to_kdiffusion_sampler("ddpm")(Model(g64), x, sig, noise_sampler=noise_sampler)
    theirs = sampling.sample_dpmpp_2m_sde(
        Model(g64), x, sig, disable=True, eta=1.0, noise_sampler=noise_sampler
    )
    assert rel_err(ours, theirs) <= TOL
    assert calls == [(20.0, 1.5), (20.0, 1.5)]  # once each side; none for the step to 0
    quiet = kd.to_kdiffusion_sampler("ddpm")(Model(g64), x, sig, noise_sampler=lambda s, t: 0 * z)
    assert rel_err(quiet, ours) > 1e-3


def test_denoiser_from_kdiffusion(sampling, g64, x_T):
    """The wrapped model runs through ds.sample like any Denoiser: same result as the exported
    sampler, and converting back (KDiffusionDenoiser) gives the original model."""
    model = kd.denoiser_from_kdiffusion(Model(g64), 0.002, 80.0)
    assert isinstance(model.process, ds.EDM) and model.prediction == "x0"
    sig = sigmas(sampling, n=7)
    ours = ds.sample(model, x_T, "dpmpp_3m", times=sig[:-1])
    exported = kd.to_kdiffusion_sampler("dpmpp_3m")(Model(g64), x_T, sig)
    assert rel_err(ours, exported) <= 1e-12
    back = kd.KDiffusionDenoiser(model)
    for s in (50.0, 1.0, 0.01):
        sigma = torch.full((6,), s, dtype=torch.float64)
        assert rel_err(back(x_T / 10, sigma), g64.x0_mean(x_T / 10, 1.0, s)) <= 1e-12
    wrapped = type("Wrapped", (Model,), {"sigma_min": 0.03, "sigma_max": 14.6})(g64)
    edm = kd.denoiser_from_kdiffusion(wrapped).process
    assert (edm.sigma_min, edm.sigma_max) == (0.03, 14.6)


@pytest.mark.parametrize("name", ["rk45", "dpm_adaptive"])
def test_adaptive_solvers_are_refused_for_export(name):
    """Issue 11: to_kdiffusion_sampler("rk45") was accepted; an adaptive solver cannot step
    exactly on k-diffusion's sigmas, so export refuses it up front."""
    from diffsolve.interop.kdiffusion import to_kdiffusion_sampler

    with pytest.raises(ValueError, match="chooses its own steps"):
        to_kdiffusion_sampler(name)
