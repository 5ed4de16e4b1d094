"""``digits-masked``: a small transformer over the digits' grey levels as tokens.

Each 8×8 digit is a sequence of L = 64 tokens, its pixel values 0…16 (V = 17); the mask token
is 17. The network maps (tokens (B, 64) with mask id 17, t (B,)) to clean-token logits
(B, 64, 17). It is *time-agnostic*: for the absorbing (masking) process the posterior of a masked
token given the visible ones, p(x_0^i | x_t), does not depend on t (Ou et al. 2024, RADD, Thm. 1;
Zheng et al. 2024, §3), so ``t`` is accepted and ignored and the first-hitting sampler needs no
time at all.

Training (:func:`train_masked`) minimises the continuous-time masked-diffusion ELBO of the linear
schedule κ(t) = t (Sahoo et al. 2024, MDLM, eq. 10; Shi et al. 2024, MD4, eq. 5):

    L = E_{t ~ U(0,1)} E_{x_t} [ (1/t) · Σ_{i masked} −log p_θ(x_0^i | x_t) ] / L,

with each token masked independently with probability t. Samples map back to the networks'
image scale as v/8 − 1, shape (B, 1, 8, 8) (:func:`tokens_to_images`).
"""

from __future__ import annotations

import copy
import math
import resource
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "DigitsMaskedNet",
    "MaskedConfig",
    "cli_sample",
    "digits_tokens",
    "masked_model",
    "tokens_to_images",
    "train_masked",
]


@dataclass(frozen=True)
class MaskedConfig:
    """Architecture of :class:`DigitsMaskedNet` (stored in the weights header)."""

    vocab_size: int = 17
    length: int = 64
    dim: int = 64
    depth: int = 3
    heads: int = 4
    mlp_ratio: int = 2

    def __post_init__(self) -> None:
        if self.vocab_size < 2 or self.length < 1 or self.depth < 1:
            raise ValueError(f"bad MaskedConfig {self}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")


class DigitsMaskedNet(nn.Module):
    """Pre-norm transformer encoder: token + learned position embeddings, ``depth`` blocks of
    bidirectional self-attention and MLP, a linear head to V logits.

    ``net(tokens, t=None)``: tokens (B, L) long in 0…V (V = the mask id) → logits (B, L, V),
    float32. ``t`` is ignored (time-agnostic; see the module docstring).
    """

    def __init__(self, config: MaskedConfig = MaskedConfig()) -> None:
        super().__init__()
        self.config = config
        c = config
        self.mask_id = c.vocab_size
        self.tok = nn.Embedding(c.vocab_size + 1, c.dim)
        self.pos = nn.Parameter(torch.randn(c.length, c.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            c.dim,
            c.heads,
            dim_feedforward=c.mlp_ratio * c.dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(
            layer, c.depth, norm=nn.LayerNorm(c.dim), enable_nested_tensor=False
        )
        self.head = nn.Linear(c.dim, c.vocab_size)

    def forward(self, tokens: Tensor, t: Tensor | None = None) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.config.length:
            raise ValueError(
                f"tokens must have shape (B, {self.config.length}), got {tuple(tokens.shape)}"
            )
        h = self.tok(tokens) + self.pos
        return self.head(self.blocks(h))


def digits_tokens() -> Tensor:
    """The 1797 digits as token sequences (1797, 64), long, values 0…16 (raw grey levels)."""
    from .data import digits, from_unit

    x, _ = digits()
    return from_unit(x).round().long().reshape(x.shape[0], 64)


def tokens_to_images(tokens: Tensor) -> Tensor:
    """Tokens (B, 64) in 0…16 → images (B, 1, 8, 8) in [−1, 1] (v/8 − 1), float32."""
    if tokens.ndim != 2 or tokens.shape[1] != 64:
        raise ValueError(f"tokens must have shape (B, 64), got {tuple(tokens.shape)}")
    if bool(((tokens < 0) | (tokens > 16)).any()):
        raise ValueError("tokens must be grey levels 0…16 (no mask left)")
    return (tokens.to(torch.float32) / 8.0 - 1.0).reshape(-1, 1, 8, 8)


def masked_model(name: str = "digits-masked", device: torch.device | str | None = None):
    """The shipped masked network wrapped as a :class:`~diffsolve.MaskedDiffusion`
    (V = 17, mask id 17, linear schedule, the one it was trained on)."""
    from ..discrete.masked import MaskedDiffusion
    from . import load

    net, _, info = load(name, device=device)
    if not isinstance(net, DigitsMaskedNet):
        raise ValueError(f"{info.name} is not a masked-diffusion network")
    model = MaskedDiffusion(net, vocab_size=net.config.vocab_size, mask_id=net.mask_id)
    model.info = info  # type: ignore[attr-defined]
    return model


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train_masked(
    steps: int = 3000,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    config: MaskedConfig = MaskedConfig(),
    log=print,
) -> tuple[DigitsMaskedNet, dict]:
    """Train :class:`DigitsMaskedNet` on the digits with the linear-schedule masked ELBO.

    Adam with 200 warm-up steps and a cosine decay, grad-norm clip 1, EMA of the weights
    (decay 0.998, what is returned), t drawn stratified over the batch (low-variance ELBO).
    Returns the EMA network (eval mode) and a report (steps, loss, wall and CPU seconds).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = digits_tokens()
    net = DigitsMaskedNet(config)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    warmup, ema_decay, t_min = 200, 0.998, 1e-3
    t0, c0 = time.perf_counter(), _cpu()
    running = 0.0
    for step in range(steps):
        x0 = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
        # stratified t: one draw per 1/batch stratum, the standard variance reduction (MD4)
        t = (torch.rand(1, generator=g) + torch.arange(batch) / batch) % 1.0
        t = t_min + (1 - t_min) * t
        masked = torch.rand(x0.shape, generator=g) < t[:, None]
        xt = torch.where(masked, torch.full_like(x0, config.vocab_size), x0)
        ce = F.cross_entropy(net(xt).transpose(1, 2), x0, reduction="none")
        loss = ((ce * masked).sum(1) / t).mean() / config.length
        if step < warmup:
            cur = lr * (step + 1) / warmup
        else:
            cur = lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for pg in opt.param_groups:
            pg["lr"] = cur
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - d)
        running = 0.98 * running + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if step % 250 == 0 or step == steps - 1:
            log(
                f"  masked step {step:5d}/{steps} loss {running:.4f} nats/token "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    report = {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "ema_decay": ema_decay,
        "optimizer": "Adam, linear warm-up 200 steps, cosine decay, grad-norm clip 1",
        "loss": "linear-schedule masked ELBO (MDLM eq. 10), nats per token, stratified t",
        "final_loss_ema": running,
        "config": asdict(config),
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu() - c0,
    }
    return ema.eval(), report


def cli_sample(
    n: int,
    sampler: str | None,
    steps: int | None,
    seed: int,
    batch: int,
    out: str,
    npz: str | None,
    score: bool,
    console,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """``diffsolve sample --model digits-masked --sampler fhs --steps N``: sample in batches
    (batch b seeded ``seed + b``), write the PNG grid and the ``.npz`` (as for the other
    networks; labels −1), print NFE, time and (``score``) FD-digits. Returns the metadata."""
    from pathlib import Path

    from ..cli_sample import save_grid, write_samples
    from ..discrete.samplers import sample_masked

    sampler = sampler or "fhs"
    model = masked_model()
    started = time.perf_counter()
    outs, nfe = [], 0
    for b, lo in enumerate(range(0, n, batch)):
        g = torch.Generator().manual_seed(seed + b)
        with torch.no_grad():
            x, info = sample_masked(
                model, min(batch, n - lo), 64, sampler, steps=steps, generator=g,
                dtype=dtype, return_info=True,
            )  # fmt: skip
        outs.append(x)
        nfe = info.nfe
    seconds = time.perf_counter() - started
    img = tokens_to_images(torch.cat(outs))
    meta = {"model": "digits-masked", "sampler": sampler, "steps": steps, "nfe": nfe, "n": n,
            "seed": seed, "seconds": seconds}  # fmt: skip
    png = save_grid(img.numpy(), out)
    npz_path = Path(npz) if npz else Path(out).with_suffix(".npz")
    write_samples(img.numpy(), [-1] * n, meta, npz_path)
    msg = f"{n} samples, {nfe} NFE each ({sampler}), in {seconds:.1f} s → {png} and {npz_path}"
    if score:
        from ..bench.digits import fd_digits

        meta["fd"] = fd_digits(img)
        msg += f"\nFD-digits {meta['fd']:.2f} (against all digits, {n} samples)"
    console.print(msg)
    return meta
