"""Reporting the benchmark: a terminal table, JSON for machines, an error-vs-NFE plot.

Rows come from :func:`~diffsolve.bench.runner.run_benchmark`; every function here reads only
their fields, so a saved JSON can be re-rendered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .metrics import nfe_to_reach

__all__ = [
    "TARGETS",
    "plot",
    "ratio_table",
    "results_table",
    "summarize",
    "summary_table",
    "write_json",
]

TARGETS = (1e-2, 1e-3)


def _series(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["label"], []).append(r)
    return out


def _fmt(e: float | None) -> str:
    if e is None or not math.isfinite(e):
        return "—"
    return f"{e:.1e}"


def summarize(rows: Sequence[dict[str, Any]], targets: Sequence[float] = TARGETS) -> list[dict]:
    """Per label: the NFE from which the relative RMSE stays below each target
    (:func:`~diffsolve.bench.metrics.nfe_to_reach`), for both the standard-endpoint and the
    continued error; None where the sweep never gets there."""
    out = []
    for label, rs in _series(rows).items():
        nfe = [r["nfe_used"] or r["nfe"] for r in rs]
        item: dict[str, Any] = {"label": label, "kind": rs[0]["kind"], "library": rs[0]["library"]}
        for kind in ("standard", "continued"):
            errs = [r[f"err_{kind}"] for r in rs]
            item[f"nfe_to_{kind}"] = {f"{t:g}": nfe_to_reach(nfe, errs, t) for t in targets}
        out.append(item)
    return out


def _best(rows: Sequence[dict[str, Any]], metric: str) -> dict[tuple[str, int], str]:
    # the label with the smallest error per (kind, requested NFE)
    best: dict[tuple[str, int], tuple[float, str]] = {}
    for r in rows:
        e = r.get(metric)
        if e is None or not math.isfinite(e):
            continue
        k = (r["kind"], r["nfe"])
        if k not in best or e < best[k][0]:
            best[k] = (e, r["label"])
    return {k: v[1] for k, v in best.items()}


def results_table(
    rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None, continued: bool = False
) -> Any:
    """A rich Table: rows = configurations, columns = NFE, cells = standard-endpoint rel. RMSE
    (with ``continued``, a second line: the continued error). The best diffsolve entry per NFE
    is bold green, the best peer bold cyan, both starred; a budget a configuration could not
    meet exactly shows its actual NFE in brackets."""
    from rich.table import Table

    nfes = sorted({r["nfe"] for r in rows})
    title = "relative RMSE to the exact PF-ODE solution (* best per NFE): standard endpoint"
    title += " (second line: continued to σ = 0)" if continued else ""
    if meta:
        title += f"\n{meta.get('model')} on {meta.get('process')}, batch {meta.get('batch')}"
    table = Table(title=title, title_justify="left")
    table.add_column("solver", no_wrap=True)
    table.add_column("schedule")
    for n in nfes:
        table.add_column(f"NFE {n}", justify="right")
    best = _best(rows, "err_standard")
    style = {"diffsolve": "bold green", "peer": "bold cyan"}
    first_peer = True
    for label, rs in _series(rows).items():
        kind = rs[0]["kind"]
        if kind == "peer" and first_peer:
            table.add_section()
            first_peer = False
        by_nfe = {r["nfe"]: r for r in rs}
        cells = []
        for n in nfes:
            r = by_nfe.get(n)
            if r is None:
                cells.append("")
                continue
            if r.get("error"):
                cells.append("[red]fail[/red]")
                continue
            c = _fmt(r["err_standard"])
            if r.get("nfe_used") not in (None, n):
                c += f" [{r['nfe_used']}]"
            if best.get((kind, n)) == label:
                c = f"[{style[kind]}]{c}*[/{style[kind]}]"
            if continued:
                c += f"\n[dim]{_fmt(r['err_continued'])}[/dim]"
            cells.append(c)
        table.add_row(label, str(rs[0]["schedule"]), *cells)
    return table


def _cells(
    rs: Sequence[dict[str, Any]],
    nfes: Sequence[int],
    metric: str,
    fmt: Callable[[Any], str],
    best_at: Callable[[int], str | set[str] | None],
    mark: Callable[[str], str],
    fail: str = "fail",
) -> list[str]:
    """One table row's cells: ``metric`` per NFE through ``fmt``, ``[n]`` where a budget was not
    met exactly, ``± band`` where the row carries ``<metric>_band`` (the exact row's noise
    floor), ``mark`` on the best (``best_at(nfe)`` is its label, or a set of tied labels),
    ``fail`` for a run that failed and nothing where there was no run."""
    by_nfe = {r["nfe"]: r for r in rs}
    label = rs[0]["label"]
    cells = []
    for n in nfes:
        r = by_nfe.get(n)
        if r is None or r.get("error"):
            cells.append("" if r is None else fail)
            continue
        c = fmt(r.get(metric))
        band = r.get(f"{metric}_band")
        if band is not None:
            c += f" ± {band:.2g}"
        if r.get("nfe_used") not in (None, n):
            c += f" [{r['nfe_used']}]"
        best = best_at(n)
        is_best = label in best if isinstance(best, (set, frozenset)) else best == label
        cells.append(mark(c) if is_best else c)
    return cells


def markdown_table(
    rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None, metric: str = "err_standard"
) -> str:
    """The results table as GitHub markdown (rows = configurations, columns = NFE); the best
    diffsolve entry and the best peer entry per NFE are bold, and a budget a configuration could
    not meet exactly shows its actual NFE in brackets. ``metric``: ``err_standard``,
    ``err_continued`` or ``fd`` (the network benchmark)."""
    nfes = sorted({r["nfe"] for r in rows})
    best = _best(rows, metric)
    what = {
        "err_standard": "Relative RMSE to the exact PF-ODE solution (standard endpoint)",
        "err_continued": "Relative RMSE to the exact PF-ODE solution (continued to σ = 0)",
        "fd": "FD-digits against the real digits",
    }[metric]
    if meta and meta.get("reference", {}).get("method") == "rk45" and metric == "err_standard":
        what = "Relative RMSE to the network's converged ODE solution (rk45)"
    lines = []
    if meta:
        lines.append(
            f"{what}; {meta.get('model')} on {meta.get('process')}, batch {meta.get('batch')}, "
            f"seed {meta.get('seed')}. **Bold**: best of each side per NFE."
        )
        lines.append("")
    lines.append("| side | solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    lines.append("|---|---|---|" + "---:|" * len(nfes))
    fmt = (lambda v: f"{v:.1f}") if metric == "fd" else _fmt
    for label, rs in _series(rows).items():
        kind = rs[0]["kind"]

        def best_at(n: int, k: str = kind) -> str | None:
            return best.get((k, n))

        cells = _cells(rs, nfes, metric, fmt, best_at, lambda c: f"**{c}**")
        side = "diffsolve" if kind == "diffsolve" else rs[0].get("library", "peer")
        lines.append(f"| {side} | {label} | {rs[0]['schedule']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_SDE_METRICS = {
    "sw2": "sliced W2 to exact mixture samples (lower is better)",
    "mmd": "MMD to exact mixture samples (lower is better)",
    "loglik": "mean log-likelihood under the true density (nats; closest to 'exact' is best)",
}
_BAND_NOTE = (
    "exact: mean ± 2 sd over {draws} independent exact sets (the Monte-Carlo noise of one row); "
    "best = within that band of the best score (ties), no ranking inside it"
)
_METRICS = {**_SDE_METRICS, "fd": "FD-digits against the 1797 real digits (lower is better)"}


def _sde_best(rows: Sequence[dict[str, Any]], metric: str) -> dict[int, set[str]]:
    """Per NFE, the best non-reference rows (smallest distance, or log-likelihood closest to
    exact): every row whose score is within the exact row's noise band (``<metric>_band``, 0
    without one) of the best score, so differences inside the Monte-Carlo noise are not
    ranked."""
    exact = {r["nfe"]: r for r in rows if r["kind"] == "exact"}
    scores: dict[int, list[tuple[float, str]]] = {}
    for r in rows:
        v = r.get(metric)
        if r["kind"] == "exact" or r.get("error") or v is None or not math.isfinite(v):
            continue
        ref = exact.get(r["nfe"], {})
        score = abs(v - ref.get("loglik", 0.0)) if metric == "loglik" else v
        scores.setdefault(r["nfe"], []).append((score, r["label"]))
    out: dict[int, set[str]] = {}
    for k, sc in scores.items():
        band = exact.get(k, {}).get(f"{metric}_band") or 0.0
        top = min(s for s, _ in sc)
        out[k] = {label for s, label in sc if s <= top + band}
    return out


def _band_note(rows: Sequence[dict[str, Any]]) -> str | None:
    draws = next((r.get("draws") for r in rows if r["kind"] == "exact" and r.get("draws")), None)
    return None if draws is None else _BAND_NOTE.format(draws=draws)


def metric_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any], metric: str) -> Any:
    """A rich Table of one metric (``sw2``, ``mmd``, ``loglik``, ``fd``): rows = configurations
    (kind shown), columns = NFE; the best per NFE is starred."""
    from rich.table import Table

    nfes = sorted({r["nfe"] for r in rows})
    n_samples = meta.get("n", meta.get("batch"))
    title = f"{_METRICS[metric]}\n{meta.get('model')} on {meta.get('process')}, n = {n_samples}"
    note = _band_note(rows)
    if note is not None:
        title += f"\n{note}"
    table = Table(title=title, title_justify="left")
    table.add_column("kind")
    table.add_column("sampler", no_wrap=True)
    for n in nfes:
        table.add_column(f"NFE {n}", justify="right")
    best = _sde_best(rows, metric)
    for label, rs in _series(rows).items():
        cells = _cells(
            rs,
            nfes,
            metric,
            lambda v: f"{v:.3g}",
            best.get,
            lambda c: f"[bold green]{c}*[/bold green]",
            "[red]fail[/red]",
        )
        table.add_row(rs[0]["kind"], label, *cells)
    return table


def stochastic_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The stochastic benchmark as GitHub markdown: one table per metric, best per NFE bold."""
    nfes = sorted({r["nfe"] for r in rows})
    out = []
    for metric, what in _SDE_METRICS.items():
        best = _sde_best(rows, metric)
        out.append(f"{what}; {meta.get('model')} on {meta.get('process')}, n = {meta.get('n')}.")
        note = _band_note(rows)
        if note is not None:
            out.append(f"{note[0].upper()}{note[1:]}.")
        out.append("")
        out.append("| kind | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
        out.append("|---|---|" + "---:|" * len(nfes))
        for label, rs in _series(rows).items():
            cells = _cells(rs, nfes, metric, lambda v: f"{v:.3g}", best.get, lambda c: f"**{c}**")
            out.append(f"| {rs[0]['kind']} | {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def summary_table(rows: Sequence[dict[str, Any]], targets: Sequence[float] = TARGETS) -> Any:
    """A rich Table of the NFE each configuration needs to reach the target errors."""
    from rich.table import Table

    table = Table(
        title="NFE from which the relative RMSE stays below a target "
        "(standard endpoint | continued; log-log interpolated)",
        title_justify="left",
    )
    table.add_column("solver", no_wrap=True)
    for t in targets:
        table.add_column(f"≤ {t:g}", justify="right")
    for t in targets:
        table.add_column(f"≤ {t:g} cont.", justify="right")
    smallest = min((r["nfe"] for r in rows), default=0)
    for s in summarize(rows, targets):

        def cell(v: float | None) -> str:
            if v is None:
                return "—"
            return f"≤{v:.0f}" if v <= smallest else f"{v:.1f}"

        std = [cell(s["nfe_to_standard"][f"{t:g}"]) for t in targets]
        cont = [cell(s["nfe_to_continued"][f"{t:g}"]) for t in targets]
        table.add_row(s["label"], *std, *cont)
    return table


def ratio_table(rows: Sequence[dict[str, Any]]) -> Any | None:
    """Same algorithm, same grid: ours / peer standard-endpoint error per NFE (< 1: ours is
    more accurate). None when no peer row has an equivalent."""
    from rich.table import Table

    peer_rows = [r for r in rows if r["kind"] == "peer" and r.get("ratio_standard") is not None]
    if not peer_rows:
        return None
    nfes = sorted({r["nfe"] for r in peer_rows})
    table = Table(
        title="same algorithm on the peer's own grid: error ours / peer (standard endpoint)",
        title_justify="left",
    )
    table.add_column("peer", no_wrap=True)
    table.add_column("ours")
    for n in nfes:
        table.add_column(f"NFE {n}", justify="right")
    for label, rs in _series(peer_rows).items():
        by_nfe = {r["nfe"]: r for r in rs}
        ours = rs[0]["ours"]
        opts = ",".join(f"{k}={v}" for k, v in ours["options"].items())
        name = ours["solver"] + (f"({opts})" if opts else "")
        cells = []
        for n in nfes:
            r = by_nfe.get(n)
            if r is None:
                cells.append("")
                continue
            c = f"{r['ratio_standard']:.3f}"
            if r["ours"].get("nfe_used") != r.get("nfe_used"):
                # not the same work: say so rather than let the ratio pass as like-for-like
                c += f" [{r['ours']['nfe_used']} vs {r['nfe_used']} NFE]"
            cells.append(c)
        table.add_row(label, name, *cells)
    return table


def write_markdown(
    result: Any, out_dir: str | Path, name: str, metrics: Sequence[str] = ("err_standard",)
) -> Path:
    """Write one :func:`markdown_table` per metric to ``out_dir/name``; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text("\n".join(markdown_table(result.rows, result.meta, m) for m in metrics))
    return path


def write_json(result: Any, out_dir: str | Path, name: str = "bench.json") -> Path:
    """Write ``{"meta", "rows", "summary"}`` to ``out_dir/name`` (created; the NFE-to-target
    summary only for the ODE benchmark, whose rows carry errors); returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    if all("err_standard" in r for r in data["rows"]):
        data["summary"] = summarize(data["rows"])
    path = out / name
    path.write_text(json.dumps(data, indent=1, allow_nan=False))
    return path


def plot(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Log-log error vs NFE, one line per configuration (peers dashed), two panels: the
    standard-endpoint and the continued error. Saved as PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    series = _series(rows)
    ncol = 1 if len(series) <= 22 else 2  # the legend must fit beside the panels
    fig, axes = plt.subplots(1, 2, figsize=(13 + 2.5 * ncol, 5.5), sharey=True)
    cmap = plt.get_cmap("tab20")
    for ax, metric, title in zip(
        axes,
        ("err_standard", "err_continued"),
        ("standard endpoint (exact x̂₀ at the last σ)", "continued to σ = 0"),
    ):
        for i, (label, rs) in enumerate(series.items()):
            pts = sorted(
                ((r["nfe_used"] or r["nfe"]), r[metric])
                for r in rs
                if r.get(metric) is not None and math.isfinite(r[metric]) and r[metric] > 0
            )
            if not pts:
                continue
            peer = rs[0]["kind"] == "peer"
            ax.loglog(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "--" if peer else "-",
                marker="." if peer else "o",
                markersize=4,
                color=cmap(i % 20),
                label=label,
                linewidth=1.0 if peer else 1.6,
            )
        for t in TARGETS:
            ax.axhline(t, color="0.7", linewidth=0.8, linestyle=":")
        # the requested budgets, plus the smallest actual one (peers may use fewer calls)
        used = [r["nfe_used"] for r in rows if r.get("nfe_used")]
        nfes = sorted({r["nfe"] for r in rows} | ({min(used)} if used else set()))
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, min(hi, 10.0))  # a diverged run should not squash the useful decades
        ax.set_xlabel("NFE")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("relative RMSE to the exact PF-ODE solution")
    if meta:
        fig.suptitle(
            f"diffsolve bench: {meta.get('model')} on {meta.get('process')}, "
            f"batch {meta.get('batch')}, seed {meta.get('seed')}"
        )
    axes[1].legend(
        loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False, ncol=ncol
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
