"""Stable neural SDEs (Oh, Lim & Kim, ICLR 2024): three SDE classes and a differentiable solver.

Three Itô SDEs with diagonal noise on a latent z (B, D), each an ``nn.Module`` template around a
user-supplied (or default) drift network γ and diffusion network σ. The drift sees
z̃ = [z, c(t)], the latent concatenated with an optional control path c(t) (B, C) (in the paper
an interpolation of the irregular observations; :class:`LinearPath` builds one):

* :class:`LangevinSDE` (LSDE)::

      dz = γ(z̃; θ) dt + σ(t; θ) dW                  time-homogeneous drift, additive noise

* :class:`LinearNoiseSDE` (LNSDE)::

      dz = γ(t, z̃; θ) dt + σ(t; θ)·z dW             multiplicative (linear) noise

* :class:`GeometricSDE` (GSDE)::

      dz = z·γ(t, z̃; θ) dt + z·σ(t; θ) dW           geometric: positive states stay positive,

  stepped by default in log space, d log z = (γ − σ²/2) dt + σ dW (Itô's formula), so z > 0 for
  every step size; Euler–Maruyama on z itself (``method="euler"``) leaves the positive cone
  with probability P(1 + γh + σ√h·ε ≤ 0) > 0 per step.

:func:`sdeint` integrates any of them (Euler–Maruyama, or the log step) with sub-steps of at
most ``dt`` between the requested (possibly irregular) output times and returns the path
(B, T, D). Every operation is a torch operation, so a loss on the path backpropagates into the
networks, the control values and z0. The Brownian increments come from a :mod:`diffsolve.noise`
source: sub-step k of sample b draws the keyed normal (seed, k, sample b), so a path is a
function of its seed and sample index, whatever the batch split (``noise.take(range(lo, hi))``
for a piece); a :class:`~diffsolve.noise.BrownianTree` gives increments of one Brownian path,
consistent across ``dt``.

The default networks follow the paper's official code: the drift is an MLP with ReLU hidden
layers and a tanh-clipped output (for LNSDE and GSDE its input also carries sin t, cos t); σ(t)
is a small MLP of (sin t, cos t), bounded here by σ_max·sigmoid(·) (the code bounds its
ReLU output by tanh(sigmoid(θ)·…)). The paper gives conditions on γ and σ (Lipschitz,
bounded) under which these classes have unique strong solutions; the default networks are
bounded Lipschitz functions of their inputs.

The module imports only torch (and :mod:`diffsolve.noise`); it is a template library for
time-series models, not a diffusion sampler.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import ClassVar

import torch
from torch import Tensor, nn

from .noise import BrownianTree, Noise, NoiseSource

__all__ = [
    "DriftMLP",
    "GeometricSDE",
    "LangevinSDE",
    "LinearNoiseSDE",
    "LinearPath",
    "StableSDE",
    "TimeSigma",
    "sdeint",
]

Control = Callable[[float], Tensor]


# -- default networks ------------------------------------------------------------------------
def _time_features(t: Tensor) -> Tensor:
    """(sin t, cos t) of a (B, 1) time column: (B, 2)."""
    return torch.cat([torch.sin(t), torch.cos(t)], dim=-1)


class DriftMLP(nn.Module):
    """γ: an MLP with ``depth − 1`` ReLU hidden layers of width ``hidden`` and a tanh-clipped
    output, |γ| < ``scale``. ``time=True`` prepends (sin t, cos t) to the input (the drift of
    LNSDE and GSDE depends on t; LSDE's is time-homogeneous).

    Call: ``net(z̃)`` (time=False) or ``net(t, z̃)`` (time=True), t (B, 1), z̃ (B, in_dim)
    → (B, out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden: int = 32,
        depth: int = 2,
        time: bool = False,
        scale: float = 1.0,
    ):
        super().__init__()
        if depth < 1 or hidden < 1:
            raise ValueError(f"depth and hidden must be >= 1, got {depth}, {hidden}")
        self.time = time
        self.scale = float(scale)
        dims = [in_dim + (2 if time else 0)] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, *args: Tensor) -> Tensor:
        if self.time:
            t, z = args
            z = torch.cat([_time_features(t), z], dim=-1)
        else:
            (z,) = args
        return self.scale * torch.tanh(self.net(z))


class TimeSigma(nn.Module):
    """σ(t) = σ_max·sigmoid(MLP(sin t, cos t)) ∈ (0, σ_max)^D, one ReLU hidden layer of width
    ``hidden``; the output bias starts at logit(σ_init/σ_max) and the output weights at zero, so
    σ(t) = σ_init at initialisation. Call: ``net(t)``, t (B, 1) → (B, dim)."""

    def __init__(
        self, dim: int, *, hidden: int = 16, sigma_init: float = 0.1, sigma_max: float = 1.0
    ):
        super().__init__()
        if not 0 < sigma_init < sigma_max:
            raise ValueError(f"need 0 < sigma_init < sigma_max, got {sigma_init}, {sigma_max}")
        self.sigma_max = float(sigma_max)
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, math.log(sigma_init / (sigma_max - sigma_init)))

    def forward(self, t: Tensor) -> Tensor:
        return self.sigma_max * torch.sigmoid(self.net(_time_features(t)))


# -- the SDE classes -------------------------------------------------------------------------
def _time_column(t: float | Tensor, z: Tensor) -> Tensor:
    """t (a number, a 0-d tensor or (B,)/(B, 1)) as a (B, 1) column in z's dtype and device."""
    if isinstance(t, Tensor) and t.dim() > 0:
        return t.reshape(-1, 1).to(dtype=z.dtype, device=z.device).expand(z.shape[0], 1)
    return torch.full((z.shape[0], 1), float(t), dtype=z.dtype, device=z.device)


class StableSDE(nn.Module):
    """Common part of the three classes: the networks, z̃, and the torchsde protocol.

    Args:
        dim: latent size D (required for the default networks; checked against z0 by
            :func:`sdeint`).
        drift: γ, a callable (a module is registered as a submodule): ``drift(z̃)`` for
            :class:`LangevinSDE`, ``drift(t, z̃)`` for the others, t (B, 1), z̃ (B, D + C),
            returning (B, D). Default: :class:`DriftMLP` (``hidden``, ``depth``).
        sigma: σ, a callable ``sigma(t)`` with t (B, 1) returning (B, D) or anything that
            broadcasts to it, or a number (a constant σ). Default: :class:`TimeSigma`
            (``sigma_init``, ``sigma_max``).
        control_dim: C, the size of the control c(t) appended to z (0: no control).

    Methods (t a number or 0-d tensor, z (B, D), c (B, C) or None): ``f(t, z, c)`` the Itô
    drift, ``g(t, z, c)`` the diagonal diffusion, both (B, D); with c omitted they are
    torchsde's ``f``/``g`` (``noise_type = "diagonal"``, ``sde_type = "ito"``), so a module
    without control can also be passed to ``torchsde.sdeint``.
    """

    noise_type: ClassVar[str] = "diagonal"
    sde_type: ClassVar[str] = "ito"
    methods: ClassVar[tuple[str, ...]] = ("euler",)
    default_method: ClassVar[str] = "euler"
    _drift_takes_time: ClassVar[bool] = True
    drift: Callable[..., Tensor]
    sigma: Callable[[Tensor], Tensor] | None
    sigma_const: Tensor

    def __init__(
        self,
        dim: int | None = None,
        *,
        drift: Callable[..., Tensor] | None = None,
        sigma: Callable[[Tensor], Tensor] | float | None = None,
        control_dim: int = 0,
        hidden: int = 32,
        depth: int = 2,
        sigma_init: float = 0.1,
        sigma_max: float = 1.0,
    ):
        super().__init__()
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if control_dim < 0:
            raise ValueError(f"control_dim must be >= 0, got {control_dim}")
        if dim is None and (drift is None or sigma is None):
            raise ValueError("dim is required for the default drift and sigma networks")
        self.dim = dim
        self.control_dim = control_dim
        if drift is None:
            assert dim is not None
            drift = DriftMLP(
                dim + control_dim, dim, hidden=hidden, depth=depth, time=self._drift_takes_time
            )
        self.drift = drift
        if sigma is None:
            assert dim is not None
            sigma = TimeSigma(dim, sigma_init=sigma_init, sigma_max=sigma_max)
        if isinstance(sigma, (int, float)):
            self.register_buffer("sigma_const", torch.tensor(float(sigma)))
            self.sigma = None
        else:
            self.sigma = sigma

    def z_tilde(self, z: Tensor, c: Tensor | None) -> Tensor:
        """z̃ = [z, c] (B, D + C); z alone without control."""
        if c is None:
            if self.control_dim:
                raise ValueError(f"this SDE expects a control of size {self.control_dim}")
            return z
        if c.shape != (z.shape[0], self.control_dim):
            raise ValueError(
                f"control(t) must have shape (B, C) = {(z.shape[0], self.control_dim)}, "
                f"got {tuple(c.shape)}"
            )
        return torch.cat([z, c.to(z.dtype)], dim=-1)

    def gamma(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        """γ(t, z̃) (B, D) (γ(z̃) for the Langevin class)."""
        zt = self.z_tilde(z, c)
        if self._drift_takes_time:
            return self.drift(_time_column(t, z), zt)
        return self.drift(zt)

    def sigma_t(self, t: float | Tensor, z: Tensor) -> Tensor:
        """σ(t) broadcast to z's shape (B, D)."""
        if self.sigma is None:
            s = self.sigma_const.to(dtype=z.dtype, device=z.device)
        else:
            s = self.sigma(_time_column(t, z))
        return s.expand(z.shape)

    def f(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def g(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class LangevinSDE(StableSDE):
    """LSDE (Oh et al. 2024): dz = γ(z̃; θ) dt + σ(t; θ) dW.

    The drift is time-homogeneous (``drift(z̃)``, no t) and the noise additive: f = γ(z̃),
    g = σ(t). Euler–Maruyama: z ← z + γ(z̃)·h + σ(t)·√h·ε. See :class:`StableSDE` for the
    arguments.
    """

    _drift_takes_time: ClassVar[bool] = False

    def f(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        return self.gamma(t, z, c)

    def g(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        return self.sigma_t(t, z)


class LinearNoiseSDE(StableSDE):
    """LNSDE (Oh et al. 2024): dz = γ(t, z̃; θ) dt + σ(t; θ)·z dW.

    f = γ(t, z̃), g = σ(t)·z. With γ = −k·z and a constant σ it is geometric Brownian motion,
    E z_t = z0·e^{−kt}, E z_t² = z0²·e^{(σ² − 2k)t}. See :class:`StableSDE` for the arguments.
    """

    def f(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        return self.gamma(t, z, c)

    def g(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        return self.sigma_t(t, z) * z


class GeometricSDE(StableSDE):
    """GSDE (Oh et al. 2024): dz = z·γ(t, z̃; θ) dt + z·σ(t; θ) dW, for z > 0.

    f = z·γ, g = z·σ. :func:`sdeint` steps it in log space by default (``method="log"``):
    by Itô's formula d log z = (γ − σ²/2) dt + σ dW, so

        log z ← log z + (γ(t, z̃) − σ(t)²/2)·h + σ(t)·√h·ε,

    which keeps z = exp(log z) > 0 for every h and is exact for constant γ and σ given the
    Brownian increments. ``method="euler"`` (Euler–Maruyama on z) is available to show that
    it is not: z·(1 + γh + σ√h·ε) ≤ 0 when ε ≤ −(1 + γh)/(σ√h). See :class:`StableSDE` for
    the arguments.
    """

    methods: ClassVar[tuple[str, ...]] = ("log", "euler")
    default_method: ClassVar[str] = "log"

    def f(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        return z * self.gamma(t, z, c)

    def g(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        return z * self.sigma_t(t, z)

    def log_f(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        """The drift of log z: γ(t, z̃) − σ(t)²/2 (B, D)."""
        return self.gamma(t, z, c) - 0.5 * self.sigma_t(t, z) ** 2

    def log_g(self, t: float | Tensor, z: Tensor, c: Tensor | None = None) -> Tensor:
        """The diffusion of log z: σ(t) (B, D)."""
        return self.sigma_t(t, z)


# -- a control path --------------------------------------------------------------------------
class LinearPath:
    """The piecewise-linear interpolation of irregularly observed series: ``path(t) -> (B, C)``.

    Args:
        ts: the observation grid (T,), strictly increasing (shared by the batch).
        values: (B, T, C) with NaN where a series was not observed (per sample and channel).

    Missing values are filled once, at construction, by linear interpolation between the
    neighbouring observed values of the same series and channel, and held constant before
    the first and after the last observation; the path is then linear in t between grid
    points and constant outside [ts[0], ts[-1]]. The fill is differentiable in the observed
    values. Like the paper's splines, the value at t inside the observed window uses the next
    observation (the path is not causal).
    """

    def __init__(self, ts: Sequence[float] | Tensor, values: Tensor):
        times = _as_times(ts, "ts")
        if values.dim() != 3 or values.shape[1] != len(times):
            raise ValueError(
                f"values must have shape (B, T, C) with T = len(ts) = {len(times)}, "
                f"got {tuple(values.shape)}"
            )
        obs = ~torch.isnan(values)
        if not bool(obs.any(dim=1).all()):
            raise ValueError("every series and channel needs at least one observation")
        self.times = times
        t = torch.tensor(times, dtype=values.dtype, device=values.device)
        n = len(times)
        idx = torch.arange(n, device=values.device).view(1, n, 1).expand_as(values)
        prev = torch.where(obs, idx, torch.full_like(idx, -1)).cummax(dim=1).values
        nxt = torch.where(obs, idx, torch.full_like(idx, n)).flip(1).cummin(dim=1).values.flip(1)
        prev_c = torch.where(prev < 0, nxt, prev)  # before the first observation: hold it
        nxt_c = torch.where(nxt >= n, prev_c, nxt)  # after the last: hold it
        filled = torch.nan_to_num(values)
        v0, v1 = filled.gather(1, prev_c), filled.gather(1, nxt_c)
        t0, t1 = t[prev_c], t[nxt_c]
        w = torch.where(nxt_c > prev_c, (t.view(1, n, 1) - t0) / (t1 - t0), torch.zeros_like(t0))
        self.values = torch.where(obs, filled, v0 + w * (v1 - v0))

    def __call__(self, t: float | Tensor) -> Tensor:
        t = float(t)
        ts = self.times
        if t <= ts[0]:
            return self.values[:, 0]
        if t >= ts[-1]:
            return self.values[:, -1]
        j = bisect.bisect_right(ts, t) - 1
        w = (t - ts[j]) / (ts[j + 1] - ts[j])
        return (1.0 - w) * self.values[:, j] + w * self.values[:, j + 1]


# -- the solver ------------------------------------------------------------------------------
def _as_times(ts: Sequence[float] | Tensor, what: str) -> list[float]:
    if isinstance(ts, Tensor):
        if ts.dim() != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(ts.shape)}")
        times = [float(v) for v in ts.detach().double().cpu().tolist()]
    else:
        try:
            times = [float(v) for v in ts]
        except TypeError:
            raise ValueError(f"{what} must be a 1-D sequence of times, got {ts!r}") from None
    if not times:
        raise ValueError(f"{what} is empty")
    if not all(math.isfinite(v) for v in times):
        raise ValueError(f"{what} must be finite, got {times}")
    if any(b <= a for a, b in itertools.pairwise(times)):
        raise ValueError(f"{what} must be strictly increasing, got {times}")
    return times


def _substeps(times: list[float], dt: float | None) -> tuple[list[float], list[int]]:
    """All sub-step times (host float64) and the positions of the output times among them:
    gap i is cut into ceil(gap/dt) equal sub-steps (dt defaults to the smallest gap)."""
    if len(times) == 1:
        return times, [0]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    if dt is None:
        dt = min(gaps)
    grid, where = [times[0]], [0]
    for a, gap in zip(times[:-1], gaps):
        n = max(1, math.ceil(gap / dt * (1 - 1e-12)))
        grid.extend(a + gap * j / n for j in range(1, n))
        grid.append(a + gap)
        where.append(len(grid) - 1)
    return grid, where


def sdeint(
    sde: StableSDE,
    z0: Tensor,
    ts: Sequence[float] | Tensor,
    *,
    dt: float | None = None,
    noise: Noise | int | None = None,
    method: str | None = None,
    control: Control | None = None,
) -> Tensor:
    """Integrate an Itô SDE with diagonal noise from z0 at ts[0]; the path at ts, (B, T, D).

    Between consecutive output times the gap is cut into ceil(gap/dt) equal sub-steps h ≤ dt,
    and each sub-step k (t → t + h, numbered across the whole run) is

        euler:  z ← z + f(t, z, c(t))·h + g(t, z, c(t))·√h·ε_k          (Euler–Maruyama)
        log:    log z ← log z + log_f(t, z, c(t))·h + log_g(t, z, c(t))·√h·ε_k,  z = e^{log z}

    with ε_k ~ N(0, I) the normalised Brownian increment over the sub-step. Euler–Maruyama
    has strong order ½ and weak order 1; the log step (GSDE only) is Euler–Maruyama on log z.

    Args:
        sde: a :class:`LangevinSDE`, :class:`LinearNoiseSDE` or :class:`GeometricSDE` (or any
            module with ``f``/``g`` and ``methods``).
        z0: the initial state (B, D); for the log step every entry must be > 0.
        ts: the output times (T,), strictly increasing, possibly irregular; ts[0] is z0's time
            (the path's first entry is z0 itself).
        dt: the largest sub-step (> 0); default the smallest gap of ts (the paper's choice).
        noise: a :class:`~diffsolve.noise.NoiseSource` (ε_k of sample b keyed by
            (seed, k, b)), a :class:`~diffsolve.noise.BrownianTree` with ``time="t"`` (ε_k the
            increment of one path over the sub-step; its ``interval`` must contain ts), an int
            seed, or None (``NoiseSource()``: one draw from torch's global RNG).
        method: ``"euler"`` or ``"log"``; default the class's (``"log"`` for GSDE).
        control: c, a callable ``control(t) -> (B, C)`` evaluated at the left end of every
            sub-step (e.g. a :class:`LinearPath`); required exactly when ``sde.control_dim``.

    Returns: the states at ts, (B, T, D), differentiable in z0, the networks' parameters and
    the control's values.
    """
    methods = getattr(sde, "methods", ("euler",))
    method = getattr(sde, "default_method", "euler") if method is None else method
    if method not in methods:
        raise ValueError(
            f"method {method!r} is not available for {type(sde).__name__}; valid: "
            f"{', '.join(methods)}"
        )
    if not isinstance(z0, Tensor) or z0.dim() != 2:
        raise ValueError(f"z0 must be a (B, D) tensor, got {getattr(z0, 'shape', z0)!r}")
    dim = getattr(sde, "dim", None)
    if dim is not None and z0.shape[1] != dim:
        raise ValueError(f"z0 has {z0.shape[1]} channels but the SDE has dim {dim}")
    if not z0.is_floating_point():
        raise ValueError(f"z0 must be a floating-point tensor, got {z0.dtype}")
    times = _as_times(ts, "ts")
    if dt is not None and not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    control_dim = getattr(sde, "control_dim", 0)
    if control_dim and control is None:
        raise ValueError(f"{type(sde).__name__} has control_dim {control_dim}: pass control=")
    if control is not None and not control_dim:
        raise ValueError("control= given but the SDE has control_dim 0")
    if method == "log" and not bool((z0 > 0).all()):
        raise ValueError("the log step needs z0 > 0 (a geometric SDE lives on positive states)")
    if noise is None or isinstance(noise, int):
        noise = NoiseSource(noise)
    if not isinstance(noise, Noise):
        raise TypeError(f"noise must be a Noise source, an int seed or None, got {noise!r}")
    if isinstance(noise, BrownianTree) and noise.time != "t":
        raise ValueError(f"a BrownianTree for sdeint must run in time 't', got {noise.time!r}")

    grid, where = _substeps(times, dt)
    # the grid a bound source sees: sub-step times, increasing; a tree without an interval
    # spans [0, ts[-1]]
    shim = SimpleNamespace(
        t=torch.tensor(grid, dtype=torch.float64),
        process=SimpleNamespace(t_max=grid[-1]),
        steps=len(grid) - 1,
    )
    bound = noise.bind(shim)
    sign = -1.0 if bound.path else 1.0  # a path answers W(t_k) − W(t_{k+1})
    log = method == "log"
    f: Callable[..., Tensor] = getattr(sde, "log_f") if log else sde.f  # noqa: B009
    g: Callable[..., Tensor] = getattr(sde, "log_g") if log else sde.g  # noqa: B009

    z = z0
    y = torch.log(z0) if log else z0
    out = [z0]
    marks = set(where[1:])
    for k in range(len(grid) - 1):
        t, h = grid[k], grid[k + 1] - grid[k]
        c = None if control is None else control(t)
        eps = bound.randn_between(y, k, t, grid[k + 1]) * (sign * math.sqrt(h))
        y = y + f(t, z, c) * h + g(t, z, c) * eps
        z = torch.exp(y) if log else y
        if k + 1 in marks:
            out.append(z)
    return torch.stack(out, dim=1)
