"""Shared fixtures: the SD scaled-linear process, exact mixture models and cached references."""

from __future__ import annotations

import functools

import pytest
import torch

import diffsolve as ds
from diffsolve.bench import exact_x0_at, gmm2d, gmm64, solve_pf_ode

# one thread: the analytic models are small, and OpenMP spin-waits badly on a busy 2-core box
torch.set_num_threads(1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMSE ‖x − ref‖ / ‖ref‖."""
    return float((x.double() - ref.double()).norm() / ref.double().norm())


@functools.cache
def sd_process() -> ds.VPDiscrete:
    return ds.VPDiscrete.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012, steps=1000)


@functools.cache
def _gmm(name: str):
    return {"gmm2d": gmm2d, "gmm64": gmm64}[name]()


@pytest.fixture(scope="session")
def sd():
    return sd_process()


@pytest.fixture(scope="session")
def g64():
    return _gmm("gmm64")


@pytest.fixture(scope="session")
def g2():
    return _gmm("gmm2d")


def prior64(process, n: int = 8, seed: int = 0) -> torch.Tensor:
    return ds.prior(
        process, (n, 64), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


_REF_CACHE: dict = {}


def reference(gmm, process, x_T: torch.Tensor, t_to: float, *, x0: bool = False) -> torch.Tensor:
    """Exact PF-ODE solution from t_max to ``t_to`` (cached); with ``x0`` the x̂_0 there."""
    key = (gmm.name, repr(process), x_T.shape, float(x_T.sum()), round(float(t_to), 15), x0)
    if key not in _REF_CACHE:
        x = solve_pf_ode(gmm, process, x_T, process.t_max, t_to)
        _REF_CACHE[key] = exact_x0_at(gmm, process, x, t_to) if x0 else x
    return _REF_CACHE[key]
