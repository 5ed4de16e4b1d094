"""Minority guidance (Um et al., "Don't play favorites: minority guidance for diffusion models",
ICLR 2024, §3) and its classifier-free form (Um & Ye, "Self-guided generation of minority
samples", 2024).

The minority score of a clean sample is how badly Tweedie's formula reconstructs it from one
fixed noise level t_p (their eq. 6, with the squared error for LPIPS):

    l(x0) = E_ε ‖x0 − x̂0(α_p·x0 + σ_p·ε, t_p)‖².

Samples the model reconstructs poorly are the ones it has seen little of. With a noise-aware
classifier p_ψ(c | x_t) trained on minority-score classes (quantile bins of l on the data),
guidance toward the top class c* replaces the score s by s + w·∇log p_ψ(c* | x_t) (eq. 8), i.e.
classifier guidance toward c*. Without a classifier, the gradient of the minority score of the
current Tweedie estimate is the guidance (the self-guided form):

    s ← s + w·∇_{x_t} l(x̂0(x_t)),  so  x̂0 ← x̂0 + w·(σ²/α)·∇l,  ε̂ ← ε̂ − w·σ·∇l.

"Minority" means hard to reconstruct at t_p: a rare class only when t_p is noisy enough that
the rare mode's samples are pulled toward the majority (α_p ≈ 0.5 on a well-separated mixture);
at the official α_p ≈ 0.96 it is the tails of every mode instead (extras §6, measured).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..denoiser import DenoiserWrapper, EvalPoint, Prediction
from ..noise import NoiseSource
from .classifier import ClassifierGuidance

__all__ = ["MinorityGuidance", "minority_classes", "minority_score"]


def _reconstruction_loss(
    model: Any, x0: Tensor, t_p: float, noise: Tensor, cond: dict[str, Any]
) -> Tensor:
    """(B,) mean over the n draws in ``noise`` (n, B, ...) of ‖x0 − x̂0(α_p·x0 + σ_p·ε)‖²."""
    point = model.point(t_p, x0)
    total = x0.new_zeros(x0.shape[0])
    for eps in noise:
        x_p = point.alpha * x0 + point.sigma * eps
        d = x0 - model(x_p, point, **cond).x0
        total = total + (d * d).reshape(x0.shape[0], -1).sum(dim=1)
    return total / noise.shape[0]


def minority_score(
    model: Any,
    x0: Tensor,
    t_p: float,
    n_iter: int = 5,
    *,
    seed: int = 0,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """The minority score l(x0) (module docstring) of clean samples x0 (B, ...) → (B,), with
    ``n_iter`` noise draws (the official default 5) from a counter-based source (``seed``)."""
    src = NoiseSource(seed)
    noise = torch.stack([src.randn(x0, 0, k) for k in range(n_iter)])
    with torch.no_grad():
        return _reconstruction_loss(model, x0, t_p, noise, dict(cond or {}))


def minority_classes(scores: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """Quantile bins of minority scores (the official labels): (labels (B,) in 0…classes−1,
    the classes−1 inner edges). Class classes−1 holds the top 1/classes of the data."""
    if classes < 2:
        raise ValueError(f"classes must be >= 2, got {classes}")
    q = torch.linspace(0, 1, classes + 1, dtype=torch.float64)[1:-1]
    edges = torch.quantile(scores.to(torch.float64), q)
    return torch.bucketize(scores.to(torch.float64), edges, right=True), edges


class MinorityGuidance(DenoiserWrapper):
    """Minority guidance as a Denoiser wrapper (see the module docstring for the rules).

    Args:
        model: a Denoiser or a wrapper of one (differentiable for the self-guided form).
        scale: guidance weight w (0: the model unchanged).
        t_p: the perturbation time (process time) of the minority score.
        classifier: optional ``classifier(x_t, t_model) -> logits (B, C)`` trained on
            :func:`minority_classes` labels of noised data; with it the guidance is classifier
            guidance toward ``target`` (default C − 1, the most unique class).
        target: the minority class for the classifier form.
        n_iter: noise draws averaged in the self-guided score (fixed per step: a seed, not
            fresh noise, so the guided field is a deterministic function of (x_t, t)).
        seed: the draws' counter-based seed.

    Cost per call (self-guided): one network call with a graph for x̂0, ``n_iter`` more for the
    score at t_p, and one backward pass through them; NFE counts the guided calls only.
    Shapes: x (B, ...).
    """

    def __init__(
        self,
        model: Any,
        scale: float,
        *,
        t_p: float,
        classifier: Callable[[Tensor, Tensor], Tensor] | None = None,
        target: int | None = None,
        n_iter: int = 1,
        seed: int = 0,
    ):
        super().__init__(model)
        proc = model.process
        if not proc.t_min <= t_p <= proc.t_max:
            raise ValueError(f"t_p={t_p} outside the process's [{proc.t_min}, {proc.t_max}]")
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        self.scale, self.t_p, self.n_iter, self.seed = float(scale), float(t_p), n_iter, seed
        self.classifier = classifier
        self.target = target
        self._cg = None
        if classifier is not None:
            self._cg = _TopClassGuidance(model, classifier, self.scale, target)

    def minority_grad(self, x: Tensor, point: EvalPoint, cond: dict[str, Any]) -> Tensor:
        """∇_{x_t} l(x̂0(x_t)) at x, shape of x."""
        src = NoiseSource(self.seed)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = self.model(xg, point, **cond).x0
            noise = torch.stack([src.randn(x0, 0, k) for k in range(self.n_iter)])
            loss = _reconstruction_loss(self.model, x0, self.t_p, noise, cond).sum()
            (grad,) = torch.autograd.grad(loss, xg)
        return grad

    def __call__(self, x: Tensor, t: float | Tensor | EvalPoint, **cond: Any) -> Prediction:
        point = t if isinstance(t, EvalPoint) else self.point(t, x)
        if self._cg is not None:
            return self._cg(x, point, **cond)
        pred = self.model(x, point, **cond)
        if self.scale == 0.0:
            return pred
        grad = self.minority_grad(x, point, cond).to(pred.x0.dtype)
        w, a, s = self.scale, point.alpha, point.sigma
        return Prediction(pred.x0 + (w * s * s / a) * grad, pred.eps - (w * s) * grad)

    def __repr__(self) -> str:
        kind = "classifier" if self.classifier is not None else "self-guided"
        return f"MinorityGuidance({self.model!r}, scale={self.scale}, t_p={self.t_p}, {kind})"


class _TopClassGuidance(ClassifierGuidance):
    """Classifier guidance toward the top minority class (C − 1 unless a target is given)."""

    def __init__(self, model: Any, classifier: Any, scale: float, target: int | None):
        super().__init__(model, classifier, scale, label=0 if target is None else target)
        self._top = target is None

    def log_prob_grad(self, x: Tensor, point: EvalPoint) -> Tensor:
        if self._top:
            with torch.no_grad():
                c = self.classifier(x[:1], point.t_in[:1]).shape[-1]
            self.label = c - 1
        return super().log_prob_grad(x, point)
