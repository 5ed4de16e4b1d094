"""Denoiser conversions, NFE counting and classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

import diffsolve as ds

from .conftest import sd_process


class LabelNet:
    """ε̂ = 0.1·x + label (per sample), with a call log."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, labels):
        self.batches.append(x.shape[0])
        assert t.shape == (x.shape[0],)
        return 0.1 * x + labels[:, None].to(x.dtype)


def test_conversions_are_exact_on_a_known_pair():
    """Build every prediction from a known (x0, ε) and check the Denoiser recovers both."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=g, dtype=torch.float64)
    for proc, t in (
        (sd_process(), 0.37),
        (ds.VPLinear(), 0.5),
        (ds.EDM(), 2.5),
        (ds.FlowMatching(), 0.6),
        (ds.VE(), 0.3),
        (ds.VPCosine(), 0.8),
    ):
        a, s = float(proc.alpha(t)), float(proc.sigma(t))
        da, dsg = float(proc.d_alpha(t)), float(proc.d_sigma(t))
        x = a * x0 + s * eps
        outputs = {
            "eps": eps,
            "x0": x0,
            "v": a * eps - s * x0,
            "score": -eps / s,
            "velocity": da * x0 + dsg * eps,
        }
        for pred, out in outputs.items():
            d = ds.Denoiser(lambda x_, t_, _o=out: _o, proc, pred)
            got = d(x, t)
            assert torch.allclose(got.x0, x0, atol=1e-10), (proc, pred)
            assert torch.allclose(got.eps, eps, atol=1e-10), (proc, pred)


def test_unknown_prediction_and_bad_output_shape():
    with pytest.raises(ValueError, match="valid: eps, x0, v, score, velocity"):
        ds.Denoiser(lambda x, t: x, sd_process(), "noise")
    d = ds.Denoiser(lambda x, t: x[:, :2], sd_process(), "eps")
    with pytest.raises(ValueError, match="does not match"):
        d(torch.randn(2, 3), 0.5)


def test_vp_discrete_network_receives_its_fractional_index():
    seen = []
    d = ds.Denoiser(lambda x, t: seen.append(t) or x, sd_process(), "eps")
    d(torch.randn(2, 3), sd_process().time_of_index([740]))
    assert torch.allclose(seen[0], torch.tensor([740.0, 740.0]))


def test_cfg_is_one_doubled_call_per_step_and_combines_linearly():
    net = LabelNet()
    proc = sd_process()
    base = ds.Denoiser(net, proc, "eps")
    w = 4.0
    guided = ds.CFG(base, w, uncond={"labels": torch.zeros(2)})
    x = torch.randn(2, 3, dtype=torch.float64)
    labels = torch.tensor([1.0, 2.0])
    pred = guided(x, 0.5, labels=labels)
    c = 0.1 * x + labels[:, None]
    u = 0.1 * x
    assert torch.allclose(pred.eps, u + w * (c - u))
    assert net.batches == [4]  # one call on the doubled batch
    _, info = ds.sample(guided, x, "euler", nfe=6, cond={"labels": labels}, return_info=True)
    assert info.nfe == 6 and net.batches[1:] == [4] * 6


def test_cfg_rejects_mismatched_conditioning():
    guided = ds.CFG(
        ds.Denoiser(LabelNet(), sd_process(), "eps"), 2.0, uncond={"labels": torch.zeros(2)}
    )
    with pytest.raises(ValueError, match="conditioning keys"):
        guided(torch.randn(2, 3), 0.5, text=torch.zeros(2))


def test_lifetime_nfe_counter():
    d = ds.Denoiser(lambda x, t: x, sd_process(), "eps")
    ds.sample(d, torch.randn(2, 3), "euler", nfe=4)
    ds.sample(d, torch.randn(2, 3), "euler", nfe=3)
    assert d.nfe == 7
