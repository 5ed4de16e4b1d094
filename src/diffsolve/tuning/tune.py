"""``ds.tune``: calibrate a few-step sampler on the user's model and noise."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..auto import is_guided
from ..processes.vp import VPDiscrete
from ..schedules import Karras, LogSNR, Schedule, get_schedule
from .bespoke import BespokeStudent, bespoke_steps
from .search import evolve, gits_grid
from .student import Student
from .teacher import TEACHER_RTOL, teacher
from .tuned import Tuned

__all__ = ["METHODS", "TuningError", "tune"]

METHODS = {
    "auto": "learned grid, call times and weights, alternating (LD3 times, S4S weights, twice)",
    "ld3": "grid and call times by gradient through the differentiable sampler (LD3, 2025)",
    "s4s": "multistep weights by gradient on a fixed grid (S4S, Frankel et al. 2025)",
    "gits": "grid by dynamic programming on one-step costs (GITS, Chen et al. 2024)",
    "autodiffusion": "grid by evolutionary search (AutoDiffusion, Li et al. 2023)",
    "usf": "per-step order and corrector searched, then the grid (USF/S³, Liu et al. 2023)",
    "dc": "UniPC with DC-Solver's compensation ratios, searched then refined (Zhao et al. 2024)",
    "v3": "DPM-Solver-v3: empirical statistics of the model's own samples (Zheng et al. 2023)",
    "bespoke": "a learned scale-time transformation of an RK1/RK2 base (Shaul et al. 2024)",
}


class TuningError(RuntimeError):
    """Tuning stopped: a non-finite or diverging loss (nothing is returned or saved)."""


# the gradient phases: iterations per phase (at most), the early stop (not before iteration
# _MIN_ITERS, after _PATIENCE iterations in a row without a 0.1 % better validation score; on
# digits-vp at NFE 10 the grid phases find their best iterate by iteration ~30 and then
# oscillate, the weight phases creep by < 0.1 % an iteration after ~40; stopping after 15
# from the start cost digits-flow at NFE 5 a fifth of its gain) and the weights' learning
# rate as a fraction of ``lr``
_ITERS = 60
_MIN_ITERS = 30
_PATIENCE = 20
_WEIGHT_LR = 0.2
# the methods whose grid phases also learn where each call evaluates the network (LD3's
# second set of times, GAS's model-time offsets)
_OFFSET_METHODS = ("auto", "ld3")


def _loss(out: Tensor, target: Tensor) -> Tensor:
    """Relative mean squared error to the teacher (its square root is the relative RMSE)."""
    return (out - target).pow(2).mean() / target.pow(2).mean()


def _objective(out: Tensor, target: Tensor) -> Tensor:
    """The robust objective of the second round of ``auto`` and ``bespoke`` (the other
    gradient methods descend :func:`_loss`): the validation score squared, differentiable —
    the mean over samples of √(e_i / n̄), to the fourth power (e_i: a sample's error, n̄: the
    mean per-sample norm of the target). A trajectory that ends near another mode weighs as
    the square root of its error, not as its square (the first round's :func:`_loss`) nor as
    the error itself (this objective until stop 32, which let the broad or far-off samples
    decide the grid where most samples are tight: docs/tuning.md, "Stop 32")."""
    err = (out - target).reshape(out.shape[0], -1).norm(dim=1)
    per = err / target.reshape(target.shape[0], -1).norm(dim=1).mean()
    # an exact sample has no gradient rather than √'s infinite one at 0
    return per.clamp_min(torch.finfo(per.dtype).tiny).sqrt().mean().pow(4)


def _robust(out: Tensor, target: Tensor) -> float:
    """The validation score, (mean_i √(e_i / n̄))²: an error scale that follows the bulk of the
    trajectories. Squared errors of a few hundred trajectories are dominated by the one or two
    that end near another mode, which no grid fixes, and even the mean error by the samples
    far from the data's typical scale; this score still sees both."""
    return math.sqrt(float(_objective(out, target)))


def _former_auto(process: Any, nfe: int) -> Schedule | None:
    """``auto``'s grid for this budget as it was until stop 31 (None where it is today's):
    uniform λ stopped above σ_min on a continuous-time diffusion at NFE ≥ 6 (σ/α 0.05 to NFE 11,
    0.02 beyond), and on a discrete-time process Karras ρ = 12 over [0.1155, 12.2] at NFE ≤ 4.
    The untuned rule moved to σ_min (and to uniform λ) to be robust on fine-scale data; where
    the data are smooth at those scales the former grid is the better start, and tuning moves
    its ends anyway."""
    from ..auto import _bounds, _flow_like, recommend

    top = getattr(recommend(process, nfe).schedule, "sigma_max", None)
    if isinstance(process, VPDiscrete):
        return Karras(rho=12.0, **_bounds(process, 0.1155, top)) if nfe <= 4 else None
    if _flow_like(process) or nfe <= 5:
        return None
    return LogSNR(**_bounds(process, 0.05 if nfe <= 11 else 0.02, top))


def _initial_schedules(process: Any, nfe: int) -> list[tuple[str, Any]]:
    """Candidate starting schedules: the standard ones (the peers' defaults among them: a
    grid is scored by one pass over the calibration noise, so trying them all costs little,
    and on some processes the best start is a peer's discrete spacing), the ``auto`` rule's
    for this budget and its former one (:func:`_former_auto`)."""
    from ..auto import recommend

    names = ("logsnr", "karras", "uniform", "quadratic", "trailing", "linspace")
    out = [
        *((name, get_schedule(name)) for name in names),
        ("auto", get_schedule(recommend(process, nfe).schedule)),
    ]
    former = _former_auto(process, nfe)
    return out if former is None else [*out, ("former-auto", former)]


def _initial_grids(process: Any, nfe: int) -> list[tuple[str, Tensor]]:
    """Candidate starting grids (nfe process times each) on :func:`_initial_schedules`; a
    schedule that does not apply to the process (a discrete spacing on a continuous path) or
    that repeats a time at this size is skipped."""
    return [
        (name, t)
        for name, sched in _initial_schedules(process, nfe)
        if (t := _grid_or_none(sched, process, nfe)) is not None
    ]


def _grid_or_none(sched: Any, process: Any, n: int) -> Tensor | None:
    try:
        t = sched(process, n)
    except (ValueError, TypeError):
        return None
    return t if bool((t[1:] < t[:-1]).all()) else None


def _extrapolation(process: Any, t: Tensor, width: int) -> Tensor:
    """The weights of ``final="extrapolate"`` on the last ``width`` x̂_0's (newest first): the
    fit in ρ = σ/α with the even basis {1, ρ², ρ⁴} evaluated at ρ = 0 (as
    :func:`~diffsolve.solvers._expint.extrapolate_to_zero`)."""
    rho = (process.sigma(t) / process.alpha(t)).flip(0)[:width]
    basis = torch.stack([torch.ones_like(rho), rho**2, rho**4][:width], dim=1)
    return torch.linalg.inv(basis)[0]


def _search_decisions(
    s: Student,
    rebuild: Callable[[Student, list[int], list[bool]], Student],
    score: Callable[[Student], float],
    progress: Callable[[str, int, int, float], None] | None,
    sweeps: int = 2,
) -> Student:
    """USF/S³'s per-step search (Liu et al. 2023) by coordinate descent: each step's predictor
    order in 1…min(3, i + 1) and each call's corrector on/off, kept where the calibration loss
    falls. (USF trains a cheap predictor of a configuration's quality because its evaluations
    are FID runs; here a configuration is scored directly by one pass over the calibration
    noise, which is as cheap.)"""
    best, loss = s, score(s)
    n = len(s.orders)
    total, done = sweeps * (2 * n + len(s.correctors)), 0
    for _ in range(sweeps):
        improved = False
        for i in range(n):
            for p in range(1, min(3, i + 1) + 1):
                done += 1
                if p == best.orders[i]:
                    continue
                orders = [*best.orders]
                orders[i] = p
                cand = rebuild(best, orders, best.correctors)
                value = score(cand)
                if value < loss:
                    best, loss, improved = cand, value, True
        for j in range(len(best.correctors)):
            done += 1
            flags = [*best.correctors]
            flags[j] = not flags[j]
            cand = rebuild(best, best.orders, flags)
            value = score(cand)
            if value < loss:
                best, loss, improved = cand, value, True
        if progress is not None:
            progress("decisions", min(done, total), total, loss)
        if not improved:
            break
    return best


def _split(
    x: Tensor, target: Tensor, cond: dict[str, Any], lo: int, hi: int | None
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    return _take(x, target, cond, slice(lo, hi))


def _take(
    x: Tensor, target: Tensor, cond: dict[str, Any], idx: Tensor | slice
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The samples ``idx`` of x, the target and the batch-first tensors of cond."""
    part = {
        k: v[idx] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == x.shape[0] else v
        for k, v in cond.items()
    }
    return x[idx], target[idx], part


def _variance_preserving(process: Any) -> bool:
    t = torch.linspace(process.t_min, process.t_max_finite, 5, dtype=torch.float64)
    return bool(((process.alpha(t) ** 2 + process.sigma(t) ** 2 - 1).abs() < 1e-6).all())


def tune(
    model: Any,
    x_calib: Tensor,
    nfe: int,
    method: str = "auto",
    *,
    cond: Mapping[str, Any] | None = None,
    target: Tensor | None = None,
    order: int = 2,
    corrector: bool = True,
    iters: int | None = None,
    lr: float = 0.05,
    batch: int | None = None,
    validation: float = 0.25,
    rtol: float = TEACHER_RTOL,
    seed: int = 0,
    checkpoint: bool = False,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> Tuned:
    """A solver calibrated on ``model`` for a budget of ``nfe`` calls.

    Args:
        model: a :class:`~diffsolve.Denoiser` or a guidance wrapper of one (tune at the
            guidance scale you sample with: the guided ODE is a different ODE).
        x_calib: prior samples x_T (B, ...), the user's noise, in the process's scale.
        nfe: the budget the tuned solver will spend (its grid has nfe evaluation times; the
            last returns x̂_0, the standard end).
        method: one of :data:`METHODS` (``"auto"``: learned grid and weights, alternating).
            The grid phases of ``auto`` and ``ld3`` also learn where each call after the first
            evaluates the network (LD3's second set of times, GAS's model-time offsets: within
            half a step of its grid point, so the calls stay ordered; ``tuned.call_times``).
        cond: the network's conditioning for x_calib (batch-first), as in ``ds.sample``.
        target: the teacher's endpoints for x_calib, if you have them (else computed with
            ``rk45`` at ``rtol``, ended the standard way, and cached).
        order: the order p of the student's UniP-p / UniC-p rows (≤ 3).
        corrector: whether the student applies UniC after each call (no extra NFE).
        iters: gradient iterations per phase at most (default 60; ``auto`` runs two rounds of
            two phases; from its 30th iteration a phase stops once 20 in a row have not
            bettered its best validation score by 0.1 %) or generations (autodiffusion,
            default 15). The first round of ``auto`` and ``bespoke`` minimises the squared
            error, its second the validation score (mean_i √(e_i / n̄))², e_i a sample's
            error and n̄ the mean norm: the few trajectories that end near another mode than the
            teacher's dominate squared errors and no grid fixes them, while on a network whose
            errors are alike across samples the squared error descends better; each phase
            keeps its best validation iterate, so the second round never undoes the first.
            The starting grids (and ends) are ranked on the robust measure over every
            calibration noise, so the start suits the bulk of the trajectories; ``bespoke``'s
            on the squared error.
        lr: Adam's learning rate on the grid logits (the weight corrections use lr/5).
        batch: calibration samples per gradient iteration (None: every training sample; a
            number: minibatches drawn without replacement, epoch by epoch, from ``seed``:
            faster, less accurate at the larger budgets; docs/tuning.md).
        validation: the fraction of x_calib (its last samples; none below 32 samples) held out
            to choose the iterate kept (early stopping against overfitting).
        rtol: the teacher's tolerance (default 1e-5: its distance to the 1e-6 solution is far
            below a tuned solver's error, at about half the network calls; docs/tuning.md).
        seed: makes the evolutionary search deterministic (the gradient methods are
            deterministic anyway).
        checkpoint: in the gradient phases, recompute each network call's activations in the
            backward pass instead of keeping all N calls' (``torch.utils.checkpoint``): the
            memory of one call's activations instead of N at the cost of one more forward
            pass per call; the same gradients (for a network too large to differentiate
            through N calls at once; ``batch`` cuts the memory too).
        progress: ``progress(phase, i, total, loss)`` after every iteration (the CLI's bar).

    Returns:
        A :class:`~diffsolve.tuning.Tuned` solver: ``ds.sample(model, x_T, solver=tuned)``.
        ``tuned.info`` holds the method, the calibration loss before and after, timings, and
        ``phases``: per gradient phase its name, objective (``squared`` / ``robust``),
        ``iters`` run, the iteration ``kept`` (0: the phase's start) and the validation score
        at its start (``score_start``) and at the kept iterate (``score``; the training
        objective where no validation part is held out).

    Raises:
        ValueError: bad arguments (before any network call).
        TuningError: a non-finite or diverging loss.
    """
    if method not in METHODS:
        raise ValueError(f"unknown tuning method {method!r}; valid: {', '.join(METHODS)}")
    if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 2:
        raise ValueError(f"nfe must be an integer >= 2 to tune, got {nfe!r}")
    if not isinstance(x_calib, Tensor) or not x_calib.is_floating_point() or x_calib.ndim < 2:
        raise ValueError("x_calib must be a floating-point tensor of prior samples (B, ...)")
    if not 0 <= validation < 1:
        raise ValueError(f"validation must be a fraction in [0, 1), got {validation!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if batch is not None and (isinstance(batch, bool) or int(batch) != batch or batch < 1):
        raise ValueError(f"batch must be a positive integer or None, got {batch!r}")
    if not isinstance(checkpoint, bool):
        raise ValueError(f"checkpoint must be True or False, got {checkpoint!r}")
    nfe = int(nfe)
    if method == "v3":
        from .v3 import tune_v3

        return tune_v3(  # type: ignore[return-value]
            model, x_calib, nfe, cond=cond, target=target, order=order, corrector=corrector,
            rtol=rtol, seed=seed, progress=progress,
        )  # fmt: skip
    cond = dict(cond or {})
    if method == "dc":  # its own grid and the teacher's path on it (``target`` is not used)
        from .dc_solver import fit_dc

        return fit_dc(
            model, x_calib, nfe, cond=cond, order=order, corrector=corrector,
            iters=20 if iters is None else iters, rtol=rtol, progress=progress,
        )  # fmt: skip
    process = model.process
    x = x_calib.to(torch.float64) if x_calib.dtype != torch.float64 else x_calib
    start = time.perf_counter()
    if target is None:
        target = teacher(model, x, cond=cond, rtol=rtol)
    if target.shape != x.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match x {tuple(x.shape)}")
    target = target.to(x.dtype)
    t_teacher = time.perf_counter() - start

    t_start = float(process.t_max_finite)
    lam_hi = float(process.lambda_(torch.tensor(process.t_min, dtype=torch.float64)))
    lam_top = float(process.lambda_(torch.tensor(t_start, dtype=torch.float64)))
    lam_lo = lam_top + 0.1 * (lam_hi - lam_top)
    # x_T ~ N(0, I) is nearly a sample a little below t_max on a variance-preserving path
    span = 1.0 if _variance_preserving(process) else 0.0

    # unguided: the output may be a learned combination of the last x̂_0's (a continuation to
    # σ = 0 at no extra call); a guided x̂_0 is never extrapolated
    width = 1 if is_guided(model) else min(3, nfe)

    def rebuild(base: Student, orders: list[int], correctors: list[bool]) -> Student:
        """A student on ``base``'s grid and end with other per-step decisions."""
        with torch.no_grad():
            lam = base.lambdas()
            return Student(
                model, nfe, t_start, lam, lam_hi, lam_lo, order=order, corrector=corrector,
                start_span=span, start_shift=float(lam[0]) - lam_top, final_width=width,
                final_init=base.final_weights(), orders=orders, correctors=correctors,
            )  # fmt: skip

    def student(t: Tensor, end: str = "standard") -> Student:
        lam = process.lambda_(t)
        shift = min(max(float(lam[0]) - lam_top, 0.0), 0.9 * span) if span else 0.0
        init = _extrapolation(process, t, width) if end == "extrapolate" else None
        return Student(
            model, nfe, t_start, lam, lam_hi, lam_lo, order=order, corrector=corrector,
            start_span=span, start_shift=shift, final_width=width, final_init=init,
            time_offsets=method in _OFFSET_METHODS,
        )  # fmt: skip

    # a validation part of the calibration noise picks the iterate kept (early stopping):
    # per-step weights fitted to a few hundred trajectories overfit the hardest of them
    n_val = round(validation * x.shape[0]) if x.shape[0] >= 32 else 0
    cut = x.shape[0] - n_val
    parts = {"train": _split(x, target, cond, 0, cut), "val": _split(x, target, cond, cut, None)}
    parts["all"] = (x, target, cond)

    def loss_of(s: Student | BespokeStudent, part: str = "all") -> float:
        xs, ts, cs = parts[part]
        with torch.no_grad():
            return float(_loss(s(xs, cs), ts))

    def val_score(s: Student | BespokeStudent) -> float:
        xs, ts, cs = parts["val"]
        with torch.no_grad():
            return _robust(s(xs, cs), ts)

    # the best of the standard grids starts every method: (rank, squared error, name, student)
    scored: list[tuple[float, float, str, Any]] = []
    cand: Student | BespokeStudent
    if method == "bespoke":  # its step nodes on each standard grid, the base EI solver there
        kinds = bespoke_steps(nfe, min(order, 2))
        for name, sched in _initial_schedules(process, nfe):
            if (t_nodes := _grid_or_none(sched, process, len(kinds) + 1)) is None:
                continue
            lam = process.lambda_(t_nodes)
            cand = BespokeStudent(model, nfe, t_start, lam, lam_hi, lam_lo, order=min(order, 2))
            loss_c = loss_of(cand)
            scored.append((loss_c, loss_c, f"{name}/standard", cand))
    else:
        xs, ts, cs = parts["all"]
        for name, t in _initial_grids(process, nfe):
            # the two ends of one grid share its network calls: one run scores both
            ends = [student(t, end) for end in ("standard", "extrapolate")[: 1 + (width > 1)]]
            with torch.no_grad():
                hist = ends[0].history(xs, cs)
                for end, c in zip(("standard", "extrapolate"), ends):
                    out_end = ends[0].end(hist, c.final_weights())
                    loss_end = float(_loss(out_end, ts))
                    scored.append((_robust(out_end, ts), loss_end, f"{name}/{end}", c))
    _, loss0, init_name, s = min(scored, key=lambda r: r[0] if math.isfinite(r[0]) else math.inf)
    if not math.isfinite(loss0):
        raise TuningError(f"the initial grids give a non-finite loss ({loss0}) on this model")
    n_it = iters if iters is not None else (15 if method == "autodiffusion" else _ITERS)

    xt, tt, ct = parts["train"]
    n_train = xt.shape[0]
    draw = torch.Generator().manual_seed(seed)
    pending = torch.zeros(0, dtype=torch.long)  # the rest of the current epoch's order

    def minibatch() -> tuple[Tensor, Tensor, dict[str, Any]]:
        """The next ``batch`` training samples (all of them when ``batch`` is None)."""
        nonlocal pending
        if batch is None or batch >= n_train:
            return xt, tt, ct
        while pending.numel() < batch:  # whole epochs, each a new permutation
            pending = torch.cat([pending, torch.randperm(n_train, generator=draw)])
        idx, pending = pending[:batch], pending[batch:]
        return _take(xt, tt, ct, idx)

    phases: list[dict[str, Any]] = []  # what each gradient phase ran and kept (info)

    def descend(
        params: list[torch.nn.Parameter],
        rate: float,
        phase: str,
        objective: Callable[[Tensor, Tensor], Tensor] = _loss,
    ) -> None:
        """Adam at ``rate`` for ``n_it`` iterations, stopped early (after ``_MIN_ITERS``) once
        ``_PATIENCE`` of them in a row have not bettered the best validation score by 0.1 %."""
        opt = torch.optim.Adam(params, lr=rate)
        s.checkpoint = checkpoint
        best: tuple[float, list[Tensor]] | None = None
        stale, first = 0, math.inf
        record: dict[str, Any] = {
            "phase": phase, "objective": "squared" if objective is _loss else "robust"
        }  # fmt: skip
        phases.append(record)
        for i in range(n_it):
            record["iters"] = i + 1
            opt.zero_grad()
            xb, tb, cb = minibatch()
            loss = objective(s(xb, cb), tb)
            value = float(loss.detach())
            first = value if i == 0 else first
            # diverged: a thousand times the start and at least 1 (an output as far from the
            # teacher as the teacher is from 0); a step away from a nearly exact start (a
            # relative MSE of 1e-6, say) is not divergence: the best iterate is kept anyway
            if not math.isfinite(value) or value > 1e3 * max(first, 1e-3):
                raise TuningError(
                    f"{phase}: the calibration loss diverged ({value:.3g} at iteration {i}; "
                    f"the phase started at {first:.3g}); try a smaller lr"
                )
            # the parameters that gave this loss, before the step (i = 0: the phase's start)
            if n_val:
                score = val_score(s)
            elif batch is None or batch >= n_train:
                score = value
            else:  # no validation part: the minibatch's loss is too noisy to pick an iterate
                with torch.no_grad():
                    score = float(objective(s(xt, ct), tt))
            if i == 0:
                record["score_start"] = score
            if best is None or score < best[0]:
                stale = 0 if best is None or score < best[0] * (1 - 1e-3) else stale + 1
                best = (score, [p.detach().clone() for p in params])
                record.update(kept=i, score=score)
            else:
                stale += 1
            if stale >= _PATIENCE and _MIN_ITERS <= i + 1 < n_it:
                if progress is not None:  # the phase is done: its bar jumps to the end
                    progress(phase, n_it, n_it, value)
                break
            # only this phase's parameters: the network's own weights (a user's model usually
            # requires grad) get no gradient computed or accumulated, and the other phase's
            # parameters (the times, in a weight phase) prune their part of the backward pass
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
                p.grad = g
            opt.step()
            if progress is not None:
                progress(phase, i + 1, n_it, value)
        if best is None:  # no iteration (iters=0)
            return
        with torch.no_grad():  # keep the best iterate: tuning never makes the start worse
            for p, v in zip(params, best[1]):
                p.copy_(v)
            if (val_score(s) if n_val else float(objective(s(xt, ct), tt))) > best[0] * (1 + 1e-9):
                raise TuningError(f"{phase}: restoring the best iterate failed")

    grid_params = s.grid_parameters()
    weight_params = s.weight_parameters()
    if method == "ld3":
        descend(grid_params, lr, "grid")
    elif method == "s4s":
        descend(weight_params, lr * _WEIGHT_LR, "weights")
    elif method in ("auto", "bespoke"):
        for objective in (_loss, _objective):
            descend(grid_params, lr, "grid", objective)
            descend(weight_params, lr * _WEIGHT_LR, "weights", objective)
    elif method == "usf":
        s = _search_decisions(s, rebuild, lambda c: loss_of(c, "all"), progress)
        descend(s.grid_parameters(), lr, "grid")
    elif method == "gits":
        lam = gits_grid(
            model, x, nfe, t_start=t_start, lam_hi=lam_hi, target=target, cond=cond, rtol=rtol
        )
        s = student(process.t_of_lambda(lam), init_name.split("/")[1])
    else:  # autodiffusion
        vec0 = torch.cat([p.detach().reshape(-1) for p in grid_params])
        sizes = [p.numel() for p in grid_params]

        def fitness(v: Tensor) -> float:
            with torch.no_grad():
                for p, part in zip(grid_params, torch.split(v, sizes)):
                    p.copy_(part.reshape(p.shape))
            out = loss_of(s)
            return out if math.isfinite(out) else float("inf")

        best, _ = evolve(fitness, vec0, generations=n_it, seed=seed)
        fitness(best)
    loss1 = loss_of(s)
    if not math.isfinite(loss1):
        raise TuningError(f"tuning ended with a non-finite loss ({loss1})")
    info = {
        "method": method,
        "nfe": nfe,
        "order": order,
        "corrector": corrector,
        "init_grid": init_name,
        **(
            {"base": "rk2" if min(order, 2) == 2 else "rk1", "steps": s.kinds}
            if method == "bespoke"
            else {
                "final_weights": s.final_weights().tolist(),
                "orders": s.orders,
                "correctors": s.correctors,
            }
        ),
        "calib_samples": int(x.shape[0]),
        "calib_rel_rmse_before": math.sqrt(loss0),
        "calib_rel_rmse_after": math.sqrt(loss1),
        "validation_samples": n_val,
        "teacher_seconds": t_teacher,
        "seconds": time.perf_counter() - start,
        "iters": n_it,
        "batch": batch,
        "checkpoint": bool(checkpoint),
        "phases": phases,
    }
    return s.export(info)
