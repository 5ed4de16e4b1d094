"""diffsolve: fast, training-free sampling of diffusion and flow-matching models.

>>> import diffsolve as ds
>>> proc = ds.VPDiscrete.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
"""

from . import cuda_graph, integrate, nets, neural_sde, shards
from .adjoint import Adjoint, optimize_noise
from .ctm import CTM, CTMGamma
from .denoiser import CFG, PREDICTIONS, Denoiser, EvalPoint, Prediction
from .discrete import MaskedDiffusion, sample_masked
from .dlg import dlg_chain, dlg_sample
from .fp_residual import FPPath, fp_residual, fp_residual_path
from .guidance import (
    FK,
    SVDD,
    ClassifierGuidance,
    DynamicThreshold,
    Inpaint,
    MinorityGuidance,
    SkipTuning,
    StaticThreshold,
    TimeShift,
    skip_tuning,
)
from .interop.kdiffusion import denoiser_from_kdiffusion, to_kdiffusion_sampler
from .likelihood import LikelihoodInfo, bits_per_dim, dequantization_shift, log_likelihood
from .nets import WeightsError
from .noise import BrownianTree, Noise, NoiseSource
from .plan import make_plan
from .processes import (
    EDM,
    PFGMPP,
    VE,
    FlowMatching,
    FlowPath,
    GaussianPath,
    GaussianProcess,
    MeanReverting,
    StochasticInterpolant,
    SubVP,
    VPCosine,
    VPDiscrete,
    VPLinear,
)
from .retime import Retimed
from .sample import NonFiniteError, SampleInfo, sample
from .schedules import (
    Exponential,
    Karras,
    Leading,
    Linspace,
    LogSNR,
    Quadratic,
    Schedule,
    Trailing,
    Uniform,
    schedules,
)
from .shards import ShardRun, cycle_labels, load_shards, sample_shards
from .solvers import *  # noqa: F403  (solver classes: ds.UniPC, ds.DPMSolverPP2M, ...)
from .solvers import Grid, Plan, Solver, State, get_solver, solvers
from .solvers.engine import Row, StepRule
from .tuning import Tuned, TunedFileError, TunedV3, TuningError, V3Statistics, load_tuned, tune

__version__ = "0.1.0"


def prior(
    process: GaussianProcess, shape: tuple[int, ...], generator=None, device=None, dtype=None
):
    """x at t_max in the process's own scale: ``prior_std · N(0, I)``, shape ``shape``."""
    import torch

    return process.prior(
        shape,
        generator=generator,
        device=device,
        dtype=dtype if dtype is not None else torch.float32,
    )


__all__ = [
    "CFG",
    "CTM",
    "EDM",
    "FK",
    "PFGMPP",
    "PREDICTIONS",
    "SVDD",
    "VE",
    "Adjoint",
    "BrownianTree",
    "CTMGamma",
    "ClassifierGuidance",
    "Denoiser",
    "DynamicThreshold",
    "EvalPoint",
    "Exponential",
    "FPPath",
    "FlowMatching",
    "FlowPath",
    "GaussianPath",
    "GaussianProcess",
    "Grid",
    "Inpaint",
    "Karras",
    "Leading",
    "LikelihoodInfo",
    "Linspace",
    "LogSNR",
    "MaskedDiffusion",
    "MeanReverting",
    "MinorityGuidance",
    "Noise",
    "NoiseSource",
    "NonFiniteError",
    "Plan",
    "Prediction",
    "Quadratic",
    "Retimed",
    "Row",
    "SampleInfo",
    "Schedule",
    "ShardRun",
    "SkipTuning",
    "Solver",
    "State",
    "StaticThreshold",
    "StepRule",
    "StochasticInterpolant",
    "SubVP",
    "TimeShift",
    "Trailing",
    "Tuned",
    "TunedFileError",
    "TunedV3",
    "TuningError",
    "Uniform",
    "V3Statistics",
    "VPCosine",
    "VPDiscrete",
    "VPLinear",
    "WeightsError",
    "bits_per_dim",
    "cuda_graph",
    "cycle_labels",
    "denoiser_from_kdiffusion",
    "dequantization_shift",
    "dlg_chain",
    "dlg_sample",
    "fp_residual",
    "fp_residual_path",
    "get_solver",
    "integrate",
    "load_shards",
    "load_tuned",
    "log_likelihood",
    "make_plan",
    "nets",
    "neural_sde",
    "optimize_noise",
    "prior",
    "sample",
    "sample_masked",
    "sample_shards",
    "schedules",
    "shards",
    "skip_tuning",
    "solvers",
    "to_kdiffusion_sampler",
    "tune",
]


def __getattr__(name: str):
    # the diffusers scheduler imports diffusers: loaded on first use, never by `import diffsolve`
    if name == "DiffsolveScheduler":
        from .interop.diffusers_scheduler import DiffsolveScheduler

        return DiffsolveScheduler
    raise AttributeError(f"module 'diffsolve' has no attribute {name!r}")
