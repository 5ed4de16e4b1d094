"""Importing this module registers every built-in solver; ``__all__`` lists the classes."""

from .adams import DEIS, IPNDM, LMS
from .adaptive import RK45
from .ddpm import DDPM
from .dpm_adaptive import DPMAdaptive
from .dpm_solver import DPMSolver
from .dpmpp import DPMSolverPP2M, DPMSolverPP2S, DPMSolverPP3M, DPMSolverPP3S
from .euler import Euler
from .heun import Heun
from .pndm import PNDM
from .rk import RK
from .sa_solver import SASolver
from .unipc import UniPC

__all__ = [
    "DDPM",
    "DEIS",
    "IPNDM",
    "LMS",
    "PNDM",
    "RK",
    "RK45",
    "DPMAdaptive",
    "DPMSolver",
    "DPMSolverPP2M",
    "DPMSolverPP2S",
    "DPMSolverPP3M",
    "DPMSolverPP3S",
    "Euler",
    "Heun",
    "SASolver",
    "UniPC",
]
