"""Importing this module registers every built-in solver; ``__all__`` lists the classes."""

from .adams import DEIS, IPNDM, LMS
from .adaptive import RK45
from .ddpm import DDPM
from .dpm_adaptive import DPMAdaptive
from .dpm_solver import DPMSolver
from .dpmpp import DPMSolverPP2M, DPMSolverPP2S, DPMSolverPP3M, DPMSolverPP3S
from .dpmpp_sde import DPMSolverPP2MSDE, DPMSolverPP3MSDE, DPMSolverPPSDE, SDEDPMSolver
from .euler import Euler
from .heun import Heun
from .mrs import MRS
from .pndm import PNDM
from .rk import RK
from .sa_solver import SASolver
from .sde_basic import PC, EulerMaruyama
from .unipc import UniPC

__all__ = [
    "DDPM",
    "DEIS",
    "IPNDM",
    "LMS",
    "MRS",
    "PC",
    "PNDM",
    "RK",
    "RK45",
    "DPMAdaptive",
    "DPMSolver",
    "DPMSolverPP2M",
    "DPMSolverPP2MSDE",
    "DPMSolverPP2S",
    "DPMSolverPP3M",
    "DPMSolverPP3MSDE",
    "DPMSolverPP3S",
    "DPMSolverPPSDE",
    "Euler",
    "EulerMaruyama",
    "Heun",
    "SASolver",
    "SDEDPMSolver",
    "UniPC",
]
