"""Solvers: frozen configurations with ``init``/``step`` over a state value."""

from .base import Grid, Solver, State, get_solver, register, solvers
from .euler import Euler

__all__ = ["Euler", "Grid", "Solver", "State", "get_solver", "register", "solvers"]
