"""Thresholding of x̂_0 as Denoiser wrappers (Saharia et al. 2022, "Imagen", §2.3).

A wrapper takes any model with the Denoiser interface (a :class:`~diffsolve.Denoiser`, a
:class:`~diffsolve.CFG`, another wrapper) and returns the same interface with x̂_0 replaced by
a thresholded x̂_0 and ε̂ recomputed from it, so that (x̂_0, ε̂) stay consistent with x:

    ε̂ = (x − α·x̂_0)/σ.

Every solver therefore sees the thresholded prediction whichever of the two it expands. No
network call is added: NFE counting is the wrapped model's.

Use thresholding only for pixel-space models whose data live in [−1, 1], never for latent models
(DPM-Solver++, Lu et al. 2022b, §6).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..denoiser import DenoiserWrapper, EvalPoint, Prediction

__all__ = ["DynamicThreshold", "StaticThreshold"]


class _Threshold(DenoiserWrapper):
    """The Denoiser interface around ``model``, with ``_clip(x̂_0)`` applied to every call."""

    def __call__(self, x: Tensor, t: float | Tensor | EvalPoint, **cond: Any) -> Prediction:
        point = t if isinstance(t, EvalPoint) else self.point(t, x)
        pred = self.model(x, point, **cond)
        x0 = self._clip(pred.x0)
        # ε̂ from the clipped x̂_0 and the x the solver holds (its compute dtype: pred's)
        eps = (x.to(x0.dtype) - point.alpha * x0) / point.sigma
        return Prediction(x0, eps)

    def _clip(self, x0: Tensor) -> Tensor:
        raise NotImplementedError


class StaticThreshold(_Threshold):
    """Static thresholding: x̂_0 ← clip(x̂_0, −max_val, max_val) (Ho et al. 2020's clipping).

    Args:
        model: a Denoiser or a wrapper of one (CFG, ...).
        max_val: the data range's bound (1 for images in [−1, 1]).
    """

    def __init__(self, model: Any, max_val: float = 1.0):
        if not max_val > 0:
            raise ValueError(f"StaticThreshold: max_val must be > 0, got {max_val!r}")
        super().__init__(model)
        self.max_val = float(max_val)

    def _clip(self, x0: Tensor) -> Tensor:
        return x0.clamp(-self.max_val, self.max_val)

    def __repr__(self) -> str:
        return f"StaticThreshold({self.model!r}, max_val={self.max_val})"


class DynamicThreshold(_Threshold):
    """Dynamic thresholding (Imagen, Saharia et al. 2022, §2.3), per sample b:

        s_b = min(max(quantile_p(|x̂_0[b]|), max_val), s_max),
        x̂_0[b] ← clip(x̂_0[b], −s_b, s_b)/s_b,

    the quantile taken over all of sample b's entries. With the defaults (p = 0.995,
    max_val = 1, s_max = ∞) this is the official DPM-Solver++ code's ``dynamic_thresholding_fn``
    (``thresholding_max_val``) and Imagen's rule.

    diffusers' ``thresholding=True`` uses s = clamp(quantile, 1, ``sample_max_value``): that is
    ``max_val=1, s_max=sample_max_value`` here. Note that diffusers' default
    ``sample_max_value=1.0`` pins s to 1, i.e. plain clipping to [−1, 1] (``StaticThreshold``),
    not the dynamic rule.

    Args:
        model: a Denoiser or a wrapper of one (CFG, ...).
        ratio: the quantile p in (0, 1].
        max_val: the floor of s (the data range's bound).
        s_max: the ceiling of s (default ∞: none).

    Shapes: x̂_0 (B, ...); s has one entry per sample, so a sample's result does not depend on
    the rest of the batch.
    """

    def __init__(
        self, model: Any, ratio: float = 0.995, max_val: float = 1.0, s_max: float = math.inf
    ):
        if not 0 < ratio <= 1:
            raise ValueError(f"DynamicThreshold: ratio must lie in (0, 1], got {ratio!r}")
        if not 0 < max_val <= s_max:
            raise ValueError(
                f"DynamicThreshold: need 0 < max_val <= s_max, got {max_val!r}, {s_max!r}"
            )
        super().__init__(model)
        self.ratio, self.max_val, self.s_max = float(ratio), float(max_val), float(s_max)

    def _clip(self, x0: Tensor) -> Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs(), self.ratio, dim=1).clamp(self.max_val, self.s_max)
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.minimum(torch.maximum(x0, -s), s) / s

    def __repr__(self) -> str:
        return (
            f"DynamicThreshold({self.model!r}, ratio={self.ratio}, max_val={self.max_val}, "
            f"s_max={self.s_max})"
        )
