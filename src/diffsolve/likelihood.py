"""Exact log-likelihood of data under a diffusion model, through the probability-flow ODE.

Song et al. 2021 (Score SDE, §4.3 and App. D.2) and FFJORD (Grathwohl et al. 2019): along the
probability-flow ODE dx/dt = f_t·x − ½g_t²·∇log p_t(x), with ∇log p_t = −ε̂/σ_t, the log-density
obeys the instantaneous change of variables d log p_t(x_t)/dt = −div(drift). Integrating the pair
[x, log p] from the data end t_min to the noise end t_max gives

    log p_{t_min}(x_{t_min}) = log p_{t_max}(x_{t_max}) + ∫_{t_min}^{t_max} div(drift) dt.

**Variables.** The ODE is integrated in the α-scaled state y = x/α and u = log ρ, ρ = σ/α (the
variables of :mod:`diffsolve.bench.reference`): with g² = −2σ²·dλ/dt the same ODE reads

    dy/du = F(y, u) = ρ·ε̂(α·y, t(ρ)),     d log q_u(y_u)/du = −div_y F,

which is smooth and free of the process's own time scale. The density of y is
q_u(y) = α^D·p_t(α·y), so the change of frame is the exact term D·log α.

**The data end.** The data point enters as y = x_0 at ρ_min = ρ(t_min): the ODE starts from
x_{t_min} = α_{t_min}·x_0 (the mean of x_{t_min} given x_0) and the result is
q_{u_min}(x_0) = α^D·p_{t_min}(α·x_0), the density at x_0 of x_0 + ρ_min·ε. Its only error is the
Gaussian blur of width ρ_min, by Taylor expansion of the heat semigroup

    log q_{u_min}(x) − log p_0(x) = ½ρ_min²·(Δ log p_0 + |∇log p_0|²)(x) + O(ρ_min⁴),

i.e. about ρ_min²/(2s²) per coordinate of data scale s (no α-dependent bias, unlike starting
from x_{t_min} = x_0 when α_{t_min} ≠ 1). On the mixtures, ρ_min = 1e-3 gives ≤ 3e-4 nats.
Default t_min (:func:`default_t_min`): Song et al.'s
likelihood ε = 1e-5 (as a fraction of t_max) on continuous paths that reach σ = 0 at t = 0
(VP linear/cosine, flow matching, EDM), else the process's own ``t_min`` (VE: σ_min; discrete
VP: timestep 0), below which the network was never trained.

**The noise end.** The marginal at t_max is p_data convolved as α·x_0 + σ·ε; it is replaced by the
Gaussian with the same first two moments, N(α·m, α²·C + σ²·I), m and C the data mean and
covariance (``data_mean``, ``data_var``; default: the process's own prior assumption, unit
variance for VP and flow matching, C = 0 for VE, whose prior is N(0, σ_max²)). The error of this
moment matching is of order (α/σ)³ times the data's third cumulants (the first two match); with
C = 0 it is of order α²·(|m|² + tr C)/σ². ``prior_log_prob`` replaces it with an exact density.
On a :class:`~diffsolve.processes.PFGMPP` path (finite D) the noise end is not Gaussian: with
``data_var=None`` the prior term is the PFGM++ kernel at r = σ(t_max)·sqrt(D) around
``data_mean`` (:meth:`~diffsolve.processes.PFGMPP.kernel_log_prob`, the density of
``PFGMPP.prior``), whose error is of order (|y − m|²/r²)·(N + D) per sample, not the Gaussian's
(N(0, σ_max²·D/(D − 2)), moment-matched, was 3.85 nats off at D = 8, N = 2).

**Divergence.** By reverse-mode autograd of F in y: ``"exact"`` makes D vector-Jacobian products
(one per coordinate; for small D), ``"hutchinson"`` the Hutchinson–Skilling estimate
div F ≈ (1/K)·Σ_k v_kᵀ(∂F/∂y)v_k with K = ``probes`` Rademacher or Gaussian probes drawn once per
sample and kept fixed over the whole trajectory (FFJORD). The step-size controller watches y
only, so the time grid does not depend on the probes: the Hutchinson estimate of log p is then
exactly unbiased for the exact-divergence result on the same grid (it is linear in the probes'
outer products), and its error falls as 1/√K (docs/solvers.md, "Exact likelihood"). It is
unbiased for log p, not for p = e^{log p}. Rademacher probes are the default: their variance
2·Σ_{i≠j} A_ij² (A the symmetrised Jacobian) omits the diagonal, which Gaussian probes add.

**Integrator.** The project's Dormand–Prince 5(4) (:func:`diffsolve.integrate.dormand_prince`),
batched, on the sample's device, with the embedded error of y measured as a per-sample RMS
scaled by atol + rtol·max(|y|, |y'|), maximised over the batch, and the standard step-size rule
h' = h·clip(0.9·err^{−1/5}, 0.2, 5) (Hairer et al., Solving ODEs I, §II.4); the log-density
rides along with the same stages (a quadrature, without error control). ``method="dop853"``
uses scipy's DOP853 on the host instead (float64; a cross-check, also with y-only error
control).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .integrate import dormand_prince
from .processes.base import GaussianProcess
from .processes.pfgmpp import PFGMPP

__all__ = [
    "LikelihoodInfo",
    "bits_per_dim",
    "default_t_min",
    "dequantization_shift",
    "log_likelihood",
]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
METHODS = ("dopri5", "dop853")


@dataclass(frozen=True)
class LikelihoodInfo:
    """What a likelihood solve did; every tensor has shape (B,) unless stated.

    Attributes:
        prior_logp: log p_{t_max}(x_{t_max}) (x-space, the prior term).
        delta_logp: ∫ div_y F du + D·log α_{t_max} (the flow's change of log-density and the
            change of frame x → y = x/α), so that ``log_p = prior_logp + delta_logp``.
        x_t_max: the data pushed to t_max, shape of x0.
        nfe: network calls (replicas for the divergence stacked up to ``max_batch`` rows).
        steps: accepted steps; rejected: rejected steps.
        t_min, t_max: the integration interval (process time).
    """

    prior_logp: Tensor
    delta_logp: Tensor
    x_t_max: Tensor
    nfe: int
    steps: int
    rejected: int
    t_min: float
    t_max: float


def default_t_min(process: GaussianProcess) -> float:
    """The default data end of the likelihood integral (module docstring, "The data end")."""
    try:
        reaches_zero = float(process.sigma(0.0)) == 0.0
    except (ValueError, RuntimeError):
        reaches_zero = False
    if reaches_zero and process.t_min > 0:
        return min(process.t_min, 1e-5 * process.t_max)
    return process.t_min


def log_likelihood(
    model: Any,
    x0: Tensor,
    *,
    t_min: float | None = None,
    t_max: float | None = None,
    divergence: str = "exact",
    probes: int = 1,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
    method: str = "dopri5",
    data_mean: float | Tensor = 0.0,
    data_var: float | Tensor | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    cond: Mapping[str, Any] | None = None,
    max_batch: int = 4096,
    max_steps: int = 10_000,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, LikelihoodInfo]:
    """log p(x_0) in nats, per sample, by the probability-flow ODE (module docstring).

    Args:
        model: a :class:`~diffsolve.Denoiser` (or wrapper) whose network is differentiable.
        x0: data, shape (B, ...); float64 for accuracy to ~1e-6 nats, float32 works.
        t_min, t_max: process times of the two ends (defaults: :func:`default_t_min`,
            ``process.t_max_finite``).
        divergence: ``"exact"`` (D backward passes per evaluation) or ``"hutchinson"``.
        probes, probe: number and kind (``"rademacher"`` | ``"gaussian"``) of Hutchinson probes,
            fixed per sample over the trajectory; drawn from ``generator``.
        rtol, atol: tolerances on y = x/α (Song et al. use 1e-5 with RK45).
        method: ``"dopri5"`` (the project's tableau, on the sample's device) or ``"dop853"``
            (scipy, host float64).
        data_mean, data_var: first two moments of the data for the Gaussian prior term: a
            float, a per-coordinate tensor (shape of one sample, or (D,)) or, for ``data_var``,
            a full (D, D) covariance. ``data_var=None``: the process's own prior
            ``N(0, prior_std²)`` read as α²·v + σ² at its t_max (v = 1 for VP and flow
            matching, v = 0 for VE). On a PFGM++ path ``data_var=None`` uses its exact prior
            (the kernel around ``data_mean``; module docstring).
        prior_log_prob: optional exact log p_{t_max}(x) in x-space, a callable (B, ...) → (B,),
            used instead of the Gaussian.
        cond: keyword arguments of the network (conditioning).
        max_batch: rows per network call when replicas of the batch are stacked for the
            divergence (D replicas for ``"exact"``, ``probes`` for Hutchinson); at least one
            replica (the batch itself) per call. Lower it for large networks (memory).
        max_steps: cap on attempted steps.
        return_info: also return a :class:`LikelihoodInfo`.

    Returns:
        log p(x_0), shape (B,), float64 (and the info).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if int(probes) != probes or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    if not (rtol > 0 and atol > 0):
        raise ValueError("rtol and atol must be positive")
    if int(max_batch) != max_batch or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.ndim < 2:
        raise ValueError("x0 must be a floating-point tensor of shape (B, ...)")
    proc: GaussianProcess = model.process
    t0 = default_t_min(proc) if t_min is None else float(t_min)
    t1 = proc.t_max_finite if t_max is None else float(t_max)
    a1 = float(proc.alpha(t1))
    if not (0.0 <= t0 < t1) or t1 > proc.t_max + 1e-12 or not a1 > 0:
        raise ValueError(
            f"need 0 <= t_min < t_max <= process t_max with α(t_max) > 0, got t_min={t0}, "
            f"t_max={t1} for {proc!r}"
        )
    cond = dict(cond or {})
    dt = torch.float32 if x0.dtype in (torch.float16, torch.bfloat16) else x0.dtype
    y = x0.detach().to(dt)
    batch, dim = y.shape[0], y[0].numel()
    vs = _probes(y, probes, probe, generator) if divergence == "hutchinson" else None
    field = _Field(model, proc, t0, t1, cond, vs, int(max_batch))
    u0, u1 = math.log(float(proc.rho(t0))), math.log(float(proc.rho(t1)))
    if method == "dopri5":
        sol = dormand_prince(
            field,
            u0,
            u1,
            y,
            rtol=rtol,
            atol=atol,
            quadrature=True,
            max_steps=max_steps,
            name="log_likelihood",
        )
        assert sol.integral is not None  # quadrature=True
        y1, integral, steps, rejected = sol.y, sol.integral, sol.steps, sol.rejected
    else:
        y1, integral, steps, rejected = _scipy(field, u0, u1, y, rtol, atol)
    x1 = a1 * y1.to(torch.float64)
    if prior_log_prob is not None:
        prior = prior_log_prob(x1).to(torch.float64).reshape(batch)
    elif isinstance(proc, PFGMPP) and data_var is None:
        m = torch.as_tensor(data_mean, dtype=torch.float64, device=x1.device)
        m = m.reshape(-1) if m.ndim > 0 else m
        prior = proc.kernel_log_prob(x1.reshape(batch, -1) - m, sigma=t1)
    else:
        prior = _gaussian_prior(proc, x1, t1, data_mean, data_var)
    # log q_{u1}(y1) = log p_{t1}(x1) + D·log α_{t1};  log q_{u0}(x0) = log q_{u1}(y1) + ∫ div du
    delta = integral + dim * math.log(a1)
    logp = prior + delta
    if not return_info:
        return logp
    info = LikelihoodInfo(prior, delta, x1.to(x0.dtype), field.nfe, steps, rejected, t0, t1)
    return logp, info


def dequantization_shift(bits: int = 8, data_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """The bits-per-dimension offset of ``bits``-bit data rescaled to ``data_range``.

    Integer data k ∈ {0, …, 2^bits − 1} mapped to x = lo + (k + u)·(hi − lo)/2^bits
    (u ~ U[0, 1): uniform dequantisation) has density p_k(k + u) = p_x(x)·((hi − lo)/2^bits)^D,
    so −log₂ p_k / D = −log₂ p_x / D + bits − log₂(hi − lo): 8 for [0, 1], 7 for [−1, 1] (Song et
    al.'s ``7 − inverse_scaler(−1)``; FFJORD's 8 for [0, 1]).
    """
    lo, hi = data_range
    if not hi > lo:
        raise ValueError(f"data_range must be increasing, got {data_range}")
    return float(bits) - math.log2(hi - lo)


def bits_per_dim(logp: Tensor | float, dims: int | tuple[int, ...], shift: float = 0.0) -> Tensor:
    """Bits per dimension: bpd = −log p / (D·ln 2) + shift, elementwise.

    ``logp`` is a log-density in nats (e.g. :func:`log_likelihood`), ``dims`` the dimension D or
    a sample shape. ``shift`` converts a continuous density on rescaled data to the discrete
    data's bits (``dequantization_shift(8, (−1, 1))`` = 7 for 8-bit images in [−1, 1]); the
    reported numbers of Song et al. and FFJORD also evaluate log p at uniformly dequantised data
    x + u/2^bits·(hi − lo), whose expectation over u lower-bounds the discrete log-likelihood.
    """
    d = dims if isinstance(dims, int) else math.prod(dims)
    if d < 1:
        raise ValueError(f"dims must be positive, got {dims!r}")
    lp = torch.as_tensor(logp, dtype=torch.float64)
    return -lp / (d * math.log(2.0)) + shift


# -- internals ---------------------------------------------------------------------------------
def _probes(y: Tensor, k: int, kind: str, generator: torch.Generator | None) -> Tensor:
    """(k, B, ...) probes drawn on the generator's device, moved to y's."""
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    shape = (k, *y.shape)
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=gen_dev).to(y.dtype) * 2 - 1
    else:
        v = torch.randn(shape, generator=generator, device=gen_dev, dtype=y.dtype)
    return v.to(y.device)


class _Field:
    """(u, y) ↦ (F = dy/du, div_y F) with F = ρ·ε̂(α·y, t(ρ)); counts network calls.

    The divergence takes R vector-Jacobian products: R = D unit vectors (exact) or the K probes
    (Hutchinson). They are batched by stacking R replicas of the batch into one call and one
    backward pass (chunks of at most ``max_batch`` rows), which is far cheaper than R
    separate backward passes through a small network; each chunk is one network call.
    """

    def __init__(self, model, proc, t0, t1, cond, vs, max_batch):
        self.model, self.proc, self.cond, self.vs = model, proc, cond, vs
        self.max_batch = max_batch
        self.ends = {}  # exact times at the two ends (no round trip through t_of_rho)
        for t in (t0, t1):
            self.ends[math.log(float(proc.rho(t)))] = t
        self.nfe = 0

    def __call__(self, u: float, y: Tensor) -> tuple[Tensor, Tensor]:
        proc = self.proc
        t = self.ends.get(u)
        t = proc.t_of_rho(math.exp(u)) if t is None else torch.tensor(t, dtype=torch.float64)
        a = float(proc.alpha(t))
        rho = math.exp(u)
        batch, dim = y.shape[0], y[0].numel()
        reps = dim if self.vs is None else self.vs.shape[0]
        per = max(1, min(reps, self.max_batch // batch))
        div = torch.zeros(batch, dtype=torch.float64, device=y.device)
        f0 = None
        for r0 in range(0, reps, per):
            n = min(per, reps - r0)
            if self.vs is None:  # unit vectors e_{r0}, …, e_{r0+n−1}, one per replica
                e = torch.zeros(n, batch, dim, dtype=y.dtype, device=y.device)
                rows = torch.arange(n, device=y.device)
                e[rows, :, rows + r0] = 1.0
                e = e.reshape(n * batch, *y.shape[1:])
            else:
                e = self.vs[r0 : r0 + n].reshape(n * batch, *y.shape[1:])
            cond = {
                k: torch.cat([v] * n) if isinstance(v, Tensor) and v.ndim > 0 else v
                for k, v in self.cond.items()
            }
            with torch.enable_grad():
                yr = y.detach().repeat(n, *([1] * (y.ndim - 1))).requires_grad_(True)
                f = rho * self.model(a * yr, self.model.point(t, yr), **cond).eps
                (g,) = torch.autograd.grad(f, yr, grad_outputs=e)
            self.nfe += 1
            div = div + (g * e).reshape(n, batch, -1).to(torch.float64).sum((0, 2))
            if f0 is None:
                f0 = f[:batch].detach()
        if self.vs is not None:
            div = div / reps
        assert f0 is not None  # reps ≥ 1: the loop ran
        return f0.to(y.dtype), div.detach()


def _scipy(field: _Field, u0: float, u1: float, y: Tensor, rtol, atol):
    """scipy DOP853 on the flattened [y, ∫ div] (host float64); y-only error control."""
    import numpy as np
    from scipy.integrate import solve_ivp

    shape, n = y.shape, y.numel()
    dev, dt = y.device, y.dtype

    def rhs(u: float, z: np.ndarray) -> np.ndarray:
        yz = torch.from_numpy(z[:n]).reshape(shape).to(device=dev, dtype=dt)
        f, d = field(u, yz)
        return np.concatenate([f.to(torch.float64).cpu().reshape(-1).numpy(), d.cpu().numpy()])

    z0 = np.concatenate([y.to(torch.float64).cpu().reshape(-1).numpy(), np.zeros(shape[0])])
    atols = np.concatenate([np.full(n, atol), np.full(shape[0], np.inf)])
    sol = solve_ivp(rhs, (u0, u1), z0, method="DOP853", rtol=rtol, atol=atols)
    if not sol.success:
        raise RuntimeError(f"log_likelihood: scipy DOP853 failed: {sol.message}")
    z = sol.y[:, -1]
    y1 = torch.from_numpy(z[:n].copy()).reshape(shape).to(device=dev, dtype=dt)
    integral = torch.from_numpy(z[n:].copy()).to(dev)
    return y1, integral, int(sol.t.size - 1), 0


def _gaussian_prior(
    proc: GaussianProcess, x: Tensor, t: float, mean: float | Tensor, var: float | Tensor | None
) -> Tensor:
    """log N(x; α·m, α²·C + σ²·I) at time t, x of shape (B, ...) float64; returns (B,)."""
    batch = x.shape[0]
    xf = x.reshape(batch, -1)
    dim = xf.shape[1]
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    if var is None:
        aT, sT = float(proc.alpha(proc.t_max)), float(proc.sigma(proc.t_max))
        var = max((proc.prior_std() ** 2 - sT**2) / aT**2, 0.0) if aT > 0 else 1.0
    m = torch.as_tensor(mean, dtype=torch.float64, device=x.device)
    m = m.reshape(-1) if m.ndim > 0 else m
    r = xf - a * m
    v = torch.as_tensor(var, dtype=torch.float64, device=x.device)
    log2pi = math.log(2 * math.pi)
    if v.ndim == 2 and v.shape == (dim, dim):
        cov = a * a * v + s * s * torch.eye(dim, dtype=torch.float64, device=x.device)
        chol = torch.linalg.cholesky(cov)
        z = torch.linalg.solve_triangular(chol, r.T, upper=False).T
        logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
        return -0.5 * (z.pow(2).sum(1) + logdet + dim * log2pi)
    c = a * a * (v.reshape(-1) if v.ndim > 0 else v) + s * s
    c = c.expand(dim) if c.ndim == 0 else c
    if c.shape != (dim,):
        raise ValueError(f"data_var must be a float, a (D,) or (D, D) tensor; D = {dim}")
    return -0.5 * ((r * r / c).sum(1) + torch.log(c).sum() + dim * log2pi)
