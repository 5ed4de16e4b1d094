"""Guidance as Denoiser wrappers: each takes a model and returns the same interface."""

from .thresholding import DynamicThreshold, StaticThreshold

__all__ = ["DynamicThreshold", "StaticThreshold"]
