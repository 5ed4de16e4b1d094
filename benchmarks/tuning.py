"""Tuned solvers on held-out noise: error ÷ the best-peer envelope, next to untuned ``auto``.

For each model, process, NFE and tuning method, ``ds.tune`` calibrates on ``--calib`` prior
noises drawn from one seed (``--seed-calib``) and the tuned solver is evaluated on *other* noises
(``--seed-eval``) against the exact answer:

- mixtures (gmm2d, gmm64, gmm3072 and the held-out mixtures of ``diffsolve.bench.gmm``, on the
  processes of ``--processes``): the benchmark's exact reference (DOP853 at 1e-12) from t_max,
  on a discrete-time process (SD, DDPM-linear: ``VPDiscrete``) ended the standard way at t_min
  (x̂_0 there: the ``err_tmin`` of ``bench.runner`` and ``auto_rule.py``, what the network's own
  ODE gives; it never sees σ < σ_min), on a continuous-time one continued to σ = 0
  (``err_continued``); the tuning target is that same exact reference on the calibration noises
  (passed as ``target=``, so tuning spends no time on ``rk45``);
- the shipped networks (digits-vp, digits-flow; ``ds.nets.model``, class labels
  ``arange(B) % 10`` bound to the batch positions as in ``bench.networks``): the network's own
  ODE solution ended the standard way (``diffsolve.tuning.teacher.teacher``, ``rk45``): on the
  calibration noises as the target at ``--teacher-rtol`` (``ds.tune``'s own default, 1e-5), on
  the evaluation noises as the truth at ``--rtol`` (1e-6).

Every row reports the held-out relative RMSE of the tuned solver, its ratio to the best-peer
envelope (the least error of every diffusers / k-diffusion configuration of
``diffsolve.bench.peers`` on the same evaluation noise and NFE, as ``auto_rule.py`` computes it),
the same ratio for untuned ``solver="auto"``, the calibration error and the tuning wall time
(``ds.tune`` alone; the teacher is timed separately, per model). ``--also-calib 64,1024`` adds
the held-out error when calibrating on 64 and on 1024 noises (nested subsets of one draw).

Rows are printed as they finish and written to ``--out`` after each one; a rerun with the same
``--out`` skips the rows already there (resumable); ``--cache DIR`` keeps the exact answers
(the costly part on the networks) between runs. ``--md`` writes the markdown table (``--pivot``:
a column per NFE and a per-method summary); ``--render FILES`` writes it from saved rows of
``--models`` at ``--nfe`` and runs nothing.

    python benchmarks/tuning.py --models gmm64,heldout16 --processes sd --nfe 5,10 \\
        --methods auto --out tuning.json --md tuning.md

The defaults are the whole study (every model, SD and DDPM-linear for the mixtures, NFE 4, 5,
6, 8, 10, every method): hours on 2 CPU cores; choose a part with the options.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import diffsolve as ds
from diffsolve.bench.gmm import GMMS, HELDOUT, get_gmm, get_heldout
from diffsolve.bench.metrics import per_sample_rel_err, rel_rmse
from diffsolve.bench.runner import ExactReference, get_process, prediction_for
from diffsolve.processes import VPDiscrete
from diffsolve.tuning import METHODS
from diffsolve.tuning.teacher import TEACHER_RTOL, teacher

NETWORKS = ("digits-vp", "digits-flow")
EVAL_BATCH = {"gmm3072": 16}  # everything else: --eval
ALL_MODELS = (*GMMS, *HELDOUT, *NETWORKS)


class _Labelled(torch.nn.Module):
    """The network with its class labels bound to the batch positions, so that the peers (which
    call ``net(x, t)``) see the conditional model of the truth (``ds.tune``, which splits its
    batch, gets the same labels as ``cond``)."""

    def __init__(self, net: torch.nn.Module, labels: Tensor):
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t, label=self.labels[: x.shape[0]])


class Case:
    """One (model, process): its Denoiser, calibration and evaluation noises, their exact
    answers (computed when first needed) and the baselines on the evaluation noise."""

    def __init__(self, model: str, process: str, args: argparse.Namespace):
        self.model, self.process_name, self.args = model, process, args
        self.network = model in NETWORKS
        self.tune_den: Any = None
        self.labels: Tensor | None = None
        if self.network:
            den = ds.nets.model(model)
            labels = torch.arange(max(*args.calib_sizes, args.eval)) % 10
            self.den = ds.Denoiser(
                _Labelled(den.net, labels), den.process, den.prediction, sample_shape=(1, 8, 8)
            )
            # ds.tune splits its batch (the validation quarter is its last samples): the labels
            # go in as cond, split with it, not bound to batch positions
            self.tune_den, self.labels = den, labels
            self.gmm = None
            shape: tuple[int, ...] = (1, 8, 8)
        else:
            self.gmm = get_heldout(model) if model in HELDOUT else get_gmm(model)
            proc = get_process(process)
            self.den = self.gmm.denoiser(proc, prediction_for(proc))
            shape = self.gmm.shape
        self.proc = self.den.process
        self.discrete = isinstance(self.proc, VPDiscrete)
        n_cal = max(args.calib_sizes)
        n_eval = EVAL_BATCH.get(model, args.eval)
        self.x_calib = self._prior(n_cal, shape, args.seed_calib)
        self.x_eval = self._prior(n_eval, shape, args.seed_eval)
        self._truth: dict[str, Tensor] = {}
        self.truth_seconds: dict[str, float] = {}

    def _prior(self, n: int, shape: tuple[int, ...], seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return self.proc.prior((n, *shape), generator=gen, dtype=torch.float64)

    def truth(self, which: str) -> Tensor:
        """The exact answer on the ``calib`` or ``eval`` noises (cached)."""
        if which not in self._truth:
            x = self.x_calib if which == "calib" else self.x_eval
            seed = self.args.seed_calib if which == "calib" else self.args.seed_eval
            # the networks: the eval truth at --rtol, the calibration target (what ds.tune's
            # own teacher would compute) at --teacher-rtol
            rtol = self.args.rtol if which == "eval" else self.args.teacher_rtol
            exact = "exact-tmin" if self.discrete else "exact"
            tag = exact if self.gmm is not None else f"rk45-{rtol:g}"
            name = f"{self.model}-{self.process_name}-{tag}-seed{seed}-n{x.shape[0]}.pt"
            path = Path(self.args.cache) / name if self.args.cache else None
            t0 = time.perf_counter()
            if path is not None and path.exists():
                self._truth[which] = torch.load(path)
            elif self.gmm is not None:
                ref = ExactReference(self.gmm, self.proc, x)
                t_max = float(self.proc.t_max_finite)
                if self.discrete:  # its network never sees σ < σ_min: its ODE ends at t_min
                    self._truth[which] = ref.standard(t_max, float(self.proc.t_min))
                else:
                    self._truth[which] = ref.continued(t_max)
            else:
                self._truth[which] = teacher(self.den, x, rtol=rtol)
            self.truth_seconds[which] = time.perf_counter() - t0
            if path is not None and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self._truth[which], path)
        return self._truth[which]

    def baselines(self, nfe: int) -> dict[str, Any]:
        """Untuned auto and every peer configuration on the evaluation noise at ``nfe``."""
        from diffsolve.bench import peers

        ref = self.truth("eval")
        x = ds.sample(self.den, self.x_eval, "auto", nfe=nfe)
        out: dict[str, Any] = {
            "err_auto": rel_rmse(x, ref),
            "err_auto_median": float(per_sample_rel_err(x, ref).median()),
            "peers": {},
        }
        for cfg in peers.peer_configs(self.proc):
            try:
                res = peers.run_peer(cfg, self.den, self.x_eval, nfe)
                err = rel_rmse(res.x.to(torch.float64), ref)
                med = float(per_sample_rel_err(res.x.to(torch.float64), ref).median())
            except Exception as e:  # a peer's own failure is a result, not a crash
                out["peers"][cfg.label] = {"err": None, "error": repr(e)}
                continue
            ok = math.isfinite(err)
            out["peers"][cfg.label] = {
                "err": err if ok else None,
                "err_median": med if ok and math.isfinite(med) else None,
                "nfe": res.nfe,
            }
        finite = [(v["err"], k) for k, v in out["peers"].items() if v.get("err") is not None]
        if finite:
            out["envelope"], out["best_peer"] = min(finite)
        else:
            out["envelope"], out["best_peer"] = None, None
        # the same envelope on the median per-sample error: the relative RMSE of a few hundred
        # trajectories is set by the one or two whose exact path ends at another mode than
        # every few-step solver's (then every ratio is ≈ 1); the median follows the bulk
        meds = [v["err_median"] for v in out["peers"].values() if v.get("err_median") is not None]
        out["envelope_median"] = min(meds) if meds else None
        return out


def _key(row: dict[str, Any]) -> str:
    keys = ("model", "process", "nfe", "method", "calib", "iters", "lr", "batch", "order")
    return "|".join(str(row.get(k)) for k in keys)  # rows before --lr have none: the default


def _load(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"rows": [], "baselines": {}, "meta": {}}


def _save(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _lr(row: dict[str, Any]) -> str:
    """The non-default options of a row, for the iters column (rows before them: defaults)."""
    lr = "" if row.get("lr") is None else f", lr {row['lr']:g}"
    return lr + ("" if row.get("batch") is None else f", batch {row['batch']}")


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(doc: dict[str, Any]) -> str:
    """The rows as a markdown table: one line per model, process, NFE and method at ``--calib``
    noises, with a column per other calibration size found in the rows (``--also-calib``)."""
    rows = doc["rows"]
    also = sorted({r["calib"] for r in rows if not r.get("main")})
    order = {m: i for i, m in enumerate((*ALL_MODELS, *METHODS))}
    main = sorted(
        (r for r in rows if r.get("main")),
        key=lambda r: (order[r["model"]], r["process"], r["nfe"], order[r["method"]]),
    )
    head = (
        "| model | process | NFE | method | iters | tuned err | tuned ÷ env | auto ÷ env "
        "| tuned ÷ env (median) | auto ÷ env (median) | calib err | tune s |"
    )
    sep = "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|"
    for n in also:
        head += f" ÷ env @{n} |"
        sep += "--:|"
    head += " best peer |"
    sep += "---|"
    lines = [head, sep]
    for r in main:
        line = (
            f"| {r['model']} | {r['process']} | {r['nfe']} | {r['method']} "
            f"| {r['iters'] or 'default'}{_lr(r)} | {_fmt(r['err_tuned'], '.3e')} "
            f"| {_fmt(r['ratio_tuned'], '.3f')} "
            f"| {_fmt(r['ratio_auto'], '.3f')} "
            f"| {_fmt(r.get('ratio_tuned_median'), '.3f')} "
            f"| {_fmt(r.get('ratio_auto_median'), '.3f')} | {_fmt(r['err_calib'], '.3e')} "
            f"| {_fmt(r['tune_seconds'], '.1f')} |"
        )
        for n in also:
            other = next(
                (
                    o
                    for o in rows
                    if o["calib"] == n
                    and all(
                        o.get(k) == r.get(k)
                        for k in ("model", "process", "nfe", "method", "iters", "lr")
                    )
                ),
                None,
            )
            line += f" {_fmt(other['ratio_tuned'] if other else None, '.3f')} |"
        line += f" {r['best_peer']} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def pivot(doc: dict[str, Any]) -> str:
    """The rows at ``--calib`` noises as one line per model, process and method with a column per
    NFE: each cell the tuned solver's ratio to the envelope on the median per-sample error,
    then in brackets on the relative RMSE ("–": not run; "error": tuning stopped)."""
    rows = [r for r in doc["rows"] if r.get("main")]
    order = {m: i for i, m in enumerate((*ALL_MODELS, *METHODS))}
    nfes = sorted({r["nfe"] for r in rows})
    cells: dict[tuple[str, str, str], dict[int, str]] = {}
    for r in rows:
        if r.get("error"):
            text = "error"
        else:
            text = f"{_fmt(r.get('ratio_tuned_median'), '.2f')} ({_fmt(r['ratio_tuned'], '.2f')})"
        cells.setdefault((r["model"], r["process"], r["method"]), {})[r["nfe"]] = text
    head = "| model | process | method | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [head, "|---|---|---|" + "--:|" * len(nfes)]
    for key in sorted(cells, key=lambda k: (order[k[0]], k[1], order[k[2]])):
        held = " (held out)" if key[0] in HELDOUT else ""
        vals = " | ".join(cells[key].get(n, "–") for n in nfes)
        lines.append(f"| {key[0]}{held} | {key[1]} | {key[2]} | {vals} |")
    return "\n".join(lines) + "\n\n" + _summary(rows)


def _summary(rows: list[dict[str, Any]]) -> str:
    """Per method over the rows given: how many cells, how many at most ⅓ and at most 1 of the
    envelope on the median per-sample error, the geometric mean of that ratio, the median
    tuning wall time, and on the calibration noise the geometric mean of the tuned RMSE ÷ the
    start's (the method's own starting solver) with the cells where it fell."""
    order = {m: i for i, m in enumerate(METHODS)}
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    lines = [
        "| method | cells | ≤ ⅓ | ≤ 1 | geometric mean | median tune s | calib after ÷ before "
        "(fell in) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for m in sorted(by, key=lambda k: order.get(k, len(order))):
        ratios = [r["ratio_tuned_median"] for r in by[m] if r.get("ratio_tuned_median")]
        secs = sorted(r["tune_seconds"] for r in by[m])
        calib = [
            r["err_calib"] / r["err_calib_before"]
            for r in by[m]
            if r.get("err_calib") and r.get("err_calib_before")
        ]
        lines.append(
            f"| {m} | {len(by[m])} | {sum(v <= 1 / 3 for v in ratios)} "
            f"| {sum(v <= 1 for v in ratios)} | {_geomean(ratios):.2f} "
            f"| {secs[len(secs) // 2]:.1f} | {_geomean(calib):.2f} "
            f"({sum(v < 1 for v in calib)} of {len(calib)}) |"
        )
    return "\n".join(lines) + "\n"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(ALL_MODELS))
    ap.add_argument("--processes", default="sd,ddpm", help="for the mixtures (bench PROCESSES)")
    ap.add_argument("--nfe", default="4,5,6,8,10")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib", type=int, default=256, help="calibration noises")
    ap.add_argument("--also-calib", default="", help="e.g. 64,1024: also tune on these counts")
    ap.add_argument("--eval", type=int, default=64, help="evaluation noises (gmm3072: 16)")
    ap.add_argument("--iters", type=int, default=None, help="ds.tune's iters (default its own)")
    ap.add_argument("--lr", type=float, default=None, help="ds.tune's lr (default its own)")
    ap.add_argument("--batch", type=int, default=None, help="ds.tune's batch (default its own)")
    ap.add_argument("--order", type=int, default=None, help="ds.tune's order (default its own)")
    ap.add_argument("--seed-calib", type=int, default=1)
    ap.add_argument("--seed-eval", type=int, default=2)
    ap.add_argument("--rtol", type=float, default=1e-6, help="the networks' rk45 truth (eval)")
    ap.add_argument(
        "--teacher-rtol",
        type=float,
        default=TEACHER_RTOL,
        help="the networks' rk45 calibration target (ds.tune's teacher tolerance)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="folder keeping the exact answers between runs")
    ap.add_argument("--out", default="tuning.json")
    ap.add_argument("--md", default=None)
    ap.add_argument(
        "--pivot",
        action="store_true",
        help="--md as one line per model, process and method, a column per NFE",
    )
    ap.add_argument(
        "--render",
        default=None,
        help="run nothing: write --md from the rows of these result files (comma-separated) "
        "of --models at --nfe",
    )
    args = ap.parse_args()
    if args.render is not None:
        if not args.md:
            ap.error("--render writes --md: give it")
        merged: dict[str, Any] = {"rows": [], "baselines": {}, "meta": {}}
        seen: set[str] = set()
        keep_models, keep_nfes = set(args.models.split(",")), {int(n) for n in args.nfe.split(",")}
        for name in args.render.split(","):
            for r in _load(Path(name))["rows"]:
                if r["model"] not in keep_models or r["nfe"] not in keep_nfes:
                    continue  # --models and --nfe choose the part rendered
                if _key(r) not in seen:  # the first file holding a row wins
                    seen.add(_key(r))
                    merged["rows"].append(r)
        Path(args.md).write_text(pivot(merged) if args.pivot else markdown(merged))
        return
    torch.set_num_threads(args.threads)
    if args.seed_calib == args.seed_eval:
        ap.error("--seed-calib and --seed-eval must differ (held-out means other noises)")
    models = args.models.split(",")
    for m in models:
        if m not in ALL_MODELS:
            ap.error(f"unknown model {m!r}; valid: {', '.join(ALL_MODELS)}")
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    nfes = [int(n) for n in args.nfe.split(",")]
    also = [int(n) for n in args.also_calib.split(",") if n]
    args.calib_sizes = [args.calib, *[n for n in also if n != args.calib]]

    out = Path(args.out)
    doc = _load(out)
    doc["meta"].update(
        seed_calib=args.seed_calib, seed_eval=args.seed_eval, torch=torch.__version__
    )
    done = {_key(r) for r in doc["rows"]}
    print(
        f"{'model':11s} {'proc':5s} {'NFE':>3s} {'method':13s} {'calib':>5s} {'tuned':>9s} "
        f"{'÷env':>6s} {'auto÷env':>8s} {'med÷env':>7s} {'auto med':>8s} {'calib err':>9s} "
        f"{'tune s':>7s}  best peer",
        flush=True,
    )
    for model in models:
        procs = ["own"] if model in NETWORKS else args.processes.split(",")
        for pname in procs:
            case: Case | None = None
            for nfe in nfes:
                for method in methods:
                    for n_cal in args.calib_sizes:
                        row: dict[str, Any] = {
                            "model": model,
                            "process": pname,
                            "nfe": nfe,
                            "method": method,
                            "calib": n_cal,
                            "iters": args.iters,
                            "lr": args.lr,
                            "batch": args.batch,
                            "order": args.order,
                        }
                        if _key(row) in done:
                            continue
                        if case is None:
                            case = Case(model, pname, args)
                        bkey = f"{model}|{pname}|{nfe}|{args.seed_eval}|{case.x_eval.shape[0]}"
                        if bkey not in doc["baselines"]:
                            doc["baselines"][bkey] = case.baselines(nfe)
                        base = doc["baselines"][bkey]
                        target = case.truth("calib")[:n_cal]
                        x_cal = case.x_calib[:n_cal]
                        tune_den = case.den if case.tune_den is None else case.tune_den
                        cond = None if case.labels is None else {"label": case.labels[:n_cal]}
                        t0 = time.perf_counter()
                        try:
                            tuned = ds.tune(
                                tune_den, x_cal, nfe, method=method, cond=cond, target=target,
                                iters=args.iters, rtol=args.teacher_rtol,
                                **({} if args.lr is None else {"lr": args.lr}),
                                **({} if args.batch is None else {"batch": args.batch}),
                                **({} if args.order is None else {"order": args.order}),
                            )  # fmt: skip
                        except ds.TuningError as e:
                            row.update(error=repr(e), err_tuned=None, err_calib=None)
                            tuned = None
                        secs = time.perf_counter() - t0
                        if tuned is not None:
                            x = ds.sample(case.den, case.x_eval, solver=tuned)
                            row.update(
                                err_tuned=rel_rmse(x, case.truth("eval")),
                                err_tuned_median=float(
                                    per_sample_rel_err(x, case.truth("eval")).median()
                                ),
                                err_calib=tuned.info["calib_rel_rmse_after"],
                                err_calib_before=tuned.info["calib_rel_rmse_before"],
                                # v3 also reports the median per-sample error without and with
                                # its statistics
                                calib_median_before=tuned.info.get("calib_median_rel_err_before"),
                                calib_median_after=tuned.info.get("calib_median_rel_err_after"),
                                init_grid=tuned.info.get("init_grid"),  # dc, v3: their own grid
                                times=(  # v3: the schedule's, not its own
                                    list(tuned.times) if hasattr(tuned, "times") else None
                                ),
                                error=None,
                            )
                        env = base["envelope"]
                        row.update(
                            main=n_cal == args.calib,
                            eval=int(case.x_eval.shape[0]),
                            tune_seconds=secs,
                            err_auto=base["err_auto"],
                            envelope=env,
                            best_peer=base["best_peer"],
                            ratio_tuned=_ratio(row["err_tuned"], env),
                            ratio_auto=_ratio(base["err_auto"], env),
                            envelope_median=base.get("envelope_median"),
                            ratio_tuned_median=_ratio(
                                row.get("err_tuned_median"), base.get("envelope_median")
                            ),
                            ratio_auto_median=_ratio(
                                base.get("err_auto_median"), base.get("envelope_median")
                            ),
                            truth_seconds=dict(case.truth_seconds),
                        )
                        doc["rows"].append(row)
                        done.add(_key(row))
                        _save(out, doc)
                        print(
                            f"{model:11s} {pname:5s} {nfe:3d} {method:13s} {n_cal:5d} "
                            f"{_fmt(row['err_tuned'], '9.3e')} {_fmt(row['ratio_tuned'], '6.3f')} "
                            f"{_fmt(row['ratio_auto'], '8.3f')} "
                            f"{_fmt(row['ratio_tuned_median'], '7.3f')} "
                            f"{_fmt(row['ratio_auto_median'], '8.3f')} "
                            f"{_fmt(row['err_calib'], '9.3e')} "
                            f"{secs:7.1f}  {base['best_peer']}",
                            flush=True,
                        )
            if case is not None and case.truth_seconds:
                took = ", ".join(f"{k} {v:.1f} s" for k, v in case.truth_seconds.items())
                print(f"  ({model} {pname}: exact answers {took})", flush=True)
    if args.md:
        Path(args.md).write_text(pivot(doc) if args.pivot else markdown(doc))


if __name__ == "__main__":
    main()
