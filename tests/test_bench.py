"""The benchmark's metrics and runner, on cases with known answers."""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch

import diffsolve as ds
from diffsolve.bench import (
    mean_log_likelihood,
    mmd_rbf,
    nfe_to_reach,
    per_sample_rel_err,
    rel_rmse,
    sliced_w2,
)
from diffsolve.bench.runner import ExactReference, default_solvers, run_benchmark

from .conftest import reference, rel_err, sd_process


# -- metrics -------------------------------------------------------------------------------------
def test_rel_rmse_and_per_sample_errors():
    ref = torch.tensor([[3.0, 4.0], [0.0, 5.0]], dtype=torch.float64)
    x = ref + torch.tensor([[0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    assert rel_rmse(x, ref) == pytest.approx(0.5 / math.sqrt(50), rel=1e-14)
    assert per_sample_rel_err(x, ref).tolist() == pytest.approx([0.1, 0.0], abs=1e-15)


def test_sliced_w2_zero_for_identical_sets_and_exact_for_a_shift():
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sliced_w2(x, x.clone()) == 0.0
    # a shift c moves every projection by θ·c: SW2² = E(θ·c)² = ‖c‖²/d over uniform θ
    c = torch.full((16,), 0.5, dtype=torch.float64)
    got = sliced_w2(x, x + c, projections=4000)
    assert got == pytest.approx(float(c.norm()) / math.sqrt(16), rel=0.05)
    # unequal set sizes go through quantiles and still see the shift
    assert sliced_w2(x[:300], x + c, projections=2000) == pytest.approx(got, rel=0.1)


def test_mmd_and_log_likelihood_rank_samples_by_fidelity(g2):
    gen = torch.Generator().manual_seed(1)
    a, b = g2.sample(500, generator=gen), g2.sample(500, generator=gen)
    assert mmd_rbf(a, a.clone()) == 0.0
    same, shifted = mmd_rbf(a, b), mmd_rbf(a, b + 0.3)
    assert 0 < same < shifted / 3
    assert sliced_w2(a, b) < sliced_w2(a, b + 0.3) / 3
    noise = torch.randn(500, 2, generator=gen, dtype=torch.float64)
    assert mean_log_likelihood(g2, a) > mean_log_likelihood(g2, noise) + 1.0


def test_mean_log_likelihood_of_a_gaussian_is_minus_its_entropy(g64):
    # one component of gmm64 alone: E log N(x; m, S) = −(d/2)(1 + log 2π) − ½ log det S
    one = type(g64)(
        torch.ones(1, dtype=torch.float64),
        g64.means[:1],
        g64.eigvals[:1],
        g64.eigvecs[:1],
        g64.shape,
        "one",
    )
    x = one.sample(20000, generator=torch.Generator().manual_seed(2))
    d = one.dim
    expect = -0.5 * d * (1 + math.log(2 * math.pi)) - 0.5 * float(torch.log(one.eigvals).sum())
    # the Monte-Carlo standard error is sqrt(d/2)/sqrt(n) ≈ 0.04
    assert mean_log_likelihood(one, x) == pytest.approx(expect, abs=0.2)


def test_nfe_to_reach_interpolates_in_log_log():
    nfes = [4, 8, 16, 32]
    errs = [1.0 / n**2 for n in nfes]  # exactly second order: interpolation is exact
    assert nfe_to_reach(nfes, errs, 1e-3) == pytest.approx(math.sqrt(1e3), rel=1e-12)
    assert nfe_to_reach(nfes, errs, 1.0 / 64) == pytest.approx(8.0, rel=1e-12)
    assert nfe_to_reach(nfes, errs, 1e-1) == 4.0  # already met at the smallest budget
    assert nfe_to_reach(nfes, errs, 1e-4) is None  # never reached
    # a dip below the target that does not last is not "reaching" it
    dip = nfe_to_reach([4, 8, 16, 32], [0.1, 0.005, 0.02, 0.001], 0.01)
    assert dip == pytest.approx(16 * 2 ** (math.log(2) / math.log(20)), rel=1e-12)
    # unsorted input, a failed run and a plateau do not confuse it
    assert nfe_to_reach([16, 4, 8, 32], [1 / 256, None, 1 / 64, 1 / 256], 1e-3) is None
    assert nfe_to_reach([16, 4, 8], [1 / 256, None, 1 / 64], 1 / 100) == pytest.approx(
        8 * 2 ** (math.log(64 / 100) / math.log(64 / 256)), rel=1e-12
    )


# -- the exact reference cache -------------------------------------------------------------------
def test_exact_reference_chains_and_caches(g64, sd):
    x_T = sd.prior((8, 64), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = ExactReference(g64, sd, x_T)
    t_mid = 0.3
    a = ref.at(sd.t_max, t_mid)
    b = ref.at(sd.t_max, sd.t_min)  # continued from t_mid, not from t_max
    c = ref.continued(sd.t_max)
    assert ref.solves == 3
    ref.at(sd.t_max, sd.t_min)
    ref.continued(sd.t_max)
    assert ref.solves == 3  # cached
    assert rel_err(a, reference(g64, sd, x_T, t_mid)) < 1e-10
    assert rel_err(b, reference(g64, sd, x_T, sd.t_min)) < 1e-10
    assert rel_err(c, reference(g64, sd, x_T, 0.0)) < 1e-10
    # the standard endpoint at t_min is close to, but measurably not, the σ = 0 limit
    gap = rel_err(ref.standard(sd.t_max, sd.t_min), c)
    assert 1e-6 < gap < 1e-2


# -- the runner ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return run_benchmark(
        "gmm64", "sd", ["euler", "ddim"], nfes=[8, 16], schedules=["logsnr", "karras"], batch=8
    )


def test_runner_rows_are_sane(tiny):
    rows = tiny.rows
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert r["kind"] == "diffsolve" and r["error"] is None
        assert r["nfe_used"] == r["nfe"]
        assert 0 < r["err_standard"] < 1 and 0 < r["err_continued"] < 1
        assert r["err_standard_median"] <= r["err_standard_max"]
        assert r["t_start"] == 1.0 and r["t_last"] == pytest.approx(sd_process().t_min)
    json.dumps(tiny.to_json(), allow_nan=False)
    # both schedules end at t_min: one start, two exact end states (t_min and σ = 0)
    assert tiny.meta["reference"]["solves"] == 2


def test_runner_euler_is_first_order_and_ddim_is_euler(tiny):
    by = {(r["label"], r["nfe"]): r for r in tiny.rows}
    for sched in ("logsnr", "karras"):
        e8, e16 = by[(f"euler ({sched})", 8)], by[(f"euler ({sched})", 16)]
        for k in ("err_standard", "err_continued"):
            assert 1.6 < e8[k] / e16[k] < 2.4, (sched, k, e8[k] / e16[k])
        for n in (8, 16):
            assert (
                by[(f"ddim ({sched})", n)]["err_standard"]
                == by[(f"euler ({sched})", n)]["err_standard"]
            )


def test_runner_errors_match_an_independent_computation(g64, sd):
    res = run_benchmark("gmm64", "sd", ["euler"], nfes=[6], batch=8, seed=3)
    (row,) = res.rows
    x_T = sd.prior((8, 64), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = ds.sample(g64.denoiser(sd), x_T, "euler", nfe=6)
    assert row["err_continued"] == pytest.approx(rel_err(x, reference(g64, sd, x_T, 0.0)), 1e-8)
    std = reference(g64, sd, x_T, sd.t_min, x0=True)
    assert row["err_standard"] == pytest.approx(rel_err(x, std), rel=1e-8)
    # the run ends at t_min: the one standard-end truth of every run is its own here
    assert row["err_tmin"] == pytest.approx(rel_err(x, std), rel=1e-8)


def test_default_solvers_are_deterministic_and_unaliased():
    names = default_solvers()
    assert names[0] == "auto"  # the recommendation first, resolved by ds.sample
    names = names[1:]
    assert "euler" in names and "ddim" not in names  # ddim is euler
    assert all(not ds.get_solver(n).stochastic for n in names)
    # adaptive solvers pick their own steps and cannot meet an NFE budget
    assert all(not getattr(ds.get_solver(n), "adaptive", False) for n in names)
    if "rk45" in ds.solvers():
        assert "rk45" not in names
    if "ddpm" in ds.solvers():
        assert "ddpm" not in names


def test_runner_records_a_failing_configuration():
    res = run_benchmark("gmm2d", "sd", ["euler"], nfes=[3], schedules=["leading"], batch=4)
    res2 = run_benchmark("gmm2d", "sd", ["euler"], nfes=[1000], schedules=["leading"], batch=4)
    assert res.rows[0]["error"] is None
    assert res2.rows[0]["error"] and res2.rows[0]["err_standard"] is None
    json.dumps(res2.to_json(), allow_nan=False)
    with pytest.raises(ValueError, match="unknown solver"):
        run_benchmark("gmm2d", "sd", ["no-such-solver"], nfes=[4], batch=2)
    with pytest.raises(ValueError, match="unknown process"):
        run_benchmark("gmm2d", "nope", ["euler"], nfes=[4], batch=2)


@pytest.mark.parametrize(
    ("process", "nfes"),
    [
        ("vp-linear", (16, 32)),
        ("vp-cosine", (16, 32)),
        ("ve", (16, 32)),
        ("edm", (16, 32)),
        # flow's λ range is ±6.9 (t ∈ [1e-3, 0.999]): Euler needs more steps to be asymptotic
        ("flow", (48, 96)),
    ],
)
def test_runner_on_other_processes(process, nfes):
    res = run_benchmark("gmm64", process, ["euler"], nfes=list(nfes), batch=8)
    assert all(r["error"] is None for r in res.rows)
    for k in ("err_continued", "err_standard"):
        e_lo, e_hi = (r[k] for r in res.rows)
        assert 1.7 < e_lo / e_hi < 2.4, (k, e_lo / e_hi)  # first order on every path


# -- peers through a fake of diffsolve.bench.peers -----------------------------------------------
@dataclass(frozen=True)
class _Config:
    library: str
    algorithm: str
    spacing: str
    label: str
    ours: tuple[str, dict] | None


@dataclass(frozen=True)
class _Result:
    x: torch.Tensor
    nfe: int
    grid: torch.Tensor


def _fake_peers() -> types.ModuleType:
    """A peer that is our Euler on a Karras grid, and one without an equivalent here."""
    mod = types.ModuleType("diffsolve.bench.peers")

    def run_peer(config, model, x_T, nfe):
        if config.algorithm == "broken":
            raise RuntimeError("peer exploded")
        grid = ds.Karras()(model.process, nfe)
        x, info = ds.sample(model, x_T, "euler", times=grid, return_info=True)
        return _Result(x.double(), info.nfe, grid)

    mod.PeerConfig, mod.PeerResult = _Config, _Result
    mod.available = lambda: {"fake": True}
    mod.peer_configs = lambda process: [
        _Config("fake", "euler", "karras", "fake euler karras", ("euler", {})),
        _Config("fake", "broken", "karras", "fake broken", None),
    ]
    mod.run_peer = run_peer
    return mod


def test_runner_peers_with_a_fake(monkeypatch):
    import diffsolve.bench as bench

    fake = _fake_peers()
    monkeypatch.setitem(sys.modules, "diffsolve.bench.peers", fake)
    monkeypatch.setattr(bench, "peers", fake, raising=False)
    res = run_benchmark(
        "gmm64", "sd", ["euler"], nfes=[5, 10], schedules=["karras"], batch=8, peers=True
    )
    ours = {r["nfe"]: r for r in res.rows if r["kind"] == "diffsolve"}
    peer = {r["nfe"]: r for r in res.rows if r["label"] == "fake euler karras"}
    broken = [r for r in res.rows if r["label"] == "fake broken"]
    for n in (5, 10):
        # the fake peer IS euler on karras: identical errors, ratio exactly 1
        assert peer[n]["err_standard"] == pytest.approx(ours[n]["err_standard"], rel=1e-12)
        assert peer[n]["ratio_standard"] == pytest.approx(1.0, rel=1e-12)
        assert peer[n]["ours"]["nfe_used"] == peer[n]["nfe_used"] == n
    assert len(broken) == 2 and all("peer exploded" in r["error"] for r in broken)
    assert res.meta["peers"]["available"] == {"fake": True}
    json.dumps(res.to_json(), allow_nan=False)
    # the report shows the peer in its own section and the like-for-like ratio
    from rich.console import Console

    from diffsolve.bench import report

    console = Console(record=True, width=200)
    console.print(report.results_table(res.rows, res.meta, continued=True))
    console.print(report.ratio_table(res.rows))
    text = console.export_text()
    assert "fake euler karras" in text and "1.000" in text and "fail" in text


def _have_peers() -> bool:
    try:
        from diffsolve.bench.peers import available
    except ImportError:
        return False
    return all(available().values())


@pytest.mark.peers
@pytest.mark.skipif(not _have_peers(), reason="needs diffusers and k-diffusion")
def test_runner_with_the_real_peers():
    res = run_benchmark("gmm64", "sd", ["euler"], nfes=[8], batch=4, peers=True)
    peers = {r["label"]: r for r in res.rows if r["kind"] == "peer"}
    assert len(peers) == len(res.meta["peers"]["configs"]) > 10
    assert all(r["error"] is None and 0 < r["err_standard"] < 2 for r in peers.values())
    # Euler is Euler: on the peer's own grid ours matches to the peers' float32 tables
    assert peers["k-diff euler karras"]["ratio_standard"] == pytest.approx(1.0, abs=1e-5)
    assert peers["diffusers Euler default"]["ratio_standard"] == pytest.approx(1.0, abs=1e-4)
    json.dumps(res.to_json(), allow_nan=False)
