"""Peers side by side: diffusers' schedulers and k-diffusion's samplers on our exact models.

The benchmark's runners call three functions (the adapters they drive are
:mod:`diffsolve.interop.diffusers` and :mod:`diffsolve.interop.kdiffusion`):

- ``available()`` — which peer libraries can be imported;
- ``peer_configs(process)`` — the default set of peers for a process;
- ``run_peer(config, model, x_T, nfe)`` — one peer run on the same model and x_T, with the
  largest step count whose network calls fit in ``nfe``.

A :class:`PeerResult` carries the peer's ``grid`` (the process times where it evaluated the
network, decreasing, deduplicated, without the clean end), so that
``ds.sample(model, x_T, solver=ours[0], times=grid, **ours[1])`` is "the same algorithm on the
same schedule". Where a peer's update uses noise levels other than the ones its network sees
(diffusers rounds Karras / Lu-λ timesteps to integers but steps with the unrounded σ; DDIM
"trailing" with N/n not an integer steps to t − ⌊N/n⌋ instead of the next timestep), ``grid`` is
what the network saw, and the peer's inconsistency stays the peer's.

Conventions and deliberate choices (documented, so comparisons are honest):

- "default" spacing for a VP table is Stable Diffusion's scheduler config: ``leading`` spacing
  with ``steps_offset=1`` (what ``Scheduler.from_config(pipe.scheduler.config)`` gives SD users);
  its first timestep is below t_max (e.g. 901 of 999 for 10 steps) and x_T is taken there, as
  diffusers does.
- DDIM runs with ``set_alpha_to_one=True`` so that it ends at σ = 0 like every other peer (SD's
  config has ``False``, which stops at ᾱ_0 and returns a slightly noisy sample; the x̂_0 of that
  last step is the same as ours with ``True``).
- The diffusers scheduler is built from the named β schedule when the process's table matches
  one (SD ``scaled_linear``, DDPM ``linear``, ``squaredcos_cap_v2``) to 1e-5, otherwise from
  ``trained_betas``; diffusers keeps its table in float32 (≈1e-6 relative to ours).
- k-diffusion grids come from its own ``get_sigmas_karras`` / ``get_sigmas_exponential``
  between ρ(t_min) and ρ(t_max) (its float32 values, run in float64).

Known differences between a peer and its ``ours`` (each pinned by a test in
``tests/test_peers_*.py``; everything else agrees to ≤ 1e-7 relative on gmm64 + SD):

- diffusers UniPC ``bh1``: its last step evaluates α_t·B_h·0 with B_h = −h = −∞ (σ_t = 0) and
  returns NaN; ``run_peer`` returns the finite value of its own formula there, the last converted
  model output ``model_outputs[-1]``.
- diffusers Euler / Heun with ``linspace`` or ``trailing`` spacing scale x_T by σ_max instead of
  sqrt(σ_max² + 1) (``init_noise_sigma``): 0.23 % on SD, ≈1e-3 in the sample. The default
  (leading) spacing does not.
- diffusers DPM++ with ``karras`` / ``lu-lambda``: rounded timesteps for the network, unrounded σ
  in the update (≈3e-4 to 1e-3 apart from ours on the rounded grid; either way the error to the
  exact solution changes by < 1 %).
- k-diffusion ``sample_lms`` takes a full-order Adams step in ρ down to σ = 0; ours returns x̂_0
  at the last grid point (identical before that step, ≈3e-3 apart after it).
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser
from ..processes.base import GaussianProcess
from ..processes.flow import FlowMatching
from ..processes.vp import VPDiscrete

__all__ = [
    "PeerConfig",
    "PeerResult",
    "available",
    "make_scheduler",
    "make_stochastic_scheduler",
    "peer_configs",
    "run_peer",
    "run_stochastic_peer",
    "stochastic_peer_configs",
]


@dataclass(frozen=True)
class PeerConfig:
    """One peer: a library's algorithm on a spacing, with our equivalent if we have one."""

    library: str  # "diffusers" | "k-diffusion"
    algorithm: str  # e.g. "DPMSolverMultistep-2M", "sample_dpmpp_2m"
    spacing: str  # e.g. "default", "trailing", "karras", "lu-lambda", "exponential"
    label: str  # short unique table label, e.g. "diffusers DPM++2M karras"
    ours: tuple[str, dict] | None  # diffsolve solver name + options implementing the same algorithm


@dataclass(frozen=True)
class PeerResult:
    """A peer's run: the final sample, its network calls and its evaluation grid."""

    x: Tensor  # the peer's final sample (float64), clean end (σ = 0)
    nfe: int  # network calls it made
    grid: Tensor  # float64 process times of its step grid, decreasing, excluding the final σ=0


def available() -> dict[str, bool]:
    """Which peer libraries are importable (k-diffusion: its sampling module's needs too)."""

    def has(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    kd = has("k_diffusion") and all(has(m) for m in ("scipy", "torchdiffeq", "torchsde", "tqdm"))
    return {"diffusers": has("diffusers"), "k-diffusion": kd}


# -- the algorithms ------------------------------------------------------------------------------
# name -> (scheduler class, fixed config, NFE rule, our solver or None)
_ONE, _TWO = "one", "two"  # n steps cost n calls / 2n − 1 calls (last step first-order)

_DIFFUSERS: dict[str, tuple[str, dict[str, Any], str, tuple[str, dict] | None]] = {
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}, _ONE, ("ddim", {})),
    "DPMSolverMultistep-2M": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint"},
        _ONE,
        ("dpmpp_2m", {"solver_type": "midpoint"}),
    ),
    "DPMSolverMultistep-3M": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 3, "algorithm_type": "dpmsolver++", "solver_type": "midpoint"},
        _ONE,
        ("dpmpp_3m", {"reference": True}),
    ),
    **{
        f"UniPC-{v}-{k}": (
            "UniPCMultistepScheduler",
            {"solver_order": k, "solver_type": v},
            _ONE,
            ("unipc", {"order": k, "variant": v}),
        )
        for v in ("bh1", "bh2")
        for k in (2, 3)
    },
    "DEIS-2": ("DEISMultistepScheduler", {"solver_order": 2}, _ONE, None),
    "Euler": ("EulerDiscreteScheduler", {}, _ONE, ("euler", {})),
    "Heun": ("HeunDiscreteScheduler", {}, _TWO, ("heun", {})),
    "FlowMatchEuler": ("FlowMatchEulerDiscreteScheduler", {}, _ONE, ("euler", {})),
    "FlowMatchHeun": ("FlowMatchHeunDiscreteScheduler", {}, _TWO, ("heun", {})),
}

# name -> (NFE rule, our solver or None); _KD_ARGS: extra keyword arguments of the sampler
_KDIFFUSION: dict[str, tuple[str, tuple[str, dict] | None]] = {
    "sample_euler": (_ONE, ("euler", {})),
    "sample_heun": (_TWO, ("heun", {})),
    # DPM-Solver-2 (noise form, midpoint in λ) as Euler steps in σ on x/α
    "sample_dpm_2": (
        _TWO,
        ("dpm_solver", {"order": 2, "method": "singlestep", "solver_type": "dpmsolver"}),
    ),
    # DPM-Solver++(2S), r = ½: with η = 0 the ancestral sampler is the deterministic one
    "sample_dpmpp_2s_ancestral": (_TWO, ("dpmpp_2s", {})),
    "sample_dpmpp_2m": (_ONE, ("dpmpp_2m", {"solver_type": "midpoint"})),
    # identical up to the last step; k-diffusion's step to σ = 0 is a full-order Adams step in ρ,
    # ours returns x̂_0 at the last grid point (≈3e-3 relative apart on gmm64 + SD)
    "sample_lms": (_ONE, ("lms", {"order": 4})),
}

_KD_ARGS: dict[str, dict[str, Any]] = {"sample_dpmpp_2s_ancestral": {"eta": 0.0}}

_SHORT = {
    "DDIM": "DDIM",
    "DPMSolverMultistep-2M": "DPM++2M",
    "DPMSolverMultistep-3M": "DPM++3M",
    "DEIS-2": "DEIS-2",
    "Euler": "Euler",
    "Heun": "Heun",
    "FlowMatchEuler": "FlowEuler",
    "FlowMatchHeun": "FlowHeun",
    "sample_euler": "euler",
    "sample_heun": "heun",
    "sample_dpm_2": "dpm_2",
    "sample_dpmpp_2s_ancestral": "dpmpp_2s",
    "sample_dpmpp_2m": "dpmpp_2m",
    "sample_lms": "lms",
}

_SPACING: dict[str, dict[str, Any]] = {
    "default": {"timestep_spacing": "leading", "steps_offset": 1},
    "leading": {"timestep_spacing": "leading"},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "karras": {"use_karras_sigmas": True},
    "lu-lambda": {"use_lu_lambdas": True},
    "exponential": {"use_exponential_sigmas": True},
}


def _ours(spec: tuple[str, dict] | None) -> tuple[str, dict] | None:
    # only claim an equivalent that exists here with these options
    if spec is None:
        return None
    from ..solvers.base import get_solver

    try:
        get_solver(spec[0], **spec[1])
    except ValueError:
        return None
    return spec[0], dict(spec[1])


def _label(library: str, algorithm: str, spacing: str) -> str:
    short = _SHORT.get(algorithm, algorithm.replace("-", " "))
    lib = "diffusers" if library == "diffusers" else "k-diff"
    return f"{lib} {short} {spacing}"


def _config(library: str, algorithm: str, spacing: str) -> PeerConfig:
    spec = _DIFFUSERS[algorithm][3] if library == "diffusers" else _KDIFFUSION[algorithm][1]
    return PeerConfig(library, algorithm, spacing, _label(library, algorithm, spacing), _ours(spec))


def peer_configs(process: GaussianProcess) -> list[PeerConfig]:
    """The default peers for ``process``, restricted to the installed libraries.

    VPDiscrete (e.g. SD scaled-linear): diffusers DDIM (default, trailing), DPMSolverMultistep
    2M (default, trailing, karras, lu-lambda) and 3M, UniPC bh1/bh2 of orders 2 and 3, DEIS-2,
    Euler, Heun; k-diffusion euler, heun, dpm_2, dpmpp_2s_ancestral (η = 0), dpmpp_2m, lms on
    karras and exponential σ.
    FlowMatching: diffusers FlowMatch Euler/Heun, DPM++2M and UniPC-bh2-2 with flow sigmas, plus
    the k-diffusion set. Any other Gaussian path: the k-diffusion set.
    """
    have = available()
    out: list[tuple[str, str, str]] = []
    if have["diffusers"] and isinstance(process, VPDiscrete):
        out += [("diffusers", "DDIM", s) for s in ("default", "trailing")]
        out += [
            ("diffusers", "DPMSolverMultistep-2M", s)
            for s in ("default", "trailing", "karras", "lu-lambda")
        ]
        out += [("diffusers", "DPMSolverMultistep-3M", "default")]
        out += [("diffusers", f"UniPC-{v}-{k}", "default") for v in ("bh1", "bh2") for k in (2, 3)]
        out += [("diffusers", a, "default") for a in ("DEIS-2", "Euler", "Heun")]
    elif have["diffusers"] and isinstance(process, FlowMatching):
        out += [("diffusers", a, "default") for a in ("FlowMatchEuler", "FlowMatchHeun")]
        out += [("diffusers", a, "default") for a in ("DPMSolverMultistep-2M", "UniPC-bh2-2")]
    if have["k-diffusion"]:
        out += [("k-diffusion", a, s) for s in ("karras", "exponential") for a in _KDIFFUSION]
    return [_config(*c) for c in out]


# -- running them --------------------------------------------------------------------------------
def _steps_for(rule: str, nfe: int) -> int:
    # largest step count whose network calls do not exceed nfe
    steps = nfe if rule == _ONE else (nfe + 1) // 2
    if steps < 1:
        raise ValueError(f"nfe must be at least 1, got {nfe}")
    return steps


def _process_config(process: GaussianProcess, cls_name: str) -> dict[str, Any]:
    from ..interop.diffusers import process_from_scheduler_config

    if isinstance(process, FlowMatching):
        if cls_name.startswith("FlowMatch"):
            return {"shift": process.shift}
        return {
            "use_flow_sigmas": True,
            "flow_shift": process.shift,
            "prediction_type": "flow_prediction",
        }
    if not isinstance(process, VPDiscrete):
        raise ValueError(
            f"diffusers peers need a VPDiscrete or FlowMatching process, got {process!r}"
        )
    n = process.num_train_steps
    ac = process.alphas_cumprod
    named = (
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
    )
    for cfg in named:
        ref = process_from_scheduler_config({**cfg, "num_train_timesteps": n})
        assert isinstance(ref, VPDiscrete)  # a beta_schedule config makes a VP table
        if bool(((ref.alphas_cumprod - ac).abs() <= 1e-5 * ac).all()):
            return {**cfg, "num_train_timesteps": n}
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return {"num_train_timesteps": n, "trained_betas": (1.0 - ac / prev).tolist()}


def make_scheduler(config: PeerConfig, process: GaussianProcess) -> Any:
    """The diffusers scheduler instance of a diffusers PeerConfig on ``process``."""
    from ..interop.diffusers import require_diffusers

    diffusers = require_diffusers()
    cls_name, fixed, _, _ = _DIFFUSERS[config.algorithm]
    if config.spacing not in _SPACING:
        raise ValueError(f"unknown spacing {config.spacing!r}; valid: {', '.join(_SPACING)}")
    cls = getattr(diffusers, cls_name)
    spacing = {} if isinstance(process, FlowMatching) else _SPACING[config.spacing]
    cfg = {**_process_config(process, cls_name), **fixed, **spacing}
    accepted = set(inspect.signature(cls.__init__).parameters)
    dropped = sorted(set(cfg) - accepted)
    if any(k in dropped for k in (*fixed, *spacing)):
        raise ValueError(f"{cls_name} does not take option(s) {dropped}")
    return cls(**{k: v for k, v in cfg.items() if k in accepted})


def _unique_desc(times: list[float]) -> Tensor:
    return torch.tensor(sorted(set(times), reverse=True), dtype=torch.float64)


def run_peer(config: PeerConfig, model: Denoiser, x_T: Tensor, nfe: int) -> PeerResult:
    """Run one peer on ``model`` from ``x_T`` with at most ``nfe`` network calls (as many as fit).

    Args:
        config: from :func:`peer_configs` (or built by hand with a known algorithm/spacing).
        model: the Denoiser standing in for the network (typically an exact mixture model).
        x_T: shape (B, ...), in the process's own scale; converted to float64.
        nfe: network-call budget; n steps cost n calls, or 2n − 1 for Heun-type peers.

    Returns:
        :class:`PeerResult` with the clean sample, the calls made and the evaluation grid.
    """
    x_T = x_T.to(torch.float64)
    process = model.process
    if config.library == "diffusers":
        from ..interop.diffusers import run_diffusers

        rule = _DIFFUSERS[config.algorithm][2]
        scheduler = make_scheduler(config, process)
        run = run_diffusers(scheduler, model, x_T, _steps_for(rule, nfe))
        x = run.x
        if config.algorithm.startswith("UniPC-bh1"):
            # diffusers' bh1 final step computes α_t·B_h·pred_res with B_h = −h = −∞ (σ = 0) and
            # pred_res = 0 (first order): 0·∞ = NaN. The finite value of its own formula there is
            # m0, the last converted model output (σ_t = 0, −expm1(−∞) = 1), returned here.
            x = scheduler.model_outputs[-1]
        return PeerResult(x.to(torch.float64), run.nfe, _unique_desc(run.times))
    if config.library == "k-diffusion":
        from ..interop.kdiffusion import KDiffusionDenoiser, load_sampling, sigmas_for

        if config.algorithm not in _KDIFFUSION:
            raise ValueError(f"unknown k-diffusion sampler {config.algorithm!r}")
        sampling = load_sampling()
        sampler: Callable[..., Tensor] = getattr(sampling, config.algorithm)
        sigmas = sigmas_for(
            process, config.spacing, _steps_for(_KDIFFUSION[config.algorithm][0], nfe)
        )
        grid = process.t_of_rho(sigmas[:-1])
        kd_model = KDiffusionDenoiser(model)
        extra = _KD_ARGS.get(config.algorithm, {})
        x = sampler(kd_model, x_T / float(process.alpha(grid[0])), sigmas, disable=True, **extra)
        return PeerResult(x.to(torch.float64), kd_model.calls, grid)
    raise ValueError(f"unknown peer library {config.library!r}; valid: 'diffusers', 'k-diffusion'")


# -- stochastic peers (samplers of the reverse SDE) ------------------------------------------------
# name -> (scheduler class, fixed config, NFE rule, our solver). Every peer here draws its own
# noise from a seeded RNG (``run_stochastic_peer(seed=)``), so only distributions can be compared
# with ours; tests/test_dpmpp_sde.py injects identical noise into each and gets ≤ 1e-6.
_SDE_DIFFUSERS: dict[str, tuple[str, dict[str, Any], str, tuple[str, dict]]] = {
    # DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde, r = ½): 2n − 1 calls for n timesteps
    "DPMSolverSDE": ("DPMSolverSDEScheduler", {}, _TWO, ("dpmpp_sde", {})),
    "DPMSolverMultistep-SDE-2M": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 2, "algorithm_type": "sde-dpmsolver++", "solver_type": "midpoint"},
        _ONE,
        ("dpmpp_2m_sde", {}),
    ),
}

# k-diffusion sampler -> (NFE rule, our solver); all at their defaults (η = 1, s_noise = 1)
_SDE_KDIFFUSION: dict[str, tuple[str, tuple[str, dict]]] = {
    "sample_euler_ancestral": (_ONE, ("ddpm", {})),  # ancestral Euler in ρ at η = 1 is DDPM
    "sample_dpmpp_sde": (_TWO, ("dpmpp_sde", {})),
    "sample_dpmpp_2m_sde": (_ONE, ("dpmpp_2m_sde", {})),
    # k-diffusion's 3M SDE: half the second derivative (our reference=True), no lower-order final
    "sample_dpmpp_3m_sde": (
        _ONE,
        ("dpmpp_3m_sde", {"reference": True, "lower_order_final": False}),
    ),
}

_SDE_SHORT = {
    "DPMSolverSDE": "DPM++SDE",
    "DPMSolverMultistep-SDE-2M": "DPM++2M-SDE",
    "sample_euler_ancestral": "euler_a",
    "sample_dpmpp_sde": "dpmpp_sde",
    "sample_dpmpp_2m_sde": "dpmpp_2m_sde",
    "sample_dpmpp_3m_sde": "dpmpp_3m_sde",
}


def stochastic_peer_configs(process: GaussianProcess) -> list[PeerConfig]:
    """The stochastic (reverse-SDE) peers for ``process``, restricted to the installed libraries.

    VPDiscrete: diffusers ``DPMSolverSDEScheduler`` (DPM++ SDE; default spacing and karras) and
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` (2M SDE; default and
    karras). Any Gaussian path: k-diffusion ``sample_euler_ancestral``, ``sample_dpmpp_sde``,
    ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde`` on karras and exponential σ. Each entry's
    ``ours`` is the diffsolve solver implementing the same algorithm (``run_stochastic_peer``).
    """
    have = available()
    out: list[PeerConfig] = []
    if have["diffusers"] and isinstance(process, VPDiscrete):
        for algorithm, (_, _, _, ours) in _SDE_DIFFUSERS.items():
            for spacing in ("default", "karras"):
                label = f"diffusers {_SDE_SHORT[algorithm]} {spacing}"
                out.append(PeerConfig("diffusers", algorithm, spacing, label, _ours(ours)))
    if have["k-diffusion"]:
        for spacing in ("karras", "exponential"):
            for algorithm, (_, ours) in _SDE_KDIFFUSION.items():
                label = f"k-diff {_SDE_SHORT[algorithm]} {spacing}"
                out.append(PeerConfig("k-diffusion", algorithm, spacing, label, _ours(ours)))
    return out


def make_stochastic_scheduler(config: PeerConfig, process: GaussianProcess, seed: int = 0) -> Any:
    """The diffusers scheduler of a stochastic diffusers PeerConfig (DPMSolverSDE's Brownian
    tree seeded with ``seed``)."""
    from ..interop.diffusers import require_diffusers

    diffusers = require_diffusers()
    if config.algorithm not in _SDE_DIFFUSERS:
        raise ValueError(f"unknown stochastic diffusers peer {config.algorithm!r}")
    if config.spacing not in _SPACING:
        raise ValueError(f"unknown spacing {config.spacing!r}; valid: {', '.join(_SPACING)}")
    cls_name, fixed, _, _ = _SDE_DIFFUSERS[config.algorithm]
    cls = getattr(diffusers, cls_name)
    cfg = {**_process_config(process, cls_name), **fixed, **_SPACING[config.spacing]}
    if cls_name == "DPMSolverSDEScheduler":
        cfg["noise_sampler_seed"] = seed
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in cfg.items() if k in accepted})


def run_stochastic_peer(
    config: PeerConfig, model: Denoiser, x_T: Tensor, nfe: int, *, seed: int = 0
) -> PeerResult:
    """Run one stochastic peer with its own noise, seeded with ``seed``, within ``nfe`` calls.

    Noise as each library's users get it: diffusers ``DPMSolverMultistepScheduler`` draws from a
    ``torch.Generator`` seeded with ``seed``; ``DPMSolverSDEScheduler`` and k-diffusion's
    ``sample_dpmpp_*`` use their torchsde Brownian tree in ρ = σ/α (``noise_sampler_seed`` /
    ``BrownianTreeNoiseSampler(seed=seed)``, one tree for the batch); ``sample_euler_ancestral``
    draws ``randn`` from a seeded generator. Peer quirks are kept, as users get them:
    DPMSolverSDE evaluates its midpoints at timesteps from its log-σ interpolation of the table
    and, with linspace/trailing spacing (karras uses linspace), scales x_T by σ_max instead of
    sqrt(σ_max² + 1). The result's ``grid`` holds the step grid only
    (DPMSolverSDE's midpoint evaluations are left out), so ``ds.sample(model, x_T,
    solver=config.ours[0], times=grid, **config.ours[1])`` is the same algorithm on the same grid.
    """
    x_T = x_T.to(torch.float64)
    process = model.process
    if config.library == "diffusers":
        from ..interop.diffusers import run_diffusers

        if config.algorithm not in _SDE_DIFFUSERS:
            raise ValueError(f"unknown stochastic diffusers peer {config.algorithm!r}")
        rule = _SDE_DIFFUSERS[config.algorithm][2]
        scheduler = make_stochastic_scheduler(config, process, seed)
        gen = None if rule == _TWO else torch.Generator().manual_seed(seed)
        with warnings.catch_warnings():  # DPMSolverSDE's torchsde tree: see below
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            run = run_diffusers(scheduler, model, x_T, _steps_for(rule, nfe), generator=gen)
        times = run.times[0::2] if rule == _TWO else run.times  # DPMSolverSDE: midpoints odd
        return PeerResult(run.x.to(torch.float64), run.nfe, _unique_desc(times))
    if config.library == "k-diffusion":
        from ..interop.kdiffusion import KDiffusionDenoiser, load_sampling, sigmas_for

        if config.algorithm not in _SDE_KDIFFUSION:
            raise ValueError(f"unknown stochastic k-diffusion sampler {config.algorithm!r}")
        sampling = load_sampling()
        sampler: Callable[..., Tensor] = getattr(sampling, config.algorithm)
        sigmas = sigmas_for(
            process, config.spacing, _steps_for(_SDE_KDIFFUSION[config.algorithm][0], nfe)
        )
        grid = process.t_of_rho(sigmas[:-1])
        x = x_T / float(process.alpha(grid[0]))
        if config.algorithm == "sample_euler_ancestral":
            gen = torch.Generator().manual_seed(seed)

            def noise_sampler(sigma: Any, sigma_next: Any) -> Tensor:
                return torch.randn(x.shape, generator=gen, dtype=x.dtype)

        else:
            positive = sigmas[sigmas > 0]
            noise_sampler = sampling.BrownianTreeNoiseSampler(
                x, positive.min(), positive.max(), seed=seed
            )
        kd_model = KDiffusionDenoiser(model)
        with warnings.catch_warnings():
            # torchsde keeps the tree's ends in float32 and warns when a float64 σ at an end
            # falls a rounding error outside them (it clamps, as it should)
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            out = sampler(kd_model, x, sigmas, disable=True, noise_sampler=noise_sampler)
        return PeerResult(out.to(torch.float64), kd_model.calls, grid)
    raise ValueError(f"unknown peer library {config.library!r}; valid: 'diffusers', 'k-diffusion'")
