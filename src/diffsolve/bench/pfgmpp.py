"""The exact PFGM++ denoiser of a finite data set: an analytic model for finite D.

For the empirical distribution of K points y_i ∈ R^N under PFGM++'s kernel at r = σ·sqrt(D)
(:class:`~diffsolve.processes.PFGMPP`), p_r(x | y) ∝ (‖x − y‖² + r²)^{−(N+D)/2}, the posterior
mean is

    D(x; σ) = Σ_i w_i·y_i,    w_i ∝ (‖x − y_i‖² + σ²·D)^{−(N+D)/2},

the denoiser of a network trained with that kernel on these points (Xu et al. 2023). It plays
the role that :class:`~diffsolve.bench.digits.FiniteData` plays on a Gaussian path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..processes.pfgmpp import PFGMPP

__all__ = ["exact_points_denoiser"]


def exact_points_denoiser(process: PFGMPP, points: Tensor) -> Denoiser:
    """The exact PFGM++ denoiser of ``points`` (K, *shape) on ``process`` (module docstring):
    an x0 prediction computed in float64, the network receiving σ."""
    pts = points.to(torch.float64)
    n = pts[0].numel()
    flat = pts.reshape(pts.shape[0], -1)
    expo = -(n + process.D) / 2

    def net(x: Tensor, t_in: Tensor) -> Tensor:
        sig = float(t_in.reshape(-1)[0])
        xf = x.to(torch.float64).reshape(x.shape[0], -1)
        d2 = torch.cdist(xf, flat) ** 2
        w = torch.softmax(expo * torch.log(d2 + sig * sig * process.D), dim=1)
        return (w @ flat).reshape(x.shape).to(x.dtype)

    return Denoiser(net, process, "x0", sample_shape=tuple(points.shape[1:]))
