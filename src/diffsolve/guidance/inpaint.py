"""Inpainting (imputation) by replacement, and the exact answer on Gaussian mixtures.

:class:`Inpaint` wraps a Denoiser so that any solver samples x_u (the unknown coordinates)
alongside known coordinates y (Song et al. 2021, App. I.2; the replacement of RePaint without
its resampling): the network always sees the observed coordinates as a forward-noised copy of
the observation, α_t·y + σ_t·z. Replacement is an approximation: it uses the score of
p_t(x_u | x_o,t = α_t·y + σ_t·z) in place of ∇ log p_t(x_u | y) and is biased for correlated
data; the PC sampler's Langevin corrector (``solver="pc"``) moves x_u toward the conditional at
every noise level and removes most of the bias; high-dimensional conditionals need more
corrector steps (tests/test_inpaint.py; the figures in docs/stochastic.md).

The exact conditional law p(x_u | x_o = y) of a Gaussian mixture, which measures that bias, is
:func:`diffsolve.bench.gmm.gmm_conditional`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..denoiser import DenoiserWrapper, EvalPoint, Prediction
from ..noise import Noise, NoiseSource

__all__ = ["REPLACE_MODES", "Inpaint"]

REPLACE_MODES = ("fresh", "path")


class Inpaint(DenoiserWrapper):
    """Replacement inpainting as a Denoiser wrapper (works with every solver).

    At an evaluation at (α, σ) on the sample x (shape (B, ...)), with m the mask (1 = observed):

        x_in = (1 − m)·x + m·(α·y + σ·z)          (``replace="fresh"``: z ~ N(0, I) per call)
        x̂_0 = (1 − m)·D(x_in) + m·y,              ε̂ = (x − α·x̂_0)/σ.

    ``replace="fresh"`` is Song et al.'s replacement (their code overwrites the observed
    coordinates with a fresh forward-noised observation after every predictor and corrector
    update; here every network call sees one, which is the same input for the unknown
    coordinates). ``replace="path"`` feeds the sample's own observed coordinates instead: since
    x̂_0 = y there, every solver moves them exactly as the reverse process of the point mass y
    (so they are α·y + σ·(noise of the run) at every step; for DDIM the noise of x_T).
    The returned ε̂ refers to the solver's own x, so solver updates stay consistent; at the
    clean end the observed coordinates are exactly y. One network call per call (NFE as the
    wrapped model).

    Args:
        model: the Denoiser (or wrapper) to condition.
        y: the observation, broadcastable to x (values at unobserved positions are ignored).
        mask: 1/True where observed, broadcastable to x.
        replace: ``"fresh"`` (default) or ``"path"``.
        noise: the source of the fresh draws (:class:`~diffsolve.noise.Noise`); the k-th call
            of this wrapper draws ``noise.randn(x, k)``. Default: ``NoiseSource()``, seeded by
            one draw from torch's global RNG when the wrapper is built; a seeded source with
            ``offset=`` or ``NoiseSource.from_seeds`` makes them independent of the batch split.
    """

    def __init__(
        self,
        model: Any,
        y: Tensor,
        mask: Tensor,
        *,
        replace: str = "fresh",
        noise: Noise | None = None,
    ):
        super().__init__(model)
        if replace not in REPLACE_MODES:
            raise ValueError(f"unknown replace {replace!r}; valid: {', '.join(REPLACE_MODES)}")
        self.y = y
        self.mask = mask.to(torch.bool)
        self.replace = replace
        self.noise = noise if noise is not None else NoiseSource()
        self._calls = 0

    def __call__(self, x: Tensor, t: float | Tensor | EvalPoint, **cond: Any) -> Prediction:
        point = t if isinstance(t, EvalPoint) else self.point(t, x)
        a, s = point.alpha, point.sigma
        y = self.y.to(device=x.device, dtype=x.dtype)
        m = self.mask.to(x.device)
        if self.replace == "fresh":
            z = self.noise.randn(x, self._calls)
            self._calls += 1
            x_in = torch.where(m, a * y + s * z, x)
        else:
            x_in = x
        pred = self.model(x_in, point, **cond)
        x0 = torch.where(m, y.to(pred.x0.dtype), pred.x0)
        if self.replace == "fresh":
            # ε̂ of the unknown entries is the same relative to x and x_in; on the observed ones
            # keep the network's own (its magnitude sets the Langevin step size, as in Song et
            # al.'s code, where the network sees the replaced entries).
            return Prediction(x0, pred.eps)
        return Prediction(x0, (x.to(x0.dtype) - a * x0) / s)
