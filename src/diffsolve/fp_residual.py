"""The Fokker–Planck residual of a score model: how far it is from the density of one process.

Deveney et al. (2023; Phil. Trans. A 2025), papers/extras.md §13. For the forward SDE
dx = f_t·x dt + g_t dW of a Gaussian path (f_t = dlog α/dt, g_t² = dσ²/dt − 2f_t·σ², DESIGN §1)
the marginal log-density u = log p_t obeys

    ∂_t u = −∇·(f_t x) − f_t x·∇u + (g_t²/2)(Δu + ‖∇u‖²),        ∇·(f_t x) = f_t·D.

A model that satisfies it has one law for its probability-flow ODE and all its reverse SDEs; the
paper bounds W2(p_ODE, p_SDE) by the time integral of the residual, so the residual along the
sampling path is a per-model diagnostic of the ODE–SDE gap that needs no samples.

**Two forms** (what :func:`fp_residual` returns):

- *log-density form* (``log_density=u_θ`` given): the scalar residual

      R(x, t) = ∂_t u_θ + f_t·D + f_t x·∇u_θ − (g_t²/2)(Δu_θ + ‖∇u_θ‖²),       shape (B,),

  signed; ∇u_θ and ∂_t u_θ by autograd (x and t).
- *score form* (a :class:`~diffsolve.Denoiser`, score s = −ε̂/σ_t, not necessarily a gradient
  field): the gradient of the equation, ∂_t s = ∇[−f_t x·s + (g_t²/2)(∇·s + ‖s‖²)], whose
  residual vector is

      r(x, t) = ∂_t s + f_t·s + J_sᵀ(f_t x − g_t² s) − (g_t²/2)·∇(∇·s),

  (J_s = ∂s/∂x; for s = ∇u, r = ∇R). Returned as its squared norm ‖r‖², shape (B,).

**Derivatives.** ∂_t s of a Denoiser by autograd through the network's time input and α_t, σ_t
(one reverse pass with a symbolic cotangent, then a second one: the "double-vjp" Jacobian–vector
product); where the network is not differentiable in its time input (the graph does not reach it,
or the model is a wrapper such as CFG) a central difference in t, step h = 1e-4·t (float32) or
1e-5·t (float64), is used instead — ``time_derivative="central"`` forces it. The divergence ∇·s
(Laplacian Δu) is exact (D reverse passes) for D ≤ :data:`EXACT_MAX_DIM` with ``method="auto"``,
otherwise a Hutchinson estimate with ``probes`` Rademacher vectors v: ∇·s ≈ vᵀJ_s v. The
Hutchinson R is the mean of per-probe estimates (unbiased); ‖r‖² is the U-statistic
Σ_{k≠l} r̂_k·r̂_l / (P(P−1)) over the per-probe vectors r̂_k, unbiased for ‖r‖² (a single
‖mean r̂‖² would be biased upward by the probes' variance) and therefore occasionally negative.
``stderr=True`` also returns the probes' standard error (mean: std/√P; U-statistic: jackknife,
NaN for P = 2).

:func:`fp_residual_path` runs the ODE sampler and averages R² (or ‖r‖²) over the samples at
every grid time: the diagnostic the issue asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .denoiser import Denoiser, EvalPoint, Prediction
from .processes.base import GaussianProcess, as_time

__all__ = ["EXACT_MAX_DIM", "FPPath", "fp_residual", "fp_residual_path"]

EXACT_MAX_DIM = 32
"""``method="auto"``: exact divergence up to this many dimensions, Hutchinson above."""

METHODS = ("auto", "exact", "hutchinson")
TIME_DERIVATIVES = ("autograd", "central")

LogDensity = Callable[[Tensor, Tensor], Tensor]


def fp_residual(
    model: Any,
    x: Tensor,
    t: float | Tensor,
    *,
    log_density: LogDensity | None = None,
    method: str = "auto",
    probes: int = 8,
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    time_derivative: str = "autograd",
    stderr: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The Fokker–Planck residual of a model at (x, t) (module docstring for the maths).

    Args:
        model: a :class:`~diffsolve.Denoiser` (score form), or with ``log_density`` the
            forward process (a :class:`~diffsolve.GaussianProcess`, or anything with a
            ``.process``, e.g. the Denoiser of the same model).
        x: points, shape (B, ...).
        t: process time: a float, or a (B,) tensor (log-density form: per-sample times; score
            form: times shared by the batch are evaluated together, distinct ones one by one).
        log_density: ``u_θ(x, t) -> (B,)``, x shaped as given and t a (B,) tensor of x's
            dtype; both must be differentiable (twice in x). Selects the log-density form.
        method: ``"exact"`` (D reverse passes), ``"hutchinson"`` (``probes`` Rademacher
            probes) or ``"auto"`` (exact for D ≤ :data:`EXACT_MAX_DIM`).
        probes: Hutchinson probes per sample (≥ 2: the score form's U-statistic needs pairs).
        generator: draws the probes.
        cond: keyword arguments for the network (score form), e.g. ``{"label": labels}``.
        time_derivative: ``"autograd"`` (falls back to central differences where the network
            is not differentiable in time) or ``"central"``.
        stderr: also return the Hutchinson standard error (zeros for exact divergences).

    Returns:
        Log-density form: the signed residual R, shape (B,). Score form: ‖r‖², shape (B,).
        In x's dtype (float32 for half-precision inputs); with ``stderr`` a pair (value, se).
    """
    value, se, _ = _evaluate(
        model, x, t, log_density, method, probes, generator, cond, time_derivative
    )
    return (value, se) if stderr else value


def _evaluate(
    model: Any,
    x: Tensor,
    t: float | Tensor,
    log_density: LogDensity | None,
    method: str,
    probes: int,
    generator: torch.Generator | None,
    cond: Mapping[str, Any] | None,
    time_derivative: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fp_residual`'s value and standard error, and the size of the equation's two sides,
    lhs² + rhs² ((∂_t u)² + (∂_t u − R)², or the same with ‖·‖² of the score form), (B,): the
    scale that makes the residual dimensionless."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if time_derivative not in TIME_DERIVATIVES:
        raise ValueError(
            f"unknown time_derivative {time_derivative!r}; valid: {', '.join(TIME_DERIVATIVES)}"
        )
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise ValueError("x must be a floating-point tensor of shape (B, ...)")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    b = x.shape[0]
    dim = x[0].numel()
    exact = method == "exact" or (method == "auto" and dim <= EXACT_MAX_DIM)
    if not exact and probes < 2:
        raise ValueError(f"Hutchinson needs probes >= 2, got {probes}")
    tv = torch.as_tensor(t, dtype=torch.float64).to("cpu").reshape(-1)
    if tv.numel() == 1:
        tv = tv.expand(b)
    if tv.numel() != b:
        raise ValueError(f"t must be a scalar or have shape ({b},), got {tuple(tv.shape)}")
    v = None if exact else _probes(probes, b, dim, x, generator)
    with torch.enable_grad():
        if log_density is not None:
            process = model if isinstance(model, GaussianProcess) else model.process
            est, dt = _scalar_form(process, log_density, x, tv, v)
            value = est.mean(0)
            se = est.std(0) / est.shape[0] ** 0.5 if v is not None else torch.zeros_like(value)
            rhs = dt - est.mean(0)  # the right-hand side of the equation
            scale = dt * dt + rhs * rhs
        else:
            value = torch.empty(b, dtype=x.dtype, device=x.device)
            se, scale = torch.zeros_like(value), torch.zeros_like(value)
            for tt in torch.unique(tv).tolist():
                idx = (tv == tt).nonzero().reshape(-1).to(x.device)
                sub = {k: _take(c, idx, b) for k, c in (cond or {}).items()}
                vi = None if v is None else v[:, idx]
                est, dsdt = _score_form(model, x[idx], tt, vi, sub, time_derivative)
                value[idx], se[idx] = _squared_norm(est)
                rhs = dsdt - est.mean(0)  # the right-hand side of the score equation
                scale[idx] = ((dsdt * dsdt).sum(1) + (rhs * rhs).sum(1)).to(scale.dtype)
    return value, se, scale


@dataclass(frozen=True)
class FPPath:
    """The Fokker–Planck residual along an ODE sampling path.

    Attributes:
        times: the grid times evaluated (float64, decreasing; σ > 0 and finite f_t, g_t).
        r2: mean over the samples of R² (log-density form) or ‖r‖² (score form) at each time.
        stderr: Monte-Carlo standard error of each r2 over the samples (Hutchinson noise
            included).
        scale: mean over the samples of the squared sizes of the equation's two sides,
            ‖lhs‖² + ‖rhs‖² (lhs = ∂_t u_θ or ∂_t s, rhs = lhs − residual), at each time.
        nfe: network calls of the sampling run (the residual's own calls not counted).
    """

    times: Tensor
    r2: Tensor
    stderr: Tensor
    scale: Tensor
    nfe: int

    @property
    def relative(self) -> Tensor:
        """r2 / scale at each time: E‖lhs − rhs‖² / E(‖lhs‖² + ‖rhs‖²), dimensionless in
        [0, 2]: 0 for an exact model, about 1 where the two sides are unrelated, 2 where they
        are opposite. Unlike r2 it stays comparable across times, processes and data scales
        (r2 itself grows like a power of 1/σ_t toward the data end)."""
        return self.r2 / self.scale

    @property
    def mean_relative(self) -> float:
        """Mean of ``relative`` over the grid times."""
        return float(self.relative.mean())

    @property
    def mean(self) -> float:
        """Mean of ``r2`` over the grid times (what the benchmark tabulates)."""
        return float(self.r2.mean())

    @property
    def integral(self) -> float:
        """∫ E R² dt over the evaluated stretch (trapezoid in t): the quantity of the W2 bound."""
        if self.times.numel() < 2:
            return 0.0
        return float(torch.trapezoid(self.r2.flip(0), self.times.flip(0)))


def fp_residual_path(
    model: Any,
    x_T: Tensor,
    solver: Any = "dpmpp_2m",
    nfe: int | None = None,
    *,
    log_density: LogDensity | None = None,
    method: str = "auto",
    probes: int = 8,
    generator: torch.Generator | None = None,
    cond: Mapping[str, Any] | None = None,
    time_derivative: str = "autograd",
    chunk: int | None = None,
    **sample_options: Any,
) -> FPPath:
    """Mean squared Fokker–Planck residual at every grid time of an ODE sampling run.

    Samples ``ds.sample(model, x_T, solver, nfe, ...)`` and, at each grid time t_i with σ > 0
    (the clean end of ``final="standard"`` is skipped; so is a time whose f_t or g_t² is not
    finite, as flow matching's t = 1), evaluates :func:`fp_residual` at the state x_{t_i} the
    solver reached. In the log-density form it averages R̂² − se² (R̂ the Hutchinson mean, se
    its standard error; se = 0 for the exact Laplacian), which is unbiased for R².

    Args:
        model: the Denoiser that samples (and, without ``log_density``, whose score is checked).
        x_T: the starting noise, (B, ...).
        solver, nfe: as :func:`~diffsolve.sample`; ``sample_options`` go to it too.
        log_density, method, probes, generator, cond, time_derivative: as :func:`fp_residual`.
        chunk: residual batch size (memory); default the whole batch.

    Returns:
        :class:`FPPath`.
    """
    from .sample import sample

    states: list[Tensor] = [x_T.detach().clone()]

    def keep(i: int, xi: Tensor, state: Any) -> None:
        states.append(xi.detach().clone())

    with torch.no_grad():
        _, info = sample(
            model, x_T, solver, nfe, cond=cond, callback=keep, return_info=True, **sample_options
        )
    process: GaussianProcess = model.process
    times = info.times.to(torch.float64)
    out_t: list[float] = []
    out_r2: list[float] = []
    out_se: list[float] = []
    out_scale: list[float] = []
    for ti, xi in zip(times.tolist(), states):
        if ti < process.t_min - 1e-12 or ti <= 0.0 or float(process.sigma(ti)) <= 0.0:
            continue
        f, g2 = float(process.drift_coef(ti)), float(process.diffusion_sq(ti))
        if not (torch.isfinite(torch.tensor([f, g2])).all()):
            continue
        n = xi.shape[0]
        step = chunk or n
        vals, scales = [], []
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            sub = {k: _take(c, torch.arange(n)[sl], n) for k, c in (cond or {}).items()}
            r, se, sc = _evaluate(
                model, xi[sl], ti, log_density, method, probes, generator, sub, time_derivative
            )
            r = r * r - se * se if log_density is not None else r
            vals.append(r.detach().to(torch.float64))
            scales.append(sc.detach().to(torch.float64))
        v = torch.cat(vals)
        out_t.append(ti)
        out_r2.append(float(v.mean()))
        out_se.append(float(v.std() / n**0.5) if n > 1 else 0.0)
        out_scale.append(float(torch.cat(scales).mean()))
    f64 = torch.float64
    return FPPath(
        torch.tensor(out_t, dtype=f64),
        torch.tensor(out_r2, dtype=f64),
        torch.tensor(out_se, dtype=f64),
        torch.tensor(out_scale, dtype=f64),
        int(info.nfe),
    )


# -- the two forms --------------------------------------------------------------------------------
def _probes(p: int, b: int, dim: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """(P, B, D) Rademacher probes (drawn on the CPU so a generator fixes them anywhere)."""
    v = torch.randint(0, 2, (p, b, dim), generator=generator, dtype=torch.int8)
    return (2 * v - 1).to(device=x.device, dtype=x.dtype)


def _coefs(process: GaussianProcess, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """f_t and g_t² at times t (any shape), in like's dtype and device."""
    f = process.drift_coef(t).to(device=like.device, dtype=like.dtype)
    g2 = process.diffusion_sq(t).to(device=like.device, dtype=like.dtype)
    return f, g2


def _scalar_form(
    process: GaussianProcess, log_density: LogDensity, x: Tensor, tv: Tensor, v: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-probe estimates of R, shape (P, B) (P = 1 for the exact Laplacian), and ∂_t u."""
    b, dim = x.shape[0], x[0].numel()
    xf = x.detach().reshape(b, dim).clone().requires_grad_(True)
    t = tv.to(device=x.device, dtype=x.dtype).clone().requires_grad_(True)
    u = log_density(xf.reshape(x.shape), t)
    if u.shape != (b,):
        raise ValueError(f"log_density must return shape ({b},), got {tuple(u.shape)}")
    gx, gt = torch.autograd.grad(u.sum(), (xf, t), create_graph=True, allow_unused=True)
    if gx is None:
        raise ValueError("log_density does not depend on x")
    gt = torch.zeros_like(t) if gt is None else gt
    f, g2 = _coefs(process, tv, xf)
    common = gt + f * dim + f * (xf * gx).sum(1) - 0.5 * g2 * (gx * gx).sum(1)
    if v is None:
        lap = _divergence_exact(gx, xf, create_graph=False)
        return (common - 0.5 * g2 * lap).detach()[None], gt.detach()
    quad = []
    for vk in v:
        (hv,) = torch.autograd.grad(gx, xf, grad_outputs=vk, retain_graph=True)
        quad.append((hv * vk).sum(1))
    return (common[None] - 0.5 * g2 * torch.stack(quad)).detach(), gt.detach()


def _score_form(
    model: Any,
    x: Tensor,
    t: float,
    v: Tensor | None,
    cond: Mapping[str, Any],
    time_derivative: str,
) -> tuple[Tensor, Tensor]:
    """Per-probe residual vectors r̂, shape (P, B, D) (P = 1 for the exact divergence), and
    ∂_t s (B, D)."""
    process: GaussianProcess = model.process
    b, dim = x.shape[0], x[0].numel()
    xf = x.detach().reshape(b, dim).clone().requires_grad_(True)
    dsdt = None
    if time_derivative == "autograd" and _differentiable(model):
        tt = as_time(t).clone().requires_grad_(True)
        s, reached = _score_t(model, xf, x.shape, tt, cond)
        if reached:  # ∂s/∂t as a JVP from two reverse passes: d/dw [wᵀ(∂s/∂t)] = ∂s/∂t
            w = torch.zeros_like(s, requires_grad=True)
            (gw,) = torch.autograd.grad(s, tt, grad_outputs=w, create_graph=True)
            (dsdt,) = torch.autograd.grad(gw, w, retain_graph=True)
    else:
        s = _score_plain(model, xf, x.shape, t, cond)
    if dsdt is None:
        dsdt = _central(model, xf.detach(), x.shape, t, cond)
    f, g2 = _coefs(process, as_time(t), xf)
    w = (f * xf - g2 * s).detach()
    (jtw,) = torch.autograd.grad(s, xf, grad_outputs=w, retain_graph=True)
    common = (dsdt + f * s + jtw).detach()
    if v is None:
        div = _divergence_exact(s, xf, create_graph=True)
        (gdiv,) = torch.autograd.grad(div.sum(), xf)
        return (common - 0.5 * g2 * gdiv)[None], dsdt.detach()
    out = []
    for k, vk in enumerate(v):
        (jv,) = torch.autograd.grad(s, xf, grad_outputs=vk, create_graph=True)
        last = k == len(v) - 1
        (gdiv,) = torch.autograd.grad((jv * vk).sum(), xf, retain_graph=not last)
        out.append(common - 0.5 * g2 * gdiv)
    return torch.stack(out), dsdt.detach()


def _squared_norm(est: Tensor) -> tuple[Tensor, Tensor]:
    """‖r‖² and its standard error from per-probe vectors (P, B, D): exact for P = 1, else the
    unbiased U-statistic with a jackknife error."""
    p = est.shape[0]
    if p == 1:
        val = (est[0] ** 2).sum(1)
        return val, torch.zeros_like(val)
    total = est.sum(0)
    sq = (est**2).sum(2)  # (P, B)
    tot2, sq_sum = (total**2).sum(1), sq.sum(0)
    u = (tot2 - sq_sum) / (p * (p - 1))
    # leave-one-out U-statistics: Σ_{k≠l, k,l≠i} = ‖T − r_i‖² − (Σ‖r‖² − ‖r_i‖²)
    loo_t = ((total[None] - est) ** 2).sum(2)
    loo = (loo_t - (sq_sum[None] - sq)) / ((p - 1) * (p - 2)) if p > 2 else None
    if loo is None:
        return u, torch.full_like(u, float("nan"))
    se = ((p - 1) / p * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()
    return u, se


# -- helpers -------------------------------------------------------------------------------------
def _divergence_exact(field: Tensor, xf: Tensor, *, create_graph: bool) -> Tensor:
    """Σ_i ∂field_i/∂x_i by D reverse passes, shape (B,)."""
    div = torch.zeros(field.shape[0], dtype=field.dtype, device=field.device)
    for i in range(field.shape[1]):
        (gi,) = torch.autograd.grad(field[:, i].sum(), xf, retain_graph=True, create_graph=True)
        div = div + gi[:, i]
    return div if create_graph else div.detach()


def _differentiable(model: Any) -> bool:
    """Whether the score can be formed with t as a graph input (a plain Denoiser)."""
    return isinstance(model, Denoiser)


def _score_t(
    model: Denoiser, xf: Tensor, shape: torch.Size, t: Tensor, cond: Mapping[str, Any]
) -> tuple[Tensor, bool]:
    """s = −ε̂/σ_t with t a graph input; also whether the network output depends on t."""
    p = model.process
    b = xf.shape[0]
    in_dtype = torch.float64 if xf.dtype == torch.float64 else torch.float32
    t_in = torch.as_tensor(model.time_map(t)).to(device=xf.device, dtype=in_dtype).expand(b)
    da: Tensor | float = 0.0
    dsig: Tensor | float = 0.0
    if model.prediction == "velocity":  # the conversion reads dα/dt, dσ/dt: live in t too
        (da,) = torch.autograd.grad(p.alpha(t), t, create_graph=True)
        (dsig,) = torch.autograd.grad(p.sigma(t), t, create_graph=True)
    alpha, sigma = p.alpha(t), p.sigma(t)
    point = EvalPoint(float(t.detach()), alpha, sigma, da, dsig, t_in)  # type: ignore[arg-type]
    x = xf.reshape(shape)
    out = model.raw(x, point, **cond)
    (probe,) = torch.autograd.grad(out.sum(), t, retain_graph=True, allow_unused=True)
    reached = probe is not None
    out = out.to(xf.dtype)
    eps = Prediction.lazy(x, out, point, model.prediction).eps
    s = -eps.reshape(b, -1) / sigma.to(device=xf.device, dtype=xf.dtype)
    return s, reached


def _score_plain(
    model: Any, xf: Tensor, shape: torch.Size, t: float, cond: Mapping[str, Any]
) -> Tensor:
    """s = −ε̂/σ_t through the model's own call (t a number; differentiable in x only)."""
    pred = model(xf.reshape(shape), t, **cond)
    sigma = float(model.process.sigma(t))
    return -pred.eps.reshape(xf.shape[0], -1).to(xf.dtype) / sigma


def _central(
    model: Any, xf: Tensor, shape: torch.Size, t: float, cond: Mapping[str, Any]
) -> Tensor:
    """∂s/∂t by a central difference with step h = 1e-4·t (float32) or 1e-5·t (float64)."""
    h = (1e-5 if xf.dtype == torch.float64 else 1e-4) * t
    with torch.no_grad():
        hi = _score_plain(model, xf, shape, t + h, cond)
        lo = _score_plain(model, xf, shape, t - h, cond)
    return (hi - lo) / (2 * h)


def _take(c: Any, idx: Tensor, b: int) -> Any:
    """The rows ``idx`` of a per-sample conditioning tensor (others pass through)."""
    if isinstance(c, Tensor) and c.ndim >= 1 and c.shape[0] == b:
        return c[idx.to(c.device)]
    return c
