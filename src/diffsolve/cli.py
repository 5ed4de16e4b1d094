"""The ``diffsolve`` command line: ``diffsolve bench`` and ``diffsolve list``.

``diffsolve bench`` runs the exact benchmark (DESIGN §4): every deterministic solver on an analytic
Gaussian-mixture model, scored against the exact probability-flow ODE solution; it prints a table,
writes ``bench.json`` and ``bench.png`` to ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
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
DEFAULT_BATCH = 64
DEFAULT_OUT = "bench-out"


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
        help="analytic model: gmm2d, gmm64 or gmm3072 [default: gmm64; gmm2d with --stochastic]",
    ),
    process: str = typer.Option("sd", help="process (see `diffsolve list`)"),
    nfe: str = typer.Option(
        None, help="comma-separated NFE budgets [default: 4,5,6,8,10,12,15,20,25]"
    ),
    solvers: str = typer.Option(
        None, help="comma-separated solver names [default: every deterministic solver]"
    ),
    schedule: str = typer.Option(
        None, help="comma-separated schedules to run every solver on [default: each solver's own]"
    ),
    batch: int = typer.Option(None, min=1, help=f"samples in the batch [default: {DEFAULT_BATCH}]"),
    seed: int = typer.Option(0, help="seed of x_T"),
    out: str = typer.Option(DEFAULT_OUT, help="output folder for bench.json and bench.png"),
    quick: bool = typer.Option(
        False, help=f"NFE {','.join(map(str, QUICK_NFES))} and batch {QUICK_BATCH} (< 1 minute)"
    ),
    peers: bool = typer.Option(False, help="add diffusers / k-diffusion peers where installed"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON on stdout, no tables"),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="write bench.png"),
    continued: bool = typer.Option(
        False, help="show the error continued to σ=0 next to the standard-endpoint one"
    ),
    check: bool = typer.Option(
        None, "--check/--no-check", help="cross-check the reference [default: on unless --quick]"
    ),
    stochastic: bool = typer.Option(
        False,
        help="the SDE samplers: sliced W2, MMD and mean log-likelihood against the exact mixture, "
        "next to ODE solvers (and the peers' SDE samplers with --peers)",
    ),
) -> None:
    """Every solver × NFE against the exact PF-ODE solution of an analytic model."""
    from .bench import report
    from .bench.runner import DEFAULT_NFES, run_benchmark
    from .solvers.base import solvers as ds_solvers

    console = _console(stderr=as_json)
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
            console, model, nfe, solvers, schedule, batch, seed, out, quick, peers, as_json
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
) -> None:
    from .bench import report
    from .bench.networks import NETWORK_NFES, run_network_benchmark

    nfes = _nfes(nfe, (5, 10) if quick else NETWORK_NFES)
    result = _run_with_status(
        console,
        "running the network benchmark…",
        partial(
            run_network_benchmark,
            model,
            solver_names=_split(solvers),
            nfes=nfes,
            schedules=_split(schedule),
            n=batch if batch is not None else (64 if quick else 256),
            seed=seed,
            peers=peers,
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

    networks = shipped_networks()
    data = {
        "solvers": solver_rows,
        "schedules": sched,
        "processes": procs,
        "models": models,
        "networks": networks,
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
    for title, mapping in (("schedules", sched), ("processes (diffsolve bench --process)", procs)):
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
    """Console-script entry point (``diffsolve``)."""
    app()


if __name__ == "__main__":
    main()
