"""Tuning to the user's model: a calibrated grid and weight table, run by the engine.

``ds.tune(model, x_calib, nfe)`` returns a :class:`Tuned` solver; ``tuned.save(path)`` and
``ds.load_tuned(path)`` keep it. See :mod:`.tune` for the methods.
"""

from .tune import METHODS, TuningError, tune
from .tuned import Tuned, TunedFileError, load_tuned

__all__ = ["METHODS", "Tuned", "TunedFileError", "TuningError", "load_tuned", "tune"]
