"""k-diffusion's samplers on a diffsolve Denoiser (the ``peers`` extra).

k-diffusion works in the EDM convention: the state is x̃ = x/α and the noise level is
ρ = σ/α (its ``sigma``), with a denoiser ``D(x̃, ρ) -> x̂_0``. On a Gaussian path
x = α·x_0 + σ·ε this is exact: x̃ = x_0 + ρ·ε, so a diffsolve Denoiser evaluated at the process
time t with σ_t/α_t = ρ, on x = α_t·x̃, gives the same x̂_0.

``load_sampling()`` loads k-diffusion's ``sampling.py`` alone. The package's ``__init__`` imports
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

from ..denoiser import Denoiser

__all__ = ["KDiffusionDenoiser", "load_sampling", "sigmas_for"]

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


def _sampling_path() -> Path:
    # find_spec on a top-level name locates the package without executing its __init__
    try:
        spec = importlib.util.find_spec("k_diffusion")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_MISSING)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "sampling.py"
        if path.is_file():
            return path
    raise ImportError(f"k-diffusion is installed but has no sampling.py; {_MISSING}")


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
