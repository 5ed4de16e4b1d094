"""Adaptive solvers' per-step diagnostics and Pal et al.'s regularisers (extras §12): the
stiffness estimate against the known eigenvalue, the embedded error estimate's h⁵ scaling, the
``info`` fields of ``rk45`` and ``dpm_adaptive``, and gradients of R_E reaching parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import diffsolve as ds
from diffsolve.integrate import DP_STABILITY, dormand_prince, local_regularizer

from .conftest import sd_process


def test_stiffness_estimate_is_the_eigenvalue():
    """dz/du = −k·z: ‖f(g₇) − f(g₆)‖/‖g₇ − g₆‖ = k exactly at every accepted step; the local form
    divides by DP5's stability size."""
    k = 3.7
    y0 = torch.ones(4, 3, dtype=torch.float64)
    sol = dormand_prince(lambda u, z: -k * z, 0.0, 2.0, y0, rtol=1e-6, atol=1e-6, record=True)
    s = torch.stack(sol.diagnostics.stiffness)
    assert sol.steps > 5 and torch.allclose(s, torch.full_like(s, k), rtol=1e-9)
    _, r = local_regularizer(lambda u, z: -k * z, 0.0, 0.7, y0, rtol=1e-6, atol=1e-6,
                             kind="stiffness")  # fmt: skip
    assert math.isclose(float(r), k / DP_STABILITY, rel_tol=1e-9)


@pytest.mark.parametrize("case", ["logistic", "van-der-pol"])
def test_error_estimate_scales_as_h5(case):
    """One step of size h: EEst (the 5th- minus 4th-order solution, atol = 1, rtol = 0) against
    h = 0.2 … 0.025; measured log–log slope 4.95 (logistic), 5.09 (van der Pol)."""
    if case == "logistic":
        f, y0 = (lambda u, y: y * (1 - y)), torch.full((1, 1), 0.1, dtype=torch.float64)
    else:

        def f(u, y):
            return torch.stack([y[:, 1], (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)

        y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    hs = [0.2, 0.1, 0.05, 0.025]
    errs = []
    for h in hs:
        sol = dormand_prince(f, 0.0, h, y0, rtol=0.0, atol=1.0, h0=h, record=True)
        assert sol.steps == 1
        errs.append(float(sol.diagnostics.local_errors[0]))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - 5) < 0.3, slope


def test_adaptive_solvers_report_their_steps(g2, sd):
    gmm2d_model = g2.denoiser(sd)
    x = ds.prior(sd, (8, 2), generator=torch.Generator().manual_seed(0))
    _, info = ds.sample(gmm2d_model, x, "rk45", return_info=True)
    n = info.step_sizes.numel()
    assert n > 5 and info.local_errors.shape == (n,) and info.stiffness.shape == (n,)
    assert bool((info.local_errors <= 1).all())  # accepted steps pass the error test
    assert float(info.step_sizes.sum()) > 0
    _, info = ds.sample(gmm2d_model, x, "dpm_adaptive", return_info=True)
    assert info.local_errors.shape == info.step_sizes.shape and info.stiffness is None
    _, info = ds.sample(gmm2d_model, x, "dpmpp_2m", nfe=10, return_info=True)
    assert info.step_sizes is None and info.local_errors is None


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(2, 2).double()

    def forward(self, x, t):
        return self.w(x) * 0.1


def test_error_regularizer_is_differentiable():
    """R_E = Σ EEst·|h| from ``info.diagnostics`` backpropagates into the network's weights
    (``grad="backprop"``), and a direct dormand_prince solve's R_E into f's parameters."""
    proc = sd_process()
    model = ds.Denoiser(_Net(), proc, "eps")
    x = ds.prior(proc, (4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, info = ds.sample(model, x, "rk45", grad="backprop", return_info=True, rtol=1e-4, atol=1e-4)
    r_e = info.diagnostics.error_regularizer()
    h = info.step_sizes
    assert torch.isclose(r_e, (info.local_errors * h).sum())
    r_e.backward()
    assert model.net.w.weight.grad is not None and float(model.net.w.weight.grad.abs().sum()) > 0
    lin = nn.Linear(2, 2).double()
    sol = dormand_prince(lambda u, z: torch.tanh(lin(z)), 0.0, 1.0, x, rtol=1e-6, atol=1e-6,
                         record=True)  # fmt: skip
    (sol.diagnostics.error_regularizer() + sol.diagnostics.stiffness_regularizer()).backward()
    assert float(lin.weight.grad.abs().sum()) > 0


def test_local_regularizer_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        local_regularizer(lambda u, z: -z, 0.0, 1.0, torch.ones(1, 1), rtol=1e-6, atol=1e-6,
                          kind="both")  # fmt: skip


def test_docs_python_blocks_run():
    """docs/diagnostics.md's code runs as written."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "diagnostics.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(doc), "exec"), {"__name__": "docs"})
