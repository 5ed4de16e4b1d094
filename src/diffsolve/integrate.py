"""Adaptive Dormand–Prince 5(4): the project's one embedded Runge–Kutta integrator.

Integrates dy/du = f(u, y) from u0 to u1 (either direction) for a tensor y of shape (B, ...).

**Tableau.** Dormand & Prince (1980), "A family of embedded Runge–Kutta formulae",
J. Comput. Appl. Math. 6, Table 2 (RK5(4)7M; Hairer, Nørsett & Wanner, Solving Ordinary
Differential Equations I, §II.5, Table 5.2). Seven stages k_j = f(u + c_j·h, y + h·Σ a_jl·k_l);
the 5th-order solution y' = y + h·Σ b_j·k_j propagates (local extrapolation) and the embedded
4th-order one gives the error estimate e = h·Σ (b_j − b̂_j)·k_j. The last row of A is b, so the
last stage is f(u + h, y') and is the first stage of the next step (first-same-as-last: six
calls per step).

**Error and step control** (Hairer et al. I, §II.4). A step is accepted when
E = ‖e / (atol + rtol·max(|y|, |y'|))‖ ≤ 1, in a norm of the caller's choice: per-sample RMS
maximised over the batch (:func:`rms_norm`, the default; HNW's norm, DPM-Solver's batching) or
the max norm (:func:`max_norm`). The next step is h·clip(safety·E_n^{−β₁}·E_{n−1}^{−β₂}·
E_{n−2}^{−β₃}, factor_min, factor_max) with β₁ = (p + i + d)/5, β₂ = −(p + 2d)/5, β₃ = d/5
(:class:`PIDController`: Söderlind 2003, in the parameterisation of diffrax's
``PIDController``; the exponents divide by 5 = 1 + the order of the error estimator). The
default p = d = 0, i = 1 with safety 0.9 and factors in [0.2, 5] is the classical controller
h' = h·clip(0.9·E^{−1/5}, 0.2, 5) of HNW II.4. After a rejection the factor is at most 1 and
the controller's history is left as it was. The first step is HNW's rule of thumb
h₀ = 0.01·‖y₀‖/‖f(u0, y₀)‖, both norms scaled like the error (1e-6 when either is ≤ 1e-5),
unless the caller gives one; a step within 1e-12 (relative) of the end is stretched to land on
u1 exactly, and its stages with c_j = 1 are evaluated at u1 itself.

The arithmetic on y follows y's dtype and device (float64 for the exact references; the
solvers' sample dtype for ``rk45``); the step control runs on the host in float64, and reading
the error norm is the one host sync per attempted step.

**Quadrature.** If f returns a pair (dy/du, q) and ``quadrature=True``, ∫ q du over the accepted
steps is computed with the same stages and the 5th-order weights b, without error control on
it (FFJORD's log-density rides along the state this way).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DP_A",
    "DP_B4",
    "DP_B5",
    "DP_C",
    "DP_ERR",
    "DP_STABILITY",
    "DPResult",
    "PIDController",
    "StepDiagnostics",
    "dormand_prince",
    "initial_step",
    "local_regularizer",
    "max_norm",
    "rms_norm",
]

# Dormand & Prince (1980), Table 2 (RK5(4)7M)
DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DP_ERR = tuple(b5 - b4 for b5, b4 in zip(DP_B5, DP_B4))

_ERR_EXPONENT = 5.0  # 1 + the order of the embedded error estimator
# where DP5(4)'s 5th-order stability region meets the negative real axis, |hλ| ≈ 3.3066 (the
# local stiffness regulariser's normaliser; Tsit5's, in Pal et al. 2023, is 3.5068)
DP_STABILITY = 3.3066


def rms_norm(v: Tensor) -> float:
    """max over the batch of the per-sample root-mean-square of v (B, ...), in float64."""
    return float(v.detach().reshape(v.shape[0], -1).to(torch.float64).pow(2).mean(1).sqrt().max())


def max_norm(v: Tensor) -> float:
    """max |v| over all entries."""
    return float(v.detach().abs().max())


@dataclass(frozen=True)
class PIDController:
    """Step-size factor from the last three scaled errors (module docstring).

    The defaults (p = d = 0, i = 1) are the classical I-controller of Hairer et al. I, §II.4.
    """

    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 5.0

    def exponents(self) -> tuple[float, float, float]:
        """(β₁, β₂, β₃) applied to the inverse errors of steps n, n − 1, n − 2."""
        p, i, d = self.pcoeff, self.icoeff, self.dcoeff
        return (p + i + d) / _ERR_EXPONENT, -(p + 2 * d) / _ERR_EXPONENT, d / _ERR_EXPONENT


def _safe_sqrt(v: Tensor) -> Tensor:
    """√v with a finite gradient at v = 0 (an exactly zero error: a step stretched to the end)."""
    return v.clamp_min(torch.finfo(v.dtype).tiny).sqrt()


def _stiffness(dk: Tensor, dg: Tensor) -> Tensor:
    """‖dk‖/‖dg‖ (0-d, differentiable; dg = 0 gives a finite value)."""
    return _safe_sqrt((dk * dk).sum() / (dg * dg).sum().clamp_min(torch.finfo(dg.dtype).tiny))


def _norm_tensor(norm: Callable[[Tensor], float], v: Tensor) -> Tensor:
    """``norm`` as a 0-d tensor kept in v's graph (for the differentiable diagnostics)."""
    if norm is max_norm:
        return v.abs().max()
    if norm is rms_norm:
        return _safe_sqrt(v.reshape(v.shape[0], -1).pow(2).mean(1)).max()
    tensor_form = getattr(norm, "tensor", None)  # a custom norm may offer its tensor form
    if tensor_form is not None:
        return tensor_form(v)
    return torch.as_tensor(norm(v), dtype=torch.float64, device=v.device)


@dataclass
class StepDiagnostics:
    """Per accepted step of an embedded Runge–Kutta solve (Pal et al., ICML 2021, §3; 2023, §3).

    Attributes:
        u: start of each accepted step (floats, the integration variable).
        step_sizes: |h| of each accepted step (floats).
        local_errors: EEst, the scaled embedded error norm of each accepted step (0-d tensors in
            the graph of y: differentiable when y or f's parameters require grad).
        stiffness: ‖f(g₇) − f(g₆)‖/‖g₇ − g₆‖ from the last two stage points (both at u + h),
            an estimate of the Jacobian's dominant eigenvalue modulus (Shampine's; exactly k on
            dz/du = −k·z); 0-d tensors, differentiable like ``local_errors``.
    """

    u: list[float]
    step_sizes: list[float]
    local_errors: list[Tensor]
    stiffness: list[Tensor]

    @classmethod
    def empty(cls) -> StepDiagnostics:
        return cls([], [], [], [])

    def extend(self, other: StepDiagnostics) -> None:
        self.u += other.u
        self.step_sizes += other.step_sizes
        self.local_errors += other.local_errors
        self.stiffness += other.stiffness

    def _weighted(self, values: list[Tensor]) -> Tensor:
        """Σ_j values_j·|h_j| (0 with no step)."""
        if not values:
            return torch.zeros((), dtype=torch.float64)
        v = torch.stack(values)
        return (v * torch.tensor(self.step_sizes, dtype=v.dtype, device=v.device)).sum()

    def error_regularizer(self) -> Tensor:
        """R_E = Σ_j EEst_j·|h_j| (Pal et al. 2021, eq. 5)."""
        return self._weighted(self.local_errors)

    def stiffness_regularizer(self) -> Tensor:
        """R_S = Σ_j S_j·|h_j| (Pal et al. 2021, eq. 6, as their code weights it by dt)."""
        return self._weighted(self.stiffness)


@dataclass(frozen=True)
class DPResult:
    """What :func:`dormand_prince` returns.

    Attributes:
        y: y(u1), y0's shape, dtype and device.
        integral: ∫ q du in float64 (``quadrature=True``), else None.
        last: f's return value at (u1, y(u1)), the final first-same-as-last stage.
        nfev: calls of f; steps: accepted steps; rejected: rejected steps.
        diagnostics: per-step :class:`StepDiagnostics` (``record=True``), else None.
        h_next: the controller's proposal for the next step size |h| after u1.
    """

    y: Tensor
    integral: Tensor | None
    last: Any
    nfev: int
    steps: int
    rejected: int
    diagnostics: StepDiagnostics | None = None
    h_next: float = 0.0


def initial_step(
    y: Tensor, k: Tensor, scale: Tensor | float, norm: Callable[[Tensor], float] = rms_norm
) -> float:
    """HNW's first step h₀ = 0.01·‖y/scale‖/‖k/scale‖ with k = f(u0, y) (1e-6 when either norm
    is ≤ 1e-5)."""
    d0, d1 = norm(y / scale), norm(k / scale)
    return 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6


def _stages(
    call: Callable[[float, Tensor], tuple[Tensor, Any, Any]],
    u: float,
    du: float,
    y: Tensor,
    k1: Tensor,
    q1: Any,
    last: Any,
    end: float | None,
) -> tuple[list[Tensor], list[Any], Tensor, Tensor, Any]:
    """One attempted step's six new stages: (k's, q's, the 5th-order point g₇, the stage-6 point
    g₆, f's last output); stages with c = 1 are evaluated at ``end`` when given."""
    ks, qs = [k1], [q1]
    yj, out = y, last
    y6 = y
    for j in range(1, 7):
        y6 = yj
        yj = y
        for a, k in zip(DP_A[j], ks):
            if a != 0.0:
                yj = yj + (du * a) * k
        at = end if (end is not None and DP_C[j] == 1.0) else u + DP_C[j] * du
        kj, qj, out = call(at, yj)
        ks.append(kj)
        qs.append(qj)
    return ks, qs, yj, y6, out


def local_regularizer(
    f: Callable[[float, Tensor], Tensor],
    u0: float,
    u1: float,
    y0: Tensor,
    *,
    rtol: float,
    atol: float,
    kind: str = "error",
    controller: PIDController | None = None,
    norm: Callable[[Tensor], float] = rms_norm,
) -> tuple[Tensor, Tensor]:
    """Pal et al.'s local regulariser (ICML 2023, Alg. 1): y(u1) by :func:`dormand_prince` from
    u0, then one more Dormand–Prince attempt from u1 with the controller's proposed step h;
    returns (y(u1), R) with R = EEst·|h| (``kind="error"``) or S/3.3066 (``"stiffness"``: the
    stiffness estimate over the size of DP5's stability region on the negative real axis).
    The caller draws u1 (uniformly in [u0, u_end] for the unbiased form). R is differentiable
    through y(u1) and f's parameters."""
    if kind not in ("error", "stiffness"):
        raise ValueError(f"kind must be 'error' or 'stiffness', got {kind!r}")

    def call(u: float, y: Tensor) -> tuple[Tensor, Any, Any]:
        out = f(u, y)
        return out, None, out

    if u1 != u0:
        sol = dormand_prince(f, u0, u1, y0, rtol=rtol, atol=atol, controller=controller, norm=norm)
        y, h = sol.y, sol.h_next
    else:
        y = y0
        h = initial_step(y, f(u0, y), atol + rtol * y.abs(), norm)
    k1, _, last = call(u1, y)
    ks, _, g7, g6, _ = _stages(call, u1, h, y, k1, None, last, None)
    if kind == "stiffness":
        s = _stiffness(ks[6] - ks[5], g7 - g6)
        return y, s / DP_STABILITY
    err = sum((h * e) * k for e, k in zip(DP_ERR, ks) if e != 0.0)
    scaled = err / (atol + rtol * torch.maximum(y.abs(), g7.abs()))
    return y, _norm_tensor(norm, scaled) * abs(h)


def dormand_prince(
    f: Callable[[float, Tensor], Any],
    u0: float,
    u1: float,
    y0: Tensor,
    *,
    rtol: float,
    atol: float,
    controller: PIDController | None = None,
    norm: Callable[[Tensor], float] = rms_norm,
    h0: float | Callable[[Tensor, Tensor], float] | None = None,
    quadrature: bool = False,
    max_steps: int = 100_000,
    name: str = "dormand_prince",
    record: bool = False,
) -> DPResult:
    """Integrate dy/du = f(u, y) from u0 to u1 by adaptive Dormand–Prince 5(4) (module docstring).

    Args:
        f: ``f(u, y)`` → dy/du (a tensor shaped like y), or a pair (dy/du, extra); ``extra`` is
            the integrand q of the quadrature when ``quadrature`` is set, else anything (the
            one at u1 comes back as ``last``).
        u0, u1: the ends (u1 < u0 integrates backwards).
        y0: y(u0), shape (B, ...); the integration runs in its dtype and device.
        rtol, atol: tolerances of the error test (positive).
        controller: the step-size rule (default ``PIDController()``: the classical I-controller).
        norm: the error norm of a scaled tensor (default :func:`rms_norm`).
        h0: first step size |h|, or a rule ``h0(y0, f(u0, y0))`` giving it (default:
            :func:`initial_step` with the error's scaling and norm).
        quadrature: integrate f's second output along (``DPResult.integral``).
        max_steps: cap on attempted steps (``RuntimeError`` beyond it).
        name: the caller's name in error messages.
        record: keep :class:`StepDiagnostics` of the accepted steps (``DPResult.diagnostics``).

    Raises:
        FloatingPointError: on a non-finite error estimate (its u in the message).
        RuntimeError: when u1 is not reached within ``max_steps`` attempted steps.
    """

    def call(u: float, y: Tensor) -> tuple[Tensor, Any, Any]:
        out = f(u, y)
        return (out[0], out[1], out) if isinstance(out, tuple) else (out, None, out)

    controller = PIDController() if controller is None else controller
    b1, b2, b3 = controller.exponents()
    direction = math.copysign(1.0, u1 - u0)
    y = y0
    k1, q1, last = call(u0, y)
    nfev = 1
    integral = None
    if quadrature:
        integral = torch.zeros(q1.shape, dtype=torch.float64, device=q1.device)
    if h0 is None:
        h = initial_step(y, k1, atol + rtol * y.abs(), norm)
    else:
        h = abs(h0(y, k1) if callable(h0) else h0)
    h = min(h, abs(u1 - u0))
    u = u0
    inv_prev, inv_prev2 = 1.0, 1.0
    steps = rejected = 0
    diag = StepDiagnostics.empty() if record else None
    while direction * (u1 - u) > 1e-12 * max(1.0, abs(u1)):
        if steps + rejected >= max_steps:
            raise RuntimeError(f"{name}: no convergence within max_steps={max_steps}")
        end = h >= abs(u1 - u) * (1 - 1e-12)
        hs = abs(u1 - u) if end else h
        du = direction * hs
        ks, qs, yj, y6, out = _stages(call, u, du, y, k1, q1, last, u1 if end else None)
        kj, qj = ks[6], qs[6]
        nfev += 6
        # row 7 of A is b5: the last stage point yj is the 5th-order solution
        err = sum((du * e) * k for e, k in zip(DP_ERR, ks) if e != 0.0)
        scaled = err / (atol + rtol * torch.maximum(y.abs(), yj.abs()))
        e_n = norm(scaled)
        if not math.isfinite(e_n):
            raise FloatingPointError(f"{name}: non-finite error estimate at u = {u}")
        inv = 1.0 / max(e_n, 1e-10)
        if e_n <= 1.0:
            if integral is not None:
                integral = integral + du * sum(b * q for b, q in zip(DP_B5, qs) if b != 0.0)
            steps += 1
            if diag is not None:  # stage 6 and 7 both sit at u + h: Shampine's estimate
                diag.u.append(u)
                diag.step_sizes.append(hs)
                diag.local_errors.append(_norm_tensor(norm, scaled))
                dk, dg = ks[6] - ks[5], yj - y6
                diag.stiffness.append(_stiffness(dk, dg))
            u = u1 if end else u + du
            y, k1, q1, last = yj, kj, qj, out
            factor = controller.safety * inv**b1 * inv_prev**b2 * inv_prev2**b3
            inv_prev2, inv_prev = inv_prev, inv
        else:
            rejected += 1
            factor = min(controller.safety * inv**b1, 1.0)
        h = hs * min(controller.factor_max, max(controller.factor_min, factor))
    return DPResult(y, integral, last, nfev, steps, rejected, diag, h)
