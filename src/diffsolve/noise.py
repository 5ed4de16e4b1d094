"""Where stochastic solvers draw their Gaussian noise.

A :class:`NoiseSource` is passed to ``solver.init(x, grid, model, noise)`` and kept in the
solver's *state*, never on the solver object, so one solver can serve concurrent runs. It is
mutable (its generators advance), so a run owns its source.

Two ways to build one:

* ``NoiseSource(generator)`` — one stream for the whole batch (torch's global RNG when
  ``generator`` is None). Noise is drawn on the generator's device, so a generator on the
  sample's device is the fast path (no copy).
* ``NoiseSource.from_seeds(seeds)`` — one CPU generator per sample, seeded with ``seeds[b]``.
  Sample b's noise depends only on its own seed, so the same seed gives the same sample whatever
  the batch size or split. Each step draws per sample on the CPU and moves the result to the
  sample's device (one copy per step; fine for the few-step samplers this library targets).

Noise is drawn in float64 for float64 samples and in float32 otherwise (then cast), so half
precision samples get the same noise as float32 ones.

Extension point: a solver calls ``noise.bind(grid)`` once in ``init`` and then
``randn_like(x, step)`` for step i, which spans ``grid.t[i] → grid.t[i+1]``.

* :class:`BrownianTree` (``BrownianTree(seed)``, ``BrownianTree.from_seeds(seeds)``) subclasses
  :class:`NoiseSource`; ``bind(grid)`` returns a :class:`BoundBrownianTree` whose
  ``randn_like(x, i)`` is the normalised Brownian increment over step i, so a sample path is
  consistent across step counts and schedules. Solvers with sub-steps call
  ``randn_between(x, t_from, t_to)`` (process times; N(0, I)) or ``increment(x, t_from, t_to)``
  (unnormalised W(τ_from) − W(τ_to)). Draws that are not path increments (Langevin corrector
  noise) come from ``randn_extra(x, step, k)``, which every source offers (a stream simply
  draws again).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["BoundBrownianTree", "BrownianTree", "NoiseSource", "bind"]


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bind(noise: Any, grid: Any) -> Any:
    """``noise.bind(grid)``; any object with ``randn_like(x, step)`` alone is used as it is."""
    fn = getattr(noise, "bind", None)
    return fn(grid) if fn is not None else noise


class NoiseSource:
    """Standard Gaussian noise for stochastic solvers (see the module docstring).

    Args:
        generator: the single stream for the batch; None uses torch's global RNG.
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator
        self.generators: tuple[torch.Generator, ...] | None = None

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> NoiseSource:
        """One CPU generator per sample: sample b draws from ``manual_seed(seeds[b])``."""
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("from_seeds needs at least one seed")
        src = cls()
        src.generators = tuple(torch.Generator("cpu").manual_seed(s) for s in seeds)
        return src

    def bind(self, grid: Any) -> Any:
        """The source a run uses on ``grid`` (called by solvers in ``init``).

        Stream-based sources ignore the grid and return themselves; a Brownian tree returns a
        copy that maps step i to the interval (grid.t[i+1], grid.t[i]).
        """
        return self

    def randn_like(self, x: Tensor, step: int) -> Tensor:
        """ε ~ N(0, I) with the shape, device and dtype of x, for solver step ``step``."""
        dt = _draw_dtype(x.dtype)
        if self.generators is not None:
            if len(self.generators) != x.shape[0]:
                raise ValueError(
                    f"NoiseSource has {len(self.generators)} per-sample seeds but the batch "
                    f"has {x.shape[0]} samples"
                )
            z = torch.stack(
                [torch.randn(x.shape[1:], generator=g, dtype=dt) for g in self.generators]
            )
            return z.to(device=x.device, dtype=x.dtype)
        g = self.generator
        device = g.device if g is not None else x.device
        z = torch.randn(x.shape, generator=g, dtype=dt, device=device)
        return z.to(device=x.device, dtype=x.dtype)

    def randn_extra(self, x: Tensor, step: int, k: int) -> Tensor:
        """Another N(0, I) draw in step ``step`` (the k-th extra one, e.g. a Langevin corrector's):
        for a stream source the next draw of the stream."""
        return self.randn_like(x, step)

    def __repr__(self) -> str:
        if self.generators is not None:
            return f"NoiseSource.from_seeds(<{len(self.generators)} seeds>)"
        return f"NoiseSource({'global RNG' if self.generator is None else self.generator})"


# -- the Brownian tree ----------------------------------------------------------------------
# Counter-based Gaussian draws: splitmix64 (Steele et al. 2014) on int64 tensors, whose
# multiplication wraps modulo 2^64 on every torch backend. A draw depends only on
# (sample key, node id, element index), so it is the same on any device and batch split.
_M64 = (1 << 64) - 1


def _signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


_GOLD = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SALT_SAMPLE, _SALT_NODE, _SALT_EXTRA = 0x5A17, 0x7EE5, 0xE47A


def _mix_int(v: int) -> int:
    """splitmix64 of a Python int (unsigned 64-bit result)."""
    z = (v + _GOLD) & _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def _srl(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64 of int64 tensors (bits read as unsigned)."""
    z = z + _signed(_GOLD)
    z = (z ^ _srl(z, 30)) * _signed(_C1)
    z = (z ^ _srl(z, 27)) * _signed(_C2)
    return z ^ _srl(z, 31)


def _gaussian(keys: Tensor, nodes: Tensor, counters: Tensor, d: int, dtype: torch.dtype) -> Tensor:
    """Standard normals (N, B, d) for N tree nodes: Box–Muller on the two 32-bit halves of one
    64-bit hash per pair of entries (cos for the first half of the entries, sin for the rest).

    ``keys`` (B, 1) int64 per-sample keys, ``nodes`` (N,) int64 mixed node ids, ``counters``
    (1, ceil(d/2)) int64. float64 uses 32 bits per uniform, float32 their leading 24 (so
    float32 draws agree with the float64 ones to ~1e-6).
    """
    bits = _mix(_mix(keys[None] ^ nodes[:, None, None]) + counters[None])
    if dtype == torch.float64:
        u1 = (_srl(bits, 32).to(dtype) + 0.5) * 2.0**-32
        u2 = ((bits & 0xFFFFFFFF).to(dtype) + 0.5) * 2.0**-32
    else:
        u1 = (_srl(bits, 40).to(dtype) + 0.5) * 2.0**-24
        u2 = ((_srl(bits, 8) & 0xFFFFFF).to(dtype) + 0.5) * 2.0**-24
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = (2 * math.pi) * u2
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=2)[:, :, :d]


_CHUNK = 1 << 22  # hashed entries per batch of nodes (bounds the temporary memory)


TIME_VARIABLES = ("t", "rho", "sigma")


class BrownianTree(NoiseSource):
    """A Brownian motion W(τ) on an interval [a, b], fixed by seeds and evaluated anywhere.

    Unlike a stream, the noise of an interval is a function of the interval: the increment over
    [τ_1, τ_2] is W(τ_2) − W(τ_1) whatever grid asked for it, so a fine grid refines the path of
    a coarse one and a sample converges (strongly) as the step count grows. This is the
    Brownian-tree noise of torchsde / k-diffusion's ``BrownianTreeNoiseSampler``, implemented
    here without torchsde.

    Construction (Lévy's): W(a) = 0, W(b) = sqrt(b − a)·z_0; the midpoint m of a dyadic interval
    [l, r] with heap id n (root 1, children 2n, 2n + 1) gets the Brownian-bridge value

        W(m) = ½(W(l) + W(r)) + ½·sqrt(r − l)·z_n,

    down to ``depth = ceil(log2(1/tol))`` levels; inside a leaf W is linear (the bridge mean), so
    increments over intervals much longer than a leaf, (b − a)·2^{−depth}, have variance exact
    to a relative 2^{−depth}/(step/(b − a)). Each z_n ~ N(0, I) is drawn by a counter-based
    hash of (sample key, n, element index) (splitmix64 + Box–Muller in int64/float tensor ops on
    the sample's device; the hash relies on int64 multiplication wrapping modulo 2^64, as
    torch's CPU and CUDA kernels do): no generator state, nothing stored, no host
    synchronisation (a query sends its node ids and coefficients as two small non-blocking
    copies; the per-sample keys go once per batch). One query costs about ``depth`` + (levels
    below the two ends' common ancestor) hashed draws of the sample's size, batched into a few
    tensor passes (measured on a 2-core CPU: a step of 4096 two-dimensional samples ~17 ms,
    4 × 16384 entries ~150 ms; on a GPU a few dozen kernel launches per step). The coefficients
    of each node in an increment are computed in float64 on the host and differenced there, so
    a small increment of a float32 sample carries no cancellation error.

    Args:
        seed: one seed for the whole batch; sample b then uses key (seed, b), which depends on
            its index. Use :meth:`from_seeds` for one seed per sample (same seed ⇒ same sample
            whatever the batch split).
        time: the variable τ the motion runs in: ``"t"`` (process time, the default: the
            reverse SDE's dw̄ is in t), ``"rho"`` (σ/α, k-diffusion's σ: its
            ``BrownianTreeNoiseSampler``, diffusers' ``BrownianTreeNoiseSampler`` and torchsde's
            use in those samplers work in σ) or ``"sigma"`` (σ_t). Normalised increments are
            N(0, I) in every variable; the choice decides which draws are correlated across
            grids.
        interval: (a, b) in τ; default, from the process at ``bind``: [0, t_max] for ``"t"``
            (the clean end σ = 0 is t = 0), [0, τ(t_max_finite)] for ``"rho"`` and ``"sigma"``.
            The path depends on it: keep it fixed to compare runs.
        tol: leaf width relative to b − a (depth = ceil(log2(1/tol)); 1e-6 → 20 levels, torchsde's
            default tolerance).

    Use: ``ds.sample(..., noise=BrownianTree.from_seeds(seeds))``. Solvers call ``bind(grid)``
    (:func:`bind`) and get a :class:`BoundBrownianTree` whose ``randn_like(x, i)`` is the
    normalised increment (W(τ_i) − W(τ_{i+1}))/sqrt(|τ_i − τ_{i+1}|) of grid step i, and whose
    ``randn_between(x, t_from, t_to)`` / ``increment(x, t_from, t_to)`` serve sub-steps at any
    process times.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        time: str = "t",
        interval: tuple[float, float] | None = None,
        tol: float = 1e-6,
    ):
        super().__init__()
        if time not in TIME_VARIABLES:
            raise ValueError(f"unknown time {time!r}; valid: {', '.join(TIME_VARIABLES)}")
        if not 0 < tol < 1:
            raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
        if interval is not None and not float(interval[0]) < float(interval[1]):
            raise ValueError(f"interval must be (a, b) with a < b, got {interval!r}")
        self.seed = int(seed)
        self.seeds: tuple[int, ...] | None = None
        self.time = time
        self.interval = None if interval is None else (float(interval[0]), float(interval[1]))
        self.tol = float(tol)
        self.depth = max(1, math.ceil(math.log2(1.0 / tol)))

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], **options: Any) -> BrownianTree:  # type: ignore[override]
        """One tree per sample: sample b's path depends only on ``seeds[b]``."""
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("from_seeds needs at least one seed")
        tree = cls(**options)
        tree.seeds = tuple(seeds)
        return tree

    @classmethod
    def from_noise(cls, noise: Any = None, **options: Any) -> BrownianTree:
        """A tree seeded from a stream source (for solvers that default to tree noise).

        A :class:`BrownianTree` is returned as is. A ``NoiseSource.from_seeds`` source gives
        one tree seed per sample drawn from that sample's generator (so batch-split
        independence carries over); a single-stream source (or None: torch's global RNG) gives
        one seed drawn from its generator. Drawing the seeds reads the generator once (a host
        sync for a CUDA generator, at init only).
        """
        if isinstance(noise, BrownianTree):
            return noise

        def draw(g: torch.Generator | None) -> int:
            dev = g.device if g is not None else "cpu"
            return int(torch.randint(0, 2**62, (1,), generator=g, device=dev))

        gens = getattr(noise, "generators", None)
        if gens is not None:
            return cls.from_seeds([draw(g) for g in gens], **options)
        return cls(draw(getattr(noise, "generator", None)), **options)

    def bind(self, grid: Any) -> BoundBrownianTree:
        """The tree on ``grid``: step i ↦ the increment over [τ(t_{i+1}), τ(t_i)]."""
        return BoundBrownianTree(self, grid)

    def randn_like(self, x: Tensor, step: int) -> Tensor:
        raise TypeError("a BrownianTree draws per interval: use tree.bind(grid).randn_like(x, i)")

    def __repr__(self) -> str:
        who = f"<{len(self.seeds)} seeds>" if self.seeds is not None else f"seed={self.seed}"
        return f"BrownianTree({who}, time={self.time!r}, depth={self.depth})"


class BoundBrownianTree:
    """A :class:`BrownianTree` on one run's grid (what a solver's state holds).

    All times given to its methods are *process* times (the clean end σ = 0 of a grid is t = 0);
    they are mapped to the tree variable τ in float64 on the host. Shapes: x (B, ...); every
    result has the shape, device and dtype of x (draws in float64 for float64 x, else float32).
    """

    def __init__(self, tree: BrownianTree, grid: Any):
        self.tree = tree
        self.grid = grid
        self.process = grid.process
        if tree.interval is not None:
            self.a, self.b = tree.interval
        else:
            top = self.process.t_max if tree.time == "t" else self.process.t_max_finite
            self.a, self.b = 0.0, self._tau(top)
        if tree.time == "t":
            taus = grid.t
        else:
            rho = grid.sigma / grid.alpha
            taus = rho if tree.time == "rho" else grid.sigma
        self.taus: list[float] = [float(v) for v in taus.tolist()]
        self._keys: dict[tuple[int, torch.device], Tensor] = {}
        self._counters: dict[tuple[int, torch.device], Tensor] = {}

    # -- time -------------------------------------------------------------------------------
    def _tau(self, t: float) -> float:
        if self.tree.time == "t":
            return float(t)
        if t == 0.0 and self.grid.clean_end and float(self.grid.sigma[-1]) == 0.0:
            return 0.0  # the clean end σ = 0
        p = self.process
        if self.tree.time == "rho":
            return float(p.sigma(t) / p.alpha(t))
        return float(p.sigma(t))

    def tau(self, t: float) -> float:
        """The tree variable τ of process time t."""
        return self._tau(float(t))

    # -- the path ---------------------------------------------------------------------------
    def _coefs(self, tau: float) -> dict[int, float]:
        """W(τ) = Σ_n c_n·z_n (host float64): node ids n (0 = the end value W(b))."""
        a, b = self.a, self.b
        span = b - a
        slack = 1e-9 * span
        if not (a - slack <= tau <= b + slack):
            raise ValueError(
                f"Brownian tree: τ = {tau!r} ({self.tree.time}) lies outside its interval "
                f"[{a!r}, {b!r}]; pass interval= to BrownianTree"
            )
        tau = min(max(tau, a), b)
        cl: dict[int, float] = {}
        cr: dict[int, float] = {0: math.sqrt(span)}
        lo, hi, node = a, b, 1
        for _ in range(self.tree.depth):
            if tau == lo:
                return cl
            if tau == hi:
                return cr
            mid = 0.5 * (lo + hi)
            cm = {k: 0.5 * (cl.get(k, 0.0) + cr.get(k, 0.0)) for k in cl.keys() | cr.keys()}
            cm[node] = 0.5 * math.sqrt(hi - lo)
            if tau < mid:
                cr, hi, node = cm, mid, 2 * node
            else:
                cl, lo, node = cm, mid, 2 * node + 1
        w = (tau - lo) / (hi - lo)
        return {k: (1 - w) * cl.get(k, 0.0) + w * cr.get(k, 0.0) for k in cl.keys() | cr.keys()}

    def _state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, d = x.shape[0], x[0].numel()
        dev = x.device
        kk = (b, dev)
        if kk not in self._keys:
            tree = self.tree
            if tree.seeds is not None:
                if len(tree.seeds) != b:
                    raise ValueError(
                        f"BrownianTree has {len(tree.seeds)} per-sample seeds but the batch "
                        f"has {b} samples"
                    )
                keys = [_mix_int(_mix_int(s) ^ _SALT_SAMPLE) for s in tree.seeds]
            else:
                base = _mix_int(tree.seed)
                keys = [_mix_int(base + _mix_int(j + _SALT_SAMPLE)) for j in range(b)]
            self._keys[kk] = torch.tensor([_signed(k) for k in keys], dtype=torch.int64).to(dev)[
                :, None
            ]
        kc = (d, dev)
        if kc not in self._counters:
            half = (d + 1) // 2
            self._counters[kc] = (torch.arange(half, dtype=torch.int64) * _signed(_GOLD)).to(dev)[
                None
            ]
        return self._keys[kk], self._counters[kc]

    def _combine(self, x: Tensor, coefs: dict[int, float], salt: int) -> Tensor:
        """Σ_n c_n·z_n shaped like x: all nodes hashed in a few batched passes; the node ids and
        coefficients travel to the device as one small non-blocking copy each."""
        keys, counters = self._state(x)
        dt = _draw_dtype(x.dtype)
        d = x[0].numel()
        items = [(n, c) for n, c in sorted(coefs.items()) if c != 0.0]
        out = torch.zeros(x.shape[0], d, dtype=dt, device=x.device)
        per = max(1, _CHUNK // max(1, x.shape[0] * counters.shape[1]))
        for j in range(0, len(items), per):
            part = items[j : j + per]
            nodes = torch.tensor([_signed(_mix_int(n ^ salt)) for n, _ in part], dtype=torch.int64)
            cs = torch.tensor([c for _, c in part], dtype=dt)
            nodes = nodes.to(x.device, non_blocking=True)
            cs = cs.to(x.device, non_blocking=True)
            z = _gaussian(keys, nodes, counters, d, dt)
            out += torch.tensordot(cs, z, dims=1)
        return out.reshape(x.shape).to(x.dtype)

    def _increment_tau(self, x: Tensor, tau_from: float, tau_to: float) -> Tensor:
        c1, c2 = self._coefs(tau_from), self._coefs(tau_to)
        diff = {k: c1.get(k, 0.0) - c2.get(k, 0.0) for k in c1.keys() | c2.keys()}
        return self._combine(x, diff, _SALT_NODE)

    def W(self, x: Tensor, t: float) -> Tensor:
        """W(τ(t)) shaped like x (W(a) = 0)."""
        return self._combine(x, self._coefs(self.tau(t)), _SALT_NODE)

    def increment(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """W(τ(t_from)) − W(τ(t_to)): variance |τ_from − τ_to| per entry (unnormalised)."""
        return self._increment_tau(x, self.tau(t_from), self.tau(t_to))

    def randn_between(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """The normalised increment (W(τ_from) − W(τ_to))/sqrt(|τ_from − τ_to|) ~ N(0, I)."""
        a, b = self.tau(t_from), self.tau(t_to)
        if a == b:
            raise ValueError(f"Brownian tree: empty interval t = {t_from!r} → {t_to!r}")
        return self._increment_tau(x, a, b) * (1.0 / math.sqrt(abs(a - b)))

    def randn_like(self, x: Tensor, step: int) -> Tensor:
        """The normalised increment of grid step i: (W(τ_i) − W(τ_{i+1}))/sqrt(|τ_i − τ_{i+1}|)."""
        a, b = self.taus[step], self.taus[step + 1]
        return self._increment_tau(x, a, b) * (1.0 / math.sqrt(abs(a - b)))

    def randn_extra(self, x: Tensor, step: int, k: int) -> Tensor:
        """N(0, I) independent of the path and of every other (step, k): draws that are not
        Brownian increments (e.g. Langevin corrector noise), still keyed by the seeds."""
        return self._combine(x, {(step << 20) + k: 1.0}, _SALT_EXTRA)

    def __repr__(self) -> str:
        return f"{self.tree!r}.bind(<{self.grid.steps} steps on [{self.a:.6g}, {self.b:.6g}]>)"
