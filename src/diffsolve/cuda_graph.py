"""The sampling loop as one CUDA graph: capture once for fixed shapes, replay.

``ds.sample(model, x_T, solver, nfe, cuda_graph=True)`` runs the loop of :func:`diffsolve.sample`
(the solver's ``init``, every step, the end rule) through :func:`replay_loop`: the first call
for a configuration runs the loop once eagerly on a side stream (the warm-up: cuBLAS handles,
the noise source's key tensors, lazily built buffers), then captures it with
``torch.cuda.graph`` and replays it; later calls with the same model, solver, grid, end rule,
shapes and dtypes copy x_T, the conditioning tensors and the noise keys into the graph's static
buffers and replay, so a run costs one graph launch instead of a few hundred kernel launches
and Python steps (Nvidia, "CUDA Graphs", CUDA programming guide §3.2.8.7; PyTorch
``torch.cuda.graphs``). A loop that cannot be captured raises :class:`HostSyncError`.

Replay is the eager loop: the same kernels on the same inputs, so the sample equals the eager
one (bit for bit where the kernels are deterministic). The NaN/Inf watch survives: its per-call
flags are captured into one static tensor, read once after the replay.

What a graph cannot hold, refused with a ValueError before any network call: x off CUDA (on
the CPU use :func:`check_capturable`), a ``callback`` (host code between steps),
``check_finite="step"`` (a host read per call), an adaptive solver (its step count depends on
the data), noise other than a :class:`~diffsolve.noise.NoiseSource` for a stochastic solver (a
:class:`~diffsolve.noise.BrownianTree` copies node ids to the device every step).

On the CPU, :func:`check_capturable` runs the very loop a capture would record under
:class:`NoHostSync`, a dispatch mode that raises :class:`HostSyncError` on every operation that
reads device data on the host (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``,
``.numpy()``, data-dependent shapes such as ``nonzero`` or boolean indexing) or feeds a tensor
built from host data to device data (``torch.tensor(list)``: a host-to-device copy on a GPU),
so a model and solver can be checked for capture without a GPU.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from .noise import NoiseSource

if TYPE_CHECKING:
    from .sample import SampleInfo

__all__ = ["HostSyncError", "NoHostSync", "check_capturable", "clear_cache", "replay_loop"]

_CACHE_SIZE = 8


class HostSyncError(ValueError):
    """An operation inside the loop synchronises with the host (or copies host data to the
    device): it cannot be captured in a CUDA graph."""


_READS = {
    "aten::_local_scalar_dense": "reads a device value on the host (.item(), bool(t), float(t))",
    "aten::nonzero": "has a data-dependent shape (nonzero)",
    "aten::masked_select": "has a data-dependent shape (masked_select)",
    "aten::_unique2": "has a data-dependent shape (unique)",
    "aten::unique_dim": "has a data-dependent shape (unique)",
    "aten::unique_consecutive": "has a data-dependent shape (unique_consecutive)",
}
_FRESH = ("aten::lift_fresh", "aten::lift_fresh_copy")


class NoHostSync(TorchDispatchMode):
    """Raise :class:`HostSyncError` on what a CUDA graph cannot capture, emulated on any device.

    A GPU run has two kinds of tensors, and the CPU has one, so the mode tracks where each
    tensor would live on a GPU: a tensor built from host data inside the mode (``torch.tensor
    (list)``, ``as_tensor``) and whatever is computed from such tensors alone is *host* data;
    float64 tensors that existed before the mode are host data too (the project's convention:
    coefficients and grids in float64 on the host, samples in float32 on the device; run the
    check with a float32 sample); every other tensor (x, conditioning, parameters, noise keys,
    results touching any of them) is *device* data. Raised: a host read of device data
    (``.item()``, ``bool``/``float``/``int`` of a tensor, ``.tolist()``, ``.numpy()``,
    data-dependent shapes: ``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``),
    and an operation mixing host data of more than one element with device data (a
    host-to-device copy inside the loop). Host-side float64 arithmetic (coefficients computed
    and read on the host) passes, as it does on a GPU. ``.tolist()`` and ``.numpy()`` do not
    dispatch, so they are patched while the mode is active (not thread-safe: a checking tool).
    """

    def __init__(self) -> None:
        super().__init__()
        self._host = WeakIdKeyDictionary()  # made in the mode from host data
        self._made = WeakIdKeyDictionary()  # made in the mode from device data

    def _is_host(self, t: Any) -> bool:
        if not isinstance(t, Tensor) or t in self._made:
            return False
        return t in self._host or t.dtype == torch.float64  # made before: float64 is host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        device = [t for t in tensors if not self._is_host(t)]
        host = [t for t in tensors if self._is_host(t)]
        if device:
            why = _READS.get(name)
            if why is None and name == "aten::index" and len(args) > 1:
                if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in args[1]):
                    why = "indexes with a boolean mask (a data-dependent shape)"
            if why is None and any(t.numel() > 1 for t in host):
                why = "mixes a tensor built from host data with device data (a host-to-device copy)"
            if why is not None:
                raise HostSyncError(f"{func} {why}: not capturable in a CUDA graph")
        out = func(*args, **kwargs)
        made = self._host if name in _FRESH or (host and not device) else self._made
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                made[t] = True
        return out

    def __enter__(self):
        self._saved = (Tensor.tolist, Tensor.numpy)
        mode = self

        def refuse(what: str, orig: Callable[..., Any]) -> Callable[..., Any]:
            def f(t: Tensor, *a: Any, **k: Any) -> Any:
                if not mode._is_host(t):
                    raise HostSyncError(f"Tensor.{what}() reads device data on the host")
                return orig(t, *a, **k)

            return f

        Tensor.tolist = refuse("tolist", Tensor.tolist)  # type: ignore[method-assign]
        Tensor.numpy = refuse("numpy", Tensor.numpy)  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any):
        Tensor.tolist, Tensor.numpy = self._saved  # type: ignore[method-assign]
        return super().__exit__(*exc)


@dataclass
class _Graph:
    """One captured loop and everything its kernels read (kept alive with it)."""

    graph: Any  # torch.cuda.CUDAGraph
    x_in: Tensor
    x_out: Tensor
    cond: dict[str, Tensor]  # private copies of the tensors in the first call's cond
    keys: Tensor | None  # the private noise source's per-sample keys (B, 1) int64
    flags: Tensor | None  # the NaN/Inf probes of every call, stacked: 0 where finite
    where: list[tuple[int, float]]
    nfe: int
    recent: Any
    keep: tuple[Any, ...]  # plan, evaluator, noise, model: their device tensors feed the graph


_cache: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
_cpu_check = False  # set by check_capturable: run the loop guarded on any device


def clear_cache() -> None:
    """Drop every cached graph (and the memory its pool holds)."""
    _cache.clear()


def _validate(x: Tensor, ev: Any, noise: Any, solver: Any, callback: Any) -> None:
    if callback is not None:
        raise ValueError("cuda_graph=True runs the loop as one graph: no callback between steps")
    if ev.check == "step":
        raise ValueError("cuda_graph=True reads the NaN/Inf flags once: use check_finite=True")
    if getattr(solver, "adaptive", False):
        raise ValueError(
            f"cuda_graph=True needs a fixed step count; {solver.name} chooses its own steps"
        )
    if solver.stochastic and type(noise) is not NoiseSource:
        raise ValueError(
            "cuda_graph=True draws noise inside the graph from a counter-based NoiseSource; "
            f"got {type(noise).__name__} (a BrownianTree copies to the device every step)"
        )
    if not _cpu_check and not x.is_cuda:
        raise ValueError(
            f"cuda_graph=True needs x on a CUDA device, got {x.device} "
            f"(CUDA available: {torch.cuda.is_available()}); on the CPU, "
            "diffsolve.cuda_graph.check_capturable checks the loop for host syncs"
        )


def _signature(x: Tensor, ev: Any, noise: Any, plan: Any, solver: Any) -> tuple[Any, ...]:
    cond = tuple(
        (k, tuple(v.shape), v.dtype, v.device) if isinstance(v, Tensor) else (k, repr(v))
        for k, v in sorted(ev.cond.items())
    )
    keyed = None if noise is None else (noise.seeds is not None, noise.indices is not None)
    return (
        id(ev.model),
        repr(solver),
        tuple(plan.t.tolist()),
        plan.steps,
        bool(plan.clean_end),
        tuple(x.shape),
        x.dtype,
        x.device,
        cond,
        keyed,
        ev.check,
        ev._keep,
    )


def _private(ev: Any, noise: Any) -> tuple[Any, Any]:
    """Copies of the evaluator's conditioning tensors and of the noise source, so later
    replays write their inputs into buffers the caller does not own."""
    ev.cond = {k: v.clone() if isinstance(v, Tensor) else v for k, v in ev.cond.items()}
    if noise is not None:
        noise = copy.copy(noise)
        noise._keys, noise._counters = {}, {}
    return ev, noise


def _capture(loop: Callable[..., Tensor], x: Tensor, ev: Any, noise: Any) -> _Graph:
    ev, noise = _private(ev, noise)
    x_in = x.clone()
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        loop(x_in, ev, noise)  # warm-up: fills the caches (noise keys, handles) a capture can't
    torch.cuda.current_stream(x.device).wait_stream(side)
    n0 = len(ev._flags)
    nfe0 = ev.nfe
    ev.recent.clear()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            x_out = loop(x_in, ev, noise)
            flags = torch.stack(ev._flags[n0:]) if len(ev._flags) > n0 else None
    except RuntimeError as e:  # a sync or a pageable copy inside the loop
        raise HostSyncError(
            f"the loop could not be captured ({e}); diffsolve.cuda_graph.check_capturable "
            "finds the operation on the CPU"
        ) from e
    keys = None
    if noise is not None and noise._keys:
        keys = noise._keys[(x.shape[0], x.device)]
    return _Graph(
        graph=graph,
        x_in=x_in,
        x_out=x_out,
        cond={k: v for k, v in ev.cond.items() if isinstance(v, Tensor)},
        keys=keys,
        flags=flags,
        where=list(ev._where[n0:]),
        nfe=ev.nfe - nfe0,
        recent=ev.recent,
        keep=(ev, noise, ev.model),
    )


def replay_loop(
    loop: Callable[..., Tensor],
    x: Tensor,
    ev: Any,
    noise: Any,
    *,
    plan: Any,
    solver: Any,
    callback: Any = None,
) -> Tensor:
    """Run ``loop(x, ev, noise)`` (the loop of :func:`diffsolve.sample`) as a CUDA graph.

    Args:
        loop: the loop body: solver init, steps, end rule; returns the sample (B, ...).
        x: x_T (B, ...) on a CUDA device (the loop's own scale).
        ev: the loop's evaluator (model, conditioning, NaN/Inf flags, NFE count); after the
            replay it holds this run's flags and NFE as an eager run leaves them.
        noise: the run's noise source (None or a :class:`~diffsolve.noise.NoiseSource`).
        plan, solver, callback: the run's plan and solver (part of the cache key) and its
            callback (refused).

    Returns:
        The sample (a fresh tensor, not the graph's static output).
    """
    _validate(x, ev, noise, solver, callback)
    if _cpu_check:
        return _guarded(loop, x, ev, noise)
    key = _signature(x, ev, noise, plan, solver)
    g = _cache.get(key)
    if g is None or g.keep[2] is not ev.model:
        g = _capture(loop, x, ev, noise)
        g.keep = (*g.keep, plan)
        _cache[key] = g
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    g.x_in.copy_(x)
    for k, buf in g.cond.items():
        buf.copy_(ev.cond[k])
    if g.keys is not None:
        g.keys.copy_(noise._state(x)[0])
    g.graph.replay()
    ev.nfe = g.nfe  # the evaluator as an eager run leaves it: NFE, flags, recent x̂0's
    ev._flags = [] if g.flags is None else list(g.flags.clone().unbind())
    ev._where = list(g.where)
    ev.recent = g.recent
    return g.x_out.clone()


def _guarded(loop: Callable[..., Tensor], x: Tensor, ev: Any, noise: Any) -> Tensor:
    """What a capture does, eagerly and on any device: one warm-up run, then the run under
    :class:`NoHostSync` (the one returned)."""
    if x.dtype == torch.float64:
        raise ValueError("check_capturable tells host from device data by dtype: use float32 x")
    ev, noise = _private(ev, noise)
    n0, nfe0 = len(ev._flags), ev.nfe
    loop(x.clone(), ev, noise)
    del ev._flags[n0:], ev._where[n0:]
    ev.nfe = nfe0
    ev.recent.clear()
    with NoHostSync():
        return loop(x, ev, noise)


@contextlib.contextmanager
def _checking() -> Iterator[None]:
    global _cpu_check
    saved, _cpu_check = _cpu_check, True
    try:
        yield
    finally:
        _cpu_check = saved


def check_capturable(
    model: Any, x: Tensor, solver: Any = "dpmpp_2m", nfe: int | None = None, **kwargs: Any
) -> Tensor | tuple[Tensor, SampleInfo]:
    """Run ``ds.sample(model, x, solver, nfe, cuda_graph=True, **kwargs)`` on any device with
    the loop a capture would record executed under :class:`NoHostSync` (after one unguarded
    warm-up run, as a capture does); returns the sample, equal to the eager one (and its
    :class:`~diffsolve.sample.SampleInfo` with ``return_info=True``, as ``sample``).

    Raises:
        HostSyncError: an operation in the loop (the solver, the noise, the model or the
            network) reads device data on the host or copies host data to the device; the
            message names it and the traceback shows where.
        ValueError: what ``cuda_graph=True`` refuses (callback, adaptive solver, ...),
            except that x may live on the CPU.
    """
    from .sample import sample

    with _checking():
        return sample(model, x, solver, nfe, cuda_graph=True, **kwargs)
