"""Classifier guidance, the Time-Shift sampler and Skip-Tuning: known answers, not shapes.

* Classifier guidance with the exact component posterior p(k | x_t) of a Gaussian mixture is,
  by Bayes, the exact score of component k: at w = 1 the guided unconditional denoiser equals
  the exact single-component denoiser (to 1e-11 in float64; measured 2e-14), and at any w it
  equals the closed form ε̂_u + w·(ε̂_k − ε̂_u).
* Time-Shift: a row whose variance is exactly σ² at t + k·δ is evaluated at t + k·δ, and the
  time chosen per sample equals a brute-force argmin over the window;
  a variance above/below every target moves it to the window's top/bottom; window 0, the cutoff
  and a matched variance leave the model unchanged.
* Skip-Tuning: ρ = 1 and removed hooks leave outputs bit-identical; ρ ≠ 1 equals an independent
  computation with scaled skip tensors (module swap for the digits UNet, a hand-written forward
  for diffusers' UNet2DModel, a patched up-block forward for UNet2DConditionModel).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffsolve as ds
from diffsolve.bench.gmm import GaussianMixture
from diffsolve.guidance import ClassifierGuidance, TimeShift, linear_rho, skip_count, skip_tuning

from .conftest import prior64, rel_err

# -- classifier guidance -------------------------------------------------------------------------


def _exact_classifier(gmm: GaussianMixture, process):
    """log w_k + log N(x; α m_k, α² S_k + σ² I): logits of the exact p(k | x_t)."""

    def classifier(x: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        t = float(t_in.reshape(-1)[0])  # the gmm denoiser's time map is the identity
        return gmm._components(x, float(process.alpha(t)), float(process.sigma(t)))[0]

    return classifier


def _component(gmm: GaussianMixture, k: int) -> GaussianMixture:
    vecs = None if gmm.eigvecs is None else gmm.eigvecs[k : k + 1]
    ones = torch.ones(1, dtype=torch.float64)
    return GaussianMixture(
        ones, gmm.means[k : k + 1], gmm.eigvals[k : k + 1], vecs, gmm.shape, f"{gmm.name}[{k}]"
    )


def test_classifier_guidance_exact_conditional_denoiser(g64, sd):
    model = g64.denoiser(sd)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 3])
    guided = ClassifierGuidance(model, _exact_classifier(g64, sd), 1.0, label=labels)
    x, x0 = prior64(sd, n=8, seed=3), g64.sample(8, torch.Generator().manual_seed(1))
    worst = 0.0
    for t in (0.03, 0.2, 0.5, 0.9):
        xt = float(sd.alpha(t)) * x0 + float(sd.sigma(t)) * x
        with torch.no_grad():  # gradients are taken inside the wrapper
            pred = guided(xt, t)
        for k in range(6):
            rows = labels == k
            ref = _component(g64, k).denoiser(sd)(xt[rows], t)
            worst = max(worst, rel_err(pred.x0[rows], ref.x0), rel_err(pred.eps[rows], ref.eps))
    assert worst < 1e-11, worst  # measured 2e-14


def test_classifier_guidance_scale_is_the_cfg_closed_form(g64, sd):
    # exact classifier: ∇log p(k|x) = (ε̂_u − ε̂_k)/σ, so ε̂_g = ε̂_u + w·(ε̂_k − ε̂_u)
    model, comp = g64.denoiser(sd), _component(g64, 2).denoiser(sd)
    x = prior64(sd, n=8, seed=4) * 0.6
    t = 0.35
    u, c = model(x, t), comp(x, t)
    for w in (0.0, 3.0):
        pred = ClassifierGuidance(model, _exact_classifier(g64, sd), w, label=2)(x, t)
        assert rel_err(pred.eps, u.eps + w * (c.eps - u.eps)) < 1e-11
        assert rel_err(pred.x0, u.x0 + w * (c.x0 - u.x0)) < 1e-11


def test_classifier_guidance_samples_the_conditional(g64, sd):
    x_T = prior64(sd, n=6, seed=5)
    guided = ClassifierGuidance(g64.denoiser(sd), _exact_classifier(g64, sd), 1.0, label=4)
    with torch.no_grad():
        a, info = ds.sample(guided, x_T, "dpmpp_2m", nfe=8, return_info=True)
        b = ds.sample(_component(g64, 4).denoiser(sd), x_T, "dpmpp_2m", nfe=8)
    assert info.nfe == 8
    assert rel_err(a, b) < 1e-11  # measured 1.5e-15
    # and it is not the unconditional sample
    assert rel_err(ds.sample(g64.denoiser(sd), x_T, "dpmpp_2m", nfe=8), b) > 1e-2


def test_classifier_guidance_on_the_shipped_networks():
    # the shipped noise-conditional classifier steers the unconditional digits-vp model:
    # measured class accuracy 0.03 at w = 0 and 0.94 at w = 3 (100 samples, dpmpp_2m, NFE 10)
    nets = pytest.importorskip("diffsolve.nets")
    from diffsolve.bench.digits import class_accuracy

    model = nets.model("digits-vp")
    clf, _ = nets.noisy_classifier()
    labels = torch.arange(100) % 10
    x_T = ds.prior(model.process, (100, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    acc = {}
    for w in (0.0, 3.0):
        guided = ClassifierGuidance(model, clf, w, label=labels)
        with torch.no_grad():
            x = ds.sample(guided, x_T, "dpmpp_2m", nfe=10, cond={"label": torch.full((100,), -1)})
        acc[w] = class_accuracy(x, labels)
    assert acc[0.0] < 0.3 and acc[3.0] > 0.8, acc


# -- time shift ----------------------------------------------------------------------------------


class _Spy:
    """An exact gmm network that records its time inputs and honours per-sample times (the
    bench's exact nets read the batch's first time only)."""

    def __init__(self, gmm, process, prediction="eps"):
        self.net = gmm.denoiser(process, prediction).net
        self.seen: list[torch.Tensor] = []

    def __call__(self, x, t):
        self.seen.append(t.clone())
        return torch.cat([self.net(x[i : i + 1], t[i : i + 1]) for i in range(x.shape[0])])


def _spy_model(gmm, process, prediction="eps"):
    spy = _Spy(gmm, process, prediction)
    model = ds.Denoiser(spy, process, prediction, time_map=lambda t: t, sample_shape=gmm.shape)
    return spy, model


def test_time_shift_picks_the_brute_force_argmin(g64, sd):
    spy, model = _spy_model(g64, sd)
    ts = TimeShift(model, window=20, cutoff=0)
    t = 0.5
    # rows whose variance is exactly σ² at t + k/1000 (k beyond ±10 clips to the window's ends)
    k = torch.tensor([-7, -3, 0, 2, 5, 9, 14, -15], dtype=torch.float64)
    z = torch.randn(8, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    x = z * sd.sigma(t + k / 1000)[:, None]
    pred = ts(x, t)
    tau = spy.seen[-1]
    assert torch.allclose(tau, t + k.clamp(-10, 10) / 1000, rtol=0, atol=1e-12)
    # and a brute force on the host for random variances: candidates t + j/1000, |j| ≤ 10,
    # target 1 − ᾱ_τ = σ_τ²
    y = z * (0.97 + 0.06 * torch.rand(8, 1, generator=torch.Generator().manual_seed(8)))
    y = y.double() * float(sd.sigma(t))
    ts(y, t)
    cand = t + torch.arange(-10, 11, dtype=torch.float64) / 1000
    expect = cand[(y.var(1)[:, None] - sd.sigma(cand)[None] ** 2).abs().argmin(1)]
    assert torch.equal(spy.seen[-1], expect)
    # ε̂ is the network's at τ; x̂0 is rebuilt at the scheduled t
    for i in range(8):
        ref = model(x[i : i + 1], float(tau[i]))
        assert rel_err(pred.eps[i : i + 1], ref.eps) < 1e-14
    a, s = float(sd.alpha(t)), float(sd.sigma(t))
    assert rel_err(pred.x0, (x - s * pred.eps) / a) < 1e-14
    # variance above (below) every target: the window's top (bottom)
    ts(3.0 * x, t)
    assert torch.allclose(spy.seen[-1], torch.full((8,), t + 0.010, dtype=torch.float64))
    ts(0.01 * x, t)
    assert torch.allclose(spy.seen[-1], torch.full((8,), t - 0.010, dtype=torch.float64))


def test_time_shift_identity_cases(g64, sd):
    model = g64.denoiser(sd)
    x_T = prior64(sd, n=8, seed=8)
    base = ds.sample(model, x_T, "dpmpp_2m", nfe=10)
    for wrapped in (TimeShift(model, window=0, cutoff=0), TimeShift(model, cutoff=1000)):
        assert torch.equal(ds.sample(wrapped, x_T, "dpmpp_2m", nfe=10), base)
    # a variance matched exactly to σ_t² keeps τ = t
    t = 0.6
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True) * float(sd.sigma(t))
    assert rel_err(TimeShift(model, window=20, cutoff=0)(x, t).x0, model(x, t).x0) < 1e-13


def test_time_shift_in_a_run(g64, sd):
    model = _spy_model(g64, sd)[1]
    x_T = prior64(sd, n=8, seed=10) * 1.05  # x_T whose variance exceeds the prior's
    base = ds.sample(model, x_T, "unipc", nfe=6)
    ts = TimeShift(model, window=30, cutoff=300)
    out, info = ds.sample(ts, x_T, "unipc", nfe=6, return_info=True)
    assert info.nfe == 6 and torch.isfinite(out).all()
    assert 0 < rel_err(out, base) < 0.5


def test_time_shift_with_cfg_inside_keeps_per_sample_times(g64, sd):
    seen = []

    def net(x, t, label):
        seen.append(t.clone())
        return torch.zeros_like(x)

    model = ds.Denoiser(net, sd, "eps", time_map=lambda t: t)
    cfg = ds.CFG(model, 3.0, uncond={"label": torch.tensor(-1)})
    x = torch.randn(4, 16, dtype=torch.float64) * torch.tensor([[0.5], [0.8], [1.2], [3.0]])
    TimeShift(cfg, window=20, cutoff=0)(x, 0.7, label=torch.zeros(4, dtype=torch.long))
    t_in = seen[-1]
    assert t_in.shape == (8,) and torch.equal(t_in[:4], t_in[4:])
    assert t_in[:4].unique().numel() > 1


# -- skip tuning ---------------------------------------------------------------------------------


class _Scale(nn.Module):
    def __init__(self, r: float):
        super().__init__()
        self.r = r

    def forward(self, h):
        return h * self.r


@pytest.fixture(scope="module")
def digits_unet():
    unet_mod = pytest.importorskip("diffsolve.nets.unet")
    torch.manual_seed(0)
    net = unet_mod.DigitsUNet(channels=8, emb_dim=16).eval()
    with torch.no_grad():  # zero-initialised output convs would hide the skips
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


def test_skip_tuning_digits_unet(digits_unet):
    net = digits_unet
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, lab = torch.full((4,), 500.0), torch.tensor([0, 3, 7, -1])
    with torch.no_grad():
        ref = net(x, t, lab)
        with skip_tuning(net, 1.0):
            assert torch.equal(net(x, t, lab), ref)
        rho = linear_rho(net, 0.6, 0.9)
        assert skip_count(net) == 3 and rho == pytest.approx((0.6, 0.75, 0.9))
        handle = skip_tuning(net, rho)
        tuned = net(x, t, lab)
        handle.remove()
        assert torch.equal(net(x, t, lab), ref)
        assert rel_err(tuned, ref) > 1e-2
        original = net.skips
        net.skips = nn.ModuleList([_Scale(r) for r in rho])
        try:
            manual = net(x, t, lab)
        finally:
            net.skips = original
    assert torch.equal(tuned, manual)


def _unet2d_manual(unet, x, t, rho):
    """diffusers' UNet2DModel.forward (no class labels, no skip_conv blocks), written out with
    the skip tensors scaled by ρ_i."""
    emb = unet.time_embedding(unet.time_proj(t * torch.ones(x.shape[0])).to(unet.dtype))
    h = unet.conv_in(x)
    res = [h]
    for block in unet.down_blocks:
        h, r = block(hidden_states=h, temb=emb)
        res += list(r)
    res = [ri * r for ri, r in zip(res, rho, strict=True)]
    h = unet.mid_block(h, emb)
    for block in unet.up_blocks:
        n = len(block.resnets)
        h = block(h, tuple(res[-n:]), emb)
        res = res[:-n]
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def test_skip_tuning_diffusers_unet2d():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(321)
    n = skip_count(unet)
    rho = linear_rho(n, 0.5, 1.2)
    with torch.no_grad():
        ref = unet(x, t).sample
        assert torch.allclose(_unet2d_manual(unet, x, t, (1.0,) * n), ref, atol=1e-6)
        with skip_tuning(unet, 1.0):
            assert torch.equal(unet(x, t).sample, ref)
        with skip_tuning(unet, rho):
            tuned = unet(x, t).sample
        assert torch.equal(unet(x, t).sample, ref)
        manual = _unet2d_manual(unet, x, t, rho)
    assert n == 4  # conv_in, block 0 (resnet, downsampler), block 1 (resnet)
    assert rel_err(tuned, ref) > 1e-2
    assert torch.allclose(tuned, manual, atol=1e-6)


def test_skip_tuning_diffusers_unet2d_condition():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 3, 8)
    n = skip_count(unet)
    rho = linear_rho(n, 0.7, 0.4)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        with skip_tuning(unet, 1.0):
            assert torch.equal(unet(x, t, ctx).sample, ref)
        with skip_tuning(unet, rho):
            tuned = unet(x, t, ctx).sample
        assert torch.equal(unet(x, t, ctx).sample, ref)
        # independent route: patch each up block's forward to scale its skip tuple
        end = n
        for block in unet.up_blocks:
            k = len(block.resnets)
            sl, fwd = rho[end - k : end], block.forward

            def patched(*a, _f=fwd, _r=sl, **kw):
                kw["res_hidden_states_tuple"] = tuple(
                    h * r for h, r in zip(kw["res_hidden_states_tuple"], _r, strict=True)
                )
                return _f(*a, **kw)

            block.forward = patched
            end -= k
        manual = unet(x, t, ctx).sample
        for block in unet.up_blocks:
            del block.forward
    assert rel_err(tuned, ref) > 1e-2
    assert torch.equal(tuned, manual)


def test_skip_tuning_rejects_bad_input(digits_unet):
    with pytest.raises(ValueError, match="3 skips"):
        skip_tuning(digits_unet, (0.9, 0.9))
    with pytest.raises(TypeError, match="up_blocks"):
        skip_tuning(nn.Linear(2, 2), 0.9)


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_time_shift_per_sample_conversion(g64, prediction):
    # per-sample (α_τ, σ_τ, α'_τ, σ'_τ) must convert each row as a single-row call at τ would
    flow = ds.FlowMatching()
    model = _spy_model(g64, flow, prediction)[1]
    ts = TimeShift(model, window=40, cutoff=0)
    t = 0.6
    scale = torch.linspace(0.56, 0.64, 6, dtype=torch.float64)[:, None]  # σ_t = t = 0.6
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    x = x * scale
    idx, shifted = ts.shifted(x, model.point(t, x))
    assert idx.unique().numel() > 2
    pred = ts(x, t)
    for i in range(6):
        ref = model(x[i : i + 1], float(shifted.t_in[i]))
        assert rel_err(pred.eps[i : i + 1], ref.eps) < 1e-12
