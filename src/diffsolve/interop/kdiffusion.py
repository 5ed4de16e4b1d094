"""k-diffusion's samplers on a diffsolve Denoiser (the ``peers`` extra).

k-diffusion works in the EDM convention: the state is x̃ = x/α and the noise level is
ρ = σ/α (its ``sigma``), with a denoiser ``D(x̃, ρ) -> x̂_0``. On a Gaussian path
x = α·x_0 + σ·ε this is exact: x̃ = x_0 + ρ·ε, so a diffsolve Denoiser evaluated at the process
time t with σ_t/α_t = ρ, on x = α_t·x̃, gives the same x̂_0.

The other direction: :func:`denoiser_from_kdiffusion` wraps a k-diffusion model
``model(x, sigma) -> x̂_0`` as a diffsolve Denoiser on the EDM process (α = 1, σ = t, the network
receiving σ), and :func:`to_kdiffusion_sampler` exports any diffsolve solver with k-diffusion's
sampler signature, so code written for k-diffusion can call it unchanged.

``load_sampling()`` loads k-diffusion's ``sampling.py`` alone (``load_external()`` its
``external.py``, the model wrappers, beside it). The package's ``__init__`` imports
its training stack (torchvision, CLIP, wandb, ...), none of which the samplers use; the only
sibling module ``sampling.py`` touches is ``utils``, and of it only ``append_dims`` (in
``to_d``), so a tiny stand-in ``utils`` is enough.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..denoiser import Denoiser, EvalPoint, Prediction
from ..noise import Noise, NoiseSource
from ..processes.ve import EDM
from ..solvers.base import get_solver

__all__ = [
    "KDiffusionDenoiser",
    "denoiser_from_kdiffusion",
    "load_external",
    "load_sampling",
    "sigmas_for",
    "to_kdiffusion_sampler",
]

_PKG = "_diffsolve_k_diffusion"  # private name: never shadows a real ``k_diffusion`` import
_MISSING = (
    "k-diffusion is not installed (or one of the packages its sampling module imports is "
    "missing: scipy, torchdiffeq, torchsde, tqdm). Install the peers extra: "
    "pip install 'diffsolve[peers]' and k-diffusion --no-deps"
)


def _append_dims(x: Tensor, target_dims: int) -> Tensor:
    """k_diffusion.utils.append_dims: trailing singleton dims up to ``target_dims``."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def _module_path(filename: str) -> Path:
    # find_spec on a top-level name locates the package without executing its __init__
    try:
        spec = importlib.util.find_spec("k_diffusion")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_MISSING)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise ImportError(f"k-diffusion is installed but has no {filename}; {_MISSING}")


def _sampling_path() -> Path:
    return _module_path("sampling.py")


def load_sampling() -> types.ModuleType:
    """k-diffusion's ``sampling`` module, loaded without the package's heavy ``__init__``.

    Raises:
        ImportError: naming the ``peers`` extra, if k-diffusion or a dependency of its sampling
            module (scipy, torchdiffeq, torchsde, tqdm) is missing.
    """
    name = f"{_PKG}.sampling"
    if name in sys.modules:
        return sys.modules[name]
    path = _sampling_path()
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = []  # a package, so that ``from . import utils`` resolves inside it
    utils = types.ModuleType(f"{_PKG}.utils")
    utils.append_dims = _append_dims  # type: ignore[attr-defined]
    pkg.utils = utils  # type: ignore[attr-defined]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    added = {_PKG: pkg, f"{_PKG}.utils": utils, name: module}
    sys.modules.update(added)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        for key in added:
            sys.modules.pop(key, None)
        raise ImportError(f"{_MISSING} ({e})") from e
    return module


def load_external() -> types.ModuleType:
    """k-diffusion's ``external`` module (``CompVisDenoiser``, ``DiscreteEpsDDPMDenoiser``,
    ``OpenAIDenoiser``, ...), loaded without the package's ``__init__``.

    ``import k_diffusion.external`` runs ``k_diffusion/__init__``, which imports its training
    stack (scikit-image among others) and fails without it. ``external.py`` itself reads only
    ``sampling`` and ``utils.append_dims``, so it is loaded next to :func:`load_sampling`'s
    module in the same private package. Wrap a network with it and pass the wrapper to
    :func:`denoiser_from_kdiffusion`.

    Raises:
        ImportError: naming the ``peers`` extra, if k-diffusion or a dependency is missing.
    """
    name = f"{_PKG}.external"
    if name in sys.modules:
        return sys.modules[name]
    sampling = load_sampling()
    pkg = sys.modules[_PKG]
    pkg.sampling = sampling  # type: ignore[attr-defined]  # ``from . import sampling, utils``
    spec = importlib.util.spec_from_file_location(name, _module_path("external.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        sys.modules.pop(name, None)
        raise ImportError(f"{_MISSING} ({e})") from e
    return module


class KDiffusionDenoiser:
    """A diffsolve Denoiser as k-diffusion's model: ``model(x̃, ρ) -> x̂_0``.

    x̃ = x/α has shape (B, ...); ``sigma`` is ρ = σ/α, a tensor of shape (B,) with equal entries
    (k-diffusion's samplers multiply one grid value by ``s_in``). The call evaluates ``model`` at
    the process time t = t_of_rho(ρ), on x = α_t·x̃, and returns its x̂_0 in x̃'s dtype.

    ``calls`` counts network evaluations; ``times`` records the process time of each.
    """

    def __init__(self, model: Denoiser, cond: dict[str, Any] | None = None):
        self.model = model
        self.process = model.process
        self.cond = dict(cond or {})
        self.calls = 0
        self.times: list[float] = []
        self._cache: dict[float, tuple[float, float]] = {}

    def time_of(self, rho: float) -> tuple[float, float]:
        """(process time t, α_t) with σ_t/α_t = ρ."""
        if rho not in self._cache:
            t = float(self.process.t_of_rho(rho))
            self._cache[rho] = (t, float(self.process.alpha(t)))
        return self._cache[rho]

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        rho = float(sigma.reshape(-1)[0])
        t, alpha = self.time_of(rho)
        self.calls += 1
        self.times.append(t)
        pred = self.model(x * alpha, self.model.point(t, x), **{**self.cond, **cond})
        return pred.x0.to(x.dtype)


def sigmas_for(process: Any, spacing: str, n: int, rho: float = 7.0) -> Tensor:
    """k-diffusion's σ grid (ρ = σ/α, n values then 0) between the process's ends, float64.

    ``spacing``: ``karras`` (``get_sigmas_karras``, ρ-exponent ``rho``) or ``exponential``
    (``get_sigmas_exponential``). σ_min, σ_max are ρ at ``t_min`` and ``t_max_finite``, as
    k-diffusion's ``DiscreteSchedule`` takes them from a VP table's ends. The grid is computed by
    k-diffusion itself (in float32, as its users get it) and returned as float64.
    """
    sampling = load_sampling()
    s_min = float(process.rho(process.t_min))
    s_max = float(process.rho(process.t_max_finite))
    if spacing == "karras":
        sig = sampling.get_sigmas_karras(n, s_min, s_max, rho=rho)
    elif spacing == "exponential":
        sig = sampling.get_sigmas_exponential(n, s_min, s_max)
    else:
        raise ValueError(f"unknown k-diffusion spacing {spacing!r}; valid: 'karras', 'exponential'")
    sig = sig.to(torch.float64)
    # float32 rounding can push the ends just outside the process's range
    sig[0] = min(float(sig[0]), s_max)
    sig[n - 1] = max(float(sig[n - 1]), s_min)
    return sig


# -- k-diffusion models and samplers, seen from diffsolve ------------------------------------------
def denoiser_from_kdiffusion(
    model: Any,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    *,
    sample_shape: tuple[int, ...] | None = None,
) -> Denoiser:
    """A k-diffusion model ``model(x, sigma, **extra_args) -> x̂_0`` as a diffsolve Denoiser.

    k-diffusion's models (``k_diffusion.external``'s wrappers, loadable without scikit-image by
    :func:`load_external`; EDM's preconditioned networks)
    live in the EDM convention: x = x_0 + σ·ε, the network receives σ (shape (B,)) and returns
    x̂_0. That is :class:`~diffsolve.EDM` (α = 1, σ = t) with ``prediction="x0"``, so this is
    ``Denoiser(model, EDM(sigma_min, sigma_max), "x0")``; conditioning given to
    ``ds.sample(cond=...)`` reaches the model as keyword arguments, like ``extra_args``.

    ``sigma_min``/``sigma_max`` default to the model's own attributes (k-diffusion's discrete
    wrappers have them), else EDM's 0.002 and 80.
    """

    def attr(name: str, default: float) -> float:
        value = getattr(model, name, None)
        return default if value is None else float(value)

    lo = attr("sigma_min", 0.002) if sigma_min is None else float(sigma_min)
    hi = attr("sigma_max", 80.0) if sigma_max is None else float(sigma_max)
    return Denoiser(model, EDM(lo, hi), "x0", sample_shape=sample_shape)


class _StepWatch:
    """Passes calls through to the Denoiser and keeps the first call of the current step
    (what k-diffusion's callback reports: the step's x, σ̂ and x̂_0)."""

    def __init__(self, model: Denoiser):
        self.model, self.process = model, model.process
        self.first: tuple[Tensor, EvalPoint, Tensor] | None = None

    def point(self, t: float | Tensor, like: Tensor) -> EvalPoint:
        return self.model.point(t, like)

    def __call__(self, x: Tensor, t: EvalPoint, **cond: Any) -> Prediction:
        pred = self.model(x, t, **cond)
        if self.first is None:
            self.first = (x, t, pred.x0)
        return pred


class _NoiseSampler(Noise):
    """k-diffusion's ``noise_sampler(sigma, sigma_next)`` as a diffsolve noise source with a
    path: the noise over t_from → t_to is ``noise_sampler(ρ(t_from), ρ(t_to))``, k-diffusion's
    call for that interval (step i: ``noise_sampler(σ_i, σ_{i+1})``, σ_{i+1} = 0 for the step to
    the clean end; ``dpmpp_sde`` asks for its stage and step intervals, as
    ``sample_dpmpp_sde`` does). A noise_sampler has no independent draws: ``randn`` (a
    Langevin corrector's noise) raises."""

    path = True

    def __init__(self, fn: Any, grid: Any = None):
        self.fn, self.grid = fn, grid
        self.t: list[float] = [] if grid is None else grid.t.tolist()

    def bind(self, grid: Any) -> _NoiseSampler:
        return _NoiseSampler(self.fn, grid)

    def randn_between(
        self, x: Tensor, step: int, t_from: float, t_to: float, stage: int = 0
    ) -> Tensor:
        g = self.grid
        assert g is not None, "bind(grid) first"
        if t_from == self.t[step] and t_to == self.t[step + 1]:
            s_from, s_to = g.sigma[step], g.sigma[step + 1]
        else:
            ts = torch.tensor([t_from, t_to], dtype=torch.float64)
            s_from, s_to = g.process.sigma(ts) / g.process.alpha(ts)
        z = self.fn(s_from, s_to)
        return z.to(device=x.device, dtype=x.dtype)

    def randn(self, x: Tensor, step: int, stage: int = 0) -> Tensor:
        raise ValueError(
            "k-diffusion's noise_sampler only gives path increments, and this solver needs "
            "independent draws (e.g. Langevin corrector noise): pass generator= instead"
        )


def to_kdiffusion_sampler(solver: Any, **options: Any) -> Any:
    """A diffsolve solver with k-diffusion's sampler signature.

    ``sampler = to_kdiffusion_sampler("unipc", order=3)`` returns
    ``sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs)``, a
    drop-in for ``k_diffusion.sampling.sample_*``:

    - ``model(x, sigma, **extra_args) -> x̂_0`` is a k-diffusion denoiser (EDM convention,
      :func:`denoiser_from_kdiffusion`); ``x`` is x at ``sigmas[0]`` in that scale, shape (B, ...).
    - ``sigmas``: k-diffusion's decreasing σ list. Ending at 0, the run lands on the clean end
      (``final="standard"``: the last step returns x̂_0 at the last positive σ, as k-diffusion's
      samplers do); otherwise it stops at ``sigmas[-1]`` (``final="tmin"``). The solver steps are
      exactly these σ's (``ds.sample(times=...)`` on the EDM process, t = σ); multi-stage
      solvers place their stages between them as they do anywhere.
    - ``callback`` receives k-diffusion's dict ``{x, i, sigma, sigma_hat, denoised}`` once per
      step, after the step (k-diffusion calls it mid-step; the contents are the same: the
      step's first evaluation point x, σ_i, the σ̂ it was evaluated at and its x̂_0).
    - ``disable`` (the progress bar) is accepted and ignored: there is none.
    - ``kwargs``: solver options overriding ``options``; ``noise_sampler`` (k-diffusion's
      ``noise_sampler(sigma, sigma_next)``, asked per interval as k-diffusion asks it) or
      ``generator`` (one draw from it seeds diffsolve's counter-based ``NoiseSource``) feed a
      stochastic solver's noise.

    Returns x at the end, in x's dtype.
    """
    from ..sample import sample

    base = get_solver(solver, **options)  # validate the options now, not at the first call
    if base.adaptive:
        raise ValueError(
            f"{base.name!r} chooses its own steps, and a k-diffusion sampler steps exactly on "
            "the sigmas it is given: export a fixed-step solver (e.g. 'dpmpp_2m', 'unipc', "
            "'heun'), or call k-diffusion's sample_dpm_adaptive / ds.sample for adaptive runs"
        )

    def sampler(
        model: Any,
        x: Tensor,
        sigmas: Any,
        extra_args: dict[str, Any] | None = None,
        callback: Any = None,
        disable: Any = None,
        **kwargs: Any,
    ) -> Tensor:
        noise_sampler = kwargs.pop("noise_sampler", None)
        generator = kwargs.pop("generator", None)
        run_solver = get_solver(base, **kwargs) if kwargs else base
        sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1)
        if sig.numel() < 2:
            raise ValueError("sigmas needs at least two entries (k-diffusion: one step per pair)")
        clean = float(sig[-1]) == 0.0
        pos = sig[:-1] if clean else sig
        if not bool((pos > 0).all()) or not bool((pos[1:] < pos[:-1]).all()):
            raise ValueError("sigmas must decrease strictly, positive except for a final 0")
        lo, hi = float(pos[-1]), float(pos[0])
        extra = dict(extra_args or {})
        # a plain callable: x reaches the model as given, as in k-diffusion (no dtype cast)
        denoiser = Denoiser(
            lambda x_, s_: model(x_, s_, **extra), EDM(lo if lo < hi else hi / 2, hi), "x0"
        )
        watch = _StepWatch(denoiser)
        noise: Any = None
        if noise_sampler is not None:
            noise = _NoiseSampler(noise_sampler)
        elif generator is not None:
            noise = NoiseSource.from_generator(generator)

        def report(i: int, _x: Tensor, _state: Any) -> None:
            first, watch.first = watch.first, None
            if callback is None or first is None:
                return
            xe, point, x0 = first
            s_i = sigmas[i]
            hat = s_i if point.rho == float(sig[i]) else torch.as_tensor(point.rho)
            callback({"x": xe, "i": i, "sigma": s_i, "sigma_hat": hat, "denoised": x0})

        return sample(  # type: ignore[return-value]
            watch,
            x,
            run_solver,
            times=pos,
            final="standard" if clean else "tmin",
            noise=noise,
            callback=report,
        )

    sampler.__name__ = f"sample_{base.name}"
    sampler.__doc__ = f"diffsolve {base.name!r} with k-diffusion's sampler signature ({base})."
    return sampler
