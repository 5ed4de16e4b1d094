"""A tuned solver: a learned grid and a learned weight table, run by the engine, saved to a
versioned file that is validated against the model it is loaded for."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..processes.base import GaussianProcess
from ..solvers.base import Grid
from ..solvers.engine import Row, RowSolver, StepRule

__all__ = ["FORMAT", "FORMAT_VERSION", "Tuned", "TunedFileError", "load_tuned", "process_signature"]

FORMAT = "diffsolve-tuned"
FORMAT_VERSION = 1
_PROBES = 17  # times at which a process is compared with the one a file was tuned for


class TunedFileError(ValueError):
    """A tuned-solver file that is corrupted, of another format or version, or made for another
    process, prediction type or NFE."""


def process_signature(process: GaussianProcess) -> dict[str, Any]:
    """The process as numbers: its class, time range and log α, log σ at fixed probe times."""
    lo, hi = float(process.t_min), float(process.t_max_finite)
    t = torch.linspace(lo, hi, _PROBES, dtype=torch.float64)
    return {
        "class": type(process).__name__,
        "t_min": float(process.t_min),
        "t_max": float(process.t_max),
        "log_alpha": process.log_alpha(t).tolist(),
        "log_sigma": process.log_sigma(t).tolist(),
    }


def _same_process(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["class"] != b["class"]:
        return False
    close = [math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12) for k in ("t_min", "t_max")]
    for k in ("log_alpha", "log_sigma"):
        close += [
            (u == v) or math.isclose(u, v, rel_tol=1e-7, abs_tol=1e-9) for u, v in zip(a[k], b[k])
        ]
    return all(close)


@dataclass(frozen=True)
class Tuned(RowSolver):
    """A solver calibrated on one model (:func:`diffsolve.tune`): its grid, its NFE, its end
    rule and one :class:`~diffsolve.solvers.engine.StepRule` per step (rows of weights on the
    history, newest first). ``ds.sample(model, x_T, solver=tuned)`` runs exactly these; an
    ``nfe=`` that differs from ``tuned.nfe`` raises ``ValueError``.

    ``times``: the grid (process times, decreasing, without the clean end); ``steps``: the rules
    (each names the time its call evaluates: :attr:`call_times`, offset from the grid's where
    the tuning learned it);
    ``final``: the end rule the weights were tuned for; ``prediction`` and ``signature``: the
    model it was tuned on (checked by :func:`load_tuned` and by ``check``); ``info``: the method,
    its options, the calibration loss and the held-out error, for the record.
    """

    times: tuple[float, ...] = ()
    steps: tuple[StepRule, ...] = ()
    final: str = "standard"
    prediction: str = ""
    signature: dict[str, Any] = field(default_factory=dict, compare=False)
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    name: ClassVar[str] = "tuned"
    description: ClassVar[str] = "a solver calibrated on one model by ds.tune (grid and weights)"

    def validate(self) -> None:
        if len(self.steps) != len(self.times) - (0 if self.final != "tmin" else 1):
            raise ValueError(
                f"tuned: {len(self.times)} grid times do not fit {len(self.steps)} steps "
                f"with final={self.final!r}"
            )

    @property
    def call_times(self) -> tuple[float, ...]:
        """The process times at which the network is called, in order (the grid's ``times``
        unless the tuning learned where each call evaluates: ``ds.tune``'s ``auto``/``ld3``)."""
        return tuple(t for r in self.steps for t in r.t)

    @property
    def order(self) -> int:
        return max((r.update.width for r in self.steps if r.update is not None), default=1)

    @property
    def nfe(self) -> int:
        return sum(r.calls for r in self.steps)

    @property
    def planned_nfe(self) -> int | None:
        return self.nfe

    @property
    def planned_final(self) -> str | None:
        return self.final

    def budget(self, nfe: int, clean_end: bool) -> tuple[int, ...]:
        if nfe != self.nfe:
            raise ValueError(f"this tuned solver makes {self.nfe} network calls; nfe={nfe} given")
        return tuple(r.calls for r in self.steps)

    def calls(self, steps: int, clean_end: bool) -> tuple[int, ...]:
        if steps != len(self.steps):
            raise ValueError(f"this tuned solver has {len(self.steps)} steps; got {steps}")
        return tuple(r.calls for r in self.steps)

    def grid_times(
        self, process: GaussianProcess, schedule: Any, calls: tuple[int, ...], clean_end: bool
    ) -> Tensor:
        return torch.tensor(self.times, dtype=torch.float64)

    def rules(self, grid: Grid, calls: tuple[int, ...]) -> tuple[StepRule, ...]:
        mine = torch.tensor(self.times, dtype=torch.float64)
        ends = grid.t[:-1] if grid.clean_end else grid.t
        if ends.shape != mine.shape or not torch.allclose(ends, mine, rtol=1e-12, atol=0):
            raise ValueError("a tuned solver runs on its own grid: omit steps= and times=")
        return self.steps

    def check(self, process: GaussianProcess, prediction: str | None = None) -> None:
        """Raise :class:`TunedFileError` unless the solver was tuned for this process (and
        prediction type, when given)."""
        if self.signature and not _same_process(self.signature, process_signature(process)):
            raise TunedFileError(
                f"this tuned solver was made for another process ({self.signature['class']}, "
                f"t in [{self.signature['t_min']}, {self.signature['t_max']}]), not {process!r}"
            )
        if prediction is not None and self.prediction and prediction != self.prediction:
            raise TunedFileError(
                f"this tuned solver was made for a {self.prediction!r}-prediction model, "
                f"not {prediction!r}"
            )

    def check_model(self, model: Any) -> None:
        self.check(model.process, _prediction_of(model))

    # -- the file ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "times": list(self.times),
            "final": self.final,
            "prediction": self.prediction,
            "nfe": self.nfe,
            "signature": self.signature,
            "info": self.info,
            "steps": [
                {
                    "t": list(r.t),
                    "stages": [s.to_dict() for s in r.stages],
                    "update": None if r.update is None else r.update.to_dict(),
                    "correct": None if r.correct is None else r.correct.to_dict(),
                    "spans": [None if s is None else list(s) for s in r.spans],
                }
                for r in self.steps
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tuned:
        steps = tuple(
            StepRule(
                tuple(float(v) for v in s["t"]),
                tuple(Row.from_dict(r) for r in s.get("stages", ())),
                None if s.get("update") is None else Row.from_dict(s["update"]),
                None if s.get("correct") is None else Row.from_dict(s["correct"]),
                tuple(
                    None if p is None else (float(p[0]), float(p[1])) for p in s.get("spans", ())
                ),
            )
            for s in d["steps"]
        )
        out = cls(
            times=tuple(float(v) for v in d["times"]),
            steps=steps,
            final=str(d["final"]),
            prediction=str(d.get("prediction", "")),
            signature=dict(d.get("signature", {})),
            info=dict(d.get("info", {})),
        )
        if "nfe" in d and int(d["nfe"]) != out.nfe:
            raise TunedFileError(f"file says nfe={d['nfe']} but its steps make {out.nfe} calls")
        return out

    def save(self, path: str | Path) -> Path:
        """Write a versioned JSON file with a SHA-256 checksum of its body."""
        body = json.dumps(self.to_dict(), sort_keys=True)
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "sha256": hashlib.sha256(body.encode()).hexdigest(),
            "body": json.loads(body),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1, sort_keys=True))
        return path


def _span(p: Any) -> tuple[float, float] | None:
    return None if p is None else (float(p[0]), float(p[1]))


def _prediction_of(model: Any) -> str | None:
    """The prediction type of a Denoiser, through guidance wrappers."""
    inner = model
    while not hasattr(inner, "prediction") and hasattr(inner, "model"):
        inner = inner.model
    p = getattr(inner, "prediction", None)
    return p if isinstance(p, str) else None


def load_tuned(
    path: str | Path, model: Any = None, *, nfe: int | None = None, process: Any = None
) -> Tuned:
    """Read a file written by :meth:`Tuned.save`, validated: its format, version and checksum,
    and, when given, the ``model`` (its process and prediction type), the ``process`` and the
    ``nfe`` it must fit. Raises :class:`TunedFileError` naming the file and the problem."""
    path = Path(path)
    from .v3 import is_v3_file, load_v3

    if is_v3_file(path):  # a tuned DPM-Solver-v3 (statistics file)
        return load_v3(path, model, nfe=nfe, process=process)  # type: ignore[return-value]
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TunedFileError(f"{path}: not a readable tuned-solver file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TunedFileError(f"{path}: not a {FORMAT} file")
    if doc.get("version") != FORMAT_VERSION:
        raise TunedFileError(
            f"{path}: format version {doc.get('version')!r}, this diffsolve reads {FORMAT_VERSION}"
        )
    body = json.dumps(doc.get("body"), sort_keys=True)
    if hashlib.sha256(body.encode()).hexdigest() != doc.get("sha256"):
        raise TunedFileError(f"{path}: checksum mismatch (the file is corrupted or was edited)")
    try:
        tuned = Tuned.from_dict(doc["body"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, TunedFileError):
            raise TunedFileError(f"{path}: {e}") from None
        raise TunedFileError(f"{path}: malformed body ({e!r})") from None
    if nfe is not None and nfe != tuned.nfe:
        raise TunedFileError(f"{path}: tuned for nfe={tuned.nfe}, not nfe={nfe}")
    if model is not None:
        process = model.process
    if process is not None:
        try:
            tuned.check(process, _prediction_of(model) if model is not None else None)
        except TunedFileError as e:
            raise TunedFileError(f"{path}: {e}") from None
    return tuned
