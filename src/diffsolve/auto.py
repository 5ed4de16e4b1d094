"""``solver="auto"``: the recommended solver, schedule and end rule for an NFE budget.

The rule is read off the exact benchmark (README, "Which solver?") on gmm2d, gmm64 and gmm3072,
against every peer configuration of diffusers and k-diffusion at the same NFE (their lower
envelope); ``benchmarks/auto_rule.py`` reproduces the sweep and also runs the held-out mixtures
(``bench.gmm.HELDOUT``), which were never used to choose anything; ``tests/test_auto.py``
asserts the claim at NFE 5, 10 and 20. The truth depends on the process.

**Discrete-time processes** (``VPDiscrete``: SD, DDPM and every diffusers DDPM-family model).
Such a network was trained on its 1,000 noise levels only, so its ODE is ended the standard way
at t_min (x̂_0 there; ``final="standard"`` in every band), and the error is measured against that
truth (``err_tmin``), as the **median** per-sample relative error — a mixture sample near a
boundary between components ends at another component under one sampler and not another, and
that one sample sets a batch's RMSE (on heldout48 + SD at NFE 10 the peers' RMSE is 0.017 or 0.17
depending on it). Read off gmm2d/gmm64/gmm3072 × SD/DDPM-linear (candidates: UniPC-2/3,
DPM-Solver++ 2M/3M, DEIS, iPNDM × uniform λ, Karras ρ = 7/12/25, uniform t, diffusers'
linspace, quadratic, each with narrowed ends):

* NFE ≤ 4: UniPC-2 on Karras ρ = 12 over σ/α ∈ [0.12, 12.2]; NFE 5–7: UniPC-2 on uniform λ over
  [0.05, 12.2]. At these budgets the few large steps dominate; starting below t_max (x_T ~ N(0, I)
  is as good a sample of the marginal at σ/α ≈ 12 as at DDPM's 157) and stopping at 0.05 save
  steps where they matter.
* NFE 8–11: DPM-Solver++(2M) on uniform λ from σ/α = 14. Every higher-order multistep method
  (UniPC-2/3, DPM-Solver++(3M), iPNDM, DEIS) loses by 1.8–11× on gmm3072 + SD (the small-variance
  directions of an image-like covariance make x̂_0 change fast near t_min, and an extrapolated
  history amplifies it); 2M is the only one within 1.05 of the envelope on every design model
  but gmm2d, where k-diffusion's 4th-order LMS on Karras σ wins (1.36–1.44×).
* NFE ≥ 12: UniPC-3 with its corrector on every step including the last (``lower_order_final=
  False``), on uniform λ; from σ/α = 20 at NFE 12–14 (the start's bias no longer pays beyond).

Design ratios auto / envelope (median, max over the 6 models): NFE 4 1.03, 5 0.96, 6 0.96, 8
1.36, 10 1.43 (gmm2d SD; the others ≤ 1.004), 12 0.83, 15 0.67, 20 0.44, 25 0.56. Held out
(heldout16/48/128 × SD/DDPM-linear): ≤ 0.98 at NFE 5, 10 and 20 (max 0.88 / 0.98 / 0.54) and
≤ 1.05 at every NFE 4–25. The shipped digits-vp network (DDPM-linear, against its rk45
solution): docs/networks.md.

**Continuous-time processes** (VP-linear/cosine, sub-VP, VE, EDM: trained down to σ → 0): the
truth is the exact solution continued to σ = 0 (``err_continued``, RMSE), read off the same
mixtures on the SD noise levels.

What the sweep shows there, and so what the rule does:

* Every budget: UniPC (bh2, order 2, with its corrector), whose corrector is a free order of
  accuracy per step.
* NFE ≤ 7: the error is dominated by the few large steps, not by where the grid ends. The grid
  stops at σ/α = 0.05 (0.12 for NFE ≤ 4; the last x̂_0 is then already a good estimate) and,
  for variance-preserving processes only, starts a little below the top noise level (σ/α ≈
  10–12 instead of SD's 14.6), where x_T ~ N(0, I) is as good a sample of the marginal as at
  t_max — the same thing diffusers' "leading" spacing does by accident. Both are biases that
  do not vanish with more steps, so they are used only where they pay at this budget.
* NFE 8–12: uniform λ over the whole range, ``final="standard"``.
* NFE ≥ 13: Karras ρ = 25 over the whole range, and ``final="extrapolate"`` (the last x̂_0's
  continued to σ = 0), which at these budgets is worth a factor 1.5–3 over stopping at t_min.
* Flow paths (α = 0 at t_max: rectified flow, the flow-matching paths): λ-uniform and Karras
  grids put several points where the velocity barely changes. The rule is diffusers' flow grid
  (uniform t, the last evaluation at t_max/n) with UniPC-2 continued to σ = 0. On the shipped
  digits-flow network (256 samples, against its rk45 solution) at NFE 5 / 10 / 20: relative RMSE
  0.065 / 0.025 / 0.011, against the best peer (diffusers UniPC bh2-2 on the same grid) 0.073 /
  0.028 / 0.012 and UniPC-2 on uniform λ 0.167 / 0.064 / 0.017.
* Guidance on (a :class:`~diffsolve.CFG` with scale ≠ 1 anywhere in the wrapper chain):
  DPM-Solver++(2M) on the same grid with ``final="standard"`` — the guided x̂_0 overshoots, so
  neither high orders and correctors (DPM-Solver++ paper, §5) nor extrapolation of x̂_0 are
  safe. Measured on the shipped digits-vp network at CFG scale 7.5 (256 samples, against the
  guided ODE solved by rk45), each on the discrete-time band grid: at NFE 5 / 10 max |x| 3.6 /
  2.7 and FD-digits 97 / 118 against UniPC-2's 7.9 / 2.8 and 88 / 133, relative RMSE 0.27 /
  0.13 against 0.38 / 0.11 (at NFE 20 UniPC is more accurate, 0.012 vs 0.029, at FD 146 vs
  139). Uniform λ over the whole range, the usual guided default, is far worse at NFE 5 on
  this linear-β process (RMSE 2.4, FD 448, max |x| 15).
  Reproduce: ``python benchmarks/auto_guided.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .processes.base import GaussianProcess
from .processes.vp import VPDiscrete
from .schedules import Karras, LogSNR, Schedule, Uniform
from .solvers.base import Solver, get_solver

__all__ = ["Recommendation", "is_guided", "recommend"]

# σ/α levels of the low-NFE grid ends per NFE band (on SD scaled-linear these are the times
# t_last = 0.015, 0.003, 0.003 and t_start = 0.97, 0.93, 0.97)
_LOW_NFE_ENDS = {4: (0.1155, 12.2), 5: (0.05, 9.75), 7: (0.05, 12.2)}


# discrete-time processes, ended the standard way: (last NFE of the band, σ/α top of the grid)
# — a start below t_max pays at few steps and costs a bias that does not vanish with more
_DISCRETE_TOPS = ((4, 12.2), (7, 12.2), (11, 14.0), (14, 20.0))


@dataclass(frozen=True)
class Recommendation:
    """What ``solver="auto"`` runs: a solver object, a schedule object and an end rule."""

    solver: Solver
    schedule: Schedule
    final: str
    reason: str


def is_guided(model: Any) -> bool:
    """True if a classifier-free-guidance wrapper with scale ≠ 1 is anywhere in the chain."""
    from .denoiser import CFG

    seen = 0
    while model is not None and seen < 32:
        if isinstance(model, CFG) and model.scale != 1.0:
            return True
        model, seen = getattr(model, "model", None), seen + 1
    return False


def _variance_preserving(process: GaussianProcess) -> bool:
    ts = (process.t_min, 0.5 * (process.t_min + process.t_max_finite), process.t_max_finite)
    return all(
        abs(float(process.alpha(t)) ** 2 + float(process.sigma(t)) ** 2 - 1.0) < 1e-6 for t in ts
    )


def _flow_like(process: GaussianProcess) -> bool:
    # α = 0 at the noise end (rectified flow, flow-matching paths): λ-grids waste steps there
    return float(process.alpha(process.t_max)) == 0.0


def _bounds(process: GaussianProcess, sigma_min: float | None, sigma_max: float | None) -> dict:
    # keep a bound only where it narrows the process's own range and leaves a non-empty one
    lo, hi = float(process.rho(process.t_min)), float(process.rho(process.t_max_finite))
    out: dict[str, float] = {}
    if sigma_min is not None and lo < sigma_min < hi:
        out["sigma_min"] = sigma_min
    if sigma_max is not None and out.get("sigma_min", lo) < sigma_max < hi:
        out["sigma_max"] = sigma_max
    return out


def recommend(process: GaussianProcess, nfe: int, guided: bool = False) -> Recommendation:
    """The solver, schedule and end rule ``solver="auto"`` uses for this budget.

    Args:
        process: the model's forward process.
        nfe: the network-evaluation budget (≥ 1).
        guided: classifier-free guidance is on (see :func:`is_guided`).
    """
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    nfe = int(nfe)
    if _flow_like(process):
        return Recommendation(
            get_solver("dpmpp_2m") if guided else get_solver("unipc", order=2),
            Uniform(trailing=True),
            "standard" if guided else "extrapolate",
            "flow path: uniform t ending at t_max/n (diffusers' flow grid)"
            + (", DPM-Solver++(2M), guided" if guided else ", UniPC-2, continued to σ = 0"),
        )
    if guided:
        plain = recommend(process, nfe)
        return Recommendation(
            get_solver("dpmpp_2m"),
            plain.schedule,
            "standard",
            "guided: DPM-Solver++(2M) on the unguided grid, x̂0 at the last step",
        )
    if isinstance(process, VPDiscrete):
        return _discrete(process, nfe)
    unipc = get_solver("unipc", order=2)
    vp = _variance_preserving(process)
    if nfe <= 7:
        band = 4 if nfe <= 4 else 5 if nfe == 5 else 7
        bottom, top = _LOW_NFE_ENDS[band]
        bounds = _bounds(process, bottom, top if vp else None)
        if nfe <= 5:
            return Recommendation(
                unipc,
                Karras(rho=12.0, **bounds),
                "standard",
                f"NFE {'≤ 4' if band == 4 else '5'}: UniPC-2, Karras ρ = 12 on a narrowed "
                "noise range",
            )
        return Recommendation(
            unipc,
            LogSNR(**bounds),
            "extrapolate",
            "NFE 6–7: UniPC-2, uniform λ on a narrowed noise range, continued to σ = 0",
        )
    if nfe <= 12:
        return Recommendation(unipc, LogSNR(), "standard", "NFE 8–12: UniPC-2, uniform λ")
    return Recommendation(
        unipc, Karras(rho=25.0), "extrapolate", "NFE ≥ 13: UniPC-2, Karras ρ = 25, to σ = 0"
    )


def _discrete(process: VPDiscrete, nfe: int) -> Recommendation:
    """The rule for a discrete-time (``VPDiscrete``) process: every band ends the standard way
    (x̂_0 at the last σ ≥ σ_min; the network never saw a lower noise level), the grid's top
    rises with the NFE, and the order with it (module docstring)."""
    top = next((t for last, t in _DISCRETE_TOPS if nfe <= last), None)
    if nfe <= 4:
        return Recommendation(
            get_solver("unipc", order=2),
            Karras(rho=12.0, **_bounds(process, _LOW_NFE_ENDS[4][0], top)),
            "standard",
            "discrete, NFE ≤ 4: UniPC-2, Karras ρ = 12 on a narrowed noise range",
        )
    if nfe <= 7:
        return Recommendation(
            get_solver("unipc", order=2),
            LogSNR(**_bounds(process, 0.05, top)),
            "standard",
            "discrete, NFE 5–7: UniPC-2, uniform λ over σ/α ∈ [0.05, 12.2]",
        )
    if nfe <= 11:
        return Recommendation(
            get_solver("dpmpp_2m"),
            LogSNR(**_bounds(process, None, top)),
            "standard",
            "discrete, NFE 8–11: DPM-Solver++(2M), uniform λ from σ/α = 14 to t_min",
        )
    return Recommendation(
        get_solver("unipc", order=3, lower_order_final=False),
        LogSNR(**_bounds(process, None, top)),
        "standard",
        "discrete, NFE ≥ 12: UniPC-3, uniform λ"
        + (" from σ/α = 20" if top is not None else "")
        + " to t_min",
    )
