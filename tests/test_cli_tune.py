"""``diffsolve tune``, ``sample --tuned`` and ``bench --tuned`` through typer's CliRunner.

Tiny budgets: few calibration samples, one or two iterations, a loose teacher for the network;
one torch thread (the nets are tiny; a shared machine makes more threads slower).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import diffsolve as ds
from diffsolve.bench.gmm import get_gmm
from diffsolve.bench.runner import get_process, prediction_for
from diffsolve.cli import app

runner = CliRunner()


def _text(output: str) -> str:
    """The output with rich's error-box borders and line wrapping taken out."""
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gmm_dir(tmp_path_factory):
    """gmm2d on the SD process, NFE 3 and 4, the default method (auto) at 2 iterations/phase
    on minibatches of 4 of the 8 calibration noises."""
    out = tmp_path_factory.mktemp("tuned-gmm")
    args = ["tune", "--model", "gmm2d", "--nfe", "3,4", "--calib", "8", "--iters", "2"]
    args += ["--batch", "4"]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def net_dir(tmp_path_factory):
    """digits-vp at NFE 3: 2 calibration samples, a loose teacher, one s4s iteration, the
    network's activations recomputed in the backward pass (--checkpoint)."""
    out = tmp_path_factory.mktemp("tuned-net")
    args = ["tune", "--model", "digits-vp", "--nfe", "3", "--calib", "2", "--rtol", "1e-3"]
    args += ["--iters", "1", "--method", "s4s", "--checkpoint", "--no-progress", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert ds.load_tuned(out / "digits-vp-nfe3.json").info["checkpoint"] is True
    return out


def test_tune_on_a_mixture_writes_files_and_summary(gmm_dir):
    assert sorted(p.name for p in gmm_dir.iterdir()) == [
        "gmm2d-nfe3.json",
        "gmm2d-nfe4.json",
        "summary.json",
    ]
    proc = get_process("sd")
    den = get_gmm("gmm2d").denoiser(proc, prediction_for(proc))
    for n in (3, 4):
        tuned = ds.load_tuned(gmm_dir / f"gmm2d-nfe{n}.json", model=den, nfe=n)
        assert tuned.nfe == n and tuned.info["method"] == "auto" and tuned.info["batch"] == 4
        cal = tuned.info["calibration"]
        assert cal["model"] == "gmm2d" and cal["process"] == "sd" and cal["calib"] == 8
        assert cal["noise_seed"] == 1_000_000  # documented: manual_seed(1_000_000 + seed)
    summary = json.loads((gmm_dir / "summary.json").read_text())
    entries = {e["nfe"]: e for e in summary["entries"]}
    assert sorted(entries) == [3, 4]
    for e in entries.values():
        assert e["error"] is None and e["seconds"] > 0 and e["teacher_seconds"] > 0
        # the best iterate is kept, so tuning never makes the calibration error worse
        assert e["calib_rel_rmse_after"] <= e["calib_rel_rmse_before"] * (1 + 1e-9)


def test_the_calibration_noise_is_drawn_from_the_documented_seed(gmm_dir):
    # the teacher of the documented noise reproduces the run's "before" error exactly
    proc = get_process("sd")
    gmm = get_gmm("gmm2d")
    den = gmm.denoiser(proc, prediction_for(proc))
    gen = torch.Generator().manual_seed(1_000_000 + 0)
    x = proc.prior((8, *gmm.shape), generator=gen, dtype=torch.float64)
    summary = json.loads((gmm_dir / "summary.json").read_text())
    entry = next(e for e in summary["entries"] if e["nfe"] == 3)
    # at the teacher tolerance the run recorded (the CLI's --rtol)
    again = ds.tune(den, x, 3, method="s4s", iters=1, rtol=entry["rtol"])
    assert again.info["calib_rel_rmse_before"] == pytest.approx(
        entry["calib_rel_rmse_before"], rel=1e-9
    )


def test_bench_tuned_rows_beside_the_others(gmm_dir, tmp_path):
    args = ["bench", "--model", "gmm2d", "--solvers", "euler", "--nfe", "3,4", "--batch", "4"]
    args += ["--tuned", str(gmm_dir), "--no-check", "--no-plot", "--out", str(tmp_path)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "tuned:auto" in _text(res.output)
    data = json.loads((tmp_path / "bench.json").read_text())
    tuned = [r for r in data["rows"] if r["label"] == "tuned:auto"]
    assert [r["nfe"] for r in tuned] == [3, 4] and all(r["nfe_used"] == r["nfe"] for r in tuned)
    assert all(r["error"] is None and 0 < r["err_standard"] < 1 for r in tuned)
    assert tuned[0]["tuned"]["file"].endswith("gmm2d-nfe3.json")
    assert len(data["meta"]["tuned"]) == 2


def test_bench_tuned_refuses_mismatches_before_work(gmm_dir, tmp_path):
    base = ["bench", "--solvers", "euler", "--nfe", "4", "--batch", "4", "--out", str(tmp_path)]
    # another process: the file's signature does not match
    res = runner.invoke(
        app, [*base, "--model", "gmm2d", "--process", "edm", "--tuned", str(gmm_dir)]
    )
    assert res.exit_code == 2 and "another process" in _text(res.output)
    # no file for this model in the folder: says what is there
    res = runner.invoke(app, [*base, "--model", "gmm64", "--tuned", str(gmm_dir)])
    assert res.exit_code == 2 and "gmm2d-nfe3.json" in _text(res.output)
    # one file given directly, but tuned for another model (same process)
    one = str(gmm_dir / "gmm2d-nfe4.json")
    res = runner.invoke(app, [*base, "--model", "gmm64", "--tuned", one])
    assert res.exit_code == 2 and "tuned for the model 'gmm2d'" in _text(res.output)
    # never scored on the calibration noise
    res = runner.invoke(app, [*base, "--model", "gmm2d", "--seed", "1000000", "--tuned", one])
    assert res.exit_code == 2 and "calibrated on the noise" in _text(res.output)
    res = runner.invoke(app, [*base, "--stochastic", "--tuned", str(gmm_dir)])
    assert res.exit_code == 2 and "--stochastic" in _text(res.output)
    res = runner.invoke(app, [*base, "--tuned", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "neither a folder nor a file" in _text(res.output)
    assert not (tmp_path / "bench.json").exists()


def test_sample_with_a_tuned_file(net_dir, gmm_dir, tmp_path):
    f = net_dir / "digits-vp-nfe3.json"
    assert json.loads((net_dir / "summary.json").read_text())["entries"][0]["nfe"] == 3
    out = tmp_path / "grid.png"
    res = runner.invoke(app, ["sample", "--tuned", str(f), "--n", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    npz = np.load(tmp_path / "grid.npz")
    meta = json.loads(str(npz["meta"]))
    assert meta["nfe"] == 3 and meta["solver"] == "tuned:s4s" and meta["tuned"] == str(f)
    assert npz["samples"].shape == (4, 1, 8, 8) and np.isfinite(npz["samples"]).all()
    # --nfe, when given, must be the file's
    res = runner.invoke(app, ["sample", "--tuned", str(f), "--nfe", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "--tuned", str(f), "--nfe", "5", "--out", str(out)])
    assert res.exit_code == 2 and "nfe=3" in _text(res.output)
    # a file made for another model or process fails clearly
    res = runner.invoke(app, ["sample", "--tuned", str(gmm_dir / "gmm2d-nfe3.json")])
    assert res.exit_code == 2 and "another process" in _text(res.output)
    res = runner.invoke(app, ["sample", "--model", "digits-flow", "--tuned", str(f)])
    assert res.exit_code == 2 and "another process" in _text(res.output)
    # a tuned solver brings its own grid
    res = runner.invoke(app, ["sample", "--tuned", str(f), "--solver", "euler"])
    assert res.exit_code == 2 and "own grid" in _text(res.output)


def test_bench_tuned_on_a_shipped_network(net_dir, tmp_path):
    args = ["bench", "--model", "digits-vp", "--solvers", "euler", "--nfe", "3", "--batch", "4"]
    res = runner.invoke(app, [*args, "--tuned", str(net_dir), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "bench-digits-vp.json").read_text())
    err = {r["label"]: r for r in data["rows"]}
    assert set(err) == {"euler", "tuned:s4s"}
    assert err["tuned:s4s"]["nfe_used"] == 3 and err["tuned:s4s"]["err_standard"] > 0
    assert err["tuned:s4s"]["fd"] > 0 and "tuned:s4s" in _text(res.output)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gmm2d", "--nfe", "4,x"], "comma-separated integers"),
        (["--model", "gmm2d", "--nfe", "1,4"], "at least 2 network calls"),
        (["--model", "gmm2d", "--nfe", "4,5,4"], "repeated"),
        (["--model", "gmm2d", "--nfe", ","], "at least one budget"),
        (["--model", "nope"], "valid: digits-vp, digits-flow, gmm2d, gmm64"),
        (["--model", "gmm2d", "--method", "nope"], "valid: auto, ld3, s4s, gits, autodiffusion"),
        (["--model", "gmm2d", "--process", "nope"], "valid: sd, ddpm"),
        (["--model", "digits-vp", "--process", "sd"], "has its own process"),
        (["--model", "gmm64", "--guidance", "3"], "no classes"),
        (["--model", "digits-vp", "--guidance", "3", "--label", "none"], "needs a class"),
        (["--model", "gmm2d", "--calib", "0"], "--calib"),
        (["--model", "gmm2d", "--batch", "0"], "--batch"),
    ],
)
def test_tune_rejects_bad_arguments_before_work(tmp_path, args, message):
    out = tmp_path / "tuned"
    t0 = time.perf_counter()
    res = runner.invoke(app, ["tune", *args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert message in _text(res.output), res.output
    assert not out.exists() and time.perf_counter() - t0 < 5


def test_tune_keeps_going_after_a_failed_budget(tmp_path, monkeypatch):
    import diffsolve.tuning as tuning

    real = tuning.tune

    def flaky(model, x, nfe, *a, **kw):
        if nfe == 4:
            raise tuning.TuningError("grid: the calibration loss diverged")
        return real(model, x, nfe, *a, **kw)

    monkeypatch.setattr(tuning, "tune", flaky)
    args = ["tune", "--model", "gmm2d", "--nfe", "3,4", "--calib", "4", "--iters", "1"]
    res = runner.invoke(app, [*args, "--method", "ld3", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "diverged" in _text(res.output)
    assert (tmp_path / "gmm2d-nfe3.json").exists() and not (tmp_path / "gmm2d-nfe4.json").exists()
    entries = {e["nfe"]: e for e in json.loads((tmp_path / "summary.json").read_text())["entries"]}
    assert entries[3]["error"] is None and "diverged" in entries[4]["error"]


def test_tune_help_names_every_method():
    from diffsolve.tuning.tune import METHODS

    result = runner.invoke(app, ["tune", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    text = _text(result.output)
    assert all(name in text for name in METHODS), text
