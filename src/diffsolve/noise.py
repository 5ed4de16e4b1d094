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
``randn_like(x, step)`` for step i, which spans ``grid.t[i] → grid.t[i+1]``. A Brownian tree
(a later addition) subclasses :class:`NoiseSource`, remembers the grid in ``bind`` and returns
the normalised Brownian increment over that interval, so a sample is consistent across step
counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["NoiseSource", "bind"]


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

    def bind(self, grid: Any) -> NoiseSource:
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

    def __repr__(self) -> str:
        if self.generators is not None:
            return f"NoiseSource.from_seeds(<{len(self.generators)} seeds>)"
        return f"NoiseSource({'global RNG' if self.generator is None else self.generator})"
