"""Shared fixtures: the SD scaled-linear process, exact mixture models and cached references."""

from __future__ import annotations

import functools
import os

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


# -- CI: a skipped peer test is a failure ---------------------------------------------------------
# With DIFFSOLVE_REQUIRE_PEERS=1 (set by .ci/run) a skip of a test marked ``peers``, or of a whole
# test module at import (every module-level skip here is a peer module's "needs the peers extra"),
# makes the run fail: the peers are installed by the CI command, so a skip means their import
# broke and the tests would vanish silently. Recorded as the run goes and turned into exit
# status 1 at the end, so every other test still runs and reports.
REQUIRE_PEERS_ENV = "DIFFSOLVE_REQUIRE_PEERS"
_PEER_SKIPS: list[str] = []


def _require_peers() -> bool:
    return os.environ.get(REQUIRE_PEERS_ENV, "").strip() not in ("", "0", "false", "no")


def _skip_reason(report) -> str:
    lr = report.longrepr
    return str(lr[2]) if isinstance(lr, tuple) and len(lr) == 3 else str(lr)


def pytest_runtest_logreport(report):
    if report.skipped and "peers" in report.keywords and _require_peers():
        _PEER_SKIPS.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_collectreport(report):
    if report.skipped and report.nodeid.endswith(".py") and _require_peers():
        _PEER_SKIPS.append(f"{report.nodeid} (whole module): {_skip_reason(report)}")


def pytest_terminal_summary(terminalreporter):
    if _PEER_SKIPS:
        terminalreporter.section(f"peer tests skipped with {REQUIRE_PEERS_ENV}=1", red=True)
        for line in _PEER_SKIPS:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    if _PEER_SKIPS and exitstatus == 0:
        session.exitstatus = 1
