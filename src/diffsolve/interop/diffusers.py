"""diffusers' schedulers run on a diffsolve Denoiser (the ``peers`` extra).

``run_diffusers`` is the usual pipeline loop (``set_timesteps``; per timestep
``scale_model_input`` → network → ``step``) with our Denoiser standing in for the network.

How a diffusers timestep τ becomes a process time — the network must see what the real scheduler
gives it, which is the *timestep*, not the scheduler's internal σ:

- VP tables (DDIM, DPMSolverMultistep, UniPC, DEIS, Euler, Heun, ...): τ is a (possibly
  fractional) index into ``alphas_cumprod``; our :class:`~diffsolve.VPDiscrete` puts index k at
  t = (k + 1)/N, so the network is evaluated at t = (τ + 1)/N. Where diffusers rounds the
  timesteps of a Karras or Lu-λ schedule to integers but keeps the unrounded σ in its update
  (``DPMSolverMultistepScheduler.set_timesteps``, ``timesteps.round()`` after
  ``_sigma_to_t``), the network sees the rounded index, as a real UNet would, while the update
  uses the unrounded σ: the peer is reproduced with that inconsistency, not corrected.
- Flow matching (``FlowMatchEulerDiscreteScheduler``, ``use_flow_sigmas``): τ = N·σ, so the
  network is evaluated at t = τ/N (DPMSolverMultistep casts these timesteps to int64; again the
  network sees the truncated value).

The network returns what the scheduler's ``prediction_type`` expects, built from our (x̂_0, ε̂)
at the evaluated time: ``epsilon`` → ε̂, ``sample`` → x̂_0, ``v_prediction`` → α·ε̂ − σ·x̂_0,
``flow_prediction`` (and the FlowMatch schedulers) → ε̂ − x̂_0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..processes.base import GaussianProcess
from ..processes.flow import FlowMatching
from ..processes.vp import VPDiscrete

__all__ = [
    "DiffusersRun",
    "is_flow_scheduler",
    "process_from_scheduler_config",
    "require_diffusers",
    "run_diffusers",
]


def require_diffusers() -> Any:
    """The ``diffusers`` module, or an ImportError naming the ``peers`` extra."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            "diffusers is not installed; install the peers extra: pip install 'diffsolve[peers]'"
        ) from e
    return diffusers


def _cfg(config: Any) -> Mapping[str, Any]:
    if hasattr(config, "config") and not isinstance(config, Mapping):
        return config.config  # a scheduler instance
    return config


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` samples a flow-matching path (α = 1 − σ)."""
    cfg = _cfg(scheduler)
    return type(scheduler).__name__.startswith("FlowMatch") or bool(cfg.get("use_flow_sigmas"))


def _betas(cfg: Mapping[str, Any]) -> Tensor:
    # exactly as diffusers' schedulers build them: float32, so the tables agree bit for bit
    n = int(cfg.get("num_train_timesteps", 1000))
    trained = cfg.get("trained_betas")
    if trained is not None:
        return torch.tensor(np.asarray(trained), dtype=torch.float32)
    kind = cfg.get("beta_schedule", "linear")
    b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(b0, b1, n, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(
        f"unsupported beta_schedule {kind!r}; valid: 'linear', 'scaled_linear', "
        "'squaredcos_cap_v2' (or trained_betas)"
    )


def process_from_scheduler_config(config: Any) -> VPDiscrete | FlowMatching:
    """The diffsolve process a diffusers scheduler (or its ``config`` dict) samples.

    VP tables: ``alphas_cumprod`` built from ``trained_betas`` or ``beta_schedule`` /
    ``beta_start`` / ``beta_end`` / ``num_train_timesteps`` in float32, exactly as diffusers
    does (a scheduler instance's own ``alphas_cumprod`` is used directly), then held in float64.
    Flow schedulers (``FlowMatch*`` or ``use_flow_sigmas``): :class:`~diffsolve.FlowMatching`
    with the config's ``shift`` / ``flow_shift`` and t_min = 1/N.

    Raises:
        ValueError: for ``rescale_betas_zero_snr`` (ᾱ_T = 0 has no Gaussian prior at t_max) or an
            unknown ``beta_schedule``.
    """
    cfg = _cfg(config)
    n = int(cfg.get("num_train_timesteps", 1000))
    if is_flow_scheduler(config):
        shift = cfg.get("shift", cfg.get("flow_shift", 1.0))
        return FlowMatching(shift=float(shift if shift is not None else 1.0), t_min=1.0 / n)
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr gives ᾱ_T = 0, which VPDiscrete cannot hold")
    table = getattr(config, "alphas_cumprod", None)
    if table is None:
        table = torch.cumprod(1.0 - _betas(cfg), dim=0)
    return VPDiscrete(torch.as_tensor(table).to(torch.float64))


def _time_of(scheduler: Any, process: GaussianProcess):
    n = int(_cfg(scheduler).get("num_train_timesteps", 1000))
    if isinstance(process, VPDiscrete):
        if process.num_train_steps != n:
            raise ValueError(
                f"scheduler has {n} training steps, the process table {process.num_train_steps}"
            )

        def vp(tau: float) -> float:
            return min(max((tau + 1.0) / n, process.t_min), process.t_max)

        return vp
    if isinstance(process, FlowMatching) and is_flow_scheduler(scheduler):

        def flow(tau: float) -> float:
            return min(max(tau / n, process.t_min), process.t_max)

        return flow
    raise ValueError(
        f"no timestep map from {type(scheduler).__name__} to {type(process).__name__}: "
        "VP schedulers need a VPDiscrete process, flow schedulers a FlowMatching one"
    )


@dataclass(frozen=True)
class DiffusersRun:
    """A finished scheduler loop: the last ``prev_sample``, network calls, evaluated times."""

    x: Tensor
    nfe: int
    times: list[float]


def run_diffusers(
    scheduler: Any,
    model: Denoiser,
    x_T: Tensor,
    num_inference_steps: int,
    *,
    cond: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    evaluate_at: str = "timestep",
) -> DiffusersRun:
    """Run ``scheduler``'s sampling loop with ``model`` as the network.

    Args:
        scheduler: a diffusers scheduler instance (its ``set_timesteps`` is called here).
        model: the Denoiser evaluated at each timestep (see the module docstring for the map).
        x_T: the initial latent in the process's own scale, shape (B, ...); it is multiplied by
            ``init_noise_sigma`` as a pipeline does.
        num_inference_steps: passed to ``set_timesteps``.
        cond: keyword arguments for the network.
        generator: for stochastic schedulers' ``step``.
        evaluate_at: ``"timestep"`` (what a real network sees; the default) or ``"sigma"``: the
            process time of the scheduler's own current σ (``sigmas[step_index]``), unrounded.
            The latter is not what a pipeline does; it isolates the effect of diffusers'
            timestep rounding (Karras, Lu-λ) from the rest of the algorithm.

    Returns:
        The final ``prev_sample`` (the scheduler's last state), the number of network calls and
        the process time of each call in order.
    """
    cond = dict(cond or {})
    process = model.process
    time_of = _time_of(scheduler, process)
    if evaluate_at not in ("timestep", "sigma"):
        raise ValueError(f"evaluate_at must be 'timestep' or 'sigma', got {evaluate_at!r}")
    flow = is_flow_scheduler(scheduler)
    kind = "flow_prediction" if flow else _cfg(scheduler).get("prediction_type", "epsilon")
    scheduler.set_timesteps(num_inference_steps)
    # FlowMatch schedulers have neither an initial scale nor an input scaling
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda sample, timestep: sample)
    times: list[float] = []
    step_kw: dict[str, Any] = {"return_dict": False}
    if generator is not None:
        step_kw["generator"] = generator
    for tau in scheduler.timesteps:
        x_in = scale(x, tau)
        if evaluate_at == "sigma":
            sigma = float(scheduler.sigmas[scheduler.step_index or 0])
            t = sigma if flow else float(process.t_of_rho(sigma))
        else:
            t = time_of(float(tau))
        times.append(t)
        point = model.point(t, x_in)
        pred = model(x_in, point, **cond)
        if kind == "epsilon":
            out = pred.eps
        elif kind == "sample":
            out = pred.x0
        elif kind == "v_prediction":
            out = point.alpha * pred.eps - point.sigma * pred.x0
        elif kind == "flow_prediction":
            out = pred.eps - pred.x0
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        x = scheduler.step(out.to(x_in.dtype), tau, x, **step_kw)[0]
    return DiffusersRun(x=x, nfe=len(times), times=times)
