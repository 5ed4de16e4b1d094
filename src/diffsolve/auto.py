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
≤ 1.05 at every NFE 4–25; a second held-out set (heldout24/72/256): docs/benchmarks.md. A
third (stop 30) breaks the rule on near-degenerate data: heldout192 (rank-16 subspaces) is above
the envelope at NFE 4–10 on SD (1.89 at NFE 5) and at every NFE on DDPM-linear (3.89 at NFE
10); ``ds.tune`` brings it below the envelope there (median ratio 0.31 / 0.15 on SD, 0.87 /
0.57 on DDPM-linear at NFE 5 / 10; docs/tuning.md). The shipped digits-vp network
(DDPM-linear, against its rk45 solution): docs/networks.md.

**Continuous-time processes** (VP-linear, sub-VP, VE, EDM: trained down to σ → 0): the truth
is the exact solution continued to σ = 0 (``err_continued``), ranked on its median for the same
reason. Read off gmm2d/gmm64/gmm3072 × EDM/VE/VP-linear (``benchmarks/auto_rule.py --process``)
against the 12 k-diffusion configurations (diffusers has none for these processes), with the
candidates UniPC-2/3, DPM-Solver++(2M/3M) and DEIS × uniform λ, Karras ρ = 7/12/25 and uniform t,
each with narrowed ends and either end rule:

* NFE ≤ 5: UniPC-2 on uniform λ over σ/α ∈ [0.1155, max], continued to σ = 0 (stop 30; the
  stop-29 band, Karras ρ = 12 over the same range ended the standard way, was above the envelope
  on the second held-out set — below).
* NFE 6–7: UniPC-2 on uniform λ over [0.05, max], continued to σ = 0; NFE 8–11 the same.
* NFE 12–14: UniPC-3 with its corrector on every step, uniform λ over [0.02, max], continued.
  NFE ≥ 15: the same. On the full range order 3 loses at NFE ≤ 12 on gmm3072 (1.4–4×), as on
  the discrete processes; with the VP start at σ/α = 20 it is within 1.03 at NFE 12, and it
  wins from NFE 13 (design max 0.70 → 0.28 at NFE 13 → 25).
* "max" is the process's top, except on a variance-preserving process, where the grid starts
  at σ/α = 12.2 (NFE ≤ 7), 14 (8–11), 20 (12–14): x_T ~ N(0, I) is as good a sample of the
  marginal there as at t_max, and the steps saved pay up to NFE 14.
* Stopping above σ_min and continuing x̂_0 to σ = 0 is a bias that does not vanish with more
  steps; on these mixtures it costs less than the steps it saves at every NFE measured (4–25).

Median ratio auto / envelope, max over the 9 design cells: NFE 4 0.95, 5 0.76 (stop 30's band;
2.20 and 0.94 under stop 29's), 6 0.69, 8 0.92, 10 1.10, 12 1.03, 15 0.43, 20 0.42, 25 0.28.
Held out (heldout16/48/128 × EDM/VE/VP-linear/VP-cosine and the design mixtures on VP-cosine, a
process never used to choose anything; 15 cells × 12 NFEs): above the envelope at 4 of 180
points (VE heldout128 NFE 8/10: 1.07/1.01; VP-linear and VP-cosine heldout48 NFE 14: 1.19/1.07),
max 0.64 / 1.01 / 0.42 at NFE 5 / 10 / 20, median 0.35 (NFE 4–5 under stop 30's band; 0.82
and 0.36 under stop 29's; the rule before stop 21: 37 of 180,
median 0.74). On the RMSE, which one boundary sample sets (module text above), above the
envelope at 45 of 180 (before: 61), median 0.63 (0.93); the worst is VP-linear heldout48 from
NFE 10 on (5–28×): one of its 64 samples ends at another component under UniPC-3 on uniform λ,
whatever the grid's ends (checked at NFE 15 and 25), and not under DPM-Solver++(2M) or UniPC-2
on Karras ρ = 25. On a second held-out set the stop-29 NFE ≤ 5 band was above the envelope on
two of its three mixtures with EDM or VE (heldout72 EDM / VE NFE 5: 1.25 / 1.12). Stop 30
re-chose that band with ``benchmarks/auto_candidates.py`` over 40 candidates (UniPC-2 and
DPM-Solver++(2M) × Karras ρ = 7 / 12 and uniform λ × four bottoms × both ends) on the 72 cells
of the design mixtures and both held-out sets × EDM / VE / VP-linear / VP-cosine × NFE 4 / 5,
ranked on the largest ratio first: 2.20 → 1.33 (above 1 at 7 → 1 cell: heldout256 VE NFE 4),
at NFE 5 at most 0.81 (geometric mean 0.41), and judged once on a third held-out set
(heldout32/100/192, written down before it ran): at most 0.97 at NFE 4 and 0.63 at NFE 5. The
bands above NFE 5 are above the envelope at 13 of that set's 84 points from NFE 6 on (heldout32,
whose tight components reach σ = 0.01 below the truncated bottoms: up to 2.13 at NFE 25); no
bottom, grid or end of the same family is robust on all twelve mixtures
(``auto_candidates.py --band high``), so they stay as they are. A fourth held-out set makes the
cause plain: on quantised data (standard deviation 0.004) every band is above the envelope, up
to 31× at NFE 25 — x̂_0 continued from σ/α ≥ 0.02 is the component's mean, while the peers run
to σ_min; ``ds.tune`` learns its own end there (docs/benchmarks.md).

Two rules apply before the process's kind:

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

# continuous-time processes, UniPC on uniform λ continued to σ = 0: (last NFE of the band or
# None, UniPC order, σ/α bottom, σ/α top for variance-preserving processes)
_CONTINUOUS_BANDS: tuple[tuple[int | None, int, float, float | None], ...] = (
    (5, 2, 0.1155, 12.2),
    (7, 2, 0.05, 12.2),
    (11, 2, 0.05, 14.0),
    (14, 3, 0.02, 20.0),
    (None, 3, 0.02, None),
)

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


def _span(bounds: dict) -> str:
    return f"[{bounds.get('sigma_min', 'σ_min')}, {bounds.get('sigma_max', 'σ_max')}]"


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
    return _continuous(process, nfe)


def _continuous(process: GaussianProcess, nfe: int) -> Recommendation:
    """The rule for a continuous-time process (trained down to σ → 0): the grid's bottom falls
    and its top (variance-preserving processes only) rises with the NFE, the order rises at
    NFE 12, and every band is continued to σ = 0 (module docstring)."""
    vp = _variance_preserving(process)
    first = 1
    for last, order, bottom, top in _CONTINUOUS_BANDS:
        if last is None or nfe <= last:
            bounds = _bounds(process, bottom, top if vp else None)
            band = f"NFE {first}–{last}" if last is not None else f"NFE ≥ {first}"
            return Recommendation(
                get_solver("unipc", order=order, lower_order_final=order == 2),
                LogSNR(**bounds),
                "extrapolate",
                f"{band}: UniPC-{order}, uniform λ over σ/α ∈ {_span(bounds)}, continued to σ = 0",
            )
        first = last + 1
    raise AssertionError("unreachable: the last band has no upper NFE")


def _discrete(process: VPDiscrete, nfe: int) -> Recommendation:
    """The rule for a discrete-time (``VPDiscrete``) process: every band ends the standard way
    (x̂_0 at the last σ ≥ σ_min; the network never saw a lower noise level), the grid's top
    rises with the NFE, and the order with it (module docstring)."""
    top = next((t for last, t in _DISCRETE_TOPS if nfe <= last), None)
    if nfe <= 4:
        bounds = _bounds(process, 0.1155, top)
        return Recommendation(
            get_solver("unipc", order=2),
            Karras(rho=12.0, **bounds),
            "standard",
            f"discrete, NFE 1–4: UniPC-2, Karras ρ = 12 over σ/α ∈ {_span(bounds)}, x̂0 there",
        )
    if nfe <= 7:
        bounds = _bounds(process, 0.05, top)
        return Recommendation(
            get_solver("unipc", order=2),
            LogSNR(**bounds),
            "standard",
            f"discrete, NFE 5–7: UniPC-2, uniform λ over σ/α ∈ {_span(bounds)}, x̂0 there",
        )
    bounds = _bounds(process, None, top)
    if nfe <= 11:
        return Recommendation(
            get_solver("dpmpp_2m"),
            LogSNR(**bounds),
            "standard",
            f"discrete, NFE 8–11: DPM-Solver++(2M), uniform λ over σ/α ∈ {_span(bounds)}, "
            "x̂0 at t_min",
        )
    return Recommendation(
        get_solver("unipc", order=3, lower_order_final=False),
        LogSNR(**bounds),
        "standard",
        f"discrete, NFE ≥ 12: UniPC-3, uniform λ over σ/α ∈ {_span(bounds)}, x̂0 at t_min",
    )
