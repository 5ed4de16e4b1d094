"""Gradients through sampling (diffsolve.adjoint): the adjoint backward pass against the exact
flow map of Gaussian data, where x0(x_T) = μ + J·(x_T − α_T·μ), J = s/√(α_T²s² + σ_T²) per
dimension, so ∂x0/∂x_T = J and ∂x0/∂μ = 1 − α_T·J are known in closed form; backprop through the
steps against central finite differences of the discrete sampler; memory held between the
forward and backward passes; noise optimisation reaching the analytic preimage."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import diffsolve as ds

S2 = torch.tensor([0.3, 0.6, 1.2], dtype=torch.float64)
MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)


class GaussNet(nn.Module):
    """The exact x̂0 of N(μ + shift, diag(s²)) data, differentiable in μ and in ``shift``."""

    def __init__(self, process: ds.GaussianProcess):
        super().__init__()
        self.process = process
        self.mu = nn.Parameter(MU.clone())

    def forward(self, x, t, shift=None):
        t64 = t.to(torch.float64)
        a = self.process.alpha(t64).to(x.dtype)[:, None]
        s = self.process.sigma(t64).to(x.dtype)[:, None]
        m = self.mu if shift is None else self.mu + shift
        return m + a * S2 * (x - a * m) / (a * a * S2 + s * s)


def _model(process):
    return ds.Denoiser(GaussNet(process), process, "x0", time_map=lambda t: t)


def _jac(process):
    t = torch.tensor(float(process.t_max), dtype=torch.float64)
    a, s = float(process.alpha(t)), float(process.sigma(t))
    j = S2.sqrt() / torch.sqrt(a * a * S2 + s * s)
    return a, j


def _x_T(process, b=2):
    return ds.prior(process, (b, 3), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)  # fmt: skip


def _grad_x(model, x_T, nfe, grad, solver="dpmpp_2m"):
    xx = x_T.clone().requires_grad_(True)
    ds.sample(model, xx, solver, nfe, grad=grad).sum().backward()
    return xx.grad


@pytest.mark.parametrize(
    ("process", "tol"),
    [(ds.VPLinear(), 5e-3), (ds.FlowMatching(), 3e-2), (ds.EDM(), 8e-2)],
    ids=["vp", "flow", "edm"],
)
def test_adjoint_matches_the_exact_flow_map(process, tol):
    """Measured max relative error of ∂x0/∂x_T at NFE 20 (dpmpp_2m grid, substeps 1):
    VP 2.3e-3, flow 1.5e-2, EDM 4.5e-2; backprop through the same steps: 1.4e-2 / 2.7e-2 /
    1.7e-2 (the discrete sampler's own Jacobian)."""
    model = _model(process)
    _, j = _jac(process)
    g = _grad_x(model, _x_T(process), 20, "adjoint")
    assert float(((g - j) / j).abs().max()) < tol


def test_adjoint_is_second_order_in_substeps():
    """EDM at NFE 10: error 6.5e-2 / 1.6e-2 at 2 / 4 substeps: slope 2 (±0.3)."""
    proc = ds.EDM()
    model = _model(proc)
    _, j = _jac(proc)
    errs = [
        float(((_grad_x(model, _x_T(proc), 10, ds.Adjoint(substeps=n)) - j) / j).abs().max())
        for n in (2, 4)
    ]
    slope = math.log(errs[0] / errs[1]) / math.log(2)
    assert abs(slope - 2) < 0.3, errs


def test_adjoint_gradients_reach_parameters_and_conditioning():
    """∂L/∂μ (the network's parameter) and ∂L/∂shift (a conditioning tensor) against the
    closed form Σ_b (1 − α_T·J) for L = Σ x0, and against backprop through a fine solve.
    Measured relative error at NFE 20: 7.8e-3 / 1.9e-3 / 4.8e-4 at 1 / 2 / 4 substeps."""
    proc = ds.VPLinear()
    model = _model(proc)
    a, j = _jac(proc)
    x_T = _x_T(proc, b=3)
    shift = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    x0 = ds.sample(model, x_T, "dpmpp_2m", 20, cond={"shift": shift},
                   grad=ds.Adjoint(substeps=2))  # fmt: skip
    x0.sum().backward()
    exact = 1 - a * j
    g_mu = model.net.mu.grad.clone()
    assert torch.allclose(g_mu, 3 * exact, rtol=5e-3)
    assert torch.allclose(shift.grad, exact.expand(3, 3), rtol=5e-3)
    model.net.mu.grad = None
    ds.sample(model, x_T, "dpmpp_2m", 200, grad="backprop").sum().backward()
    assert torch.allclose(g_mu, model.net.mu.grad, rtol=5e-3)


def test_backprop_is_the_discrete_samplers_jacobian():
    """grad='backprop' against central differences of the same discrete sampler (1e-6)."""
    proc = ds.VPLinear()
    model = _model(proc)
    x_T = _x_T(proc, b=1)
    g = _grad_x(model, x_T, 10, "backprop")
    with torch.no_grad():
        fd = torch.zeros(3, dtype=torch.float64)
        for k in range(3):
            e = torch.zeros_like(x_T)
            e[0, k] = 1e-5
            up = ds.sample(model, x_T + e, "dpmpp_2m", 10).sum()
            dn = ds.sample(model, x_T - e, "dpmpp_2m", 10).sum()
            fd[k] = (up - dn) / 2e-5
    assert torch.allclose(g[0], fd, rtol=1e-6, atol=1e-9)


def _saved_bytes(fn):
    """Bytes autograd holds for backward once ``fn`` returns (saved-tensor hooks)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_adjoint_memory_is_flat_in_the_steps():
    """Saved for backward: backprop's grows with the steps (every step's graph), the adjoint's
    is the last state only."""
    proc = ds.VPLinear()
    model = _model(proc)
    x_T = _x_T(proc, b=64).requires_grad_(True)
    mem = {}
    for grad in ("adjoint", "backprop"):
        for n in (10, 40):
            mem[grad, n], _ = _saved_bytes(
                lambda n=n, grad=grad: ds.sample(model, x_T, "dpmpp_2m", n, grad=grad)
            )
    assert mem["adjoint", 10] == mem["adjoint", 40]
    assert mem["backprop", 40] > 3 * mem["backprop", 10] > 3 * mem["adjoint", 10]


def test_adjoint_bad_input():
    proc = ds.VPLinear()
    model = _model(proc)
    x_T = _x_T(proc).requires_grad_(True)
    with pytest.raises(ValueError, match="stochastic"):
        ds.sample(model, x_T, "ddpm", 10, grad="adjoint")
    with pytest.raises(ValueError, match="grad must be"):
        ds.sample(model, x_T, "dpmpp_2m", 10, grad="reverse")
    with pytest.raises(ValueError, match="final"):
        ds.sample(model, x_T, "dpmpp_2m", 10, grad="adjoint", final="extrapolate")
    with pytest.raises(ValueError, match="substeps"):
        ds.Adjoint(substeps=0)


def test_optimize_noise_reaches_the_analytic_preimage():
    """Minimising ‖x0 − c‖² over x_T through the sampler. The exact flow map is affine, so the
    optimum is x_T* = α_T·μ + (c − μ)/J; the NFE-20 sampler's map is affine too (Gaussian data)
    with its own Jacobian J_d (1.4e-2 from J), whose preimage x_T + (c − x0(x_T))/J_d is reached
    to 1e-3 and the analytic one to the sampler's error (measured 2.7e-2)."""
    proc = ds.VPLinear()
    model = _model(proc)
    a, j = _jac(proc)
    c = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    x_T = _x_T(proc, b=1)

    def reward(x0):
        return -((x0 - c) ** 2).sum(dim=1)

    z, curve = ds.optimize_noise(model, x_T, reward, steps=300, lr=0.05, nfe=20,
                                 regularizer=None)  # fmt: skip
    assert curve[-1] > curve[0]
    assert curve[-1] > -1e-6
    x0 = ds.sample(model, z, "dpmpp_2m", 20).detach()
    assert float((x0[0] - c).abs().max()) < 1e-3
    j_d = _grad_x(model, x_T, 20, "backprop")[0]  # diagonal: the sum's gradient is J_d
    own = x_T[0] + (c - ds.sample(model, x_T, "dpmpp_2m", 20).detach()[0]) / j_d
    assert float((z[0] - own).abs().max()) < 1e-3
    exact = a * MU + (c - MU) / j
    assert float((z[0] - exact).abs().max()) < 5e-2


def test_optimize_noise_regularisers():
    proc = ds.VPLinear()
    model = _model(proc)
    x_T = _x_T(proc, b=4)

    def reward(x0):
        return -((x0 - 3.0) ** 2).sum(dim=1)

    z, curve = ds.optimize_noise(model, x_T, reward, steps=10, lr=0.1, nfe=10)
    assert torch.allclose(z.norm(dim=1), x_T.norm(dim=1), rtol=1e-10)  # "norm": on the sphere
    assert curve[-1] > curve[0]
    z_free, _ = ds.optimize_noise(model, x_T, reward, steps=10, lr=0.1, nfe=10, regularizer=None)
    z_prior, _ = ds.optimize_noise(model, x_T, reward, steps=10, lr=0.1, nfe=10,
                                   regularizer="prior", weight=50.0)  # fmt: skip
    assert float(z_prior.norm()) < float(z_free.norm())
    with pytest.raises(ValueError, match="regularizer"):
        ds.optimize_noise(model, x_T, reward, regularizer="l1")
    with pytest.raises(ValueError, match="shape"):
        ds.optimize_noise(model, x_T, lambda x0: x0, steps=1)


@pytest.mark.parametrize("grad", ["adjoint", "backprop"])
def test_optimize_noise_leaves_the_networks_gradients_alone(grad):
    """Only x_T is optimised: the network's weights and the reward's (which require grad, as a
    user's freshly loaded models do) get no gradient accumulated."""
    proc = ds.VPLinear()
    model = _model(proc)
    scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def reward(x0):
        return -((scale * x0 - 3.0) ** 2).sum(dim=1)

    _z, curve = ds.optimize_noise(model, _x_T(proc, b=2), reward, steps=3, nfe=6, grad=grad)
    assert curve[-1] > curve[0]
    assert model.net.mu.grad is None and scale.grad is None
