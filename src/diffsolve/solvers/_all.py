"""Importing this module registers every built-in solver; ``__all__`` lists the classes."""

from .adams import DEIS, IPNDM, LMS
from .adaptive import RK45
from .ddpm import DDPM
from .dpm_solver import DPMSolver
from .dpmpp import DPMSolverPP2M, DPMSolverPP2S, DPMSolverPP3M
from .euler import Euler
from .heun import Heun
from .rk import RK
from .unipc import UniPC

__all__ = [
    "DDPM",
    "DEIS",
    "IPNDM",
    "LMS",
    "RK",
    "RK45",
    "DPMSolver",
    "DPMSolverPP2M",
    "DPMSolverPP2S",
    "DPMSolverPP3M",
    "Euler",
    "Heun",
    "UniPC",
]
