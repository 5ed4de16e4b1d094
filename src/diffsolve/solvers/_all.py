"""Importing this module registers every built-in solver; ``__all__`` lists the classes."""

from .euler import Euler

__all__ = ["Euler"]
