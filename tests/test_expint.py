"""The shared exponential-integrator maths: φ-functions and extrapolation weights."""

from __future__ import annotations

import math

import pytest
import torch

from diffsolve.solvers._expint import (
    extrapolate_to_zero,
    phi_data_float,
    phi_noise_float,
    zphi_float,
)


def _phi_mp(k: int, z: float) -> float:
    """z^k·φ_k(z): its series (|z| < 1) or e^z minus the head of the series, summed by fsum."""
    if abs(z) < 1:
        return math.fsum(z**j / math.factorial(j) for j in range(k, k + 60))
    return math.fsum([math.expm1(z), *(-(z**j) / math.factorial(j) for j in range(1, k))])


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("z", [-20.0, -3.0, -1.0, -0.999, -0.2, -1e-3, -1e-9, 1e-9, 0.4, 1.0, 2.5])
def test_zphi_matches_series_to_machine_precision(k, z):
    ref = _phi_mp(k, z)
    assert abs(zphi_float(k, z) - ref) <= 1e-13 * abs(ref) + 1e-300


def test_phi_recursion_and_data_noise_forms():
    for h in (0.01, 0.5, 2.0):
        assert math.isclose(phi_noise_float(1, h), math.expm1(h), rel_tol=1e-14)
        assert math.isclose(phi_data_float(1, h), -math.expm1(-h), rel_tol=1e-14)
        assert math.isclose(phi_data_float(2, h), h - 1 + math.exp(-h), abs_tol=1e-12)
        assert math.isclose(phi_data_float(3, h), h**2 / 2 - h + 1 - math.exp(-h), abs_tol=1e-12)
    assert phi_data_float(1, math.inf) == 1.0


def test_extrapolation_weights():
    # x̂0(ρ) = a + b·ρ² + c·ρ⁴ (even in ρ) is recovered exactly at ρ = 0 from three points
    rhos = [0.05, 0.1, 0.2]
    vals = [torch.tensor([1.0 + 3 * r**2 - 2 * r**4], dtype=torch.float64) for r in rhos]
    assert abs(float(extrapolate_to_zero(rhos, vals)) - 1.0) < 1e-12
