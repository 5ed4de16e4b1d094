"""Guidance as Denoiser wrappers (each takes a model and returns the same interface), and
particle steering run between the steps (``FK``)."""

from .classifier import ClassifierGuidance
from .inpaint import Inpaint
from .skip_tuning import SkipTuning, linear_rho, skip_count, skip_tuning
from .steering import FK
from .thresholding import DynamicThreshold, StaticThreshold
from .time_shift import TimeShift

__all__ = [
    "FK",
    "ClassifierGuidance",
    "DynamicThreshold",
    "Inpaint",
    "SkipTuning",
    "StaticThreshold",
    "TimeShift",
    "linear_rho",
    "skip_count",
    "skip_tuning",
]
