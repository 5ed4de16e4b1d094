"""Timestep schedules: where the network is evaluated.

A schedule maps (process, n) to n process times, strictly decreasing from the noise end to the
data end (both included), in float64. The sampling loop then appends the clean end σ = 0 (or,
with ``final="tmin"``, asks for one point more and stops at the last one).

Conventions are those of the papers and peers, so grids compare like with like:
``karras(n)`` equals k-diffusion's ``get_sigmas_karras(n, σ_min, σ_max)`` (without its trailing
0) in σ/α, and the diffusers spacings reproduce ``set_timesteps`` of diffusers' schedulers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from .processes.base import GaussianProcess, as_time
from .processes.vp import VPDiscrete

__all__ = [
    "Exponential",
    "Karras",
    "Leading",
    "Linspace",
    "LogSNR",
    "Quadratic",
    "Schedule",
    "Trailing",
    "Uniform",
    "get_schedule",
    "schedules",
]


class Schedule:
    """Base class: ``schedule(process, n) -> Tensor`` of n decreasing float64 times."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __call__(self, process: GaussianProcess, n: int) -> Tensor:
        if int(n) != n or n < 1:
            raise ValueError(f"a schedule needs at least one point, got n={n}")
        t = self.times(process, int(n))
        process.check_times(t, what=f"schedule {self.name!r}")
        return t

    def times(self, process: GaussianProcess, n: int) -> Tensor:
        raise NotImplementedError

    def for_calls(self, process: GaussianProcess, calls: Sequence[int], clean_end: bool) -> Tensor:
        """Grid times for steps that make ``calls[i]`` network calls each (singlestep solvers):
        the schedule's grid of Σ calls intervals sub-sampled at the cumulative calls, so that
        every call sits on the schedule (DPM-Solver-fast's rule for non-λ schedules)."""
        n = len(calls) if clean_end else len(calls) + 1
        total = sum(calls)
        every = self(process, total if clean_end else total + 1)
        idx = torch.cumsum(torch.tensor([0, *calls]), 0)[:n]
        return every[idx]


def _ramp(n: int) -> Tensor:
    # k-diffusion's ramp: linspace(0, 1, n), and [0] for n = 1 (the noise end alone)
    return torch.linspace(0.0, 1.0, n, dtype=torch.float64)


@dataclass(frozen=True)
class Uniform(Schedule):
    """Uniform in t (with the process's time shift, e.g. SD3 flow shift).

    ``trailing=True``: the n points of ``linspace(t_max, t_min, n + 1)`` without its last, so the
    last evaluation is at about t_max/n and the final step to σ = 0 covers the rest — diffusers'
    flow-matching grid (``FlowMatchEulerDiscreteScheduler``) and its ``trailing`` spacing; the
    first point is ``t_max_finite`` (1 − t_min on flow paths, where λ = −∞ at t = 1).
    """

    trailing: bool = False
    name: ClassVar[str] = "uniform"
    description: ClassVar[str] = "uniform in t (time-shifted for shifted flow models)"

    def times(self, process: GaussianProcess, n: int) -> Tensor:
        if not self.trailing:
            t = process.t_max + _ramp(n) * (process.t_min - process.t_max)
            return process.shift_time(t)
        ramp = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)[:-1]
        t = process.shift_time(process.t_max + ramp * (process.t_min - process.t_max))
        # start where λ is finite (flow paths: 1 − t_min, diffusers' 1 − 1/1000), so that
        # exponential integrators' first step and its successors' step ratios are finite
        t[0] = min(float(t[0]), process.t_max_finite)
        return t


@dataclass(frozen=True)
class LogSNR(Schedule):
    """Uniform in the half-log-SNR λ (DPM-Solver's ``logSNR``; Lu et al. 2022)."""

    sigma_min: float | None = None
    sigma_max: float | None = None
    name: ClassVar[str] = "logsnr"
    description: ClassVar[str] = "uniform in λ = log(α/σ) (DPM-Solver's logSNR)"

    def for_calls(self, process: GaussianProcess, calls: Sequence[int], clean_end: bool) -> Tensor:
        """Uniform in λ over the steps themselves (DPM-Solver-fast's outer grid)."""
        return self(process, len(calls) if clean_end else len(calls) + 1)

    def times(self, process: GaussianProcess, n: int) -> Tensor:
        r_lo, r_hi = _noise_range(process, self.sigma_min, self.sigma_max)
        lo, hi = -math.log(r_hi), -math.log(r_lo)
        t = process.t_of_lambda(lo + _ramp(n) * (hi - lo))
        return _pin_ends(t, process, self.sigma_min, self.sigma_max)


@dataclass(frozen=True)
class Exponential(LogSNR):
    """Uniform in log(σ/α): k-diffusion's ``get_sigmas_exponential``; the same grid as logsnr."""

    name: ClassVar[str] = "exponential"
    description: ClassVar[str] = "uniform log(σ/α) (k-diffusion's exponential; equals logsnr)"


@dataclass(frozen=True)
class Karras(Schedule):
    """EDM's ρ-schedule in σ/α (Karras et al. 2022, eq. 5); ρ → ∞ tends to uniform λ."""

    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    name: ClassVar[str] = "karras"
    description: ClassVar[str] = "EDM power schedule in σ/α, ρ = 7 (k-diffusion get_sigmas_karras)"

    def times(self, process: GaussianProcess, n: int) -> Tensor:
        lo, hi = _noise_range(process, self.sigma_min, self.sigma_max)
        r_min, r_max = lo ** (1 / self.rho), hi ** (1 / self.rho)
        rho = (r_max + _ramp(n) * (r_min - r_max)) ** self.rho
        return _pin_ends(process.t_of_rho(rho), process, self.sigma_min, self.sigma_max)


@dataclass(frozen=True)
class Quadratic(Schedule):
    """Power-κ spacing in t, denser near the data (DEIS's t-grid; κ = 2 is DDIM's "quad")."""

    kappa: float = 2.0
    name: ClassVar[str] = "quadratic"
    description: ClassVar[str] = "t_i = (t_max^{1/κ} + u_i·(t_min^{1/κ} − t_max^{1/κ}))^κ, κ = 2"

    def times(self, process: GaussianProcess, n: int) -> Tensor:
        k = self.kappa
        a, b = process.t_max ** (1 / k), process.t_min ** (1 / k)
        return (a + _ramp(n) * (b - a)) ** k


def _noise_range(
    process: GaussianProcess, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    """The noise levels σ/α a schedule spans: the process's range, narrowed to
    [sigma_min, sigma_max] where given (k-diffusion's sigma_min/sigma_max, in σ/α units)."""
    lo, hi = process.rho_range()
    if sigma_min is not None:
        lo = max(lo, float(sigma_min))
    if sigma_max is not None:
        hi = min(hi, float(sigma_max))
    if not 0.0 < lo < hi:
        raise ValueError(
            f"empty noise range: sigma_min={sigma_min}, sigma_max={sigma_max} inside the "
            f"process's σ/α range [{process.rho_range()[0]:.4g}, {process.rho_range()[1]:.4g}]"
        )
    return lo, hi


def _pin_ends(
    t: Tensor,
    process: GaussianProcess,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    # inverse maps round by ~1 ulp; pin the ends exactly inside [t_min, t_max] where the schedule
    # spans the whole process (a narrowed end keeps its inverse-map time)
    host = t.device.type == "cpu" and t.dtype == torch.float64 and not t.requires_grad
    # host times: numpy's clip and item writes (the same numbers, a few µs less than torch's)
    t = (
        torch.from_numpy(np.clip(t.numpy(), process.t_min, process.t_max))
        if host
        else t.clamp(process.t_min, process.t_max)
    )
    tn = t.numpy() if host else t
    rho_lo, rho_hi = process.rho_range()
    if sigma_max is None or sigma_max >= rho_hi:
        tn[0] = process.t_max_finite
    if t.numel() > 1 and (sigma_min is None or sigma_min <= rho_lo):
        tn[-1] = process.t_min
    return t


# -- diffusers' discrete spacings ---------------------------------------------------------------
@dataclass(frozen=True)
class _Discrete(Schedule):
    """diffusers' spacings come in two conventions under each name: its multistep solvers
    (DPMSolverMultistep, UniPC, DEIS) lay n+1 points and drop the one at index 0 (the default
    here); DDIM and PNDM lay n points ending at index 0 (``include_zero=True``)."""

    steps_offset: int = 0
    include_zero: bool = False

    def times(self, process: GaussianProcess, n: int) -> Tensor:
        if not isinstance(process, VPDiscrete):
            raise ValueError(f"schedule {self.name!r} needs a VPDiscrete process")
        num = process.num_train_steps
        idx = self.indices(num, n) if self.include_zero else self.indices(num, n + 1)[:-1]
        idx = np.minimum(idx + self.steps_offset, num - 1)
        if len(np.unique(idx)) != n:
            raise ValueError(
                f"schedule {self.name!r} gives repeated timesteps for n={n} on a {num}-step table"
            )
        return process.time_of_index(idx)

    def indices(self, num_train: int, n: int) -> np.ndarray:
        """n decreasing indices, the last at (or near) 0, before the offset."""
        raise NotImplementedError


@dataclass(frozen=True)
class Leading(_Discrete):
    """diffusers ``timestep_spacing="leading"``: k·⌊N/n⌋ + offset (DDIM paper, SD default)."""

    name: ClassVar[str] = "leading"
    description: ClassVar[str] = "diffusers 'leading' spacing (VPDiscrete)"

    def indices(self, num_train: int, n: int) -> np.ndarray:
        return (np.arange(0, n) * (num_train // n)).round()[::-1].astype(np.int64)


@dataclass(frozen=True)
class Trailing(_Discrete):
    """diffusers ``timestep_spacing="trailing"``: round(N − k·N/n) − 1 (Lin et al. 2024)."""

    name: ClassVar[str] = "trailing"
    description: ClassVar[str] = "diffusers 'trailing' spacing (VPDiscrete)"

    def times(self, process: GaussianProcess, n: int) -> Tensor:
        # both diffusers conventions agree here: n points from N−1 down, none at 0
        if not isinstance(process, VPDiscrete):
            raise ValueError(f"schedule {self.name!r} needs a VPDiscrete process")
        num = process.num_train_steps
        idx = np.round(np.arange(num, 0, -num / n)).astype(np.int64)[:n] - 1
        return process.time_of_index(idx)


@dataclass(frozen=True)
class Linspace(_Discrete):
    """diffusers ``timestep_spacing="linspace"``: round(linspace(0, N−1, ·))."""

    name: ClassVar[str] = "linspace"
    description: ClassVar[str] = "diffusers 'linspace' spacing (VPDiscrete)"

    def indices(self, num_train: int, n: int) -> np.ndarray:
        return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)


_SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls
    for cls in (Uniform, LogSNR, Karras, Quadratic, Exponential, Leading, Trailing, Linspace)
}


def schedules() -> dict[str, str]:
    """Every registered schedule name with a one-line description."""
    return {name: cls.description for name, cls in _SCHEDULES.items()}


def get_schedule(schedule: str | Schedule) -> Schedule:
    """A schedule object from a name or an object (objects pass through)."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str) and schedule in _SCHEDULES:
        return _SCHEDULES[schedule]()
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(_SCHEDULES)}")


# relative tolerance on the range [t_min, t_max] for explicit times: a float32 σ list (k-diffusion's
# own grids) mapped back to t lands a few float32 ulps outside it, and is clamped in
_TIMES_RTOL = 1e-5


def validate_times(process: GaussianProcess, times: Tensor | np.ndarray | list[float]) -> Tensor:
    """Explicit user times as a checked float64 tensor.

    Times within a relative ``1e-5`` of the range [t_min, t_max] (float32 rounding) are clamped
    into it; values further out are refused (``process.check_times``)."""
    t = as_time(np.asarray(times, dtype=np.float64) if not isinstance(times, Tensor) else times)
    t = t.to(torch.float64).clone()
    if t.ndim == 1 and t.numel() and bool(torch.isfinite(t).all()):
        lo, hi = float(process.t_min), float(process.t_max)
        tol_lo, tol_hi = _TIMES_RTOL * max(abs(lo), 1e-12), _TIMES_RTOL * max(abs(hi), 1e-12)
        keep = 1e-9 * max(1.0, abs(hi))  # what check_times already lets through, left as given
        t = torch.where((t < lo - keep) & (t >= lo - tol_lo), torch.full_like(t, lo), t)
        t = torch.where((t > hi + keep) & (t <= hi + tol_hi), torch.full_like(t, hi), t)
    process.check_times(t, what="times")
    return t
