"""Samplers for masked diffusion: first-hitting (exact), MDLM ancestral, τ-leaping.

All three start from the fully masked sequence at t = 1 (or from given ``tokens``, whose masked
positions are generated and whose clean ones are kept) and end at t = 0 with no mask left.
Write p_θ(· | x) = softmax of the network's logits at a masked position, and κ the schedule.

- ``fhs`` (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic masked models
  and exploit inaccurate categorical sampling", §3, the first-hitting sampler): with n tokens still
  masked at time t, each unmasks independently at a reverse time with P(still masked at s) =
  κ(s)/κ(t), so the first of them unmasks at τ = κ⁻¹(κ(t)·u^{1/n}), u ~ U(0, 1); which one is
  uniform over the n, and its value is drawn from p_θ(· | x_t). One network call per token:
  NFE = L, and the result is *exactly* a draw from the model's reverse process (no time
  discretisation). ``steps = S < L`` is the batched variant: ⌈n/S⌉-sized groups of
  first-hitting events share one call, their tokens drawn independently from the same
  posterior; its only error is that within a group the joint law is replaced by the product of
  the marginals (exact when every group has one token, i.e. S = L).
- ``ancestral`` (Sahoo et al. 2024, MDLM, eq. 7; Shi et al. 2024, MD4): on a uniform grid
  1 = t_0 > … > t_S = 0, a masked token at t stays masked at s with probability κ(s)/κ(t) and
  otherwise becomes v with probability (κ(t) − κ(s))/κ(t) · p_θ(v | x_t). Tokens unmasked in
  the same step are conditionally independent: converges to the exact process as S grows.
- ``tau_leap`` (Campbell et al. 2022, τ-leaping; here for the absorbing rate): the reverse rate
  κ'(t)/κ(t) · p_θ(v | x_t) is frozen over the step, so a masked token unmasks with probability
  1 − exp(−(t − s)·κ'(t)/κ(t)); the last step unmasks every token left (the final denoising step).
  First order in the step size.

Categorical draws use :func:`~diffsolve.discrete.categorical.categorical` in ``dtype`` (float64 by
default; float32 reproduces the lowered-temperature effect, most strongly for ``ancestral`` with
many steps, whose categorical carries the dominant "stay masked" entry).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..noise import NoiseSource
from .categorical import categorical
from .masked import MaskedDiffusion

__all__ = ["MASKED_SAMPLERS", "MaskedInfo", "sample_masked"]

MASKED_SAMPLERS = {
    "fhs": "first-hitting sampler: exact unmasking times, one token per call (NFE = L)",
    "ancestral": "MDLM ancestral sampler on a uniform time grid (NFE = steps)",
    "tau_leap": "τ-leaping with the absorbing rate frozen per step (NFE = steps)",
}


@dataclass(frozen=True)
class MaskedInfo:
    """What a masked-diffusion run did: network calls, steps, wall seconds."""

    nfe: int
    steps: int
    sampler: str
    seconds: float


class _Watch:
    """Remembers the first step and (sample, position) with NaN posteriors, without a host sync
    inside the loop; :meth:`raise_if_bad` syncs once after it."""

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.where = torch.zeros((), dtype=torch.long, device=device)

    def update(self, bad: Tensor, step: int) -> None:
        first = (self.step < 0) & bad.any()
        self.where = torch.where(first, bad.reshape(-1).to(torch.uint8).argmax(), self.where)
        self.step = torch.where(first, torch.full_like(self.step, step), self.step)

    def raise_if_bad(self, shape: tuple[int, ...]) -> None:
        step = int(self.step)
        if step >= 0:
            b, i = divmod(int(self.where), shape[-1]) if len(shape) == 2 else (0, 0)
            raise ValueError(
                f"the network returned NaN (or all −inf) logits at step {step}, sample {b}, "
                f"position {i}: the clean-token posterior is undefined there"
            )


def _posterior(logits: Tensor) -> Tensor:
    return torch.softmax(logits.to(torch.float64), dim=-1)


def _fhs(model, x, steps, noise, dtype, watch) -> int:
    b = x.shape[0]
    sched = model.schedule
    masked = x == model.mask_id
    n = masked.sum(1)
    n_max = int(n.max())  # one sync before the loop: how many events there are
    if n_max == 0:
        return 0
    steps = n_max if steps is None else steps
    if steps > n_max:
        raise ValueError(
            f"fhs unmasks at least one token per call: steps must be ≤ {n_max} (the number of "
            f"masked tokens), got {steps}"
        )
    # group sizes: n_max events split as evenly as possible over the calls
    sizes = [n_max // steps + (1 if j < n_max % steps else 0) for j in range(steps)]
    t = torch.ones(b, dtype=torch.float64, device=x.device)
    for j, m in enumerate(sizes):
        # exact first-hitting times of the group's m events: τ = κ⁻¹(κ(t)·u^{1/n})
        t_call, tau, left = None, t, n
        for k in range(m):
            u = noise.rand(t[:, None], j, k)[:, 0]
            nxt = sched.inverse(sched.kappa(tau) * u ** (1.0 / left.clamp(min=1)))
            tau = torch.where(left > 0, nxt, tau)
            t_call = tau if t_call is None else t_call
            left = left - 1
        post = _posterior(model.logits(x, t_call, step=j))
        # m masked positions uniformly at random: the top-m of uniform scores over masked slots
        score = noise.rand(x.to(torch.float64), j, m)
        score = torch.where(masked, score, torch.full_like(score, -1.0))
        top, idx = score.topk(m, dim=1)
        valid = top >= 0
        p = post.gather(1, idx[..., None].expand(b, m, post.shape[-1]))
        bad = torch.isnan(p).any(-1) & valid
        watch.update(torch.zeros_like(masked).scatter(1, idx, bad), j)  # (B, L) positions
        tok = categorical(p, dtype=dtype, u=noise.rand(p.to(dtype), j, m + 1))
        new = torch.where(valid, tok, x.gather(1, idx))
        x.scatter_(1, idx, new)
        masked = masked.scatter(1, idx, masked.gather(1, idx) & ~valid)
        n, t = n - valid.sum(1), tau
    return steps


def _grid(model, x, steps, noise, dtype, watch, leap: bool) -> int:
    sched = model.schedule
    if steps is None:
        raise ValueError("ancestral and tau_leap need steps= (the number of network calls)")
    b = x.shape[0]
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    kap = sched.kappa(ts)
    rate = sched.dkappa(ts) / kap  # κ'(t)/κ(t), used at the left end of each step
    for i in range(steps):
        masked = x == model.mask_id
        t = torch.full((b,), float(ts[i]), dtype=torch.float64, device=x.device)
        post = _posterior(model.logits(x, t, step=i))
        if i == steps - 1:
            q = 1.0  # t_S = 0: every token left is unmasked (κ(0) = 0)
        elif leap:
            q = float(-torch.expm1(-(ts[i] - ts[i + 1]) * rate[i]))
        else:
            q = float((kap[i] - kap[i + 1]) / kap[i])
        probs = torch.cat([post * q, torch.full_like(post[..., :1], 1.0 - q)], dim=-1)
        watch.update(torch.isnan(post).any(-1) & masked, i)
        draw = categorical(probs, dtype=dtype, u=noise.rand(probs.to(dtype), i))
        draw = torch.where(draw == model.vocab_size, torch.full_like(draw, model.mask_id), draw)
        x.copy_(torch.where(masked, draw, x))
    return steps


def sample_masked(
    model: MaskedDiffusion,
    batch: int | None = None,
    length: int | None = None,
    sampler: str = "fhs",
    steps: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    dtype: torch.dtype = torch.float64,
    noise: NoiseSource | None = None,
    tokens: Tensor | None = None,
    device: torch.device | str | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, MaskedInfo]:
    """Generate (batch, length) token sequences with no mask left.

    Args:
        model: a :class:`MaskedDiffusion`.
        batch, length: B and L of a fully masked start (or give ``tokens``).
        sampler: ``"fhs"`` (exact; ``steps`` ≤ L for the batched variant, default L),
            ``"ancestral"`` or ``"tau_leap"`` (``steps`` required). See the module docstring.
        generator: a ``torch.Generator`` (one draw seeds the counter-based noise), a list of
            them (one per sample), or None (torch's global RNG): shorthand for
            ``noise=NoiseSource.from_generator(generator)``.
        noise: a :class:`~diffsolve.noise.NoiseSource`; every draw is keyed by (seed, sample,
            call, draw), so a sample is the same whatever the batch split
            (``NoiseSource(seed, offset=lo)`` for the piece ``[lo:hi]``), except that ``fhs``
            from partly masked ``tokens`` groups its events by the batch's largest count.
        dtype: precision of the categorical draws, float64 (default) or float32 (the paper's
            truncated Gumbel race, for reproducing its effect).
        tokens: optional start (B, L) long: clean tokens are kept, positions equal to the mask
            id are generated (infilling).
        return_info: also return a :class:`MaskedInfo`.

    Returns:
        LongTensor (B, L) with values in 0…V−1 (and the info when asked).

    Raises:
        ValueError: bad sizes, sampler, steps or dtype; tokens out of range (naming sample and
            position); network logits of the wrong shape or NaN (naming the step and position).
    """
    if not isinstance(model, MaskedDiffusion):
        raise ValueError(f"model must be a ds.MaskedDiffusion, got {type(model).__name__}")
    if sampler not in MASKED_SAMPLERS:
        raise ValueError(f"unknown masked sampler {sampler!r}; valid: {', '.join(MASKED_SAMPLERS)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    if noise is not None and generator is not None:
        raise ValueError("pass generator= or noise=, not both")
    if noise is not None and not isinstance(noise, NoiseSource):
        raise ValueError(f"noise must be a ds.NoiseSource, got {type(noise).__name__}")
    if noise is None:
        gens = generator if isinstance(generator, Sequence) else [generator]
        if not all(g is None or isinstance(g, torch.Generator) for g in gens):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        noise = NoiseSource.from_generator(generator)
    if tokens is None:
        for name, v in (("batch", batch), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        assert batch is not None and length is not None  # checked just above
        x = torch.full((batch, length), model.mask_id, dtype=torch.long, device=device)
    else:
        if not isinstance(tokens, Tensor):
            raise ValueError(f"tokens must be a LongTensor (B, L), got {type(tokens).__name__}")
        model.check_tokens(tokens)
        want = (batch or tokens.shape[0], length or tokens.shape[1])
        if tuple(tokens.shape) != want:
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}, batch/length say {want}")
        x = tokens.to(device=device, dtype=torch.long).clone()
    if sampler == "fhs" and steps is not None and steps > x.shape[1]:
        raise ValueError(f"fhs takes at most L = {x.shape[1]} steps, got {steps}")
    watch = _Watch(x.device)
    nfe0, t0 = model.nfe, time.perf_counter()
    if sampler == "fhs":
        done = _fhs(model, x, steps, noise, dtype, watch)
    else:
        done = _grid(model, x, steps, noise, dtype, watch, leap=sampler == "tau_leap")
    watch.raise_if_bad(tuple(x.shape))
    if not return_info:
        return x
    info = MaskedInfo(model.nfe - nfe0, done, sampler, time.perf_counter() - t0)
    return x, info
