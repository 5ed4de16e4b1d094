"""``diffsolve sample``: draw samples from a shipped network, write a PNG grid and an ``.npz``.

    diffsolve sample --model digits-vp --solver unipc --nfe 10 --guidance 3 --label 7 \\
        --seed 0 --n 64 --out grid.png

x_T comes from ``--seed`` (and stochastic solvers' noise from ``--seed`` too), so a command
line always gives the same samples. ``--guidance w`` applies classifier-free guidance (one NFE per
guided call: the conditional and null-class branches run as one doubled batch).

``--solver auto`` takes the solver, schedule and end rule ``ds.sample(..., solver="auto")``
recommends for the budget, the process and the guidance. The adaptive solvers (``rk45``,
``dpm_adaptive``) choose their own steps: give ``--rtol`` / ``--atol`` instead of ``--nfe``.

``--tuned FILE`` samples with a solver that ``diffsolve tune`` (or ``Tuned.save``) wrote, on its
own grid and NFE: the file is validated against the network (``ds.load_tuned(path,
model=...)``), so one made for another model or process is refused.

``--num-samples N --shard-size S --out-dir DIR`` writes resumable shards instead of a PNG
(``ds.sample_shards``; sample i seeded ``--seed`` + i, the same set under ``torchrun
--nproc_per_node=P -m diffsolve sample ...`` for any P; docs/sharding.md).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import typer

__all__ = ["parse_labels", "sample", "save_grid", "write_samples"]


def parse_labels(text: str | None, n: int, guided: bool) -> list[int] | None:
    """``--label``: one class, a comma list (cycled), ``all`` (0…9 cycled), ``none`` (−1).

    Without ``--label``: unconditional, or 0…9 cycled when guidance is on (guidance needs a
    class to steer toward).
    """
    if text is None:
        text = "all" if guided else "none"
    t = text.strip().lower()
    if t == "none":
        if guided:
            raise typer.BadParameter("--guidance needs a class: give --label (or 'all')")
        return None
    if t == "all":
        return [i % 10 for i in range(n)]
    try:
        items = [int(s) for s in t.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"--label takes 0…9, a comma list, 'all' or 'none'; got {text!r}"
        ) from None
    if not items or any(not -1 <= v <= 9 for v in items):
        raise typer.BadParameter(f"labels must be in 0…9 (or −1 for none); got {text!r}")
    if guided and any(v < 0 for v in items):
        raise typer.BadParameter("--guidance needs a class: label −1 is the unconditional one")
    return [items[i % len(items)] for i in range(n)]


def _steering(
    steer: str | None,
    reward: str | None,
    particles: int,
    n: int,
    batch: int,
    label: str | None,
    out_dir: str | None,
    num_samples: int | None,
) -> Any:
    """``--steer fk --reward digit=D --particles K``: a :class:`~diffsolve.FK` whose reward is
    the shipped classifier's log-probability of D on the sample (``--steer svdd``: a
    :class:`~diffsolve.SVDD` with K candidates per step); checked before any work."""
    if steer is None:
        if reward is not None:
            raise typer.BadParameter("--reward needs --steer fk|svdd", param_hint="--reward")
        return None
    if steer not in ("fk", "svdd"):
        raise typer.BadParameter(
            f"--steer takes 'fk' or 'svdd', got {steer!r}", param_hint="--steer"
        )
    if out_dir is not None or num_samples is not None:
        raise typer.BadParameter("--steer is not for sharded runs", param_hint="--steer")
    if label is not None:
        raise typer.BadParameter(
            "--steer samples the unconditional model toward --reward: omit --label",
            param_hint="--label",
        )
    digit = None
    if reward is not None and reward.startswith("digit="):
        tail = reward.split("=", 1)[1]
        digit = int(tail) if tail.isdigit() else None
    if digit is None or not 0 <= digit <= 9:
        raise typer.BadParameter(f"--reward takes digit=0…9, got {reward!r}", param_hint="--reward")
    if steer == "fk" and (n % particles or batch % particles):
        raise typer.BadParameter(
            f"--n ({n}) and --batch ({batch}) must be multiples of --particles ({particles})",
            param_hint="--particles",
        )
    import torch

    from . import nets
    from .guidance import FK, SVDD

    clf = nets.classifier()

    def log_prob(x: Any) -> Any:
        with torch.no_grad():
            return torch.log_softmax(clf(x.to(torch.float32)), dim=1)[:, digit].to(x.dtype)

    if steer == "svdd":
        return SVDD(log_prob, candidates=particles)
    return FK(log_prob, particles=particles)


def save_grid(x: Any, path: str | Path, scale: int = 4, pad: int = 1) -> Path:
    """Write samples (B, 1, H, W) in [−1, 1] as a square PNG grid (white on black, like the data).

    Each sample is clipped to [−1, 1], magnified ``scale``× (nearest) and separated by ``pad``
    grey pixels.
    """
    import numpy as np
    from matplotlib import image as mimage

    a = np.asarray(x, dtype=np.float64)
    a = (np.clip(a, -1.0, 1.0) + 1.0) / 2.0
    b, _, h, w = a.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    hs, ws = h * scale, w * scale
    grid = np.full((rows * (hs + pad) + pad, cols * (ws + pad) + pad), 0.35)
    for k in range(b):
        r, c = divmod(k, cols)
        tile = np.kron(a[k, 0], np.ones((scale, scale)))
        y0, x0 = pad + r * (hs + pad), pad + c * (ws + pad)
        grid[y0 : y0 + hs, x0 : x0 + ws] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mimage.imsave(str(path), grid, cmap="gray", vmin=0.0, vmax=1.0)
    return path


def write_samples(x: Any, labels: Any, meta: dict[str, Any], path: str | Path) -> Path:
    """``.npz`` with ``samples`` (B, 1, 8, 8) float32 in [−1, 1], ``pixels`` (0…16, clipped),
    ``labels`` (−1 = unconditional) and ``meta`` (the command's settings as JSON)."""
    import numpy as np

    s = np.asarray(x, dtype=np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        samples=s,
        pixels=((np.clip(s, -1, 1) + 1) * 8).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        meta=np.asarray(json.dumps(meta)),
    )
    return path


def _planned_steps(model: Any, solver: Any, schedule: Any, nfe: int) -> int | None:
    from .schedules import get_schedule

    try:
        sched = get_schedule(schedule if schedule is not None else solver.default_schedule)
        times = solver.grid_times(model.process, sched, solver.budget(nfe, True), True)
        return int(times.numel())
    except Exception:  # the bar then counts without a total
        return None


def _tolerances(solver: str, tolerances: dict[str, float], nfe: int | None) -> dict[str, float]:
    """``--rtol``/``--atol`` for an adaptive solver (which takes no ``--nfe``); refused for the
    others, whose steps come from ``--nfe``."""
    from .solvers.base import get_solver

    default = get_solver(solver)
    adaptive = bool(getattr(default, "adaptive", False))
    if adaptive and nfe is not None:
        raise ValueError(
            f"{solver} chooses its own steps: omit --nfe and set --rtol/--atol "
            f"(default rtol {getattr(default, 'rtol', '?')})"
        )
    if tolerances and not adaptive:
        raise ValueError(
            f"--rtol/--atol are for the adaptive solvers (rk45, dpm_adaptive); {solver} takes "
            "its steps from --nfe"
        )
    return tolerances


def _load_tuned(
    path: str, den: Any, model: str, nfe: int | None, guidance: float | None, console: Any
) -> Any:
    """``--tuned``: the file validated against the network (process, prediction type, NFE and,
    for a file written by ``diffsolve tune``, the model it was tuned on); a different guidance
    scale is allowed with a warning (the tuned ODE is the guided one)."""
    from .tuning import TunedFileError, load_tuned

    tuned = load_tuned(path, model=den, nfe=nfe)
    cal = tuned.info.get("calibration") or {}
    if cal.get("model") not in (None, model):
        raise TunedFileError(f"{path}: tuned for the model {cal['model']!r}, not {model!r}")
    if "model" in cal and cal.get("guidance") != guidance:
        console.print(
            f"[yellow]warning:[/yellow] {path} was tuned at guidance {cal.get('guidance') or 1:g}, "
            f"sampling at {guidance or 1:g}"
        )
    return tuned


def sample(
    model: str = typer.Option("digits-vp", help="shipped network (digits-vp, digits-flow)"),
    sampler: str = typer.Option(
        None, help="digits-masked only: fhs (default), ancestral or tau_leap"
    ),
    steps: int = typer.Option(
        None, min=1, help="digits-masked only: network calls (fhs: at most 64, default 64)"
    ),
    solver: str = typer.Option(
        None, help="solver name or 'auto' (see `diffsolve list`) (default: unipc)"
    ),
    nfe: int | None = typer.Option(
        None,
        min=1,
        help="network evaluations per sample (default: 10, or the tuned file's; adaptive "
        "solvers choose their own)",
    ),
    rtol: float = typer.Option(
        None, help="adaptive solvers (rk45, dpm_adaptive): relative tolerance (instead of --nfe)"
    ),
    atol: float = typer.Option(None, help="adaptive solvers: absolute tolerance"),
    schedule: str = typer.Option(None, help="timestep schedule (default: the solver's own)"),
    tuned: str = typer.Option(
        None,
        help="a tuned-solver file (`diffsolve tune`): sample on its grid and NFE "
        "(instead of --solver)",
    ),
    guidance: float = typer.Option(None, help="classifier-free guidance scale w (1 = none)"),
    label: str = typer.Option(
        None, help="class 0…9, a comma list, 'all' or 'none' (default: none, or all if guided)"
    ),
    n: int = typer.Option(64, min=1, help="number of samples"),
    seed: int = typer.Option(0, help="seed of x_T (and of a stochastic solver's noise)"),
    batch: int = typer.Option(256, min=1, help="samples per network batch"),
    out: str = typer.Option("grid.png", help="PNG grid path; the .npz goes next to it"),
    npz: str = typer.Option(None, help="path of the .npz (default: --out with .npz)"),
    final: str = typer.Option(
        None, help="standard, extrapolate or tmin (default: standard, or the tuned file's)"
    ),
    score: bool = typer.Option(False, help="print FD-digits (and class accuracy with labels)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    threads: int = typer.Option(
        1, min=0, help="torch intra-op threads (0: torch's default; the nets are tiny)"
    ),
    num_samples: int = typer.Option(
        None, min=1, help="with --out-dir: samples in all (default: --n); sample i seeded seed+i"
    ),
    shard_size: int = typer.Option(1000, min=1, help="with --out-dir: samples per shard file"),
    steer: str = typer.Option(
        None,
        help="'fk': Feynman–Kac steering toward --reward (ds.FK); 'svdd': soft value-based "
        "decoding (ds.SVDD, --particles candidates per step); both want a stochastic --solver",
    ),
    reward: str = typer.Option(
        None, help="with --steer: 'digit=D', the shipped classifier's log-probability of D"
    ),
    particles: int = typer.Option(
        8, min=1, help="with --steer: particles per block (fk) or candidates per step (svdd)"
    ),
    out_dir: str = typer.Option(
        None,
        help="write resumable shards DIR/shard-*.npz and DIR/manifest.json (torchrun-aware) "
        "instead of --out",
    ),
) -> None:
    """Sample a shipped network; write a PNG grid and an .npz of the samples."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import nets
    from .auto import is_guided, recommend
    from .sample import sample as ds_sample
    from .solvers.base import get_solver

    if score:
        from .cli import require_digits_extra

        require_digits_extra("sample --score")
    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    if model == "digits-masked" or sampler is not None or steps is not None:
        _masked(model, sampler, steps, n, seed, batch, out, npz, score, console)
        return
    guided = guidance is not None and guidance != 1.0
    steer_obj = _steering(steer, reward, particles, n, batch, label, out_dir, num_samples)
    rec: Any = None  # solver "auto": the recommendation ds.sample follows
    tolerances = {k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None}
    if tuned is not None:
        for given, flag in (
            (solver, "--solver"),
            (schedule, "--schedule"),
            (rtol, "--rtol"),
            (atol, "--atol"),
        ):
            if given is not None:
                raise typer.BadParameter(
                    "a tuned solver runs on its own grid: give --tuned or --solver/--schedule",
                    param_hint=flag,
                )
    try:
        labels = parse_labels(label, n, guided)
        den = nets.model(model, guidance=guidance if guided else None)
        if tuned is not None:
            solver_obj = _load_tuned(tuned, den, model, nfe, guidance if guided else None, console)
            solver = f"tuned:{solver_obj.info.get('method', '?')}"
            nfe = solver_obj.nfe
        elif solver == "auto":  # resolved by ds.sample; the same recommendation shown here
            if tolerances:
                raise ValueError("--rtol/--atol are for the adaptive solvers (rk45, dpm_adaptive)")
            nfe = 10 if nfe is None else nfe
            rec = recommend(den.process, nfe, guided=is_guided(den))
            solver_obj = rec.solver
        else:
            solver = solver or "unipc"
            solver_obj = get_solver(solver, **_tolerances(solver, tolerances, nfe))
    except (ValueError, nets.WeightsError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    adaptive = bool(getattr(solver_obj, "adaptive", False))
    nfe = None if adaptive else (10 if nfe is None else nfe)
    if out_dir is not None or num_samples is not None:  # sharded (diffsolve.shards)
        if out_dir is None:
            raise typer.BadParameter("give --out-dir for the shards", param_hint="--num-samples")
        solver_arg = "auto" if solver == "auto" else solver_obj
        _sample_to_dir(
            model, guidance if guided else None, label, guided, solver_arg, nfe, schedule, final,
            num_samples or n, shard_size, out_dir, seed, batch, score, progress, console,
        )  # fmt: skip
        return
    process = den.process
    shape = (n, *nets.SAMPLE_SHAPE)
    g = torch.Generator().manual_seed(seed)
    x_T = process.prior(shape, generator=g, dtype=torch.float32)
    lab = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    planned: int | None  # solver steps per chunk, for the progress bar (not the --steps option)
    if tuned is not None:
        planned = len(solver_obj.steps)
    elif solver == "auto":
        planned = _planned_steps(den, rec.solver, schedule or rec.schedule, nfe)
    elif adaptive:
        planned = None  # the bar counts steps without a total
    else:
        planned = _planned_steps(den, solver_obj, schedule, nfe)
    if solver == "auto":
        shown = f"auto: {rec.solver.name} · NFE {nfe}"
    elif adaptive:
        shown = f"{solver} · rtol {solver_obj.rtol:g}, atol {solver_obj.atol:g}"
    else:
        shown = f"{solver} · NFE {nfe}"
    chunks = list(range(0, n, batch))
    outs = []
    nfe_done = 0
    started = time.perf_counter()
    with Progress(
        TextColumn(f"{model} · {shown}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task("sampling", total=planned * len(chunks) if planned else None)
        for lo in chunks:
            sl = slice(lo, lo + batch)
            cond = {"label": lab[sl]} if lab is not None else {}
            noise_gen = torch.Generator().manual_seed(seed + 1 + lo)
            try:
                x0, info = ds_sample(
                    den,
                    x_T[sl],
                    solver="auto" if solver == "auto" else solver_obj,
                    nfe=nfe,
                    schedule=schedule,
                    final=final,
                    cond=cond,
                    generator=noise_gen if solver_obj.stochastic else None,
                    callback=lambda i, x, state: bar.advance(task),
                    steer=steer_obj,
                    return_info=True,
                )
            except ValueError as e:
                console.print(f"[red]error:[/red] {e}")
                raise typer.Exit(2) from None
            nfe_done = info.nfe
            outs.append(x0)
    seconds = time.perf_counter() - started
    x0 = torch.cat(outs)
    meta = {
        "model": model,
        "solver": f"auto:{rec.solver.name}" if solver == "auto" else solver,
        "nfe": nfe_done,
        **({k: getattr(solver_obj, k) for k in ("rtol", "atol")} if adaptive else {}),
        "schedule": schedule,
        "guidance": guidance,
        "label": label,
        "n": n,
        "seed": seed,
        "final": final
        or (rec.final if rec is not None else getattr(solver_obj, "planned_final", None))
        or "standard",
        "tuned": tuned,
        "seconds": seconds,
    }
    png = save_grid(x0.numpy(), out)
    npz_path = Path(npz) if npz else Path(out).with_suffix(".npz")
    write_samples(x0.numpy(), labels if labels is not None else [-1] * n, meta, npz_path)
    msg = f"{n} samples, {nfe_done} NFE each, in {seconds:.1f} s → {png} and {npz_path}"
    if score:
        from .bench.digits import score_digits

        s = score_digits(x0, lab)
        against = "all digits" if lab is None else "real digits of the requested classes"
        msg += f"\nFD-digits {s.fd:.2f} (against {against}, {n} samples)" + (
            f", class accuracy {s.accuracy:.3f}" if s.accuracy is not None else ""
        )
    console.print(msg)


def _masked(model, sampler, steps, n, seed, batch, out, npz, score, console) -> None:
    """``--model digits-masked``: masked discrete diffusion (diffsolve.nets.masked.cli_sample)."""
    from .nets.masked import cli_sample

    try:
        if model != "digits-masked":
            raise ValueError(f"--sampler/--steps are for --model digits-masked, not {model}")
        cli_sample(n, sampler, steps, seed, batch, out, npz, score, console)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


def _sample_to_dir(
    model: str, guidance: float | None, label: str | None, guided: bool, solver: Any,
    nfe: int | None, schedule: str | None, final: str | None, num: int, shard_size: int,
    out_dir: str, seed: int, batch: int, score: bool, progress: bool, console: Any,
) -> None:  # fmt: skip
    """``--out-dir``: :func:`diffsolve.shards.sample_shards` on the shipped network (each
    torchrun rank loads it onto its own device); labels cycle by sample index."""
    from . import nets
    from .shards import cycle_labels, sample_shards

    text = (label or ("all" if guided else "none")).strip().lower()
    period = 10 if text == "all" else len([v for v in text.split(",") if v.strip()])
    labels = parse_labels(label, period, guided)
    try:
        run = sample_shards(
            lambda device: nets.model(model, guidance=guidance, device=device),
            num_samples=num, shard_size=shard_size, out_dir=out_dir, solver=solver, nfe=nfe,
            seed=seed, batch_size=batch, schedule=schedule, final=final,
            cond_fn=None if labels is None else cycle_labels(labels),
            model_id=model if guidance is None else f"{model} (guidance {guidance:g})",
            labels=label, summary="digits" if score else False, progress=progress,
        )  # fmt: skip
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if run.rank != 0:
        return
    m = run.manifest
    msg = (
        f"{len(m['shards'])} shards of {num} samples in {out_dir} "
        f"({len(run.skipped)} already done; this run {run.seconds:.1f} s, "
        f"{run.samples_per_second:.1f} samples/s on rank 0 of {run.world_size})"
    )
    if run.summary is not None and "fd_digits" in run.summary:
        msg += f"\nFD-digits {run.summary['fd_digits']:.2f} over {run.summary['fd_digits_samples']}"
    console.print(msg)
