"""Guidance as Denoiser wrappers (each takes a model and returns the same interface), and
particle steering run between the steps (``FK``, ``SVDD``)."""

from .classifier import ClassifierGuidance
from .inpaint import Inpaint
from .minority import MinorityGuidance, minority_classes, minority_score
from .skip_tuning import SkipTuning, linear_rho, skip_count, skip_tuning
from .steering import FK
from .svdd import SVDD
from .thresholding import DynamicThreshold, StaticThreshold
from .time_shift import TimeShift

__all__ = [
    "FK",
    "SVDD",
    "ClassifierGuidance",
    "DynamicThreshold",
    "Inpaint",
    "MinorityGuidance",
    "SkipTuning",
    "StaticThreshold",
    "TimeShift",
    "linear_rho",
    "minority_classes",
    "minority_score",
    "skip_count",
    "skip_tuning",
]
