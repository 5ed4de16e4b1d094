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


def _eager(kind, x, out, pt):
    """The conversion table as ``Denoiser.convert`` computed it eagerly (before issue 9)."""
    a, s = pt.alpha, pt.sigma
    if kind == "eps":
        return (x - s * out) / a, out
    if kind == "x0":
        return out, (x - a * out) / s
    if kind == "v":
        n = a * a + s * s
        return (a * x - s * out) / n, (s * x + a * out) / n
    if kind == "score":
        return (x + (s * s) * out) / a, (-s) * out
    da, ds_ = pt.d_alpha, pt.d_sigma
    det = a * ds_ - s * da
    return (ds_ * x - s * out) / det, (a * out - da * x) / det


class _OpCount(torch.overrides.TorchFunctionMode):
    """Counts torch operations (tensor arithmetic included) run inside the block."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ds.PREDICTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lazy_prediction_is_bit_identical_to_the_eager_table(kind, dtype):
    """Each view is formed on first read, once, by the table's formula fused into one new
    tensor (equal to the eager formula to rounding: a few ulp), the same bits in either order of
    access; a view that is never read costs no tensor operation."""
    proc = ds.FlowMatching() if kind == "velocity" else sd_process()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).to(dtype)
    out = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).to(dtype)
    d = ds.Denoiser(lambda x_, t_: out, proc, kind)
    for t in (0.37, 0.93):
        pt = d.point(t, x)
        want_x0, want_eps = _eager(kind, x, out, pt)
        for first in ("x0", "eps"):
            pred = d(x, pt)
            assert pred.sources[0] is out  # the watch reads the output, not a view
            with _OpCount() as ops:
                got_first = getattr(pred, first)
            assert (ops.n == 0) == (kind == first)  # the network's own view is free
            with _OpCount() as ops:
                again = getattr(pred, first)
            assert again is got_first and ops.n == 0  # formed once
            x0, eps = pred  # unpacks like the NamedTuple it replaces
            tol = 1e-6 if dtype == torch.float32 else 1e-14
            assert torch.allclose(x0, want_x0, rtol=tol, atol=tol), (kind, t, first)
            assert torch.allclose(eps, want_eps, rtol=tol, atol=tol), (kind, t, first)
            assert x0.dtype == eps.dtype == dtype
            if first == "x0":
                ref_x0, ref_eps = x0, eps
            else:  # the same bits whichever view is read first
                assert torch.equal(x0, ref_x0) and torch.equal(eps, ref_eps)
        idx = torch.tensor([2, 0, 2])
        for part in (d(x, pt), d(x, pt)):
            sel = part.select(idx)  # still lazy: same bits on the chosen samples
            assert torch.equal(sel.eps, ref_eps[idx]) and torch.equal(sel.x0, ref_x0[idx])


@pytest.mark.parametrize("kind", [k for k in ds.PREDICTIONS if k != "x0"])
def test_a_differentiable_time_gives_the_table_and_its_gradients(kind):
    """Tuning evaluates at 0-dim α, σ in a graph (the time is learned): x̂_0 is then formed as
    one linear combination whose coefficient gradients are dot products; it equals the table's
    formula, and its gradients in x, the output and t pass torch's finite-difference check."""
    from diffsolve.tuning.student import eval_point

    proc = ds.FlowMatching() if kind == "velocity" else ds.VPLinear()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    d = ds.Denoiser(lambda x_, t_: out, proc, kind, time_map=lambda t: t)

    def x0_at(x_, out_, t_):
        pt = eval_point(d, t_, x_)
        return ds.Prediction.lazy(x_, out_, pt, kind).x0

    t = torch.tensor(0.41, dtype=torch.float64, requires_grad=True)
    want, _ = _eager(kind, x, out, d.point(0.41, x))
    assert torch.allclose(x0_at(x, out, t), want, rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(x0_at, (x, out, t))


def test_combination_checks_its_arguments_and_gradients():
    from diffsolve.lincomb import combination

    g = torch.Generator().manual_seed(3)
    c = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    v = [torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in c]
    assert torch.allclose(combination(c, v), sum(ci * vi for ci, vi in zip(c, v)), atol=1e-15)
    assert torch.autograd.gradcheck(lambda c_, *v_: combination(c_, list(v_)), (c, *v))
    with pytest.raises(ValueError, match="2 coefficients for 3 terms"):
        combination(c[:2], v)
    low = v[0].detach().float().requires_grad_(True)  # mixed dtypes: the promoted one
    out = combination(c, [low, v[1], v[2]])
    out.sum().backward()
    assert out.dtype == torch.float64 and low.grad is not None and low.grad.dtype == torch.float32


def test_eager_prediction_keeps_the_given_views():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    pred = ds.Prediction(x0, eps)
    assert pred.x0 is x0 and pred.eps is eps and pred.sources == (x0, eps)
    a, b = pred
    assert a is x0 and b is eps and len(pred) == 2
    sel = pred.select(torch.tensor([1]))
    assert torch.equal(sel.x0, x0[1:]) and torch.equal(sel.eps, eps[1:])


def test_cfg_forms_only_the_view_the_solver_reads():
    """CFG guides the raw output and converts once, lazily: reading ε̂ of an ε-network is free."""
    proc = sd_process()
    guided = ds.CFG(ds.Denoiser(LabelNet(), proc, "eps"), 3.0, uncond={"labels": torch.zeros(2)})
    x, labels = torch.randn(2, 3), torch.tensor([1.0, 2.0])
    pred = guided(x, 0.5, labels=labels)
    with _OpCount() as ops:
        eps = pred.eps
    assert ops.n == 0 and eps is pred.sources[0]


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
