"""Solvers: frozen configurations with ``init``/``step`` over a state value.

Importing the package registers every built-in solver (each module's ``@register``); the
registry itself (``base.register``, ``base.get_solver``) imports none of them, so there is no
import cycle.
"""

from .adams import DEIS, IPNDM, LMS
from .adaptive import RK45
from .base import Grid, Plan, Solver, State, get_solver, register, solvers
from .ddpm import DDPM
from .dpm_adaptive import DPMAdaptive
from .dpm_solver import DPMSolver
from .dpm_solver_v3 import DPMSolverV3
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
    "DPMSolverV3",
    "Euler",
    "EulerMaruyama",
    "Grid",
    "Heun",
    "Plan",
    "SASolver",
    "SDEDPMSolver",
    "Solver",
    "State",
    "UniPC",
    "get_solver",
    "register",
    "solvers",
]
