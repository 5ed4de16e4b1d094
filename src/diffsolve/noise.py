"""Where stochastic solvers draw their Gaussian noise: noise is a value.

A draw is a pure function of its keys, (seed, step, stage, sample index), not the next output of
a stream: a run never advances a generator, so a solver object and a noise source can serve any
number of runs (or concurrent ones), a replayed step (diffusers' scheduler protocol re-runs a
solver step once per network call) draws exactly what it drew the first time, and the same seed
gives the same noise for a sample whatever the batch it is drawn in.

**The protocol** (:class:`Noise`, an abstract base; solvers use nothing else):

* ``source.bind(grid)`` — once, in the solver's ``init``: the object the run's state holds.
  Keyed sources return themselves; a :class:`BrownianTree` returns its path on that grid.
* ``bound.randn(x, step, stage=0)`` — ε ~ N(0, I) with the shape, device and dtype of x: the
  ``stage``-th independent draw of solver step ``step`` (which spans grid.t[step] →
  grid.t[step + 1]). Different (step, stage) keys give independent draws.
* ``bound.randn_between(x, step, t_from, t_to, stage=0)`` — the *normalised increment* of the
  driving Brownian path over t_from → t_to (process times, inside step ``step``), N(0, I).
  Solvers ask for their step noise this way (t_from, t_to = the step's own ends) and for
  sub-steps with the sub-interval. Sources without a path (``path`` False) answer
  ``randn(x, step, stage)``; a Brownian tree answers the true increment, so draws are
  consistent across step counts.
* ``bound.path`` — True when ``randn_between`` returns increments of one path (overlapping
  intervals correlated, disjoint ones independent). A solver that needs two correlated
  sub-step noises (``dpmpp_sde``) asks a path for both intervals and otherwise builds the pair
  from ``randn(x, step, 0)`` and ``randn(x, step, 1)``.

Conventions: stage 0 of a step is its main noise (the one ``randn_between`` falls back to);
further independent draws of the same step (Langevin correctors, a second sub-step) use stages
1, 2, ... A custom source subclasses :class:`Noise` and implements ``randn`` (and, for a path,
``randn_between`` with ``path = True``); it may be stateful (e.g. serve a recorded list in call
order), but then it is not replay-safe.

**The default source**, :class:`NoiseSource` (counter-based):

* ``NoiseSource(seed)`` — one seed for the batch; sample b is keyed by (seed, b + ``offset``)
  or by (seed, ``indices[b]``). To split a batch of global indices 0..N−1 into pieces, give
  each piece its first global index, ``NoiseSource(seed, offset=lo)`` for ``x[lo:hi]`` (or
  ``indices=``; ``source.take(range(lo, hi))`` does it for you): the pieces get exactly the
  noise the whole batch gets.
* ``NoiseSource.from_seeds(seeds)`` — one seed per sample: sample b is keyed by ``seeds[b]``
  alone (its position does not matter; ``take`` selects seeds).
* ``NoiseSource(generator)`` / ``NoiseSource.from_generator(g)`` — a ``torch.Generator`` (or
  None: torch's global RNG) is read *once*, at construction: one ``randint`` draw becomes the
  seed (a host sync for a CUDA generator, at set-up only). A list of generators gives one seed
  per sample (``from_seeds`` of one draw each). ``ds.sample(..., generator=g)`` is
  ``noise=NoiseSource.from_generator(g)`` built at set-up, so a generator-seeded run is
  reproducible from the generator's state, and the generator is advanced by exactly one draw.

Draws are splitmix64 hashes of (sample key, draw id, element index) on int64 tensors (whose
multiplication wraps modulo 2^64 on every torch backend) turned Gaussian by Box–Muller, made on
the sample's device: no generator, no host synchronisation, one small cached key tensor per
batch. The integer part is exact on every backend; the Box–Muller transcendental functions may
round differently on another device, so same seed ⇒ bit-identical noise on the same device, and
equal to float rounding across devices. Noise is drawn in float64 for float64 samples and in
float32 otherwise (then cast), so half-precision samples get the float32 draws rounded.

**The Brownian tree** (:class:`BrownianTree`, ``BrownianTree(seed)``,
``BrownianTree.from_seeds(seeds)``; same keys and ``offset``/``indices`` as NoiseSource):
``bind(grid)`` returns a :class:`BoundBrownianTree` whose ``randn_between`` is the normalised
Brownian increment over any sub-interval (``increment`` and ``W`` give the unnormalised path),
so a sample path is consistent across step counts and schedules; its ``randn`` are the
path-independent keyed draws of a NoiseSource with the same seeds.
"""

from __future__ import annotations

import abc
import copy
import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["BoundBrownianTree", "BrownianTree", "Noise", "NoiseSource"]


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- counter-based draws ---------------------------------------------------------------------
# Counter-based Gaussian draws: splitmix64 (Steele et al. 2014) on int64 tensors, whose
# multiplication wraps modulo 2^64 on every torch backend. A draw depends only on
# (sample key, node id, element index), so it is the same on any device and batch split.
_M64 = (1 << 64) - 1


def _signed(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


_GOLD = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SALT_SAMPLE, _SALT_NODE, _SALT_STEP = 0x5A17, 0x7EE5, 0xE47A
_SALT_UNIFORM = 0x0F1A7


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


def _normals(mixed: Tensor, counters: Tensor, d: int, dtype: torch.dtype) -> Tensor:
    """Standard normals (..., B, d) from int64 ``mixed`` (..., B, 1) (per-sample key XOR a
    mixed draw id) and ``counters`` (1, ceil(d/2)): Box–Muller on the two 32-bit halves of one
    64-bit hash per pair of entries (cos for the first half of the entries, sin for the rest).
    float64 uses 32 bits per uniform, float32 their leading 24 (so float32 draws agree with the
    float64 ones to ~1e-6)."""
    bits = _mix(_mix(mixed) + counters)
    if dtype == torch.float64:
        u1 = (_srl(bits, 32).to(dtype) + 0.5) * 2.0**-32
        u2 = ((bits & 0xFFFFFFFF).to(dtype) + 0.5) * 2.0**-32
    else:
        u1 = (_srl(bits, 40).to(dtype) + 0.5) * 2.0**-24
        u2 = ((_srl(bits, 8) & 0xFFFFFF).to(dtype) + 0.5) * 2.0**-24
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = (2 * math.pi) * u2
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)[..., :d]


def _gaussian(keys: Tensor, nodes: Tensor, counters: Tensor, d: int, dtype: torch.dtype) -> Tensor:
    """Standard normals (N, B, d) for N tree nodes: ``keys`` (B, 1) int64 per-sample keys,
    ``nodes`` (N,) int64 mixed node ids, ``counters`` (1, ceil(d/2)) int64 (see :func:`_normals`).
    """
    return _normals(keys[None] ^ nodes[:, None, None], counters[None], d, dtype)


def _seed_of(generator: torch.Generator | None) -> int:
    """One draw from ``generator`` (None: torch's global RNG) as a seed in [0, 2^62)."""
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=dev))


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{what} must be an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        if isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point():
            return int(v)
        raise TypeError(f"{what} must be an integer, got {v!r}") from None


# -- the protocol ----------------------------------------------------------------------------
class Noise(abc.ABC):
    """The noise protocol every source offers (see the module docstring).

    A *source* is what a user passes (``ds.sample(..., noise=source)``); a solver calls
    ``source.bind(grid)`` once in ``init`` and keeps the result, the *bound* noise, in its state.
    The base class's ``bind`` returns the source itself (a keyed source needs no grid) and its
    ``randn_between`` falls back to ``randn``: a subclass only has to implement ``randn``.

    All methods take x (B, ...) for the shape, device and dtype of the result; ``step`` is the
    solver step index i (grid.t[i] → grid.t[i + 1]); ``stage`` ≥ 0 numbers independent draws
    within a step (0: the step's main noise).
    """

    path: ClassVar[bool] = False
    """True when ``randn_between`` gives increments of one Brownian path."""

    def bind(self, grid: Any) -> Noise:
        """The noise a run on ``grid`` draws from (called once by a solver's ``init``)."""
        return self

    @abc.abstractmethod
    def randn(self, x: Tensor, step: int, stage: int = 0) -> Tensor:
        """ε ~ N(0, I) shaped like x: the ``stage``-th independent draw of step ``step``."""

    def randn_between(
        self, x: Tensor, step: int, t_from: float, t_to: float, stage: int = 0
    ) -> Tensor:
        """The normalised Brownian increment over process times t_from → t_to inside step
        ``step`` (N(0, I)); without a path (the default) ``randn(x, step, stage)``."""
        return self.randn(x, step, stage)


# -- the default source: counter-based draws -------------------------------------------------
class NoiseSource(Noise):
    """Counter-based standard Gaussian noise: a draw is a function of (seed, step, stage,
    sample index) (see the module docstring).

    Args:
        seed: an integer; a ``torch.Generator`` (one draw from it becomes the seed, now); or
            None (one draw from torch's global RNG, now).
        offset: sample b of a batch is sample ``b + offset`` (default 0): the source of the
            piece ``x[lo:hi]`` of a batch is ``NoiseSource(seed, offset=lo)``.
        indices: the samples' global indices instead (one per sample of the batch).

    Use :meth:`from_seeds` for one seed per sample and :meth:`take` to get the source of a
    sub-batch. Binding returns the source itself: it holds no run state.
    """

    def __init__(
        self,
        seed: int | torch.Generator | None = None,
        *,
        offset: int = 0,
        indices: Iterable[int] | None = None,
    ):
        if seed is None or isinstance(seed, torch.Generator):
            seed = _seed_of(seed)
        self.seed = _int(seed, "seed")
        self.seeds: tuple[int, ...] | None = None
        self.offset = _int(offset, "offset")
        self.indices = None if indices is None else tuple(_int(i, "index") for i in indices)
        if self.indices is not None and self.offset != 0:
            raise ValueError("pass offset= or indices=, not both")
        self._keys: dict[tuple[int, torch.device], Tensor] = {}
        self._counters: dict[tuple[int, torch.device], Tensor] = {}

    @classmethod
    def from_seeds(cls, seeds: Iterable[int], **options: Any) -> NoiseSource:
        """One seed per sample: sample b's draws depend only on ``seeds[b]``."""
        seeds = tuple(_int(s, "seed") for s in seeds)
        if not seeds:
            raise ValueError("from_seeds needs at least one seed")
        src = cls(0, **options)
        src.seeds = seeds
        return src

    @classmethod
    def from_generator(
        cls, generator: torch.Generator | Sequence[torch.Generator] | None = None, **options: Any
    ) -> NoiseSource:
        """A source seeded by one draw from ``generator`` (None: torch's global RNG); a list or
        tuple of generators (one per sample, as diffusers pipelines take them) gives
        ``from_seeds`` of one draw from each, so splitting the list splits the batch."""
        if isinstance(generator, Sequence):  # list, tuple (a torch.Generator is not one)
            return cls.from_seeds([_seed_of(g) for g in generator], **options)
        return cls(generator, **options)

    def take(self, positions: Iterable[int]) -> NoiseSource:
        """The source of the sub-batch ``x[positions]`` (non-negative positions in this
        source's batch): its draws are those rows of this source's draws. ``range(lo, hi)``
        keeps the offset form; any other selection becomes ``indices``/``seeds``."""
        pos = [_int(p, "position") for p in positions]
        if any(p < 0 for p in pos):
            raise ValueError("take: positions must be >= 0")
        out = copy.copy(self)
        out._keys, out._counters = {}, {}
        if self.seeds is not None:
            out.seeds = tuple(self.seeds[p] for p in pos)
        elif self.indices is not None:
            out.indices = tuple(self.indices[p] for p in pos)
        elif pos and pos == list(range(pos[0], pos[0] + len(pos))):
            out.offset = self.offset + pos[0]
        else:
            out.offset, out.indices = 0, tuple(self.offset + p for p in pos)
        return out

    # -- keys -------------------------------------------------------------------------------
    def _sample_keys(self, b: int) -> list[int]:
        if self.seeds is not None:
            if len(self.seeds) != b:
                raise ValueError(
                    f"{type(self).__name__} has {len(self.seeds)} per-sample seeds but the "
                    f"batch has {b} samples"
                )
            return [_mix_int(_mix_int(s) ^ _SALT_SAMPLE) for s in self.seeds]
        if self.indices is not None:
            if len(self.indices) != b:
                raise ValueError(
                    f"{type(self).__name__} has {len(self.indices)} sample indices but the "
                    f"batch has {b} samples"
                )
            idx: Sequence[int] = self.indices
        else:
            idx = range(self.offset, self.offset + b)
        base = _mix_int(self.seed)
        return [_mix_int(base + _mix_int(j + _SALT_SAMPLE)) for j in idx]

    def _state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(per-sample keys (B, 1), element counters (1, ceil(d/2))) on x's device, cached."""
        b, d = x.shape[0], math.prod(x.shape[1:])
        dev = x.device
        kk = (b, dev)
        if kk not in self._keys:
            keys = [_signed(k) for k in self._sample_keys(b)]
            self._keys[kk] = torch.tensor(keys, dtype=torch.int64).reshape(b, 1).to(dev)
        kc = (d, dev)
        if kc not in self._counters:
            half = (d + 1) // 2
            self._counters[kc] = (torch.arange(half, dtype=torch.int64) * _signed(_GOLD)).to(dev)[
                None
            ]
        return self._keys[kk], self._counters[kc]

    # -- draws ------------------------------------------------------------------------------
    def randn(self, x: Tensor, step: int, stage: int = 0) -> Tensor:
        """ε ~ N(0, I) shaped like x, keyed by (sample key, step, stage)."""
        step, stage = _int(step, "step"), _int(stage, "stage")
        if step < 0 or stage < 0:
            raise ValueError(f"step and stage must be >= 0, got {step}, {stage}")
        keys, counters = self._state(x)
        draw_id = _signed(_mix_int(_mix_int(step ^ _SALT_STEP) + stage))
        z = _normals(keys ^ draw_id, counters, math.prod(x.shape[1:]), _draw_dtype(x.dtype))
        return z.reshape(x.shape).to(x.dtype)

    def rand(self, x: Tensor, step: int, stage: int = 0) -> Tensor:
        """u ~ U[0, 1) shaped like x, keyed by (sample key, step, stage) as :meth:`randn` (on
        its own stream): float64 on the 2^-53 grid, float32 on the 2^-24 grid, as ``torch.rand``
        draws them (the discrete samplers' categorical races)."""
        step, stage = _int(step, "step"), _int(stage, "stage")
        if step < 0 or stage < 0:
            raise ValueError(f"step and stage must be >= 0, got {step}, {stage}")
        keys, _ = self._state(x)
        d, dev = math.prod(x.shape[1:]), x.device
        kc = (-1 - d, dev)  # one counter per element (the normals' counters are per pair)
        if kc not in self._counters:
            self._counters[kc] = (torch.arange(d, dtype=torch.int64) * _signed(_GOLD)).to(dev)[None]
        draw_id = _signed(_mix_int(_mix_int(step ^ _SALT_UNIFORM) + stage))
        bits = _mix(_mix(keys ^ draw_id) + self._counters[kc])
        if _draw_dtype(x.dtype) == torch.float64:
            u = _srl(bits, 11).to(torch.float64) * 2.0**-53
        else:
            u = _srl(bits, 40).to(torch.float32) * 2.0**-24
        return u.reshape(x.shape)

    def __repr__(self) -> str:
        if self.seeds is not None:
            who = f".from_seeds(<{len(self.seeds)} seeds>)"
        elif self.indices is not None:
            who = f"(seed={self.seed}, indices=<{len(self.indices)}>)"
        else:
            who = f"(seed={self.seed}, offset={self.offset})"
        return f"{type(self).__name__}{who}"


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
    tensor passes (on a GPU a few dozen kernel launches per step). The coefficients
    of each node in an increment are computed in float64 on the host and differenced there, so
    a small increment of a float32 sample carries no cancellation error.

    Args:
        seed, offset, indices: the sample keys, exactly as :class:`NoiseSource` (sample b uses
            key (seed, b + offset) or (seed, indices[b])); :meth:`from_seeds` gives one seed per
            sample and :meth:`take` the tree of a sub-batch (same seed ⇒ same path whatever the
            batch split). Unlike NoiseSource the seed defaults to 0.
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
    and get a :class:`BoundBrownianTree` whose ``randn_between(x, i, t_from, t_to)`` is the
    normalised increment (W(τ_from) − W(τ_to))/sqrt(|τ_from − τ_to|) (for a whole step i,
    t_from, t_to = grid.t[i], grid.t[i + 1]) and whose ``randn(x, i, stage)`` are draws
    independent of the path (those of ``NoiseSource`` with the same keys; they need no grid, so
    the unbound tree offers them too).
    """

    path: ClassVar[bool] = True

    def __init__(
        self,
        seed: int | torch.Generator | None = 0,
        *,
        offset: int = 0,
        indices: Iterable[int] | None = None,
        time: str = "t",
        interval: tuple[float, float] | None = None,
        tol: float = 1e-6,
    ):
        super().__init__(seed, offset=offset, indices=indices)
        if time not in TIME_VARIABLES:
            raise ValueError(f"unknown time {time!r}; valid: {', '.join(TIME_VARIABLES)}")
        if not 0 < tol < 1:
            raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
        if interval is not None and not float(interval[0]) < float(interval[1]):
            raise ValueError(f"interval must be (a, b) with a < b, got {interval!r}")
        self.time = time
        self.interval = None if interval is None else (float(interval[0]), float(interval[1]))
        self.tol = float(tol)
        self.depth = max(1, math.ceil(math.log2(1.0 / tol)))

    @classmethod
    def from_noise(cls, noise: NoiseSource | None = None, **options: Any) -> BrownianTree:
        """A tree with the sample keys of a keyed source (for solvers that default to tree
        noise): a :class:`BrownianTree` is returned as is; a :class:`NoiseSource` gives the
        tree with its seed(s), offset or indices; None, ``NoiseSource()`` (one draw from torch's
        global RNG)."""
        if isinstance(noise, BrownianTree):
            return noise
        if noise is None:
            noise = NoiseSource()
        if not isinstance(noise, NoiseSource):
            raise TypeError(f"from_noise needs a NoiseSource, got {type(noise).__name__}")
        tree = cls(noise.seed, offset=noise.offset, indices=noise.indices, **options)
        tree.seeds = noise.seeds
        return tree

    def bind(self, grid: Any) -> BoundBrownianTree:
        """The tree on ``grid``: step i ↦ the increment over [τ(t_{i+1}), τ(t_i)]."""
        return BoundBrownianTree(self, grid)

    def randn_between(
        self, x: Tensor, step: int, t_from: float, t_to: float, stage: int = 0
    ) -> Tensor:
        raise TypeError(
            "a BrownianTree draws per interval on a grid: use tree.bind(grid).randn_between(...)"
        )

    def __repr__(self) -> str:
        keys = super().__repr__()[len(type(self).__name__) :]
        return f"{type(self).__name__}{keys[:-1]}, time={self.time!r}, depth={self.depth})"


class BoundBrownianTree(Noise):
    """A :class:`BrownianTree` on one run's grid (what a solver's state holds).

    All times given to its methods are *process* times (the clean end σ = 0 of a grid is t = 0);
    they are mapped to the tree variable τ in float64 on the host. Shapes: x (B, ...); every
    result has the shape, device and dtype of x (draws in float64 for float64 x, else float32).
    """

    path: ClassVar[bool] = True

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
        self.t: list[float] = [float(v) for v in grid.t.tolist()]

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

    def _combine(self, x: Tensor, coefs: dict[int, float], salt: int) -> Tensor:
        """Σ_n c_n·z_n shaped like x: all nodes hashed in a few batched passes (the node ids
        travel to the device as one small non-blocking copy), then summed node by node in a
        fixed order — a product and a sum per node, never a BLAS contraction, whose summation
        order depends on the batch size on some CPUs: a sample's draw is the same bits whatever
        the batch split."""
        keys, counters = self.tree._state(x)
        dt = _draw_dtype(x.dtype)
        d = math.prod(x.shape[1:])
        items = [(n, c) for n, c in sorted(coefs.items()) if c != 0.0]
        out = torch.zeros(x.shape[0], d, dtype=dt, device=x.device)
        per = max(1, _CHUNK // max(1, x.shape[0] * counters.shape[1]))
        for j in range(0, len(items), per):
            part = items[j : j + per]
            nodes = torch.tensor([_signed(_mix_int(n ^ salt)) for n, _ in part], dtype=torch.int64)
            z = _gaussian(keys, nodes.to(x.device, non_blocking=True), counters, d, dt)
            for k, (_, c) in enumerate(part):
                out += z[k] * c
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

    def randn_between(
        self, x: Tensor, step: int, t_from: float, t_to: float, stage: int = 0
    ) -> Tensor:
        """The normalised increment (W(τ_from) − W(τ_to))/sqrt(|τ_from − τ_to|) ~ N(0, I) (any
        ``step`` and ``stage``: the path has one value per interval). A whole grid step,
        (t_from, t_to) = (grid.t[step], grid.t[step + 1]), uses the grid's own τ values."""
        t = self.t
        if 0 <= step < len(t) - 1 and t_from == t[step] and t_to == t[step + 1]:
            a, b = self.taus[step], self.taus[step + 1]
        else:
            a, b = self.tau(t_from), self.tau(t_to)
        if a == b:
            raise ValueError(f"Brownian tree: empty interval t = {t_from!r} → {t_to!r}")
        return self._increment_tau(x, a, b) * (1.0 / math.sqrt(abs(a - b)))

    def randn(self, x: Tensor, step: int, stage: int = 0) -> Tensor:
        """N(0, I) independent of the path and of every other (step, stage): the tree's
        ``NoiseSource.randn`` (draws that are not increments, e.g. Langevin corrector noise)."""
        return self.tree.randn(x, step, stage)

    def __repr__(self) -> str:
        return f"{self.tree!r}.bind(<{self.grid.steps} steps on [{self.a:.6g}, {self.b:.6g}]>)"
