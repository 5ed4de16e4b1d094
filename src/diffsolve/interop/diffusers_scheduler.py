"""``DiffsolveScheduler``: any diffsolve solver behind diffusers' scheduler protocol.

    pipe.scheduler = DiffsolveScheduler.from_config(pipe.scheduler.config, solver="unipc", order=3)
    image = pipe(num_inference_steps=10).images      # 10 network calls, UniPC-3 on a logSNR grid

**The protocol, one network call per entry.** A pipeline calls ``set_timesteps(n)`` and then, for
every entry τ of ``scheduler.timesteps``, evaluates the network once at (``sample``, τ) and hands
the output to ``step``. Here ``n`` is the NFE budget (met exactly, as ``ds.sample(nfe=n)`` meets
it) and ``timesteps`` lists the model time of *every* network call of the run, in order: two per
step for Heun or DPM-Solver++(2S), four for RK4. ``order`` is therefore 1 (one timestep per call;
pipelines use it to count progress-bar updates), whatever the solver's accuracy order
(``solver_order``).

**How a solver is driven.** diffsolve solvers call ``model(x, point)`` inside ``step``; a
pipeline wants the opposite, to call the network itself and hand the scheduler its output. The
scheduler keeps the run's solver state and re-runs the current solver step against a *tape* of
the evaluations it has been handed so far: the tape answers the first calls from the recorded
outputs and stops the step (an internal exception) at the first call it cannot answer. That call's
input x becomes ``prev_sample``, the point the pipeline evaluates next. When a step completes,
its result and new state are committed and the next step starts the same way. Solver steps are
pure functions of (x, state) given the network outputs, so replaying is exact; noise is a value
too (a draw is a function of (seed, step, stage, sample index), :mod:`diffsolve.noise`), so a
re-run step of a stochastic solver draws what it drew the first time and replays exactly. Replay
costs a few tensor operations per call (a step of k calls is run k times), nothing on the network.

**Conventions.** The latents are in the process's own scale (VP: x_t = α_t·x_0 + σ_t·ε, as
diffusers' DDPM/DDIM/DPM-Solver schedulers hold them), so ``init_noise_sigma`` is the prior's
standard deviation (1 for VP and flow matching) and ``scale_model_input`` is the identity. The
network receives the model time of the process: the (fractional) ``alphas_cumprod`` index for VP
tables (diffsolve's ``VPDiscrete.model_time``), N·t for flow matching (N = ``num_train_timesteps``,
as diffusers' FlowMatch schedulers feed σ·N). The network output is read as ``prediction_type``
(``epsilon``, ``sample``, ``v_prediction``; flow configs: ``flow_prediction``).

**State.** Everything a run needs lives in one private run object built by ``set_timesteps``; a
new ``set_timesteps`` starts afresh, so consecutive pipeline runs are independent. A stochastic
solver's noise is seeded by one draw from the ``generator`` given to its first ``step`` call
(what DDPM/DDIM pipelines pass; None: torch's global RNG), a list of generators giving one seed
per sample (``NoiseSource.from_generator``, as ``ds.sample(..., generator=...)`` does).

**Mid-schedule starts** (img2img, inpainting, SDEdit with ``strength < 1``; an SDXL refiner's
``denoising_start``). Pipelines call ``set_timesteps(n)``, keep ``timesteps[t_start:]``, call
``set_begin_index(t_start)`` and noise the image to the first kept timestep (``add_noise``, or
``scale_noise`` on flow paths: (1 − t)·x_0 + t·ε). The run then starts at that grid point with an
empty history: the solver on the rest of the grid, exactly ``ds.sample(model, x, solver,
times=<the remaining grid>)``. Without ``set_begin_index`` (``begin_index`` is None) the timestep
handed to the first ``step`` places the run (``index_for_timestep``). The start must be the first
call of a solver step; a solver whose restarted calls would differ from the rest of
``timesteps`` (singlestep solvers that plan their calls from the whole budget, PNDM's warm-up) is
refused there with a clear error.

**Config keys of the stock schedulers.** ``rescale_betas_zero_snr``: ᾱ_T = 0 held as 2⁻²⁴, as
diffusers' DPM-Solver and UniPC hold it. ``use_karras_sigmas`` / ``use_exponential_sigmas`` /
``use_lu_lambdas``: the ``karras`` / ``exponential`` / ``logsnr`` schedule (``use_beta_sigmas``:
refused). ``clip_sample`` (``clip_sample_range``) and ``thresholding``
(``dynamic_thresholding_ratio``, ``sample_max_value``): x̂_0 clipped on every call as
:class:`~diffsolve.StaticThreshold` / :class:`~diffsolve.DynamicThreshold` do in ``ds.sample``.
LCM/TCD configs (consistency-distilled networks) are refused. On flow configs a named solver
without an explicit schedule steps on diffusers' flow grid, shifted by ``shift`` and by Flux's
``mu`` (``Uniform(trailing=True)``), as ``solver="auto"`` does. Schedule objects and
solver-valued options are stored in the config as their name and fields (JSON).

**Limits.** Adaptive solvers (``rk45``, ``dpm_adaptive``) choose their steps from the values
they see, so their evaluation times cannot be listed in advance: rejected. A solver whose first
network call is not at x_T itself cannot be driven (the pipeline has already evaluated x_T): the
first ``step`` raises. Edits a pipeline makes to the latents between calls (inpainting blends) are
honoured where the next call starts a solver step, and ignored at a solver's intermediate stages.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

import torch
from torch import Tensor

from ..auto import recommend
from ..denoiser import Denoiser, EvalPoint, Prediction
from ..guidance.thresholding import DynamicThreshold, StaticThreshold
from ..noise import NoiseSource
from ..plan import FINALS, make_plan
from ..processes.base import GaussianProcess
from ..processes.flow import FlowMatching
from ..processes.vp import VPDiscrete
from ..sample import continue_to_zero
from ..schedules import (
    Exponential,
    Karras,
    Leading,
    Linspace,
    LogSNR,
    Schedule,
    Trailing,
    Uniform,
    get_schedule,
    validate_times,
)
from ..solvers.base import Grid, Solver, get_solver
from .diffusers import _betas, is_flow_scheduler, process_from_scheduler_config, require_diffusers

require_diffusers()

from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402

__all__ = ["DiffsolveScheduler", "DiffsolveSchedulerOutput"]

# diffusers' prediction_type → the Denoiser's prediction
_PREDICTIONS = {
    "epsilon": "eps",
    "sample": "x0",
    "v_prediction": "v",
    "flow_prediction": "velocity",
}
# diffusers' timestep_spacing → diffsolve's schedule of the same indices
_SPACINGS = {"leading": Leading, "trailing": Trailing, "linspace": Linspace}
# schedulers whose σ-parameterisation (EDM preconditioning, VE) has no VP/flow reading here
_UNSUPPORTED = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "ScoreSdeVeScheduler")
# consistency-distilled models (LCM, TCD): their network is not a denoiser an ODE solver can
# integrate with; their keys tell them apart from a plain VP config
_CONSISTENCY = ("LCMScheduler", "TCDScheduler")
_CONSISTENCY_KEYS = ("original_inference_steps", "timestep_scaling")
# diffusers' σ-spacing flags → the diffsolve schedule that builds the same kind of grid
_SIGMA_FLAGS: dict[str, type[Schedule]] = {
    "use_karras_sigmas": Karras,
    "use_exponential_sigmas": Exponential,
    "use_lu_lambdas": LogSNR,
}


def _encode(v: Any) -> Any:
    """A solver option or schedule as JSON-ready data: objects become their name and fields."""
    if isinstance(v, Solver):
        return {"__solver__": v.name, **{f.name: _encode(getattr(v, f.name)) for f in fields(v)}}
    if isinstance(v, Schedule):
        names = [f.name for f in fields(cast(Any, v))]  # schedules are frozen dataclasses
        return {"__schedule__": v.name, **{k: _encode(getattr(v, k)) for k in names}}
    if isinstance(v, dict):
        return {k: _encode(u) for k, u in v.items()}
    return v


def _decode(v: Any) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(v, dict):
        d = {k: _decode(u) for k, u in v.items() if k not in ("__solver__", "__schedule__")}
        if "__solver__" in v:
            return get_solver(v["__solver__"], **d)
        if "__schedule__" in v:
            return type(get_schedule(v["__schedule__"]))(**d)
        return d
    return v


def _tuned_solver(sched: Any, solver: Any, options: dict[str, Any] | None) -> Solver:
    """A tuned solver (``ds.tune``) given as the object or, from a saved config, as ``"tuned"``
    with its table in ``solver_options["table"]`` (the body of its file): the config keeps the
    whole table, so ``save_config`` / ``from_config`` restore it."""
    from ..tuning.tuned import Tuned

    if isinstance(solver, Tuned):
        if options:
            raise ValueError("a tuned solver takes no solver options: its table is all it runs")
        tuned = solver
    elif not isinstance(options, dict) or "table" not in options:
        raise ValueError(
            "solver='tuned' needs the tuned solver itself (solver=ds.load_tuned(path)), or "
            "solver_options={'table': ...} from a saved scheduler config"
        )
    else:
        tuned = Tuned.from_dict(options["table"])
    sched.register_to_config(solver="tuned", solver_options={"table": tuned.to_dict()})
    return tuned


def _zero_snr_process(cfg: Any) -> VPDiscrete:
    """The VP table of a ``rescale_betas_zero_snr`` config: diffusers' rescaled betas, with
    ᾱ_T = 0 replaced by 2⁻²⁴ as diffusers' DPM-Solver, UniPC and Euler schedulers do (a finite
    first σ; the prior at t_max is N(0, I) to 6e-8)."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    abar = torch.cumprod(1.0 - rescale_zero_terminal_snr(_betas(cfg)), dim=0).to(torch.float64)
    # where the table's second-to-last ᾱ is already below 2⁻²⁴ (short linear tables), half of
    # it instead, so that the table stays strictly decreasing
    abar[-1] = min(2.0**-24, 0.5 * float(abar[-2]))
    return VPDiscrete(abar)


def _process_of(cfg: Any) -> VPDiscrete | FlowMatching:
    if cfg.get("rescale_betas_zero_snr") and not is_flow_scheduler(cfg):
        return _zero_snr_process(cfg)
    return process_from_scheduler_config(cfg)


@dataclass
class DiffsolveSchedulerOutput(BaseOutput):
    """``prev_sample``: where the pipeline evaluates the network next (the final sample after
    the last call); ``pred_original_sample``: x̂_0 of the output just handed in."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class _NeedEval(BaseException):
    """Raised by the tape at the first network call it cannot answer (control flow: a
    BaseException, so no ``except Exception`` inside a solver can swallow it)."""

    def __init__(self, x: Tensor, point: EvalPoint):
        self.x, self.point = x, point


class _Tape:
    """The model as a replayed solver step sees it: recorded outputs, in call order."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.preds: list[Prediction] = []
        self.k = 0

    def point(self, t: float | Tensor, like: Tensor) -> EvalPoint:
        return self.denoiser.point(t, like)

    def points(self, ts: Tensor, like: Tensor) -> list[EvalPoint]:
        return self.denoiser.points(ts, like)

    def __call__(self, x: Tensor, t: EvalPoint, **cond: Any) -> Prediction:
        if self.k == len(self.preds):
            raise _NeedEval(x, t)
        self.k += 1
        return self.preds[self.k - 1]


class _Dry:
    """The model of the planning run: records each call's point, answers x̂_0 = ε̂ = 0."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.seen: list[EvalPoint] = []  # not "points": that name is the batched point builder

    def point(self, t: float | Tensor, like: Tensor) -> EvalPoint:
        return self.denoiser.point(t, like)

    def points(self, ts: Tensor, like: Tensor) -> list[EvalPoint]:
        return self.denoiser.points(ts, like)

    def __call__(self, x: Tensor, t: EvalPoint, **cond: Any) -> Prediction:
        self.seen.append(t)
        return Prediction(torch.zeros_like(x), torch.zeros_like(x))


def _plan_points(
    solver: Solver, grid: Grid, denoiser: Denoiser
) -> tuple[list[EvalPoint], list[int]]:
    """Every network call of a run on ``grid``, in order (a run on a one-element sample), and
    the solver step each call belongs to."""
    dry = _Dry(denoiser)
    x = torch.zeros(1, 1, dtype=torch.float64)
    noise = NoiseSource(0) if solver.stochastic else None
    state = solver.init(x, grid, dry, noise)
    step_of: list[int] = []
    for i in range(grid.steps):
        x, state = solver.step(x, i, state, dry)
        step_of += [i] * (len(dry.seen) - len(step_of))
    return dry.seen, step_of


class _Run:
    """One sampling run: the solver's (x, state) at the start of step ``i``, the tape of that
    step, and the evaluation the pipeline is making now (``pending``)."""

    def __init__(
        self,
        solver: Solver,
        grid: Grid,
        denoiser: Denoiser,
        final: str,
        clip: Callable[[Tensor], Tensor] | None = None,
    ):
        self.solver, self.grid, self.denoiser, self.final = solver, grid, denoiser, final
        self.clip = clip
        self.tape = _Tape(denoiser)
        self.i = 0
        self.calls = 0
        self.x: Tensor = torch.zeros(0)  # set by start()
        self.started = False
        self.state: Any = None
        self.pending: tuple[Tensor, EvalPoint] | None = None
        self.returned: Tensor | None = None
        self.recent: deque[tuple[float, Tensor]] = deque(maxlen=6)
        self.done = False
        self.offset = 0  # index of this run's first call in the scheduler's timesteps

    def start(self, sample: Tensor, generator: Any) -> None:
        xc = sample.to(torch.float32) if sample.dtype in (torch.float16, torch.bfloat16) else sample
        # counter-based noise: a replayed step draws what it drew the first time
        noise = NoiseSource.from_generator(generator) if self.solver.stochastic else None
        self.x, self.started = xc, True
        self.state = self.solver.init(xc, self.grid, self.tape, noise)
        self._advance()
        # a solver may pass x through a round trip (RK: α·(x/α)), so compare up to round-off;
        # the run's one host sync
        first = None if self.pending is None else self.pending[0]
        if first is None or not (
            first is xc or bool((first - xc).abs().max() <= 1e-5 * xc.abs().max())
        ):
            raise NotImplementedError(
                f"solver {self.solver.name!r} makes its first network call away from x_T "
                "(e.g. noise added before it), which a pipeline cannot evaluate: the pipeline "
                "has already called the network at x_T"
            )

    def _advance(self) -> None:
        """Run solver steps until one needs an evaluation that is not on the tape."""
        while self.i < self.grid.steps:
            self.tape.k = 0
            try:
                x, state = self.solver.step(self.x, self.i, self.state, self.tape)
            except _NeedEval as need:
                self.pending = (need.x, need.point)
                return
            self.x, self.state, self.i = x, state, self.i + 1
            self.tape.preds.clear()
        self.pending = None
        self.done = True

    def feed(self, out: Tensor, sample: Tensor) -> tuple[Tensor, Prediction]:
        """Hand in the network output at the pending point; returns where to evaluate next (or
        the final sample) and the prediction just made."""
        assert self.pending is not None
        x_eval, point = self.pending
        if sample is not self.returned and self.returned is not None:
            # the pipeline edited the latents: honoured where this call starts a solver step
            if not self.tape.preds and x_eval is self.x:
                self.x = x_eval = sample.to(self.x.dtype)
        pred = self.denoiser.convert(x_eval, out, point)
        if self.clip is not None:  # clip_sample / thresholding: as StaticThreshold and co.
            x0 = self.clip(pred.x0)
            pred = Prediction(x0, (x_eval.to(x0.dtype) - point.alpha * x0) / point.sigma)
        self.tape.preds.append(pred)
        self.calls += 1
        if self.final == "extrapolate":
            self.recent.append((point.rho, pred.x0))
        self._advance()
        if self.pending is not None:
            return self.pending[0], pred
        x = self.x
        if self.final == "extrapolate":
            x = continue_to_zero(self.recent, min(max(self.solver.order, 2), 3), x)
        return x, pred


def _pipeline_guided() -> bool:
    """Whether the diffusers pipeline calling ``set_timesteps`` runs classifier-free guidance:
    the first ``DiffusionPipeline`` found as ``self`` up the call stack, read through its
    ``do_classifier_free_guidance`` property (SD, SDXL, SD3, PixArt, ...: set from
    ``guidance_scale`` before the pipeline plans its timesteps), else its ``_guidance_scale``
    > 1 (Flux and other guidance-distilled pipelines have neither CFG flag: unguided)."""
    from diffusers import DiffusionPipeline

    frame: Any = sys._getframe(2)
    depth = 0
    while frame is not None and depth < 16:
        owner = frame.f_locals.get("self")
        if isinstance(owner, DiffusionPipeline):
            try:
                flag = getattr(owner, "do_classifier_free_guidance", None)
            except Exception:  # a property reading state the pipeline has not set
                flag = None
            if flag is None:
                scale = getattr(owner, "_guidance_scale", None)
                flag = scale is not None and float(scale) > 1.0
            return bool(flag)
        frame, depth = frame.f_back, depth + 1
    return False


def _net_placeholder(*args: Any, **kwargs: Any) -> Tensor:
    raise RuntimeError("DiffsolveScheduler never calls the network: the pipeline does")


class DiffsolveScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
    """A diffsolve solver as a diffusers scheduler (see the module docstring).

    Build it from a pipeline's scheduler config; keyword arguments that are not config keys are
    the solver's options (validated against the solver's declared options)::

        DiffsolveScheduler.from_config(pipe.scheduler.config, solver="dpmpp_3m", schedule="karras")

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        rescale_betas_zero_snr: the VP table, read exactly as diffusers reads it
            (:func:`~diffsolve.interop.diffusers.process_from_scheduler_config`; a zero-SNR
            table with ᾱ_T = 2⁻²⁴, as diffusers' DPM-Solver holds it).
        prediction_type: ``epsilon``, ``sample``, ``v_prediction`` (or ``flow_prediction``).
        timestep_spacing, steps_offset: used when ``schedule="timestep_spacing"`` (diffusers'
            ``leading``/``trailing``/``linspace`` indices of the original config).
        use_flow_sigmas, flow_shift: a flow-matching model (rectified flow, α = 1 − t, σ = t,
            timestep shift ``flow_shift``); ``from_config`` sets both from a FlowMatch config.
        solver: a registered solver name (``ds.solvers()``), a solver object (stored as its
            name and fields), or ``"auto"``: the solver, schedule and end rule ``ds.sample``
            recommends for each run's NFE budget (an explicit ``schedule``/``final`` wins),
            or a tuned solver (``ds.tune`` / ``ds.load_tuned``: its own grid and call times,
            ``set_timesteps`` with its NFE only; refused for a config whose process or
            prediction type it was not tuned for; the config keeps its whole table).
        solver_options: the solver's options as a dict (JSON-serialisable).
        schedule: a diffsolve schedule name (``ds.schedules()``) or object (stored as its name
            and fields); None: the solver's default (flow configs: the shifted flow grid).
        guided: the pipeline runs classifier-free guidance (``solver="auto"`` then uses its
            guided rule; other solvers ignore it). None (default): detected at
            ``set_timesteps`` from the calling pipeline (the ``DiffusionPipeline`` up the call
            stack: its ``do_classifier_free_guidance``, else ``_guidance_scale > 1``); False
            outside a pipeline.
        variance_type: accepted and unused (IF and Kandinsky pipelines read it).
        use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas, use_beta_sigmas,
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
        sample_max_value: honoured or refused, as the module docstring says.
        final: ``standard`` (default), ``extrapolate`` or ``tmin``, as in ``ds.sample``.
    """

    order = 1  # timesteps hold one entry per network call
    # the stock schedulers whose configs this one reads (VP tables and flow matching)
    _compatibles = [  # noqa: RUF012 (diffusers reads and declares it per instance)
        "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
        "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
        "DPMSolverSDEScheduler", "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
    ]  # fmt: skip

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        solver: str | Solver = "dpmpp_2m",
        solver_options: dict[str, Any] | None = None,
        schedule: str | Schedule | dict[str, Any] | None = None,
        final: str | None = None,
        guided: bool | None = None,
        variance_type: str | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ):
        # "auto" resolves per run from the NFE budget (set_timesteps); until then, its solver
        self._auto = isinstance(solver, str) and solver == "auto"
        if self._auto:
            if solver_options:
                raise ValueError("solver='auto' takes no solver options; name a solver instead")
            proc = _process_of(dict(self.config))
            self.solver = recommend(proc, 10, bool(guided)).solver
        elif solver == "tuned" or getattr(solver, "name", "") == "tuned":
            self.solver = _tuned_solver(self, solver, solver_options)
        else:
            if isinstance(solver, Solver):
                options = {f.name: getattr(solver, f.name) for f in fields(solver)}
                solver_options = {**options, **(solver_options or {})}
                solver = solver.name
            # objects (a solver-valued option, a schedule) stored as name + fields: JSON-ready
            solver_options = _encode(dict(solver_options or {}))
            self.register_to_config(solver=solver, solver_options=solver_options)
            self.solver = get_solver(solver, **_decode(solver_options))
        if self.solver.adaptive:
            raise ValueError(
                f"solver {self.solver.name!r} chooses its own steps from the values it sees, so "
                "its network calls cannot be listed as timesteps in advance; use a fixed-grid "
                "solver (e.g. 'dpmpp_3m', 'unipc') or ds.sample"
            )
        if prediction_type not in _PREDICTIONS:
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r}; valid: {', '.join(_PREDICTIONS)}"
            )
        if final is not None and final not in FINALS:
            raise ValueError(f"unknown final {final!r}; valid: {', '.join(FINALS)}")
        self.process: GaussianProcess = _process_of(dict(self.config))
        if self.solver.name == "tuned":  # made for this process (and prediction type) only
            self.solver.check(self.process, _PREDICTIONS[prediction_type])  # type: ignore[attr-defined]
        chosen: str | Schedule | None
        if isinstance(schedule, (Schedule, dict)):
            self.register_to_config(schedule=_encode(schedule))
            chosen = _decode(schedule)
        else:
            chosen = schedule
        if use_beta_sigmas:
            raise ValueError(
                "use_beta_sigmas (a Beta-distribution σ grid) has no diffsolve schedule; use "
                "schedule='karras', 'logsnr', 'uniform', ... or explicit sigmas"
            )
        flagged = [k for k in _SIGMA_FLAGS if self.config[k]]
        if len(flagged) > 1:
            raise ValueError(f"at most one σ-spacing flag may be set, got {flagged}")
        want = _SIGMA_FLAGS[flagged[0]] if flagged else None
        if want is not None and chosen is None:
            chosen = want()
        self._schedule = self._make_schedule(chosen, timestep_spacing, steps_offset)
        if want is not None and not isinstance(self._schedule, want):
            raise ValueError(
                f"{flagged[0]}=True asks for a {want.name} grid but schedule={schedule!r} "
                "was given: drop one of them"
            )
        self._flow = isinstance(self.process, FlowMatching)
        if clip_sample and thresholding:
            raise ValueError("clip_sample and thresholding are exclusive, as in diffusers")
        if schedule is None and self._flow:
            # diffusers' flow grid (uniform σ ending at 1/n), shifted by the config's shift and
            # by Flux's dynamic μ (set_timesteps(mu=...)): a λ grid would ignore both
            self._schedule = Uniform(trailing=True)
        if self._flow != (prediction_type == "flow_prediction"):
            raise ValueError(
                "flow-matching configs need prediction_type='flow_prediction' and VP configs one "
                f"of epsilon/sample/v_prediction, got {prediction_type!r}"
            )
        n = int(num_train_timesteps)
        time_map: Callable[[Tensor], Tensor] = (
            (lambda t: t * n) if self._flow else self.process.model_time
        )
        self._denoiser = Denoiser(
            _net_placeholder, self.process, _PREDICTIONS[prediction_type], time_map=time_map
        )
        # x̂_0 clipping as diffsolve's thresholding wrappers do it (ε̂ recomputed from the
        # clipped x̂_0), applied to every network output the pipeline hands in
        self._clip: Callable[[Tensor], Tensor] | None = None
        if clip_sample:
            self._clip = StaticThreshold(self._denoiser, float(clip_sample_range))._clip
        elif thresholding:
            self._clip = DynamicThreshold(
                self._denoiser, float(dynamic_thresholding_ratio), 1.0, float(sample_max_value)
            )._clip
        self.init_noise_sigma = float(self.process.prior_std())
        self.timesteps = torch.zeros(0, dtype=torch.float32)
        self._timesteps_host = self.timesteps
        self.num_inference_steps: int | None = None
        self._run: _Run | None = None
        self._begin_index: int | None = None
        self._step_of: list[int] = []  # the solver step of each entry of timesteps
        self._planned: tuple[Solver, Grid, Denoiser, str] | None = None
        self.sigmas = self._sigmas_of(self._train_times())

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """diffusers' ``from_config``; keyword arguments that are not config keys are solver
        options (``from_config(cfg, solver="unipc", order=3)``). A config saved by this class
        keeps its ``solver_options`` unless ``solver=`` names another solver."""
        cfg = dict(config or {})
        keys = set(cls._get_init_keys(cls)) - {"self"}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k not in keys}
        options.pop("dtype", None)
        # a scheduler's own config holds ``_class_name`` only once saved: tell kinds by keys too
        name = cfg.get("_class_name", "")
        if name in _UNSUPPORTED or "sigma_data" in cfg:
            raise ValueError(
                f"{name or 'this scheduler'} uses a σ-parameterisation (EDM preconditioning / "
                "VE) that DiffsolveScheduler does not map; use a VP or flow-matching pipeline"
            )
        if name in _CONSISTENCY or any(k in cfg for k in _CONSISTENCY_KEYS):
            raise ValueError(
                f"{name or 'this scheduler'} samples a consistency-distilled model (LCM/TCD), "
                "whose network maps noise to data in one call rather than predicting along "
                "the path; ODE solvers do not apply: keep the model's own scheduler"
            )
        if (isinstance(name, str) and name.startswith("FlowMatch")) or (
            "shift" in cfg and "beta_schedule" not in cfg
        ):
            cfg.setdefault("use_flow_sigmas", True)
            cfg.setdefault("flow_shift", cfg.get("shift", 1.0))
            cfg.setdefault("prediction_type", "flow_prediction")
        if cfg.get("use_flow_sigmas") and "prediction_type" not in kwargs:
            cfg["prediction_type"] = "flow_prediction"
        solver = kwargs.get("solver", cfg.get("solver"))
        saved = cfg.get("solver_options") or {}
        changed = isinstance(solver, Solver) or (solver is not None and solver != cfg.get("solver"))
        if changed:
            saved = {}
        if changed or options or "solver_options" in kwargs:
            kwargs["solver_options"] = {**saved, **kwargs.get("solver_options", {}), **options}
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _make_schedule(self, schedule: str | Schedule | None, spacing: str, offset: int) -> Any:
        if schedule is None:
            return get_schedule(self.solver.default_schedule)
        if schedule == "timestep_spacing":
            if spacing not in _SPACINGS:
                raise ValueError(
                    f"timestep_spacing {spacing!r} has no diffsolve schedule; valid: "
                    f"{', '.join(_SPACINGS)}"
                )
            return _SPACINGS[spacing](steps_offset=int(offset))
        if schedule in _SPACINGS:
            return _SPACINGS[schedule](steps_offset=int(offset))
        return get_schedule(schedule)

    # -- the protocol ----------------------------------------------------------------------
    @property
    def solver_order(self) -> int:
        """The solver's accuracy order (``order`` is diffusers' calls-per-timestep count, 1)."""
        return self.solver.order

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ of the VP table (float32, as diffusers holds it)."""
        if not isinstance(self.process, VPDiscrete):
            raise AttributeError("alphas_cumprod exists for VP tables only")
        return self.process.alphas_cumprod.to(torch.float32)

    @property
    def betas(self) -> Tensor:
        """β of the VP table (float32): 1 − ᾱ_k/ᾱ_{k−1}."""
        return 1.0 - self.alphas

    @property
    def alphas(self) -> Tensor:
        """α_k = ᾱ_k/ᾱ_{k−1} of the VP table (float32, as diffusers holds it)."""
        abar = self.alphas_cumprod.to(torch.float64)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return (abar / prev).to(torch.float32)

    @property
    def step_index(self) -> int | None:
        """Index in ``timesteps`` of the next network call (None before the first ``step``)."""
        run = self._run
        return None if run is None or not run.started else run.offset + run.calls

    @property
    def begin_index(self) -> int | None:
        """The entry of ``timesteps`` a run starts at (``set_begin_index``); None: from the
        timestep handed to the first ``step`` (``index_for_timestep``), as in diffusers."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at entry ``begin_index`` of ``timesteps`` (img2img / inpainting with
        ``strength < 1``: ``timesteps[t_start * order:]``). The run is the solver on the rest of
        the grid from that point with an empty history, ``ds.sample(..., times=<the remaining
        grid>)``; the entry must be the first call of a solver step."""
        k = int(begin_index)
        if self._planned is not None:
            self._check_begin(k)
        self._begin_index = k

    def _check_begin(self, k: int) -> int:
        """The solver step that starts at call ``k`` (a clear error if none does)."""
        n = len(self._step_of)
        if not 0 <= k < n:
            raise ValueError(f"begin index {k} is outside this run's {n} timesteps")
        i = self._step_of[k]
        if k > 0 and self._step_of[k - 1] == i:
            raise ValueError(
                f"timestep entry {k} is an intermediate stage of solver step {i} "
                f"({self.solver.name!r} makes several calls per step): a run can start only at "
                "the first call of a step; use a multistep solver for img2img/inpainting"
            )
        return i

    def index_for_timestep(
        self, timestep: float | Tensor, schedule_timesteps: Tensor | None = None
    ) -> int:
        """The entry of ``schedule_timesteps`` (default ``timesteps``) at ``timestep``. Among
        repeated entries (several calls of a step at one time) the first that starts a solver
        step; for another schedule, diffusers' rule (the second of several)."""
        own = schedule_timesteps is None
        ts = self._timesteps_host if schedule_timesteps is None else schedule_timesteps
        tau = float(timestep)
        ts64 = ts.detach().to("cpu", torch.float64).reshape(-1)
        hits = (ts64 - tau).abs() <= 1e-4 * max(1.0, abs(tau))
        idx = [int(j) for j in hits.nonzero().reshape(-1)]
        if not idx:
            raise ValueError(f"timestep {tau:.6g} is not in the schedule ({ts64.numel()} entries)")
        if own:
            for j in idx:
                if j == 0 or self._step_of[j - 1] != self._step_of[j]:
                    return j
            return idx[0]
        return idx[1] if len(idx) > 1 else idx[0]

    def _start_at(self, k: int) -> _Run:
        """The run from call ``k``: the solver on the remaining grid, history empty."""
        assert self._planned is not None
        solver, grid, denoiser, final = self._planned
        i = self._check_begin(k)
        if i == 0:
            return _Run(solver, grid, denoiser, final, self._clip)
        end = grid.steps if grid.clean_end else grid.steps + 1
        like = torch.zeros(1, 1, dtype=torch.float64)
        plan = make_plan(denoiser, like, solver, times=grid.t[i:end], final=final)
        points, _ = _plan_points(solver, plan, denoiser)
        rest = torch.tensor([float(p.t_in[0]) for p in points], dtype=torch.float32)
        if not torch.equal(rest, self._timesteps_host[k:]):
            raise NotImplementedError(
                f"solver {solver.name!r} started at call {k} makes other calls than the rest of "
                "this run's timesteps (its calls per step depend on the whole budget); use a "
                "multistep solver for img2img/inpainting"
            )
        run = _Run(solver, plan, denoiser, final, self._clip)
        run.offset = k
        return run

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        *,
        nfe: int | None = None,
        timesteps: Sequence[float] | Tensor | None = None,
        sigmas: Sequence[float] | Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Plan a run and reset all run state.

        ``num_inference_steps`` is the NFE budget, met exactly (``nfe=`` says the same
        explicitly): the grid is the one ``ds.sample(nfe=...)`` builds for this solver and
        schedule. Alternatively the solver's step points can be given as diffusers does
        (``retrieve_timesteps``): ``timesteps`` as model times (VP: ``alphas_cumprod``
        indices; flow: N·σ) or ``sigmas`` (VP: diffusers' σ = sqrt((1 − ᾱ)/ᾱ); flow: σ = t,
        then shifted as diffusers' FlowMatch schedulers shift them); the solver then steps
        through exactly those points (``ds.sample(times=...)``) and the NFE follows from them.
        ``mu``: Flux-style dynamic shifting (the flow shift e^μ for this run) when the config
        has ``use_dynamic_shifting``; otherwise the static shift applies, as in diffusers.

        Afterwards ``timesteps`` lists the model time of every network call, in order, and
        ``num_inference_steps`` their number.
        """
        denoiser = self._denoiser
        if mu is not None and self._flow and self.config.get("use_dynamic_shifting"):
            n = int(self.config["num_train_timesteps"])
            flow = FlowMatching(shift=math.exp(mu), t_min=1.0 / n)
            denoiser = Denoiser(
                _net_placeholder, flow, denoiser.prediction, time_map=lambda t: t * n
            )
        process = denoiser.process
        solver, schedule, final = self.solver, self._schedule, self.config["final"]
        if self._auto and timesteps is None and sigmas is None:
            budget = nfe if nfe is not None else num_inference_steps
            if budget is not None and int(budget) == budget and budget >= 1:
                guided = self.config["guided"]
                guided = _pipeline_guided() if guided is None else bool(guided)
                rec = recommend(process, int(budget), guided)
                solver = rec.solver
                schedule = schedule if self.config["schedule"] is not None else rec.schedule
                final = final if final is not None else rec.final
        final = final if final is not None else (solver.planned_final or "standard")
        like = torch.zeros(1, 1, dtype=torch.float64)
        if timesteps is not None or sigmas is not None:
            if timesteps is not None and sigmas is not None:
                raise ValueError("give timesteps or sigmas, not both")
            grid_t = self._custom_times(process, timesteps, sigmas)
            grid = make_plan(denoiser, like, solver, times=grid_t, final=final)
        else:
            if nfe is not None and num_inference_steps is not None and nfe != num_inference_steps:
                raise ValueError("give num_inference_steps or nfe, not two different budgets")
            budget = nfe if nfe is not None else num_inference_steps
            if budget is None or int(budget) != budget or budget < 1:
                raise ValueError(f"the NFE budget must be a positive integer, got {budget!r}")
            grid = make_plan(
                denoiser, like, solver, nfe=int(budget), schedule=schedule, final=final
            )
        points, self._step_of = _plan_points(solver, grid, denoiser)
        model_times = [float(p.t_in[0]) for p in points]
        self._timesteps_host = torch.tensor(model_times, dtype=torch.float32)
        self.timesteps = self._timesteps_host.to(device)
        self.sigmas = self._sigmas_of(torch.tensor([p.t for p in points], dtype=torch.float64))
        self.sigmas = self.sigmas.to(device)
        self.num_inference_steps = len(model_times)
        self.solver = solver
        self._planned = (solver, grid, denoiser, final)
        self._begin_index = None
        self._run = _Run(solver, grid, denoiser, final, self._clip)

    def _train_times(self) -> Tensor:
        """Process times of the training timesteps, noise end first."""
        n = int(self.config["num_train_timesteps"])
        tau = torch.arange(n - 1, -1, -1, dtype=torch.float64)
        if self._flow:  # FlowMatch's σ = 1 … 1/N, shifted
            return self.process.shift_time(tau.add(1.0).div(n))  # type: ignore[attr-defined]
        return self._time_of_model(tau)

    def _sigmas_of(self, t: Tensor) -> Tensor:
        """diffusers' σ of process times (VP: sqrt((1 − ᾱ)/ᾱ) = σ/α; flow: σ = t), then 0."""
        rho = self.process.sigma(t) / self.process.alpha(t) if not self._flow else t
        return torch.cat([rho, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)

    def _custom_times(self, process: GaussianProcess, timesteps: Any, sigmas: Any) -> Tensor:
        """Process times of diffusers-style custom ``timesteps`` or ``sigmas`` (see above)."""
        given = timesteps if timesteps is not None else sigmas
        v = torch.as_tensor(given).detach().to("cpu", torch.float64).reshape(-1)
        if timesteps is not None:
            t = self._time_of_model(v)
        elif isinstance(process, FlowMatching):
            t = process.shift_time(v[v > 0])
        else:
            t = process.t_of_rho(v[v > 0])
        return validate_times(process, t.clamp(process.t_min, process.t_max))

    def _time_of_model(self, tau: Tensor) -> Tensor:
        """Process time of model times τ (the inverse of the network's time map)."""
        n = int(self.config["num_train_timesteps"])
        if self._flow:
            return tau / n
        return self.process.time_of_index(tau)  # type: ignore[attr-defined]

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The identity: latents are in the process's own scale, as the network expects."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> DiffsolveSchedulerOutput | tuple[Tensor, Tensor]:
        """Hand in the network output at ``sample`` (the last ``prev_sample``) and ``timestep``.

        Returns ``prev_sample``: the point of the next network call, or the final sample after
        the last call. ``generator`` (first call) seeds a stochastic solver's noise (one draw from
        it, or one from each of a list). Arguments
        of other schedulers that stock pipelines pass (DDIM's ``eta``,
        ``use_clipped_model_output``) are accepted; a non-zero ``eta`` raises (set the solver
        and its options in the config, e.g. ``solver="ddpm", eta=...``).
        """
        if kwargs.get("eta"):
            raise ValueError(
                "DiffsolveScheduler ignores the pipeline's eta; choose a stochastic solver in "
                "the config instead (e.g. from_config(cfg, solver='ddpm', eta=1.0))"
            )
        run = self._run
        if run is None:
            raise RuntimeError("call set_timesteps before step")
        if run.done:
            raise RuntimeError(
                f"this run made all its {run.calls} network calls; call set_timesteps again"
            )
        if not run.started:
            k = self._begin_index
            if k is None:
                k = self.index_for_timestep(timestep) if self._offschedule(timestep) else 0
            if k:
                self._run = run = self._start_at(k)
            run.start(sample, generator)
        self._check_timestep(timestep, run.offset + run.calls)
        x, pred = run.feed(model_output, sample)
        prev = x.to(sample.dtype)
        run.returned = prev
        x0 = pred.x0.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return DiffsolveSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _offschedule(self, timestep: Any) -> bool:
        """Whether the first ``step`` got a timestep other than ``timesteps[0]`` (read once per
        run, a host sync where the timestep lives on an accelerator)."""
        if isinstance(timestep, Tensor) and timestep.numel() != 1:
            return False
        first = float(self._timesteps_host[0])
        return abs(float(timestep) - first) > 1e-4 * max(1.0, first)

    def _check_timestep(self, timestep: Any, k: int) -> None:
        # compared only where it costs no device sync; a pipeline iterates ``timesteps`` anyway
        if isinstance(timestep, Tensor):
            if timestep.device.type != "cpu" or timestep.numel() != 1:
                return
            timestep = float(timestep)
        expected = float(self.timesteps[k]) if self.timesteps.device.type == "cpu" else None
        if expected is not None and abs(float(timestep) - expected) > 1e-4 * max(1.0, expected):
            raise ValueError(
                f"step got timestep {float(timestep):.6g} but network call {k} of this run is at "
                f"{expected:.6g}: call step once per entry of scheduler.timesteps, in order "
                "(a run starting mid-schedule starts at set_begin_index or at the timestep of "
                "its first step)"
            )

    # -- training-side helpers -------------------------------------------------------------
    def _coefficients(self, timesteps: Any, like: Tensor) -> tuple[Tensor, Tensor]:
        tau = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1)
        t = self._time_of_model(tau)
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha = self.process.alpha(t).to(like.device, like.dtype).reshape(shape)
        sigma = self.process.sigma(t).to(like.device, like.dtype).reshape(shape)
        return alpha, sigma

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Any) -> Tensor:
        """x_τ = α_τ·x_0 + σ_τ·ε at model times τ (shape (B,) or a scalar)."""
        alpha, sigma = self._coefficients(timesteps, original_samples)
        return alpha * original_samples + sigma * noise

    def scale_noise(self, sample: Tensor, timestep: Any, noise: Tensor | None = None) -> Tensor:
        """The forward noising at model times τ (flow pipelines' img2img, SD3/Flux):
        x_τ = α_τ·x_0 + σ_τ·ε, i.e. (1 − t)·x_0 + t·ε on a flow path (``add_noise``)."""
        if noise is None:
            raise ValueError("scale_noise needs the noise tensor")
        return self.add_noise(sample, noise, timestep)

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Any) -> Tensor:
        """v = α_τ·ε − σ_τ·x_0 (the v-prediction target)."""
        alpha, sigma = self._coefficients(timesteps, sample)
        return alpha * noise - sigma * sample

    def __len__(self) -> int:
        return int(self.config["num_train_timesteps"])
