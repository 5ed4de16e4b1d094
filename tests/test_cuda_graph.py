"""GPU readiness tested on the CPU (issue 14): ``cuda_graph=True`` refuses clearly without CUDA,
the loop a capture records makes no host sync and no host-to-device copy (checked by
``check_capturable``'s dispatch mode, itself shown to catch each kind), the capture path's
bookkeeping (private inputs, NaN flags, NFE) gives the eager sample, and a ``torch.compile``d
network runs the whole loop as one graph without breaks or recompiles."""

from __future__ import annotations

import pytest
import torch

import diffsolve as ds
from diffsolve import nets
from diffsolve.cuda_graph import HostSyncError, NoHostSync, check_capturable

LAB = {"label": torch.arange(6) % 10}


def _x(model, b: int = 6) -> torch.Tensor:
    return ds.prior(model.process, (b, 1, 8, 8), generator=torch.Generator().manual_seed(0))


class Counting(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, nan_at: int | None = None):
        super().__init__()
        self.net, self.calls, self.nan_at = net, 0, nan_at

    def forward(self, x, t, **cond):
        self.calls += 1
        out = self.net(x, t, **cond)
        return out * float("nan") if self.calls == self.nan_at else out


def _counting(nan_at: int | None = None) -> ds.Denoiser:
    net, proc, _ = nets.load("digits-vp")
    return ds.Denoiser(Counting(net, nan_at), proc, "eps", sample_shape=(1, 8, 8))


def test_cuda_graph_refused_clearly_off_cuda_and_for_what_a_graph_cannot_hold():
    model = _counting()
    x = _x(model)
    with pytest.raises(ValueError, match="needs x on a CUDA device, got cpu"):
        ds.sample(model, x, "dpmpp_2m", 5, cond=LAB, cuda_graph=True)
    cases = [
        (dict(callback=lambda i, x, s: None), "no callback"),
        (dict(check_finite="step"), "check_finite=True"),
        (dict(solver="ddpm", noise=ds.BrownianTree(0)), "BrownianTree"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            ds.sample(model, x, **{"solver": "dpmpp_2m", "nfe": 5, **kw}, cond=LAB, cuda_graph=True)
    with pytest.raises(ValueError, match="needs a fixed step count; rk45"):
        ds.sample(model, x, "rk45", cond=LAB, cuda_graph=True)
    assert model.net.calls == 0  # every refusal before the first network call


@pytest.mark.parametrize(
    "solver, kw",
    [
        ("dpmpp_2m", {}),
        ("unipc", {}),
        ("dpmpp_3m", {"final": "extrapolate"}),
        ("deis", {}),
        ("heun", {}),
        ("dpmpp_2s", {}),
        ("ddpm", {}),
        ("dpmpp_2m_sde", {}),
        ("euler_maruyama", {}),
    ],
)
def test_capturable_loop_has_no_host_sync_and_equals_eager(solver, kw):
    model = nets.model("digits-vp")
    x = _x(model)
    eager = ds.sample(model, x, solver, 6, cond=LAB, noise=ds.NoiseSource(5), **kw)
    noise, lab = ds.NoiseSource(5), {"label": LAB["label"].clone()}
    got = check_capturable(model, x, solver, 6, cond=lab, noise=noise, **kw)
    assert torch.equal(got, eager)
    assert torch.equal(lab["label"], LAB["label"]) and not noise._keys  # inputs untouched


def test_capture_path_keeps_nan_watch_and_nfe():
    model = _counting(nan_at=6 + 3)  # the warm-up makes calls 1..5; the checked run's 4th call
    x = _x(model)
    with pytest.raises(ds.NonFiniteError, match="step 3"):
        check_capturable(model, x, "dpmpp_2m", 5, cond=LAB)
    _, info = ds.sample(model, x, "dpmpp_2m", 5, cond=LAB, return_info=True)
    model.net.calls, model.net.nan_at = 0, None
    _, info_g = check_capturable(model, x, "dpmpp_2m", 5, cond=LAB, return_info=True)
    assert info_g.nfe == info.nfe == 5 and model.net.calls == 10  # warm-up + the run


def test_host_sync_detector_catches_each_kind_and_passes_host_arithmetic():
    dev = torch.ones(4)  # made before the mode: device data
    grid = torch.linspace(0, 1, 5, dtype=torch.float64)  # a float64 grid: host data
    for bad, what in [
        (lambda: dev.sum().item(), "_local_scalar_dense"),
        (lambda: bool((dev > 0).all()), "_local_scalar_dense"),
        (lambda: dev.tolist(), "tolist"),
        (lambda: dev[dev > 0], "boolean mask"),
        (lambda: dev.nonzero(), "nonzero"),
        (lambda: dev * torch.tensor([1.0, 2.0, 3.0, 4.0]), "host-to-device copy"),
    ]:
        with pytest.raises(HostSyncError, match=what), NoHostSync():
            bad()
    with NoHostSync():
        w = (torch.tensor([0.5, 0.25]) * 2).tolist()  # coefficients made and read on the host
        h = float(grid[1:].diff().sum()) + grid.tolist()[1]
        y = dev * w[0] + h
    assert w == [1.0, 0.5] and torch.equal(y, torch.full((4,), 2.0))


def test_model_that_reads_its_time_on_the_host_is_not_capturable():
    from diffsolve.bench import gmm2d

    model = gmm2d().denoiser(ds.VPLinear(), "eps")  # the exact mixture calls float(t) per call
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        check_capturable(model, torch.randn(4, 2), "dpmpp_2m", 5)


def test_compiled_network_runs_the_loop_as_one_graph_without_recompiles():
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    net, proc, _ = nets.load("digits-vp")
    x = _x(nets.model("digits-vp"))
    eager = ds.sample(nets.model("digits-vp"), x, "dpmpp_2m", 6, cond=LAB)
    dynamo.reset()
    counters.clear()
    # backend "eager": dynamo's graph capture (where breaks and guards are decided) without a
    # C++ toolchain, so the check runs anywhere in about a second
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # fullgraph: a break raises
    model = ds.Denoiser(compiled, proc, "eps", sample_shape=(1, 8, 8))
    with dynamo.config.patch(error_on_recompile=True):  # a new time each step must not recompile
        got = ds.sample(model, x, "dpmpp_2m", 6, cond=LAB)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(got, eager)
    dynamo.reset()
