"""Model-side and guidance methods on the shipped digits-vp network (issue 5).

Sections (``--sections``, default all):

* ``skip``: Skip-Tuning, FD-digits against ρ (uniform, and linear in depth) at NFE 5, 10, 20.
* ``timeshift``: FD-digits with and without the Time-Shift sampler at NFE 5, 10, 20.
* ``cfg``: classifier-free guidance at scale 7.5 with several solvers, with and without dynamic
  thresholding: finite?, pixel range, FD-digits, class accuracy.
* ``classifier``: classifier guidance with the shipped noise-conditional classifier.
* ``inpaint``: inpainting (right half and bottom half masked) by replacement with
  :class:`diffsolve.guidance.inpaint.Inpaint`; a PNG.

FD-digits: the Fréchet distance between the penultimate-layer features (64-D) of the shipped
clean digits classifier on samples (clipped to [−1, 1], as a saved image would be) and on all
1797 real digits. Its noise floor at the sample count used is reported (a random subset of the
real digits of the same size against all of them). Class accuracy: the same classifier's
argmax against the requested label. Samples are class-conditional with balanced labels
(label = i mod 10) unless stated; every configuration uses the same x_T (seed 0).

    python benchmarks/digits_guidance.py --n 1000 --json docs/digits-guidance.json \
        --markdown docs/digits-guidance.md --png docs/digits-inpaint.png

Sections can run as separate processes (``--sections skip --json a.json`` …, ``--tag`` and
``--seed`` for repeats with other settings or another x_T, ``--rhos`` for the Skip-Tuning grid,
``--cfg-nfe``) and be merged with ``--render a.json,b.json --markdown …``; a ``findings`` text
in a merged JSON file is printed at the top (docs/digits-guidance.md's was written by hand from
the tables).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffsolve as ds
from diffsolve import nets
from diffsolve.bench.digits import class_accuracy, digits_features, fd_digits, frechet_distance
from diffsolve.guidance import (
    ClassifierGuidance,
    DynamicThreshold,
    TimeShift,
    linear_rho,
    skip_tuning,
)
from diffsolve.nets.data import digits

NFES = (5, 10, 20)


# -- metrics ---------------------------------------------------------------------------------------


class Metrics:
    """FD-digits against all 1797 real digits, class accuracy, and the pixel range
    (``diffsolve.bench.digits``)."""

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        finite = bool(torch.isfinite(x).all())
        out: dict[str, Any] = {"finite": finite}
        if not finite:
            return out
        out["fd"] = fd_digits(x)
        out["max_abs"] = float(x.abs().max())
        out["frac_out"] = float((x.abs() > 1.05).float().mean())
        if labels is not None:
            out["acc"] = class_accuracy(x, labels)
        return out

    def floor(self, n: int, seed: int = 0) -> float:
        """FD of n random real digits against all of them: the floor at this sample count."""
        real = digits_features(digits()[0]).double().numpy()
        idx = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))
        sub = real[idx[:n].numpy()]
        stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (sub, real)]
        return frechet_distance(*stats[0], *stats[1])


# -- the sections ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, n: int, log, seed: int = 0):
        self.log = log
        self.model = nets.model("digits-vp")
        self.net, self.process = self.model.net, self.model.process
        self.metrics = Metrics()
        self.n = n
        self.labels = torch.arange(n) % 10
        gen = torch.Generator().manual_seed(seed)
        self.x_T = ds.prior(self.process, (n, 1, 8, 8), generator=gen)

    def run(self, model: Any, solver: str = "dpmpp_2m", nfe: int = 10, cond=None, **opts):
        cond = {"label": self.labels} if cond is None else cond
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                x = ds.sample(model, self.x_T, solver, nfe=nfe, cond=cond, **opts)
        except ds.NonFiniteError:
            return {"finite": False, "seconds": time.perf_counter() - t0}
        m = self.metrics(x, self.labels)
        m["seconds"] = time.perf_counter() - t0
        return m

    def reference(self) -> dict[str, Any]:
        out = {"fd_floor_real_subset": self.metrics.floor(self.n)}
        noise = torch.randn(self.n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        out["fd_noise"] = self.metrics(noise.clamp(-1, 1))["fd"]
        out["dpmpp_2m_nfe50"] = self.run(self.model, "dpmpp_2m", 50)
        self.log(f"reference: {out}")
        return out

    def skip(self, rhos: str = "1,0.9,0.8,0.7,lin:1:0.7") -> list[dict[str, Any]]:
        rows = []
        settings: list[tuple[str, Any]] = []
        for r in rhos.split(","):
            if r.startswith("lin:"):  # lin:top:bottom, linear in depth
                top, bottom = (float(v) for v in r.split(":")[1:])
                settings.append((f"linear {top:g}→{bottom:g}", linear_rho(self.net, top, bottom)))
            elif r.startswith("t:"):  # t:ρ0:ρ1:…, one value per skip (outermost first)
                rho = tuple(float(v) for v in r.split(":")[1:])
                settings.append(("(" + ", ".join(f"{v:g}" for v in rho) + ")", rho))
            else:
                settings.append((f"{float(r):g}", float(r)))
        for solver in ("dpmpp_2m",):
            for label, rho in settings:
                for nfe in NFES:
                    with skip_tuning(self.net, rho):
                        m = self.run(self.model, solver, nfe)
                    rows.append({"solver": solver, "rho": label, "nfe": nfe, **m})
                    self.log(f"skip {solver} ρ={label} nfe={nfe}: {_short(m)}")
        return rows

    def timeshift(self) -> list[dict[str, Any]]:
        x, _ = digits()
        data_var = float(x.reshape(x.shape[0], -1).var(1).mean())
        settings = [
            ("off", None),
            ("w=20, t_c=900", {"window": 20, "cutoff": 900}),
            ("w=30, t_c=300", {"window": 30, "cutoff": 300}),
            (
                f"w=30, t_c=300, data_var={data_var:.2f}",
                {"window": 30, "cutoff": 300, "data_var": data_var},
            ),
        ]
        rows = []
        for solver in ("euler", "dpmpp_2m"):
            for label, opts in settings:
                model = self.model if opts is None else TimeShift(self.model, **opts)
                for nfe in NFES:
                    m = self.run(model, solver, nfe)
                    rows.append({"solver": solver, "time_shift": label, "nfe": nfe, **m})
                    self.log(f"timeshift {solver} {label} nfe={nfe}: {_short(m)}")
        return rows

    def cfg(self, scale: float = 7.5, nfe: int = 10) -> list[dict[str, Any]]:
        solvers: list[tuple[str, dict[str, Any]]] = [
            ("euler", {}),
            ("dpmpp_2m", {}),
            ("dpmpp_3m", {}),
            ("unipc", {"order": 3}),
            ("dpm_solver", {"order": 3, "method": "singlestep"}),
            ("heun", {}),
        ]
        guided = ds.CFG(self.model, scale, uncond={"label": torch.tensor(-1)})
        rows = []
        for name, opts in solvers:
            for thr in (False, True):
                model = DynamicThreshold(guided, ratio=0.995) if thr else guided
                m = self.run(model, name, nfe, **opts)
                label = name + "".join(f" {k}={v}" for k, v in opts.items())
                rows.append({"solver": label, "threshold": thr, "scale": scale, "nfe": nfe, **m})
                self.log(f"cfg {label} thr={thr}: {_short(m)}")
        m = self.run(self.model, "dpmpp_2m", nfe)
        rows.append({"solver": "dpmpp_2m", "threshold": False, "scale": 1.0, "nfe": nfe, **m})
        return rows

    def classifier(self, nfe: int = 10) -> list[dict[str, Any]]:
        clf, _ = nets.noisy_classifier()
        uncond = {"label": torch.full((self.n,), -1)}
        rows = []
        for scale in (0.0, 1.0, 3.0, 10.0):
            model = ClassifierGuidance(self.model, clf, scale, label=self.labels)
            m = self.run(model, "dpmpp_2m", nfe, cond=uncond)
            rows.append({"scale": scale, "nfe": nfe, **m})
            self.log(f"classifier guidance w={scale}: {_short(m)}")
        return rows

    def inpaint(self, png: str | None, nfe: int = 20, n: int = 100) -> list[dict[str, Any]]:
        from diffsolve.guidance.inpaint import Inpaint
        from diffsolve.noise import NoiseSource

        x, y = digits()
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:n]
        x0, lab = x[idx], y[idx]
        x_T = ds.prior(self.process, (n, 1, 8, 8), generator=torch.Generator().manual_seed(3))
        uncond = {"label": torch.full((n,), -1)}
        rows, pictures = [], []
        for where in ("right", "bottom"):
            known = torch.ones_like(x0, dtype=torch.bool)
            if where == "right":
                known[..., 4:] = False
            else:
                known[..., 4:, :] = False
            for replace in ("fresh", "path"):
                noise = NoiseSource(torch.Generator().manual_seed(2))
                model = Inpaint(self.model, x0, known, replace=replace, noise=noise)
                with torch.no_grad():
                    out = ds.sample(model, x_T, "dpmpp_2m", nfe=nfe, cond=uncond)
                m = self.metrics(out, lab)
                m["rmse_unknown"] = float(((out - x0)[~known] ** 2).mean().sqrt())
                m["known_exact"] = bool(torch.equal(out[known], x0[known]))
                rows.append({"mask": where, "replace": replace, "nfe": nfe, "n": n, **m})
                self.log(f"inpaint {where} {replace}: {_short(m)}")
                if replace == "fresh":
                    pictures.append((x0[:12], torch.where(known, x0, 0.0)[:12], out[:12]))
        if png:
            save_png(pictures, png)
        return rows


def save_png(pictures, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sum(len(p) for p in pictures)
    cols = pictures[0][0].shape[0]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.66))
    names = []
    for where in ("right half", "bottom half"):
        names += ["original", f"{where.split()[0]} masked", "inpainted"]
    r = 0
    for group in pictures:
        for imgs in group:
            for c in range(cols):
                ax = axes[r, c]
                ax.imshow(imgs[c, 0].clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[r, 0].set_ylabel(names[r], rotation=0, ha="right", va="center", fontsize=7)
            r += 1
    fig.subplots_adjust(left=0.15, right=0.99, top=0.99, bottom=0.01, wspace=0.08, hspace=0.12)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(m: dict[str, Any]) -> str:
    keys = ("fd", "acc", "max_abs", "frac_out", "rmse_unknown", "seconds")
    return ", ".join(f"{k}={m[k]:.3g}" for k in keys if k in m) or str(m)


# -- report ----------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    return str(v)


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join(
        "| " + " | ".join(_fmt(r.get(c, "—")) for c in cols) + " |\n" for r in rows
    )


def pivot(rows: list[dict[str, Any]], key: str, solver: str | None = None) -> str:
    """FD-digits with one row per setting and one column per NFE."""
    settings: list[str] = []
    for r in rows:
        if (solver is None or r["solver"] == solver) and r[key] not in settings:
            settings.append(r[key])
    cols = [key] + [f"FD @ NFE {n}" for n in NFES]
    out = []
    for s in settings:
        row: dict[str, Any] = {key: s}
        for r in rows:
            if r[key] == s and (solver is None or r["solver"] == solver):
                row[f"FD @ NFE {r['nfe']}"] = r.get("fd", "non-finite")
        out.append(row)
    return table(out, cols)


USAGE = """## Usage

```python
from diffsolve.guidance import ClassifierGuidance, TimeShift, linear_rho, skip_tuning

guided = ClassifierGuidance(model, noisy_classifier, scale=3.0, label=labels)  # ε̂ − w·σ·∇log p(y|x)
shifted = TimeShift(model, window=20, cutoff=900)      # network time matched to Var(x_t)
with skip_tuning(unet, (1.0, 0.8, 0.8)):               # per skip; or a float, or linear_rho
    x0 = ds.sample(model, x_T, "dpmpp_2m", nfe=10, cond={"label": labels})
```
"""


def markdown(res: dict[str, Any]) -> str:
    ref = res.get("reference", {})
    parts = [
        "# Guidance and model-side methods on digits-vp\n",
        "Generated by `benchmarks/digits_guidance.py` "
        f"(n = {res['n']} samples per configuration, same x_T, {res['device']}). "
        "FD-digits: Fréchet distance of the shipped digits classifier's 64-D features "
        "(samples clipped to [−1, 1]) to all 1797 real digits; lower is better. "
        "Class-conditional samples, label = i mod 10, no CFG unless stated.\n",
    ]
    if res.get("findings"):
        parts += ["## Findings\n", res["findings"], ""]
    parts.append(USAGE)
    if ref:
        parts.append(
            f"Scale: FD of {res['n']} real digits vs all = {ref['fd_floor_real_subset']:.3g} "
            f"(the floor at this n); clipped Gaussian noise = {ref['fd_noise']:.3g}; "
            f"dpmpp_2m at NFE 50 = {ref['dpmpp_2m_nfe50'].get('fd', float('nan')):.3g}.\n"
        )

    def rows_of(prefix: str, seeded: bool) -> list[dict[str, Any]]:
        keys = [k for k in sorted(res) if k.startswith(prefix) and ("_seed" in k) == seeded]
        return [r for k in keys for r in res[k]]

    for seeded, note in ((False, ""), (True, ", replicate with x_T seed 1")):
        skip_rows = rows_of("skip", seeded)
        if skip_rows:
            parts += [f"## Skip-Tuning (dpmpp_2m{note})\n", pivot(skip_rows, "rho"), ""]
    if rows_of("skip", False):
        parts.append(
            "ρ is one number for every skip, or one per skip from the outermost (8×8, 24 ch) to "
            "the innermost (2×2); `linear a→b`: linear in depth (`linear_rho`).\n"
        )
    for seeded, note in ((False, ""), (True, ", replicate with x_T seed 1")):
        ts_rows = rows_of("timeshift", seeded)
        for solver in ("euler", "dpmpp_2m") if ts_rows else ():
            parts += [
                f"## Time-Shift sampler ({solver}{note})\n",
                pivot(ts_rows, "time_shift", solver),
                "",
            ]
    cfg_rows = rows_of("cfg", False)
    if cfg_rows:
        parts += [
            "## CFG at scale 7.5\n",
            table(
                cfg_rows,
                [
                    "solver",
                    "nfe",
                    "scale",
                    "threshold",
                    "finite",
                    "max_abs",
                    "frac_out",
                    "fd",
                    "acc",
                ],
            ),
            "`max_abs`: largest |pixel|; `frac_out`: fraction of pixels with |x| > 1.05; "
            "`acc`: the classifier's agreement with the requested label.\n",
        ]
    if res.get("classifier"):
        parts += [
            "## Classifier guidance (noise-conditional classifier, unconditional model, "
            "dpmpp_2m)\n",
            table(res["classifier"], ["scale", "nfe", "fd", "acc", "max_abs"]),
            "",
        ]
    if "inpaint" in res:
        parts += [
            "## Inpainting by replacement (`guidance.inpaint.Inpaint`, dpmpp_2m, "
            "unconditional model)\n",
            table(
                res["inpaint"],
                ["mask", "replace", "nfe", "n", "rmse_unknown", "known_exact", "acc"],
            ),
            "`rmse_unknown`: RMSE to the original digit on the masked pixels (a completion need "
            "not match it); `acc`: the classifier recognises the original digit's label in "
            "the completed image. Picture (replace=fresh): `digits-inpaint.png`.\n",
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--sections", default="reference,skip,timeshift,cfg,classifier,inpaint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="results file (sections accumulate in it)")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--rhos", default="1,0.9,0.8,0.7,lin:1:0.7", help="Skip-Tuning settings")
    ap.add_argument("--cfg-nfe", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="seed of x_T")
    ap.add_argument("--tag", default="", help="suffix of the result keys (repeat a section)")
    ap.add_argument(
        "--render", default=None, help="comma-separated JSON files: merge them, write --markdown"
    )
    args = ap.parse_args(argv)
    if args.render:
        res: dict[str, Any] = {}
        for f in args.render.split(","):
            res.update(json.loads(Path(f).read_text()))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        if args.markdown:
            Path(args.markdown).write_text(markdown(res))
        return res
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    bench = Bench(args.n, log, args.seed)
    res = {"n": args.n, "device": f"CPU, {args.threads} thread(s), torch {torch.__version__}"}
    if args.json and Path(args.json).exists():  # sections run separately accumulate
        res = {**json.loads(Path(args.json).read_text()), **res}
    for section in args.sections.split(","):
        section = section.strip()
        t0 = time.perf_counter()
        key = section + args.tag
        if section == "inpaint":
            res[key] = bench.inpaint(args.png)
        elif section == "skip":
            res[key] = bench.skip(args.rhos)
        elif section == "cfg":
            res[key] = bench.cfg(nfe=args.cfg_nfe)
        else:
            res[key] = getattr(bench, section)()
        log(f"[{section}: {time.perf_counter() - t0:.0f} s]")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        if args.markdown:
            Path(args.markdown).write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
