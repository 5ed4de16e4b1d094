"""The ``diffsolve`` command line: ``diffsolve bench``, ``tune``, ``sample`` and ``list``.

``diffsolve bench`` runs the exact benchmark (DESIGN §4): every deterministic solver on an analytic
Gaussian-mixture model, scored against the exact probability-flow ODE solution; it prints a table,
writes ``bench.json`` and ``bench.png`` to ``--out``. ``--tuned DIR`` adds the solvers that
``diffsolve tune`` wrote to DIR.

``diffsolve tune`` calibrates one solver per NFE budget on a shipped network or an analytic
mixture (``ds.tune``) and writes ``DIR/<model>-nfe<N>.json`` and ``DIR/summary.json``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    help="diffsolve: fast diffusion sampling, measured against exact solutions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

QUICK_NFES = (4, 6, 10, 15)
QUICK_BATCH = 16
# `bench --quick` on a shipped network: its reference at this rk45 tolerance (≈ 600 instead of
# ≈ 1900 NFE); the errors it ranks at NFE 5 and 10 are 1e-2 or more, far above it
QUICK_NET_RTOL = 1e-4
PEERS_INSTALL = 'pip install -e ".[peers]" && pip install --no-deps k-diffusion==0.1.1.post1'
DEFAULT_BATCH = 64
DEFAULT_OUT = "bench-out"
TUNE_NFES = "4,5,6,8,10"
# the calibration noise of `diffsolve tune --seed S` comes from manual_seed(CALIB_SEED_OFFSET + S),
# so it never coincides with the x_T of a benchmark or a `diffsolve sample` run (seed S < 1e6)
CALIB_SEED_OFFSET = 1_000_000


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"diffsolve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="print diffsolve's version and exit",
    ),
) -> None:
    """diffsolve: fast diffusion sampling, measured against exact solutions."""


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    return items or None


def _nfes(text: str | None, default: tuple[int, ...]) -> list[int]:
    items = _split(text)
    if items is None:
        return list(default)
    try:
        out = [int(s) for s in items]
    except ValueError:
        raise typer.BadParameter(f"--nfe takes comma-separated integers, got {text!r}") from None
    if any(n < 1 for n in out):
        raise typer.BadParameter(f"NFE budgets must be positive, got {text!r}")
    return out


def _run_with_status(console: Any, what: str, run: Callable[..., Any]) -> Any:
    """``run(progress=…)`` under a status line; a ValueError is printed and exits with code 2.
    The result's ``meta["wall_seconds"]`` is set."""
    started = time.perf_counter()
    try:
        with console.status(what) as status:
            result = run(progress=lambda msg: status.update(f"running {msg}"))
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    result.meta["wall_seconds"] = time.perf_counter() - started
    return result


@app.command()
def bench(
    model: str = typer.Option(
        None,
        help="analytic model: gmm2d, gmm64 or gmm3072 (default: gmm64; gmm2d with --stochastic)",
    ),
    process: str = typer.Option("sd", help="process (see `diffsolve list`)"),
    nfe: str = typer.Option(
        None, help="comma-separated NFE budgets (default: 4,5,6,8,10,12,15,20,25)"
    ),
    solvers: str = typer.Option(
        None, help="comma-separated solver names (default: every deterministic solver)"
    ),
    schedule: str = typer.Option(
        None, help="comma-separated schedules to run every solver on (default: each solver's own)"
    ),
    batch: int = typer.Option(None, min=1, help=f"samples in the batch (default: {DEFAULT_BATCH})"),
    seed: int = typer.Option(0, help="seed of x_T"),
    out: str = typer.Option(DEFAULT_OUT, help="output folder for bench.json and bench.png"),
    quick: bool = typer.Option(
        False,
        help=f"NFE {','.join(map(str, QUICK_NFES))} and batch {QUICK_BATCH} (< 1 minute); on "
        f"a network: NFE 5,10, 64 samples, reference at rtol {QUICK_NET_RTOL:g}",
    ),
    threads: int = typer.Option(
        None,
        min=0,
        help="torch intra-op threads (default: 1 on a shipped network, else torch's; 0: torch's)",
    ),
    peers: bool = typer.Option(False, help="add diffusers / k-diffusion peers where installed"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON on stdout, no tables"),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="write bench.png"),
    continued: bool = typer.Option(
        False, help="show the error continued to σ=0 next to the standard-endpoint one"
    ),
    check: bool = typer.Option(
        None, "--check/--no-check", help="cross-check the reference (default: on unless --quick)"
    ),
    stochastic: bool = typer.Option(
        False,
        help="the SDE samplers: sliced W2, MMD and mean log-likelihood against the exact mixture, "
        "next to ODE solvers (and the peers' SDE samplers with --peers)",
    ),
    tuned: str = typer.Option(
        None,
        help="a folder written by `diffsolve tune` (its <model>-nfe<N>.json files) or one tuned "
        "file: a row tuned:<method> per file, at its own NFE, on the benchmark's x_T",
    ),
) -> None:
    """Every solver × NFE against the exact PF-ODE solution of an analytic model."""
    from .bench import report
    from .bench.runner import DEFAULT_NFES, run_benchmark
    from .solvers.base import solvers as ds_solvers

    console = _console(stderr=as_json)
    _check_schedules(schedule, stochastic)
    if peers:
        _check_peers(console)
    if (model or "").startswith("digits") and not stochastic:
        require_digits_extra(f"bench --model {model}")
    if threads is None and (model or "").startswith("digits"):
        threads = 1  # the digits nets are tiny: more threads only add overhead
    if threads:
        import torch

        torch.set_num_threads(threads)
    if tuned is not None and stochastic:
        raise typer.BadParameter(
            "tuned solvers are ODE solvers: not with --stochastic", param_hint="--tuned"
        )
    tuned_files = _tuned_files(tuned, model or "gmm64") if tuned is not None else []
    if stochastic:
        _bench_stochastic(
            console,
            model or "gmm2d",
            process,
            nfe,
            solvers,
            batch,
            seed,
            out,
            quick,
            peers,
            as_json,
        )
        return
    model = model or "gmm64"
    if model.startswith("digits"):
        _bench_network(
            console,
            model,
            nfe,
            solvers,
            schedule,
            batch,
            seed,
            out,
            quick,
            peers,
            as_json,
            tuned_files,
        )
        return
    nfes = _nfes(nfe, QUICK_NFES if quick else DEFAULT_NFES)
    n_batch = batch if batch is not None else (QUICK_BATCH if quick else DEFAULT_BATCH)
    do_check = (not quick) if check is None else check
    result = _run_with_status(
        console,
        "running the benchmark…",
        partial(
            run_benchmark,
            model=model,
            process=process,
            solver_names=_split(solvers),
            nfes=nfes,
            schedules=_split(schedule),
            batch=n_batch,
            seed=seed,
            peers=peers,
            check=do_check,
            tuned=tuned_files,
        ),
    )
    json_path = report.write_json(result, out)
    png_path = report.plot(result.rows, Path(out) / "bench.png", result.meta) if plot else None
    md_path = report.write_markdown(result, out, "bench.md", ("err_standard", "err_continued"))
    if as_json:
        sys.stdout.write(json_path.read_text() + "\n")
        return
    console.print(report.results_table(result.rows, result.meta, continued=continued))
    console.print(report.summary_table(result.rows))
    ratios = report.ratio_table(result.rows)
    if ratios is not None:
        console.print(ratios)
    if peers and result.meta.get("peers", {}).get("note"):
        console.print(f"[yellow]{result.meta['peers']['note']}[/yellow]")
    chk = result.meta.get("reference_check")
    if chk:
        console.print(
            "reference check (relative): DOP853 vs Dormand–Prince "
            f"{chk['agreement']:.1e}, tolerance halving {chk['halving']:.1e}"
        )
    if solvers is None:
        skipped = sorted(set(ds_solvers()) - set(result.meta["solvers"]))
        if skipped:
            console.print(
                f"[dim]not run by default (stochastic, adaptive or an alias): "
                f"{', '.join(skipped)}[/dim]"
            )
    failed = [r for r in result.rows if r.get("error")]
    for r in failed[:10]:
        console.print(f"[red]{r['label']} nfe={r['nfe']}:[/red] {r['error']}")
    console.print(
        f"wrote {json_path}, {md_path}"
        + (f" and {png_path}" if png_path else "")
        + f" in {result.meta['wall_seconds']:.1f} s"
    )


def require_digits_extra(what: str) -> None:
    """Refuse (exit code 2) before any work when FD-digits cannot be computed: it needs the
    ``digits`` extra (scikit-learn's digits data, scipy), which ``[bench]`` does not bring."""
    import importlib.util

    missing = [m for m in ("sklearn", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        names = ", ".join("scikit-learn" if m == "sklearn" else m for m in missing)
        raise typer.BadParameter(
            f'{what} scores FD-digits, which needs {names}: pip install -e ".[digits]" '
            "(or the dev extra)",
            param_hint="--model" if what.startswith("bench") else "--score",
        )


def _check_peers(console: Any) -> None:
    """``bench --peers``: refuse (exit code 2) when no peer library is installed, say which are
    missing otherwise, before any work."""
    from .bench.peers import available

    have = available()
    missing = [k for k, ok in have.items() if not ok]
    if len(missing) == len(have):
        raise typer.BadParameter(
            f"no peer library is installed ({', '.join(missing)}); install them with "
            f"`{PEERS_INSTALL}`, or omit --peers",
            param_hint="--peers",
        )
    if missing:
        console.print(
            f"[yellow]--peers: {', '.join(missing)} not installed, its rows are left out "
            f"(`{PEERS_INSTALL}`)[/yellow]"
        )


def _check_schedules(schedule: str | None, stochastic: bool) -> None:
    """``bench --schedule``: every name valid, checked before any work or file (exit code 2)."""
    from .schedules import schedules

    names = _split(schedule)
    if names is None:
        return
    if stochastic:
        raise typer.BadParameter(
            "the stochastic benchmark runs each sampler on its own schedule; omit --schedule",
            param_hint="--schedule",
        )
    valid = schedules()
    bad = [s for s in names if s not in valid]
    if bad:
        raise typer.BadParameter(
            f"unknown schedule(s) {', '.join(map(repr, bad))}; valid: {', '.join(valid)}",
            param_hint="--schedule",
        )


def _bench_network(
    console: Any,
    model: str,
    nfe: str | None,
    solvers: str | None,
    schedule: str | None,
    batch: int | None,
    seed: int,
    out: str,
    quick: bool,
    peers: bool,
    as_json: bool,
    tuned_files: list[Path],
) -> None:
    from .bench import report
    from .bench.networks import NETWORK_NFES, run_network_benchmark

    if model == "digits-masked":
        raise typer.BadParameter(
            "digits-masked is a discrete (masked) diffusion network, not an ODE: its samplers "
            "are benchmarked by `python benchmarks/masked.py digits`",
            param_hint="--model",
        )
    nfes = _nfes(nfe, (5, 10) if quick else NETWORK_NFES)
    n = batch if batch is not None else (64 if quick else 256)
    rtol = QUICK_NET_RTOL if quick else 1e-6
    console.print(
        f"{model}: the converged reference first (rk45 at rtol {rtol:g} on {n} samples, "
        f"{'about 10 s' if quick else 'about a minute'} on one core), then every solver at NFE "
        f"{', '.join(map(str, nfes))}"
    )
    result = _run_with_status(
        console,
        "running the network benchmark…",
        partial(
            run_network_benchmark,
            model,
            solver_names=_split(solvers),
            nfes=nfes,
            schedules=_split(schedule),
            n=n,
            seed=seed,
            peers=peers,
            rtol=rtol,
            tuned=tuned_files,
        ),
    )
    json_path = report.write_json(result, out, name=f"bench-{model}.json")
    md_path = report.write_markdown(result, out, f"bench-{model}.md", ("err_standard", "fd"))
    if as_json:
        sys.stdout.write(json_path.read_text() + "\n")
        return
    console.print(report.results_table(result.rows, result.meta))
    console.print(report.metric_table(result.rows, result.meta, "fd"))
    ref = result.meta["reference"]
    console.print(
        f"reference: rk45 at rtol {ref['rtol']:g} ({ref['nfe']} NFE), FD-digits {ref['fd']:.2f}"
    )
    console.print(f"wrote {json_path}, {md_path} in {result.meta['wall_seconds']:.1f} s")


def _bench_stochastic(
    console: Any,
    model: str,
    process: str,
    nfe: str | None,
    solvers: str | None,
    batch: int | None,
    seed: int,
    out: str,
    quick: bool,
    peers: bool,
    as_json: bool,
) -> None:
    from .bench import report
    from .bench.stochastic import run_stochastic_benchmark

    nfes = _nfes(nfe, (10, 20) if quick else (10, 20, 50))
    n = batch if batch is not None else (512 if quick else 2048)
    result = _run_with_status(
        console,
        "running the stochastic benchmark…",
        partial(
            run_stochastic_benchmark,
            model,
            process,
            solver_names=_split(solvers),
            nfes=nfes,
            n=n,
            seed=seed,
            peers=peers,
        ),
    )
    json_path = report.write_json(result, out, name="bench-stochastic.json")
    md_path = Path(out) / "bench-stochastic.md"
    md_path.write_text(report.stochastic_markdown(result.rows, result.meta))
    if as_json:
        sys.stdout.write(json_path.read_text() + "\n")
        return
    for metric in ("sw2", "loglik"):
        console.print(report.metric_table(result.rows, result.meta, metric))
    for r in [r for r in result.rows if r.get("error")][:10]:
        console.print(f"[red]{r['label']} nfe={r['nfe']}:[/red] {r['error']}")
    console.print(f"wrote {json_path}, {md_path} in {result.meta['wall_seconds']:.1f} s")


def _tuned_files(path: str, model: str) -> list[Path]:
    """``bench --tuned``: one file, or a folder's ``<model>-nfe<N>.json`` files by NFE."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise typer.BadParameter(f"{path} is neither a folder nor a file", param_hint="--tuned")
    found = [f for f in p.glob(f"{model}-nfe*.json") if f.stem[len(model) + 4 :].isdigit()]
    if not found:
        there = sorted(f.name for f in p.glob("*-nfe*.json"))
        raise typer.BadParameter(
            f"no tuned files for {model} in {path} (looked for {model}-nfe<N>.json; "
            f"found: {', '.join(there) or 'none'}); make them with "
            f"`diffsolve tune --model {model} --out {path}`",
            param_hint="--tuned",
        )
    return sorted(found, key=lambda f: int(f.stem[len(model) + 4 :]))


def _tune_nfes(text: str) -> list[int]:
    items = _split(text)
    if items is None:
        raise typer.BadParameter("give at least one budget, e.g. 4,5,6,8,10", param_hint="--nfe")
    try:
        out = [int(s) for s in items]
    except ValueError:
        raise typer.BadParameter(
            f"comma-separated integers, got {text!r}", param_hint="--nfe"
        ) from None
    if any(n < 2 for n in out):
        raise typer.BadParameter(
            f"a tuned solver makes at least 2 network calls, got {text!r}", param_hint="--nfe"
        )
    if len(set(out)) != len(out):
        raise typer.BadParameter(f"a budget is repeated in {text!r}", param_hint="--nfe")
    return out


def _tune_networks() -> list[str]:
    from .nets import available

    # the diffusion networks: not the classifiers, the masked (discrete) one or the CTM (whose
    # own sampler is γ-sampling, not a tuned ODE solver)
    return [
        k
        for k in available()
        if not k.endswith("classifier") and k not in ("digits-masked", "digits-ctm")
    ]


class _TuneBar:
    """``ds.tune``'s ``progress(phase, i, total, loss)`` on one rich task over all budgets: a
    budget of n calls weighs n (an iteration costs about n network calls), so the ETA holds
    across budgets."""

    def __init__(self, bar: Any, nfes: list[int], method: str):
        self.bar, self.nfes = bar, nfes
        self.phases = 4 if method == "auto" else 1  # auto: (grid, weights) twice
        self.task = bar.add_task("tuning", total=float(sum(nfes)), start=False, status="")
        self.done = 0.0
        self.last: tuple[str, int] | None = None

    def start(self, k: int) -> None:
        if k == 0:
            self.bar.start_task(self.task)
        n = self.nfes[k]
        self.k, self.n, self.phase_done, self.last = k, n, 0, None
        what = f"NFE {n} ({k + 1}/{len(self.nfes)})"
        self.bar.update(self.task, completed=self.done, description=what, status="")

    def __call__(self, phase: str, i: int, total: int, loss: float) -> None:
        if self.last is not None and (phase != self.last[0] or i <= self.last[1]):
            self.phase_done += 1
        self.last = (phase, i)
        frac = min((self.phase_done + i / max(total, 1)) / self.phases, 1.0)
        step = f"phase {self.phase_done + 1}/{self.phases} " if self.phases > 1 else ""
        where = f"NFE {self.n} ({self.k + 1}/{len(self.nfes)})"
        self.bar.update(
            self.task,
            completed=self.done + self.n * frac,
            description=f"{where} · {step}{phase} {i}/{total}",
            status=f"calib. rel. RMSE {math.sqrt(max(loss, 0.0)):.3g}",
        )

    def finish(self) -> None:
        self.done += self.n
        self.bar.update(self.task, completed=self.done)


@app.command()
def tune(
    model: str = typer.Option(
        ...,
        help="a shipped network (digits-vp, digits-flow) or an analytic mixture (gmm2d, gmm64, "
        "gmm3072)",
    ),
    nfe: str = typer.Option(TUNE_NFES, help="comma-separated NFE budgets (≥ 2), one solver each"),
    out: str = typer.Option("tuned", help="folder for <model>-nfe<N>.json and summary.json"),
    method: str = typer.Option(
        "auto", help="auto, ld3, s4s, gits, autodiffusion, usf, dc, v3 or bespoke (see `list`)"
    ),
    process: str = typer.Option(
        None, help="a mixture's process, see `diffsolve list` (default: sd); a network has its own"
    ),
    calib: int = typer.Option(256, min=1, help="calibration samples x_T"),
    seed: int = typer.Option(
        0,
        help=f"the calibration noise: x_T ~ prior from torch.Generator().manual_seed("
        f"{CALIB_SEED_OFFSET} + SEED), float64 (never a benchmark's or `sample`'s x_T)",
    ),
    guidance: float = typer.Option(
        None, help="networks: tune the classifier-free-guided ODE at scale w (sample with it)"
    ),
    label: str = typer.Option(
        None,
        help="networks: calibration classes, 0…9, a comma list (cycled), 'all' or 'none' "
        "(default: none, or all if guided)",
    ),
    iters: int = typer.Option(
        None,
        min=1,
        help="iterations per phase at most (default: 60, stopped early once the validation "
        "score stalls; autodiffusion: 15 generations)",
    ),
    rtol: float | None = typer.Option(
        None, min=0.0, help="the teacher's tolerance (rk45; default: ds.tune's, 1e-5)"
    ),
    batch: int = typer.Option(
        None,
        min=1,
        help="calibration samples per gradient iteration (default: all; 64 tunes the digits "
        "networks ~2x faster, less accurate at NFE 10: docs/tuning.md)",
    ),
    threads: int = typer.Option(
        1, min=0, help="torch intra-op threads (0: torch's default; the digits nets are tiny)"
    ),
    checkpoint: bool = typer.Option(
        False,
        "--checkpoint/--no-checkpoint",
        help="recompute each network call's activations in the backward pass (one call's "
        "memory instead of NFE calls', one more forward pass per call)",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
) -> None:
    """Tune one solver per NFE budget on a model's own ODE; write DIR/<model>-nfe<N>.json."""
    from .bench.gmm import GMMS
    from .bench.runner import PROCESSES
    from .cli_sample import parse_labels
    from .tuning import METHODS

    # every argument is checked before any work
    nfes = _tune_nfes(nfe)
    if method not in METHODS:
        raise typer.BadParameter(
            f"unknown method {method!r}; valid: {', '.join(METHODS)}", param_hint="--method"
        )
    networks = _tune_networks()
    is_net = model in networks
    if not is_net and model not in GMMS:
        raise typer.BadParameter(
            f"unknown model {model!r}; valid: {', '.join([*networks, *GMMS])}",
            param_hint="--model",
        )
    if is_net and process is not None:
        raise typer.BadParameter(f"{model} has its own process; omit it", param_hint="--process")
    if not is_net:
        process = process or "sd"
        if process not in PROCESSES:
            raise typer.BadParameter(
                f"unknown process {process!r}; valid: {', '.join(PROCESSES)}",
                param_hint="--process",
            )
        if guidance is not None or label is not None:
            raise typer.BadParameter(
                f"{model} is an analytic mixture: no classes to guide toward",
                param_hint="--guidance/--label",
            )
    if rtol is None:
        from .tuning.teacher import TEACHER_RTOL

        rtol = TEACHER_RTOL
    if not rtol > 0:
        raise typer.BadParameter(f"must be positive, got {rtol}", param_hint="--rtol")
    guided = guidance is not None and guidance != 1.0
    labels = parse_labels(label, calib, guided) if is_net else None
    _tune(
        model, is_net, process, nfes, method, calib, seed, guidance if guided else None,
        label, labels, iters, rtol, threads, progress, Path(out), batch, checkpoint,
    )  # fmt: skip


def _tune(
    name: str,
    is_net: bool,
    process: str | None,
    nfes: list[int],
    method: str,
    calib: int,
    seed: int,
    guidance: float | None,
    label: str | None,
    labels: list[int] | None,
    iters: int | None,
    rtol: float,
    threads: int,
    show: bool,
    out: Path,
    batch: int | None = None,
    checkpoint: bool = False,
) -> None:
    import torch
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from .tuning import TuningError
    from .tuning import tune as ds_tune
    from .tuning.teacher import teacher

    if threads:
        torch.set_num_threads(threads)
    console = _console(stderr=True)
    if is_net:
        from . import nets

        try:
            den = nets.model(name, guidance=guidance)
        except (ValueError, nets.WeightsError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        shape: tuple[int, ...] = nets.SAMPLE_SHAPE
    else:
        from .bench.gmm import get_gmm
        from .bench.runner import get_process, prediction_for

        gmm = get_gmm(name)
        proc = get_process(process or "sd")
        den = gmm.denoiser(proc, prediction_for(proc))
        shape = gmm.shape
    noise_seed = CALIB_SEED_OFFSET + seed
    gen = torch.Generator().manual_seed(noise_seed)
    x = den.process.prior((calib, *shape), generator=gen, dtype=torch.float64)
    cond = {"label": torch.tensor(labels, dtype=torch.long)} if labels is not None else {}
    calibration = {
        "model": name,
        "process": process,
        "guidance": guidance,
        "label": label,
        "calib": calib,
        "seed": seed,
        "noise_seed": noise_seed,
        "rtol": rtol,
    }
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    entries: list[dict[str, Any]] = []
    failed: list[str] = []
    with Progress(*columns, console=console, disable=not show, transient=True) as bar:
        what = f"teacher: rk45 at rtol {rtol:g} on {calib} samples"
        t_task = bar.add_task(what, total=None, status="")
        try:
            target = teacher(den, x, cond=cond, rtol=rtol)
        except ValueError as e:
            console.print(f"[red]error:[/red] teacher: {e}")
            raise typer.Exit(1) from None
        teacher_seconds = time.perf_counter() - started
        bar.update(t_task, total=1, completed=1)
        tracker = _TuneBar(bar, nfes, method)
        for k, n in enumerate(nfes):
            tracker.start(k)
            path = out / f"{name}-nfe{n}.json"
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"file": path.name, "nfe": n, "method": method, **calibration}
            try:
                tuned = ds_tune(
                    den, x, n, method, cond=cond, target=target, iters=iters, rtol=rtol,
                    seed=seed, batch=batch, checkpoint=checkpoint, progress=tracker,
                )  # fmt: skip
            except (TuningError, ValueError) as e:
                entry.update(error=str(e), seconds=time.perf_counter() - t0)
                failed.append(f"NFE {n}: {e}")
                console.print(f"[red]NFE {n} failed:[/red] {e}")
            else:
                info = {
                    **tuned.info,
                    "calibration": calibration,
                    "teacher_seconds": teacher_seconds,
                }
                tuned = replace(tuned, info=info)
                tuned.save(path)
                entry.update(
                    calib_rel_rmse_before=info["calib_rel_rmse_before"],
                    calib_rel_rmse_after=info["calib_rel_rmse_after"],
                    seconds=time.perf_counter() - t0,
                    teacher_seconds=teacher_seconds,
                    iters=info.get("iters"),
                    init_grid=info.get("init_grid"),
                    error=None,
                )
            entries.append(entry)
            summary = _write_summary(out, entries)  # after every budget: a stopped run keeps it
            tracker.finish()
    total = time.perf_counter() - started
    t = Table(
        title=f"{name} tuned by {method} on {calib} calibration samples "
        f"(teacher {teacher_seconds:.1f} s)",
        title_justify="left",
    )
    for c in ("NFE", "calib. rel. RMSE before", "after", "seconds", "file"):
        t.add_column(c, justify="left" if c == "file" else "right")
    for row in entries:
        secs = f"{row['seconds']:.1f}"
        if row.get("error"):
            t.add_row(str(row["nfe"]), "[red]failed[/red]", "", secs, "")
            continue
        before, after = row["calib_rel_rmse_before"], row["calib_rel_rmse_after"]
        t.add_row(str(row["nfe"]), f"{before:.3g}", f"{after:.3g}", secs, row["file"])
    console.print(t)
    written = len(entries) - len(failed)
    console.print(f"wrote {written} tuned file(s) and {summary} in {total:.1f} s")
    if failed:
        raise typer.Exit(1)


def _write_summary(out: Path, entries: list[dict[str, Any]]) -> Path:
    """``summary.json``: one entry per tuned file; entries of other files already in the folder
    (another model, other budgets) are kept."""
    path = out / "summary.json"
    kept: list[dict[str, Any]] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            kept = [e for e in old.get("entries", []) if isinstance(e, dict) and "file" in e]
        except (OSError, ValueError, AttributeError):
            kept = []
    mine = {e["file"] for e in entries}
    merged = [e for e in kept if e["file"] not in mine] + entries
    merged.sort(key=lambda e: (str(e.get("model")), int(e.get("nfe", 0))))
    doc = {"format": "diffsolve-tune-summary", "version": 1, "entries": merged}
    path.write_text(json.dumps(doc, indent=1))
    return path


@app.command("list")
def list_(
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
) -> None:
    """Solvers and schedules with descriptions, processes, analytic models, shipped networks."""
    from rich.table import Table

    from .bench.gmm import GMMS
    from .bench.runner import PROCESSES
    from .schedules import schedules
    from .solvers.base import get_solver, solvers

    solver_rows: list[dict[str, Any]] = [
        {
            "name": "auto",
            "description": "the recommended solver, schedule and end rule for the NFE budget, "
            "process and guidance (ds.sample(..., solver='auto'))",
            "order": None,
            "stochastic": False,
            "adaptive": False,
            "default_schedule": "auto",
        }
    ]
    for name, desc in solvers().items():
        obj = get_solver(name)
        try:
            order: int | None = obj.order
        except NotImplementedError:
            order = None
        solver_rows.append(
            {
                "name": name,
                "description": desc,
                "order": order,
                "stochastic": obj.stochastic,
                "adaptive": bool(getattr(obj, "adaptive", False)),
                "default_schedule": obj.default_schedule,
            }
        )
    models: dict[str, dict[str, Any]] = {}
    for name, make in GMMS.items():
        g = make()
        models[name] = {
            "dim": g.dim,
            "components": int(g.weights.numel()),
            "description": (make.__doc__ or "").strip().splitlines()[0],
        }
    sched = schedules()
    procs = {k: v[1] for k, v in PROCESSES.items()}
    from .nets import available as shipped_networks
    from .tuning import METHODS

    networks = shipped_networks()
    methods = dict(METHODS)
    data = {
        "solvers": solver_rows,
        "schedules": sched,
        "processes": procs,
        "models": models,
        "networks": networks,
        "tuning_methods": methods,
    }
    if as_json:
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
        return
    console = _console()
    t = Table(title="solvers", title_justify="left")
    for c in ("name", "order", "kind", "default schedule", "description"):
        t.add_column(c)
    for s in solver_rows:
        kind = ("SDE" if s["stochastic"] else "ODE") + (", adaptive" if s["adaptive"] else "")
        shown = "" if s["order"] is None else str(s["order"])
        t.add_row(str(s["name"]), shown, kind, str(s["default_schedule"]), str(s["description"]))
    console.print(t)
    for title, mapping in (
        ("schedules", sched),
        ("processes (diffsolve bench / tune --process)", procs),
        ("tuning methods (diffsolve tune --method)", methods),
    ):
        t = Table(title=title, title_justify="left")
        t.add_column("name")
        t.add_column("description")
        for k, v in mapping.items():
            t.add_row(k, v)
        console.print(t)
    t = Table(title="analytic models (diffsolve bench --model)", title_justify="left")
    for c in ("name", "dim", "components", "description"):
        t.add_column(c)
    for k, m in models.items():
        t.add_row(k, str(m["dim"]), str(m["components"]), str(m["description"]))
    console.print(t)
    t = Table(
        title="shipped networks (diffsolve sample / bench --model; ds.nets.model)",
        title_justify="left",
    )
    t.add_column("name")
    t.add_column("description")
    for k, v in networks.items():
        t.add_row(k, v)
    console.print(t)


# `diffsolve sample` lives in its own module (shipped networks, issue 5)
from .cli_sample import sample as _sample_command  # noqa: E402

app.command("sample")(_sample_command)


def _console(stderr: bool = False):
    from rich.console import Console

    # rich assumes 80 columns off a terminal; logs and CI get room for a full NFE sweep
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def main() -> None:
    """Console-script entry point (``diffsolve``, ``python -m diffsolve``)."""
    app(prog_name="diffsolve")


if __name__ == "__main__":
    main()
