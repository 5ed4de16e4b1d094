"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion models beat GANs", Alg. 2, eq. 14).

With a noise-conditional classifier p_φ(y | x_t), the guided noise prediction is

    ε̂_g = ε̂ − w·σ_t·∇_x log p_φ(y | x_t),
    x̂_0,g = (x − σ_t·ε̂_g)/α_t = x̂_0 + w·(σ_t²/α_t)·∇_x log p_φ(y | x_t),

i.e. the score ∇log p_t(x) = −ε̂/σ_t is replaced by ∇log p_t(x) + w·∇log p_φ(y | x). With w = 1
and the exact posterior p(y | x_t), this is the exact score of the conditional p_t(x | y)
(Bayes: ∇log p(x | y) = ∇log p(x) + ∇log p(y | x)), so every solver samples the conditional.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..denoiser import DenoiserWrapper, EvalPoint, Prediction

__all__ = ["ClassifierGuidance"]


class ClassifierGuidance(DenoiserWrapper):
    """Classifier guidance as a Denoiser wrapper (see the module docstring for the rule).

    Args:
        model: a Denoiser or a wrapper of one.
        classifier: ``classifier(x_t, t_model) -> logits`` of shape (B, K), noise-conditional,
            with the same time input as the network (``EvalPoint.t_in``: the process's model
            time, e.g. the DDPM step index 0…999 for ``VPDiscrete``).
        scale: guidance weight w (0: no guidance; 1: the Bayes-exact conditional score).
        label: target class y, an int or a (B,) integer tensor.

    The gradient ∇_x log softmax(logits)[y] is taken by autograd inside the call, so callers
    may run under ``torch.no_grad()``; the wrapped model's prediction itself is computed without
    a graph. Each call costs one network call (one NFE, counted by the wrapped model) plus one
    classifier forward and backward (not counted as NFE). Shapes: x (B, ...), logits (B, K).
    """

    def __init__(
        self,
        model: Any,
        classifier: Callable[[Tensor, Tensor], Tensor],
        scale: float,
        label: int | Tensor,
    ):
        super().__init__(model)
        self.classifier = classifier
        self.scale = float(scale)
        self.label = label

    def log_prob_grad(self, x: Tensor, point: EvalPoint) -> Tensor:
        """∇_x log p_φ(y | x_t) at x, shape of x."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.classifier(xg, point.t_in)
            y = torch.as_tensor(self.label, device=logits.device).long().reshape(-1)
            y = y.expand(logits.shape[0]) if y.numel() == 1 else y
            logp = torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).sum()
            (grad,) = torch.autograd.grad(logp, xg)
        return grad

    def __call__(self, x: Tensor, t: float | Tensor | EvalPoint, **cond: Any) -> Prediction:
        point = t if isinstance(t, EvalPoint) else self.point(t, x)
        pred = self.model(x, point, **cond)
        if self.scale == 0.0:
            return pred
        grad = self.log_prob_grad(x, point).to(pred.x0.dtype)
        w, a, s = self.scale, point.alpha, point.sigma
        return Prediction(pred.x0 + (w * s * s / a) * grad, pred.eps - (w * s) * grad)

    def __repr__(self) -> str:
        return f"ClassifierGuidance({self.model!r}, scale={self.scale}, label={self.label!r})"
