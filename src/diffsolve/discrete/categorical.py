"""Categorical sampling by the exponential race, in float64 (default) or float32.

Gumbel-max in its exponential-race form (Zheng et al. 2024, §4; the MDLM code's sampler):
with E_i = −log u_i, u_i ~ U(0, 1) i.i.d., argmax_i p_i / E_i is distributed as Categorical(p),
because E_i / p_i ~ Exp(p_i) and the smallest of independent exponentials is i with probability
p_i / Σp.

The identity needs u to be continuous. ``torch.rand`` in float32 lies on a 2^-24 grid, so
E = −log u is never below −log(1 − 2^-24) ≈ 5.96e-8 and is coarsely discretised near 0: a category
whose p_i is below ~6e-8 × p_j / E_j can never win against a dominant j. In a masked-diffusion
step the dominant entry is "stay masked" (mass 1 − δ, δ ≈ 1/steps), so rare tokens are cut off
and the entropy of the generated tokens falls — Zheng et al.'s finding that float32 sampling
lowers the effective temperature. float64 (the default here) puts u on a 2^-53 grid and removes
the effect at any realistic step count; ``dtype=torch.float32`` reproduces it on purpose.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["categorical"]


def categorical(
    probs: Tensor,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    u: Tensor | None = None,
) -> Tensor:
    """One draw per row of ``probs`` (..., K) (non-negative, not necessarily normalised).

    Returns a long tensor of shape ``probs.shape[:-1]``: argmax_i p_i / E_i, E_i = −log u_i,
    computed in ``dtype`` (float64: exact to 2^-53; float32: the truncated race described in the
    module docstring). ``u`` (same shape as ``probs``, in (0, 1)) supplies the uniforms instead
    of drawing them (quasi-random or common-random-number use). A row of zeros returns index 0;
    callers keep at least one positive entry.
    """
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"categorical sampling dtype must be float64 or float32, got {dtype}")
    p = probs.to(dtype)
    if u is None:
        u = torch.rand(p.shape, generator=generator, dtype=dtype, device=p.device)
    elif u.shape != p.shape:
        raise ValueError(f"u has shape {tuple(u.shape)}, probs have {tuple(p.shape)}")
    else:
        u = u.to(dtype)
    # u = 0 gives E = inf and ratio 0: that category simply loses this race
    e = -torch.log(u)
    return torch.argmax(p / e, dim=-1)
