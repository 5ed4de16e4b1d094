"""Tuning to the user's model: a calibrated grid and weight table, run by the engine.

``ds.tune(model, x_calib, nfe)`` returns a :class:`Tuned` solver; ``tuned.save(path)`` and
``ds.load_tuned(path)`` keep it. See :mod:`.tune` for the methods.
"""

from .dc_solver import DCConfig, DCRegression, dc_solver, fit_dc, fit_dc_regression
from .tune import METHODS, TuningError, tune
from .tuned import Tuned, TunedFileError, load_tuned
from .v3 import TunedV3, V3Statistics, compute_statistics, load_statistics, load_v3

__all__ = [
    "METHODS",
    "DCConfig",
    "DCRegression",
    "Tuned",
    "TunedFileError",
    "TunedV3",
    "TuningError",
    "V3Statistics",
    "compute_statistics",
    "dc_solver",
    "fit_dc",
    "fit_dc_regression",
    "load_statistics",
    "load_tuned",
    "load_v3",
    "tune",
]
