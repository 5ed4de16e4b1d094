"""Gradients through sampling: the adjoint of the probability-flow ODE (AdjointDPM, Pan et al.,
ICLR 2024, §3, eqs. 7–10) and noise optimisation with it (DITTO, Novack et al. 2024).

``ds.sample(..., grad="adjoint")`` returns x0 from the ordinary (no-graph) sampling loop; its
backward pass solves the adjoint ODE from the data end back to the noise end, recomputing the
trajectory on the way, so the memory held between the passes is one state (the last evaluated
x), whatever the number of steps, and the backward pass holds one network graph at a time. On
the PF-ODE in the process time, dx/dt = f(x, t) = α'·x̂0 + σ'·ε̂ (valid on every Gaussian path,
flow matching's t = 1 included), for a loss L(x0):

    a = ∂L/∂x_t:       da/dt = −aᵀ·∂f/∂x,
    ∂L/∂θ, ∂L/∂c:     −∫_{t_K}^{t_max} aᵀ·∂f/∂(θ, c) dt,

integrated together with x from the last evaluated time t_K up to t_max by Heun's rule (second
order; two network calls with a vector–Jacobian product per interval, ``substeps`` intervals per
grid interval of the forward run). The forward run's last step (x̂0 at t_K, the ``standard`` end)
is differentiated exactly. The paper writes the same flow in DDIM's variables y = x/α, ρ = σ/α
(dy/dρ = ε̂); in those variables the adjoint grows like 1/ρ at high noise and the ρ-grid is
coarse there; an exponential-weight form exact in the stiff low-noise limit, tried while
writing this, was worse on smooth data (Gaussian, VP, NFE 20: 4.9e-2 against the t-form's
2.3e-3, though better on gmm2d's median, 4.8e-2 against 8.8e-2): the t-form is kept.

The gradient is the exact flow map's, to the backward solver's accuracy on that grid (not the
discrete sampler's own Jacobian: ``grad="backprop"`` differentiates through the steps instead,
with memory growing with the steps). Gaussian data at NFE 20: relative error 2.3e-3 (VP),
1.5e-2 (flow), 4.5e-2 (EDM, 1.1e-2 with 2 substeps) against backprop's 1.4e-2 / 2.7e-2 / 1.7e-2.
The recomputed trajectory drifts where the forward flow contracts strongly (thin mixture
components), where a few samples' gradients are off by tens of % at NFE ≤ 20 — as are
backprop's (docs/steering.md). Gradients reach x_T, floating-point conditioning tensors that
require grad, and the network's parameters that require grad.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from .denoiser import DenoiserWrapper

__all__ = ["Adjoint", "adjoint_sample", "network_parameters", "optimize_noise"]


@dataclass(frozen=True)
class Adjoint:
    """``ds.sample(..., grad=ds.Adjoint(...))``: the adjoint backward pass with options
    (``grad="adjoint"`` is ``Adjoint()``).

    Args:
        substeps: Heun sub-intervals per forward grid interval in the backward solve (each
            costs two network calls with a vector–Jacobian product); the gradient's error falls
            as substeps⁻² (second order).
        params: the tensors to differentiate besides x_T and conditioning tensors; default
            None: the parameters requiring grad of the network under the model.
    """

    substeps: int = 1
    params: tuple[Tensor, ...] | None = None

    def __post_init__(self) -> None:
        n = self.substeps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Adjoint: substeps must be an int >= 1, got {n!r}")
        if self.params is not None:
            object.__setattr__(self, "params", tuple(self.params))


def network_parameters(model: Any) -> list[Tensor]:
    """The parameters requiring grad of the network under ``model``'s wrappers (an
    ``nn.Module`` ``net`` of the innermost Denoiser), or [] when it has none."""
    inner = model
    while isinstance(inner, DenoiserWrapper):
        inner = inner.model
    net = getattr(inner, "net", None)
    if isinstance(net, nn.Module):
        return [p for p in net.parameters() if p.requires_grad]
    return []


class _Backward:
    """The augmented backward solve (see the module docstring) for one forward run."""

    def __init__(self, model: Any, cond: Mapping[str, Any], times: Tensor, substeps: int = 1):
        self.model, self.cond, self.substeps = model, dict(cond), substeps
        self.proc = model.process
        self.times = times

    def _vjp(
        self, x: Tensor, w: Tensor, t: float, leaves: list[Tensor], keys: list[str], out: str
    ) -> tuple[Tensor, Tensor, tuple]:
        """One network call with a graph at (x, t), freed on return: the field ``out`` (ε̂, or
        the velocity α'·x̂0 + σ'·ε̂) and its vector–Jacobian products with w, with respect to x
        and to the leaves (conditioning tensors, then parameters)."""
        t64 = torch.tensor(t, dtype=torch.float64)
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            local = [v.detach().requires_grad_(True) for v in leaves[: len(keys)]]
            cond = dict(self.cond)
            cond.update(zip(keys, local))
            pred = self.model(xx, self.model.point(t, xx), **cond)
            if out == "eps":
                f = pred.eps
            elif out == "x0":
                f = pred.x0
            else:
                da, ds_ = float(self.proc.d_alpha(t64)), float(self.proc.d_sigma(t64))
                f = da * pred.x0 + ds_ * pred.eps
            grads = torch.autograd.grad(
                f, [xx, *local, *leaves[len(keys) :]], grad_outputs=w.to(f.dtype),
                allow_unused=True,
            )  # fmt: skip
        return f.detach(), grads[0], grads[1:]

    def _heun_step(self, x, a_x, t, s, leaves, keys, add):
        """Grid time t → s in the process time on dx/dt = α'·x̂0 + σ'·ε̂ (where α_s = 0: a
        flow's noise end, ρ = ∞), Heun's rule on (x, a_x)."""
        h = s - t
        f1, v1, p1 = self._vjp(x, a_x, t, leaves, keys, "velocity")
        f2, v2, p2 = self._vjp(x + h * f1, a_x - h * v1, s, leaves, keys, "velocity")
        add(p1, -0.5 * h)
        add(p2, -0.5 * h)
        return x + (0.5 * h) * (f1 + f2), a_x - (0.5 * h) * (v1 + v2)

    def run(
        self, x_last: Tensor, g: Tensor, clean_end: bool, leaves: list[Tensor], keys: list[str]
    ) -> tuple[Tensor, list[Tensor | None]]:
        """∂L/∂x_T and the leaves' gradients for the cotangent g of x0, from the forward run's x
        at its last evaluated time (the trajectory before it is recomputed)."""
        ts = self.times.tolist()
        acc: list[Tensor | None] = [None] * len(leaves)

        def add(gs: tuple, w: float) -> None:
            for j, v in enumerate(gs):
                if v is not None:
                    acc[j] = w * v if acc[j] is None else acc[j] + w * v

        k = len(ts) - 2 if clean_end else len(ts) - 1
        x = x_last
        a_x = g
        if clean_end:  # x0 = x̂0(x_K, t_K): its exact vector–Jacobian product
            _, a_x, gl = self._vjp(x, g, ts[k], leaves, keys, "x0")
            add(gl, 1.0)
        for j in range(k, 0, -1):  # toward the noise end: grid point j → j − 1
            sub = torch.linspace(ts[j], ts[j - 1], self.substeps + 1, dtype=torch.float64).tolist()
            for u0, u1 in pairwise(sub):
                x, a_x = self._heun_step(x, a_x, u0, u1, leaves, keys, add)
        return a_x, acc


class _AdjointFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_T: Tensor, spec: dict, *leaves: Tensor) -> Tensor:  # type: ignore[override]
        ctx.spec = spec
        with torch.no_grad():
            out, x_last = spec["forward"](x_T.detach())
        ctx.save_for_backward(x_last)
        ctx.n_leaves = len(leaves)
        ctx.leaves = leaves
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x_last,) = ctx.saved_tensors
        spec = ctx.spec
        bw: _Backward = spec["backward"]
        grad_x, acc = bw.run(x_last, g, spec["clean_end"], list(ctx.leaves), spec["keys"])
        out = [None if v is None else v.to(leaf.dtype) for v, leaf in zip(acc, ctx.leaves)]
        return (grad_x.to(g.dtype), None, *out)


def adjoint_sample(
    sample_fn: Callable[..., Any],
    model: Any,
    x: Tensor,
    cond: Mapping[str, Any],
    plan_times: Tensor,
    clean_end: bool,
    options: Adjoint,
) -> Tensor:
    """x0 = ``sample_fn(x_T)`` with the adjoint backward pass (called by ``ds.sample`` for
    ``grad="adjoint"``; see the module docstring). ``sample_fn(x_T, callback)`` runs the
    ordinary loop; ``plan_times`` is its grid (float64, decreasing)."""
    steps = plan_times.numel() - 1
    keys = [
        k for k, v in cond.items()
        if isinstance(v, Tensor) and v.is_floating_point() and v.requires_grad
    ]  # fmt: skip
    params = options.params
    leaves = [cond[k] for k in keys] + list(network_parameters(model) if params is None else params)
    stop = steps - 2 if clean_end else steps - 1  # the step whose output is x at last_t

    def forward(x_T: Tensor) -> tuple[Tensor, Tensor]:
        kept = [x_T]  # x at the last evaluated time (x_T itself for a one-step run)

        def grab(i: int, xi: Tensor, state: Any) -> None:
            if i == stop:
                kept[0] = xi.detach().clone()

        out = sample_fn(x_T, grab)
        return out, kept[0]

    spec = {
        "forward": forward,
        "backward": _Backward(model, cond, plan_times, options.substeps),
        "clean_end": clean_end,
        "keys": keys,
    }
    return _AdjointFn.apply(x, spec, *leaves)


def optimize_noise(
    model: Any,
    x_T: Tensor,
    reward: Callable[[Tensor], Tensor],
    *,
    steps: int = 20,
    lr: float = 0.05,
    solver: str = "dpmpp_2m",
    nfe: int = 10,
    grad: str = "adjoint",
    regularizer: str | None = "norm",
    weight: float = 1.0,
    cond: Mapping[str, Any] | None = None,
    **sample_options: Any,
) -> tuple[Tensor, list[float]]:
    """Optimise the initial noise x_T so that the sample's reward rises (DITTO's noise
    optimisation, Novack et al. 2024, §3; gradients from :mod:`diffsolve.adjoint`).

    Adam maximises mean reward(sample(x_T)) − weight·R(x_T) over ``steps`` iterations, with R:

    * ``"norm"`` (default): no penalty; after each update every sample is rescaled to its
      starting norm (a Gaussian x_T lives near the sphere of radius σ_T·√D, where the network
      was trained);
    * ``"prior"``: R = ‖x_T‖²/(2σ_T²·D) per sample, the prior's negative log-density per
      dimension (weight 1: the log of the prior, against the reward);
    * None: unconstrained.

    Args:
        model: a Denoiser (or wrapper); x_T: (B, ...) starting noise (not modified).
        reward: differentiable ``reward(x0) -> (B,)``.
        steps, lr: Adam iterations and step size. solver, nfe, grad, **sample_options: the
            sampler that is differentiated (``grad="adjoint"`` or ``"backprop"``).
    Returns:
        (optimised x_T detached, the mean reward before each update and after the last).
    """
    if regularizer not in ("norm", "prior", None):
        raise ValueError(f"regularizer must be 'norm', 'prior' or None, got {regularizer!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    from .sample import sample

    cond = dict(cond or {})
    prior_std = float(model.process.prior_std())
    d = math.prod(x_T.shape[1:])
    z = x_T.detach().clone().requires_grad_(True)
    radius = x_T.detach().reshape(x_T.shape[0], -1).norm(dim=1)
    opt = torch.optim.Adam([z], lr=lr)
    curve: list[float] = []

    def objective() -> tuple[Tensor, Tensor]:
        x0 = sample(model, z, solver, nfe, cond=cond, grad=grad, **sample_options)
        assert isinstance(x0, Tensor)  # return_info is not passed
        r = reward(x0)
        if not isinstance(r, Tensor) or r.shape != (x_T.shape[0],):
            got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ValueError(
                f"optimize_noise: reward must return shape ({x_T.shape[0]},), got {got}"
            )
        if not bool(torch.isfinite(r).all()):
            raise ValueError("optimize_noise: the reward is NaN/Inf")
        return r, x0

    for _ in range(steps):
        opt.zero_grad()
        r, _ = objective()
        curve.append(float(r.detach().mean()))
        loss = -r.sum()
        if regularizer == "prior":
            loss = loss + weight * (z.reshape(z.shape[0], -1) ** 2).sum() / (2 * prior_std**2 * d)
        # x_T's gradient only: the network's and the reward's weights (a user's models usually
        # require grad) get none accumulated
        (z.grad,) = torch.autograd.grad(loss, [z])
        opt.step()
        if regularizer == "norm":
            with torch.no_grad():
                n = z.reshape(z.shape[0], -1).norm(dim=1).clamp_min(1e-30)
                z.mul_((radius / n).reshape(-1, *([1] * (z.ndim - 1))))
    with torch.no_grad():
        r, _ = objective()
    curve.append(float(r.mean()))
    return z.detach(), curve
