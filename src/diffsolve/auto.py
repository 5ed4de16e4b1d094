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

* NFE ≤ 4: UniPC-2 on uniform λ over σ/α ∈ [0.1155, 12.2] (Karras ρ = 12 until stop 31);
  NFE 5–7: UniPC-2 on uniform λ over [0.05, 12.2]. At these budgets the few large steps
  dominate; starting below t_max (x_T ~ N(0, I) is as good a sample of the marginal at σ/α ≈ 12
  as at DDPM's 157) and stopping above σ_min save steps where they matter.
* NFE 8–11: DPM-Solver++(2M) on uniform λ from σ/α = 14. Every higher-order multistep method
  (UniPC-2/3, DPM-Solver++(3M), iPNDM, DEIS) loses by 1.8–11× on gmm3072 + SD (the small-variance
  directions of an image-like covariance make x̂_0 change fast near t_min, and an extrapolated
  history amplifies it); 2M is the only one within 1.05 of the envelope on every design model
  but gmm2d, where k-diffusion's 4th-order LMS on Karras σ wins (1.36–1.44×).
* NFE ≥ 12: UniPC-3 with its corrector on every step including the last (``lower_order_final=
  False``), on uniform λ; from σ/α = 20 at NFE 12–14 (the start's bias no longer pays beyond).

The ratios on the design mixtures, the held-out sets (some of which break this rule: data on
low-rank subspaces, quantised data) and the shipped digits-vp network are in docs/benchmarks.md
and docs/networks.md.

**Continuous-time processes** (VP-linear, sub-VP, VE, EDM: trained down to σ → 0): the truth
is the exact solution continued to σ = 0 (``err_continued``), ranked on its median for the same
reason, against the 12 k-diffusion configurations (diffusers has none for these processes).
Every band is UniPC on uniform λ continued to σ = 0 (``final="extrapolate"``: the last step
goes from the grid's bottom to σ = 0 with the solver's own multistep formula); what changes with
the NFE is where the grid starts and stops:

* NFE ≤ 5: UniPC-2 over σ/α ∈ [0.1155, max]. At these budgets the few large steps dominate,
  and a bottom well above σ_min saves them.
* NFE 6–7: UniPC-2 over [0.02, max].
* NFE 8–11: UniPC-2 over [σ_min, max]; NFE 12–14 and ≥ 15: UniPC-3 with its corrector on every
  step over [σ_min, max].
* "max" is the process's top, except on a variance-preserving process, where the grid starts
  at σ/α = 12.2 (NFE ≤ 7), 14 (8–11), 20 (12–14): x_T ~ N(0, I) is as good a sample of the
  marginal there as at t_max, and the steps saved pay up to NFE 14.

Why the bottom is σ_min from NFE 8: stopping above σ_min and continuing to σ = 0 from there is a
bet that the data have no structure below the bottom. It pays on smooth data and loses without
bound on fine-scale data (quantised images: x̂_0 at σ/α = 0.02 is a component's mean), and the
loss grows with the NFE; running to σ_min costs a bounded share of the steps. Ending there the
standard way (x̂_0 at σ_min) instead leaves a floor that the continuation removes. Robust
before tight: each band is the candidate with the least largest ratio to the envelope over the
design and held-out mixtures (``benchmarks/auto_candidates.py``); the numbers, the candidates
and the judgement on mixtures no band was read from are in docs/benchmarks.md.

Two rules apply before the process's kind:

* Flow paths (α = 0 at t_max: rectified flow, the flow-matching paths): λ-uniform and Karras
  grids put several points where the velocity barely changes. The rule is diffusers' flow grid
  (uniform t, the last evaluation at t_max/n) with UniPC-2 continued to σ = 0.
* Guidance on (a :class:`~diffsolve.CFG` with scale ≠ 1 anywhere in the wrapper chain):
  DPM-Solver++(2M) on the same grid with ``final="standard"`` — the guided x̂_0 overshoots, so
  neither high orders and correctors (DPM-Solver++ paper, §5) nor extrapolation of x̂_0 are
  safe (measured on the shipped digits-vp network: ``benchmarks/auto_guided.py``).

Both are measured in docs/benchmarks.md ("The flow and guided rules").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .processes.base import GaussianProcess
from .processes.vp import VPDiscrete
from .schedules import LogSNR, Schedule, Uniform
from .solvers.base import Solver, get_solver

__all__ = ["Recommendation", "is_guided", "recommend"]

# continuous-time processes, UniPC on uniform λ continued to σ = 0: (last NFE of the band or
# None, UniPC order, σ/α bottom (None: the process's σ_min), σ/α top for variance-preserving
# processes)
_CONTINUOUS_BANDS: tuple[tuple[int | None, int, float | None, float | None], ...] = (
    (5, 2, 0.1155, 12.2),
    (7, 2, 0.02, 12.2),
    (11, 2, None, 14.0),
    (14, 3, None, 20.0),
    (None, 3, None, None),
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
    to σ_min and its top (variance-preserving processes only) rises with the NFE, the order
    rises at NFE 12, and every band is continued to σ = 0 (module docstring)."""
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
            LogSNR(**bounds),
            "standard",
            f"discrete, NFE 1–4: UniPC-2, uniform λ over σ/α ∈ {_span(bounds)}, x̂0 there",
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
