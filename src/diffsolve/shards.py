"""Sample N images in shards across processes: resumable, atomic, the same set for any split.

``sample_shards(model, num_samples=N, shard_size=S, out_dir=DIR, solver=..., nfe=..., seed=s)``
writes ``DIR/shard-000000.npz`` … (``samples`` (n, ...) and ``indices`` (n,) int64 global
sample indices, plus ``cond_<key>`` for 1-D conditioning such as labels) and
``DIR/manifest.json``. The same call under ``torchrun --nproc_per_node=P`` splits the shards
over the ranks (shard k on rank k mod P; gloo on the CPU, NCCL on GPUs).

**Seeds.** Sample i is a function of i alone: x_T = ``process.prior`` drawn from
``torch.Generator().manual_seed(seed + i)`` (on the CPU, then moved: the same x_T on every
device), and a stochastic solver's noise is ``NoiseSource.from_seeds([seed + i])``'s
(counter-based, independent of the batch it is drawn in). So the set of samples does not depend
on the world size, the shard size or the batch size (per-sample generators as in EDM's
``generate.py``; bit for bit wherever the network's kernels give a sample the same bits in any
batch, as elementwise and per-sample matmul models do; a convolution network may differ in the
last bits between batch sizes, never between world sizes, whose batches are the same).

**Files.** Every file is written to a temporary file in DIR, flushed, fsync'ed and renamed over
its name (``os.replace``, atomic on POSIX), then the directory is fsync'ed: a reader sees a
whole shard or none. After its ``.npz`` a shard gets ``shard-K.json`` (its SHA-256, index range
and NFE): a shard is finished when both exist and the hash of the ``.npz`` matches. Rank 0
checks (or creates) the manifest before anything is sampled; after a barrier each rank samples
its unfinished shards; at the end the records are gathered (``all_gather_object``, so no rank
reads another's files) and rank 0 writes the manifest. A process killed at any moment (SIGKILL)
loses at most the shard it was writing: rerunning skips every finished, verified shard and
rewrites nothing. Memory is one shard (plus one batch), whatever N.

**Refusals** (ValueError, before any network call): a DIR whose manifest was made with another
model, process, solver, NFE, schedule, end rule, seed, conditioning rule, N, shard size, sample
shape or dtype (the differing fields are named); shard files without a manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .denoiser import DenoiserWrapper
from .noise import NoiseSource

__all__ = [
    "ShardRun",
    "cycle_labels",
    "load_shards",
    "model_digest",
    "sample_shards",
    "shard_summary",
    "write_atomic",
]

FORMAT = "diffsolve-shards"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^shard-(\d{6,})\.(npz|json)$")


def _shard_name(k: int, ext: str) -> str:
    return f"shard-{k:06d}.{ext}"


# -- atomic files ----------------------------------------------------------------------------
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one,
    never part of it: a temporary file in the same directory, fsync, ``os.replace``, fsync of
    the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # what open() would give (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- conditioning ----------------------------------------------------------------------------
@dataclass(frozen=True)
class cycle_labels:  # a function-like name: cond_fn=cycle_labels(range(10))
    """``cond_fn`` giving sample i the label ``values[i mod len(values)]`` (key ``key``)."""

    values: tuple[int, ...]
    key: str = "label"

    def __init__(self, values: Sequence[int], key: str = "label"):
        vals = tuple(int(v) for v in values)
        if not vals:
            raise ValueError("cycle_labels needs at least one value")
        object.__setattr__(self, "values", vals)
        object.__setattr__(self, "key", key)

    def __call__(self, indices: Tensor) -> dict[str, Tensor]:
        table = torch.tensor(self.values, dtype=torch.long, device=indices.device)
        return {self.key: table[indices % len(self.values)]}

    def __str__(self) -> str:
        return f"{self.key} = {list(self.values)}[i mod {len(self.values)}]"


def _cond_of(cond_fn: Callable[[Tensor], Mapping[str, Any]] | None, idx: Tensor) -> dict:
    if cond_fn is None:
        return {}
    cond = cond_fn(idx)
    if not isinstance(cond, Mapping):
        raise ValueError(f"cond_fn must return a dict of conditioning, got {type(cond).__name__}")
    return dict(cond)


def _cond_digest(cond_fn: Any, n: int) -> str | None:
    """SHA-256 of the conditioning of the first and last 16 samples: a changed rule is caught
    even where its description is the same."""
    if cond_fn is None:
        return None
    probe = torch.tensor(sorted(set(range(min(n, 16))) | set(range(max(n - 16, 0), n))))
    h = hashlib.sha256()
    for k, v in sorted(_cond_of(cond_fn, probe).items()):
        h.update(k.encode())
        if isinstance(v, Tensor):
            h.update(str(v.dtype).encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


# -- identity of a run -----------------------------------------------------------------------
def _network(model: Any) -> Any:
    inner = model
    while isinstance(inner, DenoiserWrapper):
        inner = inner.model
    return getattr(inner, "net", None)


def model_digest(model: Any) -> str | None:
    """SHA-256 of the network's parameters and buffers (names, dtypes, shapes, values), or None
    when the model's network is not an ``nn.Module``."""
    net = _network(model)
    if not isinstance(net, nn.Module):
        return None
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _describe_model(model: Any) -> str:
    parts = []
    inner = model
    while isinstance(inner, DenoiserWrapper):
        scale = getattr(inner, "scale", None)
        parts.append(type(inner).__name__ + (f"(scale={scale})" if scale is not None else ""))
        inner = inner.model
    parts.append(repr(inner))
    return " ∘ ".join(parts)


def _short(text: str) -> str:
    return text if len(text) <= 300 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# -- distributed -----------------------------------------------------------------------------
@dataclass
class _World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    device_ids: list[int] | None = None

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier(device_ids=self.device_ids)

    def gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _world(device: torch.device) -> _World:
    """The process group: torch.distributed's if initialised, else one from torchrun's
    environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL for CUDA, gloo else."""
    import torch.distributed as dist

    ids = [device.index or 0] if device.type == "cuda" else None
    if dist.is_available() and dist.is_initialized():
        return _World(dist.get_rank(), dist.get_world_size(), ids[0] if ids else 0, False, ids)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _World()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return _World(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True, ids
    )


def _default_device(model: Any, factory: bool) -> torch.device:
    net = _network(model) if not factory else None
    if isinstance(net, nn.Module):
        p = next(iter(net.parameters()), None)
        if p is not None:
            return p.device
    if factory and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# -- the run ---------------------------------------------------------------------------------
@dataclass
class ShardRun:
    """What :func:`sample_shards` did on this rank (the manifest is the whole run's)."""

    out_dir: Path
    manifest: dict[str, Any]
    written: list[int]  # shard ids this rank sampled
    skipped: list[int]  # shard ids this rank found finished and verified
    seconds: float
    samples_per_second: float  # this rank's sampling rate (samples it wrote / sampling time)
    rank: int = 0
    world_size: int = 1
    summary: dict[str, Any] | None = field(default=None)


def _config(
    model: Any,
    model_id: str | None,
    solver: Any,
    nfe: int | None,
    schedule: Any,
    final: Any,
    seed: int,
    cond_fn: Any,
    labels: str | None,
    n: int,
    s: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    options: dict[str, Any],
) -> dict[str, Any]:
    return {
        "model": model_id if model_id is not None else _describe_model(model),
        "model_sha256": model_digest(model),
        "process": repr(model.process),
        "solver": solver if isinstance(solver, str) else _short(repr(solver)),
        "options": {k: repr(v) for k, v in sorted(options.items())},
        "nfe": nfe,
        "schedule": schedule if schedule is None or isinstance(schedule, str) else repr(schedule),
        "final": final,
        "seed": seed,
        "seed_rule": "sample i: x_T = process.prior from torch.Generator().manual_seed(seed + i) "
        "(CPU); noise NoiseSource.from_seeds([seed + i])",
        "labels": labels if labels is not None else (None if cond_fn is None else str(cond_fn)),
        "labels_sha256": _cond_digest(cond_fn, n),
        "num_samples": n,
        "shard_size": s,
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
    }


def _check_dir(out: Path, config: dict[str, Any]) -> str | None:
    """None if DIR may take this run (the manifest is then written), else the reason."""
    path = out / MANIFEST
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except ValueError as e:
            return f"{path} is not valid JSON ({e}); move it away to start a new run"
        if doc.get("format") != FORMAT:
            return f"{path} is not a diffsolve shard manifest"
        old = doc.get("config", {})
        want = json.loads(json.dumps(config))
        diff = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} there, {want.get(k)!r} now" for k in diff)
            return (
                f"{out} holds samples of another run ({shown}); use another --out-dir "
                "(runs are never mixed)"
            )
        return None
    if any(_SHARD.match(p.name) for p in out.iterdir()):
        return f"{out} has shard files but no {MANIFEST}; refusing to mix runs"
    doc = {"format": FORMAT, "version": VERSION, "config": config, "complete": False, "shards": []}
    write_atomic(path, json.dumps(doc, indent=1).encode())
    return None


def _finished(out: Path, k: int, lo: int, hi: int) -> dict[str, Any] | None:
    """The record of shard k if its ``.npz`` exists and matches its sidecar's SHA-256."""
    side, npz = out / _shard_name(k, "json"), out / _shard_name(k, "npz")
    if not (side.is_file() and npz.is_file()):
        return None
    try:
        rec = json.loads(side.read_text())
    except ValueError:
        return None
    if rec.get("start") != lo or rec.get("stop") != hi or _sha256_file(npz) != rec.get("sha256"):
        return None
    return rec


def _x_T(process: Any, idx: range, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> Tensor:
    """x_T of samples idx, each from its own generator seeded seed + i."""
    return torch.cat(
        [
            process.prior(
                (1, *shape), generator=torch.Generator().manual_seed(seed + i), dtype=dtype
            )
            for i in idx
        ]
    )


class _NoBar:
    """The progress bar's interface where rich (the ``bench`` extra) is not installed."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        return None


def _progress(enabled: bool, what: str) -> Any:
    """Rank 0's bar: samples done of its share, samples/s, elapsed, ETA (rich)."""
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:  # the core needs only torch and numpy
        return _NoBar()
    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


def sample_shards(
    model: Any,
    *,
    num_samples: int,
    shard_size: int,
    out_dir: str | Path,
    solver: Any = "dpmpp_2m",
    nfe: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    cond_fn: Callable[[Tensor], Mapping[str, Any]] | None = None,
    schedule: Any = None,
    final: str | None = None,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    model_id: str | None = None,
    labels: str | None = None,
    summary: bool | str = False,
    progress: bool = True,
    cuda_graph: bool = False,
    **options: Any,
) -> ShardRun:
    """Sample ``num_samples`` samples into ``out_dir`` in shards of ``shard_size`` (see the
    module docstring): sample i from x_T seeded ``seed + i`` (per-sample seeds as in Karras et
    al. 2022's EDM ``generate.py``) and, for a stochastic solver, noise keyed by ``seed + i``
    (:class:`~diffsolve.noise.NoiseSource`); resumable; under torchrun the ranks share the
    shards. Shapes: each shard's ``samples`` is (n, *shape) in ``dtype``, ``indices`` (n,).

    Args:
        model: a :class:`~diffsolve.Denoiser` (or wrapper), or a factory building one:
            ``factory(device)`` (or ``factory()``), called once per process, so each rank loads
            its network onto its own device.
        num_samples, shard_size: N and S; shard k holds samples kS … min((k+1)S, N) − 1.
        out_dir: the directory (created); its ``manifest.json`` pins the run's configuration.
        solver, nfe, schedule, final, options: as :func:`diffsolve.sample`.
        seed: base seed: sample i uses seed + i for x_T and for its noise.
        batch_size: samples per network batch (does not change the samples).
        cond_fn: ``cond_fn(indices (B,) int64) -> cond`` (e.g. :class:`cycle_labels`), so the
            conditioning of sample i is a function of i. Recorded in the manifest by ``labels``
            (a description; default ``str(cond_fn)``) and by a hash of its output.
        shape: per-sample shape (default: the model's ``sample_shape``).
        dtype: of x_T and of the stored samples.
        device: where to sample (default: the network's device; for a factory, ``cuda:
            LOCAL_RANK`` when CUDA is available, else the CPU).
        model_id: the model's name in the manifest (default: a description of the model); the
            network's SHA-256 (``nn.Module`` parameters) is recorded in any case.
        summary: after the run, rank 0 streams over all shards for summary statistics
            (:func:`shard_summary`) into the manifest; ``"digits"`` adds FD-digits.
        progress: rank 0 shows a progress bar with samples/s and ETA.
        cuda_graph: passed to :func:`diffsolve.sample` (one graph per batch shape).

    Returns:
        A :class:`ShardRun` (this rank's work, the manifest rank 0 wrote).

    Raises:
        ValueError: bad sizes, an ``out_dir`` of another run, shard files without a manifest
            (all before any network call).
    """
    from .sample import sample

    for name, v in (
        ("num_samples", num_samples),
        ("shard_size", shard_size),
        ("batch_size", batch_size),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    factory = callable(model) and not hasattr(model, "process")
    dev = torch.device(device) if device is not None else _default_device(model, factory)
    world = _world(dev)
    try:
        if factory:
            takes = len(inspect.signature(model).parameters) > 0
            model = model(dev) if takes else model()
        if not hasattr(model, "process"):
            raise ValueError("model must be a Denoiser (with .process) or a factory of one")
        shp = tuple(shape) if shape is not None else getattr(model, "sample_shape", None)
        if shp is None:
            raise ValueError("give shape= (the model has no sample_shape)")
        shp = tuple(int(v) for v in shp)
        out = Path(out_dir)
        config = _config(
            model,
            model_id,
            solver,
            nfe,
            schedule,
            final,
            seed,
            cond_fn,
            labels,
            num_samples,
            shard_size,
            shp,
            dtype,
            options,
        )
        problem = None
        if world.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            for p in out.glob(".*.tmp"):  # a killed run's partial files (never visible names)
                with contextlib.suppress(OSError):
                    p.unlink()
            problem = _check_dir(out, config)
        problem = world.broadcast(problem)
        if problem is not None:
            raise ValueError(problem)
        out.mkdir(parents=True, exist_ok=True)  # ranks on other machines write locally
        return _run(
            model,
            world,
            out,
            config,
            dev,
            solver,
            nfe,
            schedule,
            final,
            seed,
            batch_size,
            cond_fn,
            shp,
            dtype,
            summary,
            progress,
            cuda_graph,
            options,
            sample,
        )
    finally:
        world.close()


def _run(
    model,
    world,
    out,
    config,
    dev,
    solver,
    nfe,
    schedule,
    final,
    seed,
    batch_size,
    cond_fn,
    shp,
    dtype,
    summary,
    progress,
    cuda_graph,
    options,
    sample,
) -> ShardRun:
    n, s = config["num_samples"], config["shard_size"]
    shards = math.ceil(n / s)
    mine = list(range(world.rank, shards, world.size))
    started = time.perf_counter()
    records: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for k in mine:
        rec = _finished(out, k, k * s, min((k + 1) * s, n))
        if rec is not None:
            records[k] = rec
        else:
            todo.append(k)
    skipped = sorted(records)
    extra = {"cuda_graph": True} if cuda_graph else {}
    total = sum(min((k + 1) * s, n) - k * s for k in todo)
    name = solver if isinstance(solver, str) else getattr(solver, "name", type(solver).__name__)
    what = f"rank 0 of {world.size} · {name} · NFE {config['nfe']}"
    done, t_sampling = 0, 0.0
    with _progress(progress and world.rank == 0, what) as bar:
        task = bar.add_task("shards", total=total, rate="")
        for k in todo:
            lo, hi = k * s, min((k + 1) * s, n)
            t0 = time.perf_counter()
            parts: list[Tensor] = []
            conds: dict[str, list[Tensor]] = {}
            nfe_done: int | None = None
            for b in range(lo, hi, batch_size):
                idx = range(b, min(b + batch_size, hi))
                x = _x_T(model.process, idx, shp, seed, dtype).to(dev)
                itensor = torch.arange(idx.start, idx.stop, dtype=torch.long)
                cond = _cond_of(cond_fn, itensor.to(dev))
                noise = NoiseSource.from_seeds([seed + i for i in idx])
                x0, info = sample(
                    model,
                    x,
                    solver,
                    nfe,
                    schedule=schedule,
                    final=final,
                    cond=cond,
                    noise=noise,
                    return_info=True,
                    **extra,
                    **options,
                )
                nfe_done = info.nfe
                parts.append(x0.detach().to("cpu", dtype))
                for key, v in cond.items():
                    if isinstance(v, Tensor) and v.ndim == 1:
                        conds.setdefault(key, []).append(v.detach().cpu())
                done += len(idx)
                elapsed = t_sampling + time.perf_counter() - t0
                rate = f"{done / max(elapsed, 1e-9):.1f} samples/s"
                bar.update(task, advance=len(idx), rate=rate)
            arrays: dict[str, Any] = {
                "samples": torch.cat(parts).numpy(),
                "indices": np.arange(lo, hi, dtype=np.int64),
            }
            arrays.update({f"cond_{key}": torch.cat(v).numpy() for key, v in conds.items()})
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            data = buf.getvalue()
            write_atomic(out / _shard_name(k, "npz"), data)
            rec = {
                "file": _shard_name(k, "npz"),
                "shard": k,
                "start": lo,
                "stop": hi,
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "nfe": nfe_done,
                "seconds": time.perf_counter() - t0,
                "rank": world.rank,
            }
            write_atomic(out / _shard_name(k, "json"), json.dumps(rec).encode())
            records[k] = rec
            t_sampling += time.perf_counter() - t0
    gathered = world.gather(records)
    manifest: dict[str, Any] = {}
    result_summary = None
    if world.rank == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        doc = json.loads((out / MANIFEST).read_text())
        doc["shards"] = [merged[k] for k in sorted(merged)]
        doc["complete"] = len(merged) == shards
        doc["world_size"] = world.size
        write_atomic(out / MANIFEST, json.dumps(doc, indent=1).encode())
        if summary and doc["complete"]:  # streamed over the shards the manifest lists
            result_summary = shard_summary(out, fd_digits=summary == "digits")
            doc["summary"] = result_summary
            write_atomic(out / MANIFEST, json.dumps(doc, indent=1).encode())
        manifest = doc
    manifest = world.broadcast(manifest)
    world.barrier()
    return ShardRun(
        out_dir=out,
        manifest=manifest,
        written=todo,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        samples_per_second=done / t_sampling if t_sampling > 0 else 0.0,
        rank=world.rank,
        world_size=world.size,
        summary=result_summary if result_summary is not None else manifest.get("summary"),
    )


def _shard_files(out: Path) -> tuple[list[Path], dict[str, Any]]:
    doc = json.loads((Path(out) / MANIFEST).read_text())
    return [Path(out) / r["file"] for r in doc["shards"]], doc


def load_shards(out_dir: str | Path, verify: bool = True) -> tuple[Tensor, Tensor]:
    """All samples of a shard directory in index order: ``(samples (N, ...), indices (N,))``.

    With ``verify`` every shard's SHA-256 is checked against the manifest (ValueError if one
    differs), the indices must be 0…N−1 exactly once and the run complete.
    """
    files, doc = _shard_files(Path(out_dir))
    xs, ids = [], []
    for path, rec in zip(files, doc["shards"]):
        if verify and _sha256_file(path) != rec["sha256"]:
            raise ValueError(f"{path}: SHA-256 differs from the manifest (corrupted shard)")
        with np.load(path) as z:
            xs.append(torch.from_numpy(z["samples"]))
            ids.append(torch.from_numpy(z["indices"]))
    x, idx = torch.cat(xs), torch.cat(ids)
    order = torch.argsort(idx)
    x, idx = x[order], idx[order]
    n = doc["config"]["num_samples"]
    if verify and (not doc.get("complete") or not torch.equal(idx, torch.arange(n))):
        raise ValueError(f"{out_dir}: incomplete run (indices are not 0…{n - 1} exactly once)")
    return x, idx


def shard_summary(out_dir: str | Path, fd_digits: bool = False) -> dict[str, Any]:
    """Summary statistics over all shards, streamed one shard at a time (memory of one shard):
    count, mean, std, min, max, the fraction of values outside [−1, 1]; with ``fd_digits`` the
    FD-digits of :mod:`diffsolve.bench.digits` from streamed feature moments (float64 Σf and
    Σffᵀ), against the real digits of the stored ``cond_label`` classes where given."""
    files, _ = _shard_files(Path(out_dir))
    count, s1, s2 = 0, 0.0, 0.0
    lo, hi, outside = math.inf, -math.inf, 0
    f1 = f2 = None
    classes: set[int] = set()
    for path in files:
        with np.load(path) as z:
            x = z["samples"].astype(np.float64)
            labels = z["cond_label"] if "cond_label" in z.files else None
        count += x.size
        s1 += float(x.sum())
        s2 += float((x * x).sum())
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        outside += int((np.abs(x) > 1).sum())
        if fd_digits:
            from .bench.digits import digits_features

            f = digits_features(torch.from_numpy(x).float()).to(torch.float64).numpy()
            f1 = f.sum(0) if f1 is None else f1 + f.sum(0)
            f2 = f.T @ f if f2 is None else f2 + f.T @ f
            if labels is not None:
                classes |= {int(v) for v in labels if v >= 0}
    mean = s1 / count
    doc: dict[str, Any] = {
        "values": count,
        "mean": mean,
        "std": math.sqrt(max(s2 / count - mean * mean, 0.0)),
        "min": lo,
        "max": hi,
        "fraction_outside_unit": outside / count,
    }
    if fd_digits and f1 is not None:
        from .bench.digits import _real_stats, frechet_distance

        m = sum(_n_samples(p) for p in files)
        mu = f1 / m
        cov = (f2 - m * np.outer(mu, mu)) / (m - 1)
        mu_r, cov_r = _real_stats(tuple(sorted(classes)) or None)
        doc["fd_digits"] = frechet_distance(mu, cov, mu_r, cov_r)
        doc["fd_digits_samples"] = m
    return doc


def _n_samples(path: Path) -> int:
    with np.load(path) as z:
        return int(z["indices"].shape[0])
