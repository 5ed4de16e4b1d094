"""The one sampling loop."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .auto import is_guided, recommend
from .denoiser import Denoiser, DenoiserWrapper, EvalPoint, Prediction
from .integrate import StepDiagnostics
from .plan import FINALS, make_plan
from .processes.base import GaussianProcess
from .schedules import Schedule
from .solvers._expint import extrapolate_to_zero
from .solvers.base import Solver, State, get_solver

__all__ = ["FINALS", "NonFiniteError", "SampleInfo", "continue_to_zero", "sample"]


class NonFiniteError(FloatingPointError, ValueError):
    """The network returned NaN or Inf; the message names the step and the time."""


@dataclass(frozen=True)
class SampleInfo:
    """What a run did: network calls, the grid (float64, clean end as t = 0), wall time."""

    nfe: int
    times: Tensor
    seconds: float
    solver: Solver
    final: str
    steps: int
    log_weights: Tensor | None = None  # steer=FK: final log-weights, normalised per block
    ess: Tensor | None = None  # steer=FK: effective sample size per step and block
    diagnostics: StepDiagnostics | None = None  # adaptive solvers: per accepted step

    @property
    def step_sizes(self) -> Tensor | None:
        """Adaptive solvers: |h| of every accepted step (float64, in the solver's variable)."""
        d = self.diagnostics
        return None if d is None else torch.tensor(d.step_sizes, dtype=torch.float64)

    @property
    def local_errors(self) -> Tensor | None:
        """Adaptive solvers: the scaled embedded error estimate EEst of every accepted step
        (differentiable with ``grad="backprop"``)."""
        d = self.diagnostics
        return None if d is None or not d.local_errors else torch.stack(d.local_errors)

    @property
    def stiffness(self) -> Tensor | None:
        """``rk45``: the stiffness estimate of every accepted step (None for other solvers)."""
        d = self.diagnostics
        return None if d is None or not d.stiffness else torch.stack(d.stiffness)


class _Evaluator:
    """The model as the loop hands it to a solver: counts calls and watches for NaN/Inf.

    What is watched is each call's network output (``Prediction.sources``; both views only for
    an eager prediction built by a wrapper), so a view no solver reads is neither formed nor
    checked. Finiteness is accumulated on the device and read once after the loop (no host sync
    per step); ``check_finite="step"`` reads it after every call instead, stopping at once.
    """

    def __init__(self, model: Any, cond: Mapping[str, Any], check: str | bool, keep: int):
        self.model, self.cond, self.check = model, dict(cond), check
        self.nfe = 0
        self.step = 0
        self._flags: list[Tensor] = []  # one probe per call: 0 if finite, else NaN
        self._where: list[tuple[int, float]] = []
        self._zeros: Tensor | None = None  # the probe's zero vector, reused across calls
        self.recent: deque[tuple[float, Tensor]] = deque(maxlen=keep) if keep else deque(maxlen=1)
        self._keep = keep
        self._points: dict[float, EvalPoint] = {}
        self.plan: Any = None
        # (x, t, prediction) already computed for exactly that tensor and time (SVDD's kept
        # candidate): the solver's next call on it is answered without a network call
        self.cached: tuple[Tensor, float, Prediction] | None = None

    def prefetch(self, ts: Tensor, like: Tensor) -> None:
        """Build the grid's evaluation points in one vectorised call where the model is a plain
        :class:`~diffsolve.Denoiser`, or wrappers that take its points as they are (wrappers that
        map times keep their own ``point``); off-grid points (intermediate stages) are still
        built one by one."""
        inner = self.model
        while isinstance(inner, DenoiserWrapper) and type(inner).point is DenoiserWrapper.point:
            inner = inner.model  # CFG, thresholding, ...: the wrapped model's points unchanged
        if type(inner) is Denoiser and ts.numel():
            self._points = {p.t: p for p in inner.points(ts, like)}

    def points(self, ts: Tensor, like: Tensor) -> list[EvalPoint]:
        many = getattr(self.model, "points", None)  # user models may offer only ``point``
        return many(ts, like) if many is not None else [self.model.point(t, like) for t in ts]

    def point(self, t: float | Tensor, like: Tensor) -> EvalPoint:
        hit = self._points.get(float(t))
        if hit is not None and hit.t_in.shape[0] == like.shape[0]:
            return hit
        return self.model.point(t, like)

    def __call__(self, x: Tensor, t: EvalPoint) -> Prediction:
        hit = self.cached
        if hit is not None and x is hit[0] and t.t == hit[1]:
            return hit[2]
        pred = self.model(x, t, **self.cond)
        self.nfe += 1
        if self.check:
            first, *more = pred.sources  # the output itself, before any view is formed
            probe = self._probe(first)
            for v in more:  # an eager prediction from a wrapper: both views
                probe = probe + self._probe(v)
            if self.check == "step":
                if not bool(probe == 0):
                    self._raise(self.step, t.t)
            else:
                self._flags.append(probe)
                self._where.append((self.step, t.t))
        if self._keep:
            self.recent.append((t.rho, pred.x0))
        return pred

    def _probe(self, v: Tensor) -> Tensor:
        """⟨v, 0⟩, a 0-d tensor on v's device: 0 when every element of v is finite, NaN when one
        is NaN or ±Inf (0·∞ = NaN). A sum of zeros cannot overflow, so huge finite outputs pass
        (a float32 Σv would overflow; a float64 one copies v first), and a BLAS dot against a
        kept zero vector reads v once and allocates nothing (cheaper than Σ(0·v) or
        isfinite(v).all(), which write a temporary of v's size)."""
        f = v.reshape(-1)
        if f.requires_grad:
            f = f.detach()  # no autograd graph kept alive by the flags
        n, z = f.numel(), self._zeros
        if z is None or z.numel() < n or z.dtype != f.dtype or z.device != f.device:
            z = self._zeros = torch.zeros(n, dtype=f.dtype, device=f.device)
        return torch.dot(f, z if z.numel() == n else z[:n])

    def _raise(self, step: int, t: float) -> None:
        raise NonFiniteError(f"network output is NaN/Inf at step {step} (t={t:.6g})")

    def raise_if_nonfinite(self) -> None:
        if self._flags:
            ok = torch.stack(self._flags) == 0  # (promotes mixed float dtypes)
            if not bool(ok.all()):  # the run's single host sync
                first = int((~ok).nonzero()[0])
                self._raise(*self._where[first])


def _check_cond(x: Tensor, cond: Mapping[str, Any], sample_shape: tuple[int, ...] | None) -> None:
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise ValueError(
            f"x_T has per-sample shape {tuple(x.shape[1:])}, "
            f"the model expects {tuple(sample_shape)}"
        )
    for k, v in cond.items():
        if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] != x.shape[0]:
            raise ValueError(
                f"conditioning {k!r} has batch {v.shape[0]} but x_T has batch {x.shape[0]}"
            )


def continue_to_zero(recent: deque[tuple[float, Tensor]], order: int, x: Tensor) -> Tensor:
    """``final="extrapolate"``: x̂_0 continued to σ = 0 from the ``order`` newest evaluations
    at distinct noise levels ρ (``recent``: (ρ, x̂_0) oldest first) by the even fit
    {1, ρ², ρ⁴} of :func:`~diffsolve.solvers._expint.extrapolate_to_zero`, or x if there is
    one."""
    # newest evaluations first, one per distinct noise level (Heun re-evaluates at a grid σ)
    rhos: list[float] = []
    x0s: list[Tensor] = []
    for rho, x0 in reversed(recent):
        if all(abs(rho - r) > 1e-12 * max(rho, r) for r in rhos):
            rhos.append(rho)
            x0s.append(x0)
        if len(rhos) == order:
            break
    return extrapolate_to_zero(rhos, x0s) if len(rhos) > 1 else x


def sample(
    model: Any,
    x: Tensor,
    solver: str | Solver = "dpmpp_2m",
    nfe: int | None = None,
    *,
    steps: int | None = None,
    times: Tensor | None = None,
    schedule: str | Schedule | None = None,
    final: str | None = None,
    cond: Mapping[str, Any] | None = None,
    callback: Callable[[int, Tensor, State], tuple[Tensor, State] | None] | None = None,
    check_finite: bool | str = True,
    noise: Any = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    return_info: bool = False,
    cuda_graph: bool = False,
    steer: Any = None,
    grad: Any = None,
    **options: Any,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """Integrate from x at t_max to the data end with ``solver``.

    Args:
        model: a :class:`~diffsolve.Denoiser` (or a wrapper such as :class:`~diffsolve.CFG`).
        x: x_T, shape (B, ...), in the process's own scale (``ds.prior``).
        solver: a registered name (``ds.solvers()``), a solver object, or ``"auto"``: the
            solver, schedule and end rule recommended for ``nfe``, the process and whether
            guidance is on (:func:`diffsolve.auto.recommend`; an explicit ``schedule`` or
            ``final`` still wins).
        nfe: budget of network calls, met exactly. Alternatives: ``steps`` (solver steps on the
            schedule) or ``times`` (explicit decreasing process times, all evaluated).
        schedule: name (``ds.schedules()``) or object; default: the solver's own default.
        final: ``"standard"`` (default) — the last step returns x̂_0 at the last evaluated time (as
            k-diffusion, EDM and diffusers' ``final_sigmas_type="zero"`` do); ``"extrapolate"`` —
            continue the ODE to σ = 0 by extrapolating the last x̂_0's in σ/α to 0 (no extra
            NFE); ``"tmin"`` — stop at the last grid time with σ > 0.
        cond: keyword arguments for the network (batch-first tensors), e.g. class labels.
            A model offering ``check_cond(x, cond)`` (the shipped networks do, through any
            wrapper) has it checked before the first call: unknown keys, labels out of range.
        callback: ``callback(i, x, state)`` after every step. If it returns a tuple
            ``(x, state)`` the loop continues from that pair (the steering hook; any other
            return value is ignored): e.g. particle resampling returns
            ``(x[idx], state.select(idx))``. Conditioning tensors in ``cond`` and per-sample
            noise seeds are not reindexed; the batch size must stay the same.
        check_finite: raise :class:`NonFiniteError` naming the step and t if the network returns
            NaN/Inf (``True``: checked once after the loop; ``"step"``: after every call;
            ``False``: off). Unless off, NaN/Inf in x itself raise ``ValueError`` before any
            call.
        noise: a noise source for stochastic solvers (:class:`~diffsolve.noise.Noise`: a
            seeded :class:`~diffsolve.noise.NoiseSource` (``offset=``/``indices=`` or
            per-sample seeds keep samples independent of the batch split, except with ``pc``'s
            default ``snr_norm="batch"``, whose Langevin step size is averaged over the batch;
            ``snr_norm="sample"`` is split-exact), a
            :class:`~diffsolve.noise.BrownianTree`, or your own subclass of ``Noise``).
        generator: shorthand for ``noise=NoiseSource.from_generator(generator)``: one draw
            from the generator (at set-up) seeds the counter-based noise; a list of generators
            gives one seed per sample. None (and no ``noise``): one draw from torch's global RNG.
        return_info: also return a :class:`SampleInfo`.
        cuda_graph: capture the loop (solver init, every step, the end rule) as one CUDA graph
            for these shapes and replay it (:mod:`diffsolve.cuda_graph`): x on a CUDA device,
            no ``callback``, ``check_finite`` not ``"step"``; later calls with the same model,
            solver, grid, shapes and noise replay the cached graph. Equal to the eager loop.
        steer: a particle method run between the steps, e.g. ``ds.FK(reward, particles=K)``
            (:mod:`diffsolve.guidance.steering`): the batch is the population, blocks of K
            particles per prompt; ``info.log_weights`` and ``info.ess`` report it.
        grad: ``None`` (default): autograd as the caller's mode has it. ``"backprop"``:
            record the graph through every step (memory grows with the steps).
            ``"adjoint"`` (or ``ds.Adjoint(substeps=, params=)``): the sample's backward pass
            solves the adjoint ODE
            (:mod:`diffsolve.adjoint`, AdjointDPM): memory flat in the steps, gradients to x_T,
            conditioning tensors that require grad and the network's parameters; a
            deterministic solver, ``final`` ``"standard"`` or ``"tmin"``, no ``steer``.
        **options: solver options (validated against the solver's declared options).

    Returns:
        The sample (shape and dtype of x), and the info if ``return_info``.
    """
    cond = dict(cond or {})
    process: GaussianProcess = model.process
    if isinstance(solver, str) and solver == "auto":
        if nfe is None:
            raise ValueError("solver='auto' picks the solver from the budget: give nfe=")
        if options:
            raise ValueError(
                f"solver='auto' takes no solver options (got {sorted(options)}); name a solver "
                "to set options"
            )
        rec = recommend(process, nfe, guided=is_guided(model))
        solver = rec.solver
        schedule = schedule if schedule is not None else rec.schedule
        final = final if final is not None else rec.final
    solver_obj = get_solver(solver, **options)
    final = final if final is not None else (solver_obj.planned_final or "standard")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of shape (B, ...)")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    if final not in FINALS:
        raise ValueError(f"unknown final {final!r}; valid: {', '.join(FINALS)}")
    _check_cond(x, cond, getattr(model, "sample_shape", None))
    inner = model
    while isinstance(inner, DenoiserWrapper):  # wrappers pass cond on to the network unchanged
        inner = inner.model
    check_net_cond = getattr(inner, "check_cond", None)
    if callable(check_net_cond):  # the network's own rules (shipped nets: keys, label range)
        check_net_cond(x, cond)
    if check_finite and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x_T has {bad} NaN/Inf value(s) of {x.numel()}; no network call made")
    xc = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
    plan = make_plan(
        model, xc, solver_obj, nfe=nfe, steps=steps, times=times, schedule=schedule, final=final
    )

    from .adjoint import Adjoint

    if isinstance(grad, str) and grad == "adjoint":
        grad = Adjoint()
    if not (
        grad is None or isinstance(grad, Adjoint) or (isinstance(grad, str) and grad == "backprop")
    ):
        raise ValueError(
            f"grad must be None, 'adjoint', 'backprop' or ds.Adjoint(...), got {grad!r}"
        )
    if isinstance(grad, Adjoint):
        return _sample_adjoint(grad,
            model, x, xc, solver_obj, plan, cond, steer, cuda_graph, callback, final,
            dict(nfe=nfe, steps=steps, times=times, schedule=schedule, final=final,
                 check_finite=check_finite, noise=noise, generator=generator),
            return_info,
        )  # fmt: skip
    if steer is not None and cuda_graph:
        raise ValueError("steer= reindexes particles between steps: not with cuda_graph=True")
    stepper = steer is not None and hasattr(steer, "check_solver")  # SVDD: replaces the step
    if stepper:
        steer.check_solver(solver_obj)
        if final == "extrapolate":
            raise ValueError("steer=SVDD: final='extrapolate' is not supported (candidate batch)")
    run = steer.start(xc, plan.steps) if steer is not None else None
    start = time.perf_counter()
    keep = 6 if final == "extrapolate" else 0  # FK scores its own call, not the history
    ev = _Evaluator(model, cond, check_finite, keep=keep)
    mu = process.offset(cond)  # a path in y = x − μ (MeanReverting): solvers run on y
    if mu is not None:
        mu = mu.to(device=xc.device, dtype=xc.dtype)
        xc = xc - mu
    if noise is None and solver_obj.stochastic:
        from .noise import NoiseSource

        noise = NoiseSource.from_generator(generator)
    if stepper:
        assert run is not None
        noise = steer.wrap_noise(noise, xc.shape[0])
        run.offset = mu
    ev.plan = plan
    if plan.rules is None:  # solvers off the engine look their grid points up one by one
        ev.prefetch(plan.t[:-1] if plan.clean_end else plan.t, xc)

    last_state: list[Any] = [None]

    def loop(xc: Tensor, ev: _Evaluator, noise: Any) -> Tensor:  # what cuda_graph captures
        state = solver_obj.init(xc, plan, ev, noise)
        for i in range(plan.steps):
            ev.step = i
            if stepper:
                assert run is not None
                xc, state = run.step(solver_obj, xc, i, state, ev, noise)
            else:
                xc, state = solver_obj.step(xc, i, state, ev)
            if callback is not None:
                replaced = callback(i, xc, state)
                if isinstance(replaced, tuple):  # the steering hook; other values are ignored
                    xc, state = replaced
            if not stepper and run is not None and i < plan.steps - 1:  # the last: below
                # x̂0 of the new particles at t_{i+1}: the next step's own first call, kept
                # (reindexed with the particles) so that step reuses it
                t_next = float(plan.t[i + 1])
                pred = ev(xc, ev.point(t_next, xc))
                xc, state, idx = run.after_step(i, xc, state, pred.x0)
                if idx is not None:
                    pred = Prediction(pred.x0[idx], pred.eps[idx])
                    ev.recent = type(ev.recent)(
                        ((r, v[idx]) for r, v in ev.recent), ev.recent.maxlen
                    )
                ev.cached = (xc, t_next, pred)
        if final == "extrapolate":
            xc = continue_to_zero(ev.recent, min(max(solver_obj.order, 2), 3), xc)
        last_state[0] = state
        return xc

    if cuda_graph:  # captured once per configuration and shapes, then replayed
        from .cuda_graph import replay_loop

        xc = replay_loop(loop, xc, ev, noise, plan=plan, solver=solver_obj, callback=callback)
    elif grad is not None:  # "backprop"
        with torch.enable_grad():
            xc = loop(xc, ev, noise)
    else:
        xc = loop(xc, ev, noise)
    ev.raise_if_nonfinite()
    log_w = ess = None
    if run is not None and not stepper:
        xc, log_w = run.finish(xc if mu is None else xc + mu)
        xc = xc if mu is None else xc - mu
        ess = torch.stack(run.ess)
    out = (xc if mu is None else xc + mu).to(x.dtype)
    if not return_info:
        return out
    info = SampleInfo(
        nfe=ev.nfe,
        times=plan.t,
        seconds=time.perf_counter() - start,
        solver=solver_obj,
        final=final,
        steps=plan.steps,
        log_weights=log_w,
        ess=ess,
        diagnostics=getattr(last_state[0], "diagnostics", None),
    )
    return out, info


def _sample_adjoint(
    options: Any,
    model: Any,
    x: Tensor,
    xc: Tensor,
    solver: Solver,
    plan: Any,
    cond: dict[str, Any],
    steer: Any,
    cuda_graph: bool,
    callback: Any,
    final: str,
    run_args: dict[str, Any],
    return_info: bool,
) -> Tensor | tuple[Tensor, SampleInfo]:
    """``sample(..., grad="adjoint")``: the checks, then :func:`diffsolve.adjoint.adjoint_sample`
    around the ordinary loop."""
    from .adjoint import adjoint_sample

    if solver.stochastic:
        raise ValueError(
            f"grad='adjoint' solves the probability-flow ODE backward: {solver.name!r} is "
            "stochastic here; use a deterministic solver or grad='backprop'"
        )
    if steer is not None or cuda_graph:
        raise ValueError("grad='adjoint' takes no steer= and no cuda_graph=True")
    if final not in ("standard", "tmin"):
        raise ValueError(f"grad='adjoint' needs final 'standard' or 'tmin', got {final!r}")
    if model.process.offset(cond) is not None:
        raise ValueError("grad='adjoint' is not available for a mean-reverting path (x − μ)")
    infos: list[SampleInfo] = []

    def run(x_T: Tensor, grab: Callable[[int, Tensor, State], None]) -> Tensor:
        def both(i: int, xi: Tensor, state: State) -> Any:
            grab(i, xi, state)
            return callback(i, xi, state) if callback is not None else None

        out, info = sample(
            model, x_T.to(x.dtype), solver, cond=cond, callback=both, return_info=True,
            **run_args,
        )  # fmt: skip
        infos.append(info)
        return out.to(xc.dtype)

    out = adjoint_sample(run, model, xc, cond, plan.t, plan.clean_end, options).to(x.dtype)
    return (out, infos[-1]) if return_info else out
