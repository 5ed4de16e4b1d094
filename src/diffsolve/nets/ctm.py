"""The digits CTM network and its distillation from ``digits-flow`` (Kim et al., ICLR 2024).

A Consistency Trajectory Model learns the flow map G(x_t, t, s) ≈ the probability-flow ODE
solution from t to s ≤ t. :class:`CTMUNet` is :class:`~diffsolve.nets.unet.DigitsUNet` with a
second sinusoidal embedding, of the target time s, added to the time and label embeddings. Its
output is read, as the teacher's, as a ``velocity`` prediction at (x_t, t): the Denoiser table
turns it into g_θ(x_t, t, s) (for the flow, g = x_t − t·v_θ), and
:class:`diffsolve.ctm.CTM` forms G = (σ_s/σ_t)·x_t + (α_s − α_t·σ_s/σ_t)·g_θ — on the flow
(α = 1 − t, σ = t) CTM's own G = (s/t)·x_t + (1 − s/t)·g_θ (Kim et al. 2024), so
G(x, t, t) = x exactly and g_θ(x, t, t) is a denoiser.

Distillation (``python scripts/train_digits_ctm.py``), per sample of a batch:

1. x_0 from the digits, ε ~ N(0, I), times 1 ≥ t ≥ u ≥ s ≥ 0 (t = 1 with probability 0.2,
   s = t with probability 0.15, s = 0 with probability 0.35, else s ~ U(0, t);
   u = t − r·min(t − s, 0.3), r ~ U(0, 1)); x_t = (1 − t)·x_0 + t·ε.
2. The teacher's ODE from t to u by one Heun step (two teacher calls; t − u ≤ 0.3), then the
   stop-gradient student jumps on to s: x̂_s = G_sg(x_u, u, s) (CTM's soft consistency
   matching target, with the iCT choice of the online network as the target network).
3. The loss is ‖g_θ(x_t, t, s) − ĝ‖² with ĝ = (x̂_s − (s/t)·x_t)/(1 − s/t), the g that would
   make G_θ(x_t, t, s) = x̂_s, i.e. the consistency loss measured in data space. Where s = t
   the target is the teacher's denoiser x_t − t·v_teacher(x_t, t) (CTM's DSM term, here as
   denoiser distillation; it is the first Heun stage, so it costs nothing).

The student starts from the teacher's weights with the s branch's last layer at zero, so at
step 0 G is the teacher's Euler step and training only has to learn the curvature of the
trajectories. Adam with warm-up and cosine decay, an EMA of the weights is what is saved.
"""

from __future__ import annotations

import copy
import math
import resource
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .data import digits
from .unet import DigitsUNet, UNetConfig, timestep_embedding

__all__ = ["CTMUNet", "distil_ctm"]


class CTMUNet(DigitsUNet):
    """``net(x, t_model, s_model, label=None)``: the digits UNet with an embedding of the target
    time s; x (B, 1, 8, 8), t_model and s_model (B,) or scalars (model times of t and s, the
    flow's t ∈ [0, 1]), label as :class:`DigitsUNet`. Returns (B, 1, 8, 8)."""

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        e = self.config.emb_dim
        first, last = nn.Linear(e, e), nn.Linear(e, e)  # (in this order: the seeded init)
        # the s branch starts silent: a student initialised from the teacher is the teacher
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.s_mlp = nn.Sequential(first, nn.SiLU(), last)

    def _times(self, t: Tensor | float, b: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(t, device=device).reshape(-1)
        return t.expand(b) if t.numel() == 1 and b != 1 else t

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        t_model: Tensor | float,
        s_model: Tensor | float,
        label: Tensor | int | None = None,
    ) -> Tensor:
        b, dev, cfg = x.shape[0], x.device, self.config
        t, s = self._times(t_model, b, dev), self._times(s_model, b, dev)
        emb = self.time_mlp(timestep_embedding(t * cfg.time_scale, cfg.emb_dim))
        emb = emb + self.s_mlp(timestep_embedding(s * cfg.time_scale, cfg.emb_dim))
        emb = (emb + self.label_emb(self.labels_in(label, b, dev))).to(x.dtype)
        return self.body(x, emb)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _col(v: Tensor) -> Tensor:
    return v[:, None, None, None]


def _g_of(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, lab: Tensor) -> Tensor:
    """g(x, t, s) = x − t·v(x, t, s): the velocity output read as x̂_0 on the flow."""
    return x - _col(t) * net(x, t, s, lab)


def _jump(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, lab: Tensor) -> Tensor:
    """G(x, t, s) = (s/t)·x + (1 − s/t)·g on the flow; G(x, t, t) = x exactly."""
    r = torch.where(t > 0, s / t.clamp_min(1e-12), torch.ones_like(t))
    return _col(r) * x + _col(1 - r) * _g_of(net, x, t, s, lab)


def _times(b: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.where(
        torch.rand(b, generator=g) < 0.2, 1.0, 1e-3 + (1 - 1e-3) * torch.rand(b, generator=g)
    )
    pick = torch.rand(b, generator=g)
    s = torch.where(pick < 0.15, t, torch.where(pick < 0.5, 0.0, t * torch.rand(b, generator=g)))
    u = t - torch.rand(b, generator=g) * torch.clamp(t - s, max=0.3)
    return t, u.clamp(min=s), s


def distil_ctm(
    teacher: nn.Module,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    log: Callable[[str], None] = print,
) -> tuple[CTMUNet, dict]:
    """Distil a :class:`CTMUNet` from the flow teacher ``teacher(x, t, label) -> velocity``
    (a :class:`DigitsUNet` on α = 1 − t, σ = t); see the module docstring for the objective.
    Returns the EMA network (eval mode) and a training report (seconds, losses)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_data, y_data = digits()
    net = CTMUNet(teacher.config)  # type: ignore[arg-type]
    missing, unexpected = net.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("s_mlp.") for k in missing):
        raise ValueError(f"teacher does not match the student: {missing}, {unexpected}")
    teacher = teacher.eval().requires_grad_(False)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ema_decay, p_uncond, warmup = 0.995, 0.1, 100
    t0, c0 = time.perf_counter(), _cpu()
    running = 0.0
    for step in range(steps):
        idx = torch.randint(0, x_data.shape[0], (batch,), generator=g)
        x0, lab = x_data[idx], y_data[idx].clone()
        lab[torch.rand(batch, generator=g) < p_uncond] = -1
        eps = torch.randn(x0.shape, generator=g)
        t, u, s = _times(batch, g)
        xt = _col(1 - t) * x0 + _col(t) * eps
        with torch.no_grad():
            v1 = teacher(xt, t, lab)
            x_e = xt + _col(u - t) * v1
            x_u = xt + _col(u - t) * 0.5 * (v1 + teacher(x_e, u, lab))
            net.eval()
            x_s = _jump(net, x_u, u, s, lab)
            net.train()
            r = s / t
            target = torch.where(
                _col(s < t),
                (x_s - _col(r) * xt) / _col((1 - r).clamp_min(1e-12)),
                xt - _col(t) * v1,
            )
        lr_now = (
            lr * (step + 1) / warmup
            if step < warmup
            else lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        )
        for pg in opt.param_groups:
            pg["lr"] = lr_now
        loss = F.mse_loss(_g_of(net, xt, t, s, lab), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - d)
        running = 0.98 * running + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if step % 100 == 0 or step == steps - 1:
            sec = time.perf_counter() - t0
            log(f"  ctm step {step:5d}/{steps} loss {running:.5f} ({sec:.0f} s)")
    report = {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "ema_decay": ema_decay,
        "label_dropout": p_uncond,
        "teacher": "digits-flow",
        "objective": "CTM soft consistency matching, 1 teacher Heun step t->u (t-u <= 0.3), "
        "then stop-grad student u->s; loss in data space; teacher denoiser at s = t",
        "optimizer": "Adam, linear warm-up 100 steps, cosine decay, grad-norm clip 1",
        "final_loss_ema": running,
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu() - c0,
    }
    return ema.eval(), report
