"""Differentiable linear combinations Σ_j c_j·v_j with scalar tensor coefficients.

Tuning differentiates a sampler in its times and weights: every update and every prediction
conversion is such a combination, with 0-dim coefficients in the graph and sample-sized terms.
Autograd's own ``c * v`` writes a full-size product per term in the backward pass only to sum
it into c's gradient; here that gradient is a dot product ⟨g, v_j⟩ (no new sample-sized
tensor), and the forward pass fills one output buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["combination"]


class _Combination(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, coef: Tensor, *terms: Tensor) -> Tensor:
        ctx.save_for_backward(coef, *terms)
        dtype = terms[0].dtype
        for v in terms[1:]:
            dtype = torch.promote_types(dtype, v.dtype)
        c = coef.to(dtype)
        out = terms[0].to(dtype) * c[0]
        for j in range(1, len(terms)):
            out.addcmul_(terms[j], c[j])
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        coef, *terms = ctx.saved_tensors
        grad_coef = None
        if ctx.needs_input_grad[0]:
            flat = g.reshape(-1)
            dots = [torch.dot(flat, v.reshape(-1).to(g.dtype)) for v in terms]
            grad_coef = torch.stack(dots).to(coef.dtype)
        c = coef.to(g.dtype)
        grads = [g * c[j] if ctx.needs_input_grad[j + 1] else None for j in range(len(terms))]
        return (grad_coef, *grads)


def combination(coef: Tensor, terms: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Σ_j coef[j]·terms[j], differentiable in both.

    Args:
        coef: (k,) coefficients (any float dtype; cast to the terms' dtype).
        terms: k tensors of one shape and device.

    Returns:
        A new tensor shaped like the terms, in their promoted dtype.
    """
    if coef.ndim != 1 or coef.numel() != len(terms) or not terms:
        raise ValueError(f"combination: {coef.numel()} coefficients for {len(terms)} terms")
    return _Combination.apply(coef, *terms)  # type: ignore[no-any-return]
