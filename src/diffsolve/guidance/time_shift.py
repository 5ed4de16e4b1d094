"""Time-Shift sampler (Li et al., ICLR 2024, "Alleviating exposure bias in diffusion models
through sampling with shifted time steps"), as a Denoiser wrapper around any solver.

Exposure bias: during sampling the network sees x_t that are not distributed as the training
x_t at the scheduled t. The Time-Shift sampler evaluates the network at the time τ, inside a
window around the scheduled time, whose noise level best matches the sample's own statistics,
per sample b:

    τ_b = argmin_{τ ∈ {t + k·δ : |k| ≤ w/2}} | Var(x_b) − (1 − ᾱ_τ) |          (paper, Alg. 2)

where Var is taken over all of sample b's entries, 1 − ᾱ_τ = σ_τ² (VP) and δ is one training
step (1/N for ``VPDiscrete``; (t_max − t_min)/1000 otherwise). No shift is applied at or below
the cutoff t_c (in the same step units) nor with w = 0.

What is shifted: the network's time input only. The raw output at τ is converted into ε̂ with
τ's coefficients and x̂_0 is rebuilt at the scheduled point, x̂_0 = (x − σ_t·ε̂)/α_t, so the
pair stays consistent with the x the solver holds and every solver runs unchanged. For an
ε-network this is exactly the official code's DEIS wrapper (``eps_fn`` evaluates the network at
the shifted per-sample time, the solver keeps its coefficients). The official DDIM/PNDM and
DPM-Solver wrappers instead re-time the sample (the next step starts from τ); that needs
per-sample grid coefficients, which the solver contract (host-float coefficients) excludes.

Defaults are the README's DEIS setting (w = 10 each side → window 20, t_c = 900); the paper also
uses w = 30, t_c = 300 for 5-step DPM-Solver and w = 5, t_c = 550 for 100-step F-PNDM. The rule
assumes unit-variance data (images in [−1, 1]); ``data_var`` > 0 matches α_τ²·data_var + σ_τ²
instead (not in the paper).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..denoiser import DenoiserWrapper, EvalPoint, Prediction
from ..processes.base import as_time

__all__ = ["TimeShift"]


class TimeShift(DenoiserWrapper):
    """Evaluate the network at the variance-matched time in a window (see the module docstring).

    Args:
        model: a Denoiser or a wrapper of one (CFG, ...). Put output-side wrappers such as
            thresholding outside it.
        window: total window width w in training steps (candidates t + k·δ, |k| ≤ w/2).
        cutoff: shift only where the scheduled step index (t − t_min)/δ exceeds this.
        data_var: per-entry data variance in the matching target (0: the paper's 1 − ᾱ_τ).
        step: δ, the size of one step in process time (default: one training step).

    Shapes: x (B, ...); the shifted time is per sample, chosen on the device (no host sync),
    so the network must honour a (B,) time input with distinct entries (diffsolve's digits UNet
    and diffusers' UNets do; the exact mixture nets of ``diffsolve.bench.gmm`` read the batch's
    first time only). NFE: unchanged (one network call per call).
    """

    def __init__(
        self,
        model: Any,
        window: int = 20,
        cutoff: float = 900.0,
        data_var: float = 0.0,
        step: float | None = None,
    ):
        if int(window) != window or window < 0:
            raise ValueError(f"TimeShift: window must be a non-negative integer, got {window!r}")
        if data_var < 0:
            raise ValueError(f"TimeShift: data_var must be >= 0, got {data_var!r}")
        super().__init__(model)
        proc = self.process
        if step is None:
            n = getattr(proc, "num_train_steps", None)
            step = 1.0 / n if n else (proc.t_max - proc.t_min) / 1000.0
        if not step > 0:
            raise ValueError(f"TimeShift: step must be > 0, got {step!r}")
        self.window, self.cutoff = int(window), float(cutoff)
        self.data_var, self.step = float(data_var), float(step)
        self._cache: dict[float, tuple[Tensor, ...]] = {}

    def candidates(self, t: float) -> tuple[Tensor, ...]:
        """The window around t (float64, host): times τ, target variances, α, σ, α', σ', t_in."""
        if t not in self._cache:
            proc, half = self.process, self.window // 2
            k = torch.arange(-half, half + 1, dtype=torch.float64)
            tau = (as_time(t) + k * self.step).clamp(proc.t_min, proc.t_max_finite)
            a, s = proc.alpha(tau), proc.sigma(tau)
            base = _base(self.model)
            velocity = getattr(base, "prediction", None) == "velocity"
            da = proc.d_alpha(tau) if velocity else torch.zeros_like(tau)
            ds_ = proc.d_sigma(tau) if velocity else torch.zeros_like(tau)
            time_map = getattr(base, "time_map", proc.model_time)
            self._cache[t] = (tau, a * a * self.data_var + s * s, a, s, da, ds_, time_map(tau))
        return self._cache[t]

    def shifted(self, x: Tensor, point: EvalPoint) -> tuple[Tensor, EvalPoint]:
        """Per-sample index into the window (B,) and the shifted evaluation point (per-sample
        α, σ shaped (B, 1, …) in x's compute dtype, t_in (B,))."""
        _, target, a, s, da, ds_, t_model = self.candidates(point.t)
        flat = x.reshape(x.shape[0], -1)
        var = flat.var(dim=1)  # unbiased, as the official code's torch.var
        dev = x.device
        idx = (var[:, None] - target.to(dev, var.dtype)[None]).abs().argmin(dim=1)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = (-1,) + (1,) * (x.ndim - 1)

        def pick(v: Tensor) -> Tensor:
            return v.to(dev, dt)[idx].reshape(shape)

        shifted = EvalPoint(
            t=point.t,
            # EvalPoint declares float coefficients; here they are per-sample (B, 1, …) tensors,
            # which the conversions broadcast (EvalPoint's annotation is narrower than its use)
            alpha=pick(a),  # type: ignore[arg-type]  # per-sample tensor, see above
            sigma=pick(s),  # type: ignore[arg-type]  # per-sample tensor
            d_alpha=pick(da),  # type: ignore[arg-type]  # per-sample tensor
            d_sigma=pick(ds_),  # type: ignore[arg-type]  # per-sample tensor
            t_in=t_model.to(dev, point.t_in.dtype)[idx],
        )
        return idx, shifted

    def active(self, t: float) -> bool:
        """Whether the rule applies at scheduled time t (window > 0 and above the cutoff)."""
        return self.window > 0 and (t - self.process.t_min) / self.step > self.cutoff

    def __call__(self, x: Tensor, t: float | Tensor | EvalPoint, **cond: Any) -> Prediction:
        point = t if isinstance(t, EvalPoint) else self.point(t, x)
        if not self.active(point.t):
            return self.model(x, point, **cond)
        _, shifted = self.shifted(x, point)
        eps = self.model(x, shifted, **cond).eps
        x0 = (x.to(eps.dtype) - point.sigma * eps) / point.alpha
        return Prediction(x0, eps)

    def __repr__(self) -> str:
        return (
            f"TimeShift({self.model!r}, window={self.window}, cutoff={self.cutoff}, "
            f"data_var={self.data_var})"
        )


def _base(model: Any) -> Any:
    """The innermost Denoiser under a stack of wrappers (for its prediction and time map)."""
    while not hasattr(model, "time_map") and hasattr(model, "model"):
        model = model.model
    return model
