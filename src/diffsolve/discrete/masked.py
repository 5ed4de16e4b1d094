"""Masked (absorbing-state) discrete diffusion: the model wrapper and its masking schedules.

Forward process (Austin et al. 2021, D3PM absorbing; Sahoo et al. 2024, MDLM; Shi et al. 2024,
MD4): each of the L tokens is replaced by the mask id independently, a token being masked at time
t with probability κ(t), κ increasing from κ(0) = 0 (data) to κ(1) = 1 (all masked). A masked
token's reverse-time unmasking rate is κ'(t)/κ(t), and the token it becomes is drawn from the
clean-token posterior p(x_0^i | x_t), which the network predicts as logits.

Schedules κ(t): ``linear`` κ = t (MDLM's log-linear α_t = 1 − t), ``cosine`` κ = 1 − cos(πt/2)
(MaskGIT / MD4), ``power`` κ = t^p. A schedule object with ``kappa``, ``dkappa`` and ``inverse``
can be passed instead of a name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Cosine", "Linear", "MaskSchedule", "MaskedDiffusion", "Power", "mask_schedules"]


class MaskSchedule:
    """κ(t): the probability that a token is masked at time t ∈ [0, 1]; float64 tensors."""

    name = "schedule"

    def kappa(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def dkappa(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, k: Tensor) -> Tensor:
        """t with κ(t) = k."""
        raise NotImplementedError


@dataclass(frozen=True)
class Linear(MaskSchedule):
    """κ(t) = t."""

    name = "linear"

    def kappa(self, t: Tensor) -> Tensor:
        return t

    def dkappa(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def inverse(self, k: Tensor) -> Tensor:
        return k


@dataclass(frozen=True)
class Cosine(MaskSchedule):
    """κ(t) = 1 − cos(πt/2)."""

    name = "cosine"

    def kappa(self, t: Tensor) -> Tensor:
        return 1.0 - torch.cos(0.5 * math.pi * t)

    def dkappa(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def inverse(self, k: Tensor) -> Tensor:
        return torch.arccos((1.0 - k).clamp(-1.0, 1.0)) * (2.0 / math.pi)


@dataclass(frozen=True)
class Power(MaskSchedule):
    """κ(t) = t^p, p > 0."""

    p: float = 2.0
    name = "power"

    def __post_init__(self) -> None:
        if not self.p > 0:
            raise ValueError(f"Power schedule exponent must be > 0, got {self.p}")

    def kappa(self, t: Tensor) -> Tensor:
        return t**self.p

    def dkappa(self, t: Tensor) -> Tensor:
        return self.p * t ** (self.p - 1.0)

    def inverse(self, k: Tensor) -> Tensor:
        return k ** (1.0 / self.p)


_SCHEDULES = {"linear": Linear, "cosine": Cosine, "power": Power}


def mask_schedules() -> dict[str, str]:
    """Masking-schedule names with their κ(t)."""
    return {"linear": "κ(t) = t", "cosine": "κ(t) = 1 − cos(πt/2)", "power": "κ(t) = t^p (p=2)"}


class MaskedDiffusion:
    """A masked-diffusion model: ``net(tokens, t) -> logits`` plus its vocabulary and schedule.

    Args:
        net: callable, tokens (B, L) long with values in 0…V−1 or ``mask_id`` and t (B,) float
            → clean-token logits (B, L, V). Only masked positions' logits are used.
        vocab_size: V, the number of clean tokens.
        mask_id: the mask token id (default V); it must lie outside the vocabulary 0…V−1.
        schedule: ``"linear"``, ``"cosine"``, ``"power"`` or a :class:`MaskSchedule`.

    Counts its network calls in ``nfe``.
    """

    def __init__(
        self,
        net: nn.Module | object,
        vocab_size: int,
        mask_id: int | None = None,
        schedule: str | MaskSchedule = "linear",
    ) -> None:
        if not callable(net):
            raise ValueError("net must be callable: net(tokens (B, L), t (B,)) -> (B, L, V)")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        mask_id = vocab_size if mask_id is None else mask_id
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
            raise ValueError(f"mask_id must be a non-negative int, got {mask_id!r}")
        if mask_id < vocab_size:
            raise ValueError(
                f"mask_id {mask_id} lies inside the vocabulary 0…{vocab_size - 1}: a masked "
                f"token would be indistinguishable from a clean one (use mask_id={vocab_size})"
            )
        if isinstance(schedule, str):
            if schedule not in _SCHEDULES:
                raise ValueError(
                    f"unknown masking schedule {schedule!r}; valid: {', '.join(_SCHEDULES)}"
                )
            schedule = _SCHEDULES[schedule]()
        elif not isinstance(schedule, MaskSchedule):
            raise ValueError(f"schedule must be a name or a MaskSchedule, got {schedule!r}")
        self.net: Callable[[Tensor, Tensor], object] = net
        self.vocab_size: int = vocab_size
        self.mask_id: int = mask_id
        self.schedule: MaskSchedule = schedule
        self.nfe: int = 0

    def check_tokens(self, tokens: Tensor) -> None:
        """Raise ValueError naming the first (sample, position) whose value is neither a clean
        token 0…V−1 nor the mask id."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise ValueError(f"tokens must be integer (long), got dtype {tokens.dtype}")
        bad = ((tokens < 0) | (tokens >= self.vocab_size)) & (tokens != self.mask_id)
        if bool(bad.any()):
            b, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"token {int(tokens[b, i])} at sample {b}, position {i} is out of range: "
                f"clean tokens are 0…{self.vocab_size - 1}, the mask is {self.mask_id}"
            )

    def logits(self, tokens: Tensor, t: Tensor, step: int | None = None) -> Tensor:
        """The network's clean-token logits (B, L, V) at ``tokens`` (B, L) and t (B,); one NFE.

        The shape is checked here (no host sync); NaN checks happen once after the sampling
        loop (``sample_masked``), naming the step and position.
        """
        out = self.net(tokens, t.to(torch.float32))
        want = (tokens.shape[0], tokens.shape[1], self.vocab_size)
        if not isinstance(out, Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            at = f" at step {step}" if step is not None else ""
            raise ValueError(f"the network returned logits of shape {got}{at}, expected {want}")
        self.nfe += 1
        return out

    def __repr__(self) -> str:
        return (
            f"MaskedDiffusion(vocab_size={self.vocab_size}, mask_id={self.mask_id}, "
            f"schedule={self.schedule.name!r})"
        )
