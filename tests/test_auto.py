"""``solver="auto"``: the recommendation, its mechanics, and the claim it is built on.

The claim (issue 3): at NFE 5, 10 and 20 on gmm2d, gmm64 and gmm3072 (SD scaled-linear process),
auto's relative RMSE to the exact ODE solution of x_T (continued to σ = 0) is at or below the
lower envelope of every diffusers / k-diffusion configuration of ``diffsolve bench --peers``.
``benchmarks/auto_rule.py`` runs all 35 peer configurations (about 10 minutes); measured
ratios auto / best peer (same seeds and batches as here):

    model    NFE 5   NFE 10  NFE 20
    gmm2d    0.861   0.480   0.566
    gmm64    0.554   0.825   0.752
    gmm3072  0.866   0.928   0.545

The test below re-runs, live, the nine peer configurations that came within the top three at
any of these points in the full sweep, so that a regression on either side shows up here.
"""

from __future__ import annotations

import pytest
import torch

import diffsolve as ds
from diffsolve.auto import is_guided, recommend
from diffsolve.bench.runner import run_benchmark
from diffsolve.schedules import Karras, LogSNR

ENVELOPE_PEERS = [
    "diffusers DEIS-2 default",
    "diffusers DPM++2M default",
    "diffusers DPM++2M karras",
    "diffusers DPM++2M lu-lambda",
    "diffusers DPM++2M trailing",
    "k-diff dpmpp_2m exponential",
    "k-diff dpmpp_2m karras",
    "k-diff lms exponential",
    "k-diff lms karras",
]
BATCH = {"gmm2d": 64, "gmm64": 64, "gmm3072": 16}


@pytest.mark.peers
@pytest.mark.parametrize("model", ["gmm2d", "gmm64", "gmm3072"])
def test_auto_is_at_or_below_the_peer_envelope(model):
    pytest.importorskip("diffusers")
    res = run_benchmark(
        model,
        "sd",
        solver_names=["auto"],
        nfes=(5, 10, 20),
        batch=BATCH[model],
        peers=True,
        peer_labels=ENVELOPE_PEERS,
    )
    ran = {r["label"] for r in res.rows if r["kind"] == "peer" and r["error"] is None}
    assert ran == set(ENVELOPE_PEERS)
    for n in (5, 10, 20):
        rows = [r for r in res.rows if r["nfe"] == n]
        ours = next(r for r in rows if r["kind"] == "diffsolve")
        assert ours["nfe_used"] == n
        best = min(r["err_continued"] for r in rows if r["kind"] == "peer")
        assert ours["err_continued"] <= best, (model, n, ours["err_continued"], best)


def test_recommendation_bands(sd):
    for n, schedule, final in [
        (1, Karras, "standard"),
        (4, Karras, "standard"),
        (5, Karras, "standard"),
        (6, LogSNR, "extrapolate"),
        (10, LogSNR, "standard"),
        (20, Karras, "extrapolate"),
        (100, Karras, "extrapolate"),
    ]:
        rec = recommend(sd, n)
        assert rec.solver.name == "unipc" and rec.solver.order == 2
        assert isinstance(rec.schedule, schedule) and rec.final == final, n
    # the low-NFE grid is narrowed at both ends on a VP process ...
    assert recommend(sd, 5).schedule.sigma_max == pytest.approx(9.75)
    assert recommend(sd, 5).schedule.sigma_min == pytest.approx(0.05)
    # ... but never starts below the top on a process whose prior is not N(0, I)
    assert recommend(ds.EDM(), 5).schedule.sigma_max is None
    assert recommend(ds.VE(), 6).schedule.sigma_max is None
    guided = recommend(sd, 5, guided=True)
    assert guided.solver.name == "dpmpp_2m" and guided.final == "standard"
    assert guided.schedule == recommend(sd, 5).schedule
    with pytest.raises(ValueError, match="positive integer"):
        recommend(sd, 0)


def test_auto_runs_the_recommendation_exactly(sd, g64):
    m = g64.denoiser(sd)
    x = ds.prior(sd, (4, 64), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for n in (1, 2, 3, 4, 5, 6, 7, 9, 13, 25):
        rec = recommend(sd, n)
        got, info = ds.sample(m, x, "auto", nfe=n, return_info=True)
        want = ds.sample(m, x, rec.solver, nfe=n, schedule=rec.schedule, final=rec.final)
        assert info.nfe == n
        assert torch.equal(got, want), n
    # an explicit schedule or end rule wins over the recommendation
    a = ds.sample(m, x, "auto", nfe=20, schedule="logsnr", final="standard")
    b = ds.sample(m, x, "unipc", nfe=20, schedule="logsnr", order=2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("process", [ds.VPCosine(), ds.EDM(), ds.VE(), ds.FlowMatching()], ids=repr)
def test_auto_on_other_processes_is_finite_and_budgeted(process, g2):
    from diffsolve.bench.runner import prediction_for

    m = g2.denoiser(process, prediction_for(process))
    x = ds.prior(process, (8, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in (3, 5, 10, 20):
        y, info = ds.sample(m, x, "auto", nfe=n, return_info=True)
        assert info.nfe == n and torch.isfinite(y).all()


def test_guidance_is_detected_through_wrappers(sd, g2):
    m = g2.denoiser(sd)
    assert not is_guided(m)
    assert is_guided(ds.CFG(m, 3.0, uncond={}))
    assert not is_guided(ds.CFG(m, 1.0, uncond={}))
    assert is_guided(ds.DynamicThreshold(ds.CFG(m, 7.5, uncond={})))


def test_auto_rejects_what_it_cannot_honour(sd, g2):
    m = g2.denoiser(sd)
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="nfe="):
        ds.sample(m, x, "auto", steps=10)
    with pytest.raises(ValueError, match="no solver options"):
        ds.sample(m, x, "auto", nfe=10, order=3)
    with pytest.raises(ValueError, match="resolved by ds"):
        ds.get_solver("auto")
    assert m.nfe == 0


def test_flow_paths_get_the_flow_grid():
    from diffsolve.schedules import Uniform

    fm = ds.FlowMatching()
    for n in (3, 5, 20):
        rec = recommend(fm, n)
        assert rec.schedule == Uniform(trailing=True) and rec.final == "extrapolate"
        assert recommend(fm, n, guided=True).solver.name == "dpmpp_2m"
    t = Uniform(trailing=True)(fm, 5)
    # diffusers' FlowMatchEuler grid: linspace(t_max, t_min, n + 1) without its last point
    want = torch.linspace(1.0, fm.t_min, 6, dtype=torch.float64)[:-1]
    want[0] = fm.t_max_finite  # where λ is finite
    assert torch.allclose(t, want, rtol=0, atol=1e-15)
