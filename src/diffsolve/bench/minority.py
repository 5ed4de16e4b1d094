"""Minority guidance on a 1-D mixture, exactly: the minority score l(x0) by Gauss–Hermite
quadrature, the top-quantile region {l ≥ q} as intervals, and the Bayes-exact noise-aware
classifier p(l(x0) ≥ q | x_t) (what a trained minority classifier approximates), so the
classifier form of :class:`~diffsolve.MinorityGuidance` is measured without training error.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch
from torch import Tensor

from ..processes.base import GaussianProcess
from .gmm import GaussianMixture

__all__ = ["MinorityCase", "log_density_1d", "t_of_alpha"]


def t_of_alpha(process: GaussianProcess, alpha: float) -> float:
    """The process time where α(t) = ``alpha`` (bisection on [t_min, t_max]; α decreasing)."""
    lo, hi = process.t_min, process.t_max
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(process.alpha(torch.tensor(mid, dtype=torch.float64))) > alpha:
            lo = mid
        else:
            hi = mid
    return lo


def log_density_1d(mix: GaussianMixture, x: Tensor) -> Tensor:
    """log p(x) of a 1-D diagonal mixture at x (B, 1) or (B,) → (B,)."""
    x = x.reshape(-1, 1).to(torch.float64)
    var = mix.eigvals[:, 0].to(torch.float64)[None]
    m = mix.means[:, 0].to(torch.float64)[None]
    lp = torch.log(mix.weights.to(torch.float64))[None] - 0.5 * (
        (x - m) ** 2 / var + torch.log(2 * math.pi * var)
    )
    return torch.logsumexp(lp, dim=1)


class MinorityCase:
    """A 1-D mixture, a process and a perturbation time t_p: the exact minority score, its
    data quantile q (top ``1 − quantile`` of the data are the minority class) and the exact
    classifier ``classifier(x_t, t_model) -> logits (B, 2)`` (class 1: l ≥ q).

    The classifier takes the network's time input and maps it back to process time through
    ``t_of_input`` (identity by default: processes whose model time is t)."""

    def __init__(
        self,
        mix: GaussianMixture,
        process: GaussianProcess,
        t_p: float,
        quantile: float = 0.9,
        *,
        nodes: int = 80,
        t_of_input=None,
    ):
        if mix.means.shape[1] != 1:
            raise ValueError("MinorityCase is 1-D")
        self.mix, self.process, self.t_p = mix, process, float(t_p)
        self.t_of_input = t_of_input or (lambda t: t)
        self._gh = np.polynomial.hermite_e.hermegauss(nodes)  # weight e^{-z²/2}
        self.denoiser = mix.denoiser(process)
        grid = torch.linspace(-8, 8, 16001, dtype=torch.float64)
        lg = self.score(grid)
        # the data quantile of l: the mixture's CDF weighted on the grid
        dens = log_density_1d(mix, grid).exp()
        cdf_w = dens / dens.sum()
        order = torch.argsort(lg)
        cum = torch.cumsum(cdf_w[order], 0)
        self.q = float(
            lg[order][int(torch.searchsorted(cum, torch.tensor(quantile, dtype=torch.float64)))]
        )
        inside = (lg >= self.q).numpy()
        edges = np.flatnonzero(np.diff(inside.astype(int))) + 1
        bounds = np.concatenate([[0], edges, [len(grid)]])
        g = grid.numpy()
        self.intervals = [
            (g[a] if a > 0 else -math.inf, g[b - 1] if b < len(grid) else math.inf)
            for a, b in pairwise(bounds)
            if inside[a]
        ]

    def score(self, x0: Tensor) -> Tensor:
        """l(x0) = E_ε (x0 − x̂0(α_p·x0 + σ_p·ε))², exact to quadrature; x0 (B,) or (B, 1)."""
        x0 = x0.reshape(-1, 1).to(torch.float64)
        z, w = (torch.as_tensor(v, dtype=torch.float64) for v in self._gh)
        w = w / w.sum()
        point = self.denoiser.point(self.t_p, x0)
        out = torch.zeros(x0.shape[0], dtype=torch.float64)
        for zi, wi in zip(z, w):
            d = x0 - self.denoiser(point.alpha * x0 + point.sigma * zi, point).x0
            out = out + wi * (d * d)[:, 0]
        return out

    def is_minority(self, x0: Tensor) -> Tensor:
        return self.score(x0) >= self.q

    def classifier(self, x: Tensor, t_in: Tensor) -> Tensor:
        """Exact logits of p(l(x0) ≥ q | x_t): Σ_k r_k(x_t)·P(x0 ∈ R | x_t, k), each component's
        posterior N(m', v') integrated over the intervals R (differentiable in x)."""
        t = self.t_of_input(t_in.to(torch.float64))
        a = self.process.alpha(t).to(x.dtype)[:, None]
        s = self.process.sigma(t).to(x.dtype)[:, None]
        m = self.mix.means[:, 0].to(x.dtype)[None]
        v = self.mix.eigvals[:, 0].to(x.dtype)[None]
        xt = x.reshape(-1, 1)
        tot = a * a * v + s * s
        logr = torch.log(self.mix.weights.to(x.dtype))[None] - 0.5 * (
            (xt - a * m) ** 2 / tot + torch.log(tot)
        )
        r = torch.softmax(logr, dim=1)
        mean = m + a * v * (xt - a * m) / tot
        sd = torch.sqrt(v * s * s / tot)
        p_in = torch.zeros_like(mean)
        for lo, hi in self.intervals:
            up = (
                torch.special.ndtr((hi - mean) / sd) if math.isfinite(hi) else torch.ones_like(mean)
            )
            dn = (
                torch.special.ndtr((lo - mean) / sd)
                if math.isfinite(lo)
                else torch.zeros_like(mean)
            )
            p_in = p_in + (up - dn)
        p = (r * p_in).sum(dim=1).clamp(1e-300, 1 - 1e-16)
        return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)
