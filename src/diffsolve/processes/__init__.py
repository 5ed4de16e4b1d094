"""Forward processes: every one a Gaussian path x_t = α_t·x_0 + σ_t·ε."""

from .base import GaussianProcess
from .flow import FlowMatching
from .interpolant import StochasticInterpolant
from .mean_reverting import MeanReverting
from .path import FlowPath, GaussianPath
from .pfgmpp import PFGMPP
from .subvp import SubVP
from .ve import EDM, VE
from .vp import VPCosine, VPDiscrete, VPLinear

__all__ = ["EDM", "VE", "FlowMatching", "GaussianProcess", "VPCosine", "VPDiscrete", "VPLinear"]
__all__ += ["FlowPath", "GaussianPath", "StochasticInterpolant", "SubVP"]
__all__ += ["PFGMPP", "MeanReverting"]
