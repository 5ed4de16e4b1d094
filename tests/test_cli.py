"""The command line: ``diffsolve list`` and ``diffsolve bench`` through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import diffsolve as ds
from diffsolve.cli import app

runner = CliRunner()


def test_list_shows_solvers_schedules_processes_models():
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0, res.output
    for word in ("euler", "logsnr", "karras", "gmm64", "gmm3072", "sd", "flow"):
        assert word in res.output
    data = json.loads(runner.invoke(app, ["list", "--json"]).output)
    assert {s["name"] for s in data["solvers"]} == {"auto", *ds.solvers()}
    assert {"digits-vp", "digits-flow"} <= set(data["networks"])
    assert set(data["schedules"]) == set(ds.schedules())
    assert data["models"]["gmm64"]["dim"] == 64


def test_bench_quick_writes_json_and_png(tmp_path):
    out = tmp_path / "bench"
    res = runner.invoke(app, ["bench", "--quick", "--out", str(out), "--continued"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["batch"] == 16 and data["meta"]["nfes"] == [4, 6, 10, 15]
    labels = {r["label"] for r in data["rows"]}
    assert "euler" in labels and "auto" in labels
    assert not any(ds.get_solver(lb).stochastic for lb in labels - {"auto"})
    assert len(data["rows"]) == 4 * len(labels)
    euler = {r["nfe"]: r["err_standard"] for r in data["rows"] if r["label"] == "euler"}
    assert euler[15] < euler[4] < 1
    assert {s["label"] for s in data["summary"]} == labels
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "NFE 15" in res.output and "stays below" in res.output


def test_bench_json_on_stdout_and_no_plot(tmp_path):
    res = runner.invoke(
        app,
        [
            "bench",
            "--solvers",
            "euler",
            "--nfe",
            "5,10",
            "--batch",
            "4",
            "--model",
            "gmm2d",
            "--process",
            "edm",
            "--schedule",
            "karras",
            "--out",
            str(tmp_path),
            "--json",
            "--no-plot",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["nfe"] for r in data["rows"]] == [5, 10]
    assert data["rows"][0]["schedule"] == "karras" and data["meta"]["process"] == "edm"
    assert (tmp_path / "bench.json").exists() and not (tmp_path / "bench.png").exists()


def test_bench_rejects_bad_input(tmp_path):
    res = runner.invoke(app, ["bench", "--solvers", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown solver 'nope'" in res.output
    res = runner.invoke(app, ["bench", "--nfe", "4,x", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "comma-separated integers" in res.output


def test_bench_on_a_shipped_network(tmp_path):
    out = tmp_path / "net"
    args = ["bench", "--model", "digits-vp", "--solvers", "auto,euler", "--nfe", "5,20"]
    res = runner.invoke(app, [*args, "--batch", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "bench-digits-vp.json").read_text())
    ref = data["meta"]["reference"]
    assert ref["method"] == "rk45" and ref["nfe"] > 100
    err = {(r["label"], r["nfe"]): r["err_standard"] for r in data["rows"]}
    # against the network's own converged ODE solution, more steps are closer
    assert err[("euler", 20)] < err[("euler", 5)] and err[("auto", 20)] < err[("auto", 5)]
    assert all(r["fd"] > 0 for r in data["rows"])
    assert "FD-digits" in (out / "bench-digits-vp.md").read_text()


# -- issue 11: the rough edges a new user hits ---------------------------------------------------
def test_version_and_python_dash_m():
    import subprocess
    import sys

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"diffsolve {ds.__version__}"
    proc = subprocess.run(
        [sys.executable, "-m", "diffsolve", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"diffsolve {ds.__version__}"


def test_bench_unknown_schedule_fails_at_once(tmp_path, monkeypatch):
    import diffsolve.bench.runner as runner_mod

    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(runner_mod, "run_benchmark", no_work)
    out = tmp_path / "b"
    for extra in ([], ["--model", "digits-vp"]):
        res = runner.invoke(app, ["bench", "--schedule", "karras,karas", "--out", str(out), *extra])
        assert res.exit_code == 2, res.output
        assert "'karas'" in res.output and "karras" in res.output and "logsnr" in res.output
        assert not out.exists()
    res = runner.invoke(app, ["bench", "--stochastic", "--schedule", "karras", "--out", str(out)])
    assert res.exit_code == 2 and "omit --schedule" in res.output and not out.exists()


def test_bench_peers_not_installed_says_so(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import diffsolve.bench.peers as peers_mod
    from diffsolve.cli import _check_peers

    monkeypatch.setattr(peers_mod, "available", lambda: {"diffusers": False, "k-diffusion": False})
    out = tmp_path / "p"
    res = runner.invoke(app, ["bench", "--peers", "--quick", "--out", str(out)])
    assert res.exit_code == 2 and "no peer library is installed" in res.output
    assert "pip install" in res.output and not out.exists()
    monkeypatch.setattr(peers_mod, "available", lambda: {"diffusers": True, "k-diffusion": False})
    buf = io.StringIO()
    _check_peers(Console(file=buf, width=200))
    assert "k-diffusion not installed, its rows are left out" in buf.getvalue()


def test_bench_quick_on_a_network_says_what_it_runs(tmp_path):
    out = tmp_path / "q"
    args = ["bench", "--quick", "--model", "digits-vp", "--solvers", "euler", "--batch", "4"]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "the converged reference first (rk45 at rtol 0.0001 on 4 samples" in res.output
    data = json.loads((out / "bench-digits-vp.json").read_text())
    ref = data["meta"]["reference"]
    assert ref["rtol"] == 1e-4 and 100 < ref["nfe"] < 1000  # ≈ 600 NFE, not ≈ 1900
    assert [r["nfe"] for r in data["rows"]] == [5, 10]


def _sample_npz(tmp_path, *args):
    import numpy as np

    out = tmp_path / "g.png"
    res = runner.invoke(app, ["sample", *args, "--n", "4", "--out", str(out), "--no-progress"])
    if res.exit_code != 0:
        return res, None
    z = np.load(out.with_suffix(".npz"))
    return res, (z["samples"], json.loads(str(z["meta"])))


def test_sample_solver_auto_is_ds_sample_auto(tmp_path):
    import torch

    from diffsolve import nets

    for guidance in (None, 3.0):
        extra = ["--guidance", "3", "--label", "7"] if guidance else []
        res, (x, meta) = _sample_npz(tmp_path, "--solver", "auto", "--nfe", "6", *extra)
        assert res.exit_code == 0, res.output
        assert meta["solver"].startswith("auto:") and meta["nfe"] == 6
        den = nets.model("digits-vp", guidance=guidance)
        x_T = den.process.prior((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        cond = {"label": torch.full((4,), 7)} if guidance else {}
        want = ds.sample(den, x_T.float(), "auto", nfe=6, cond=cond)
        assert torch.allclose(torch.as_tensor(x), want, atol=1e-5)


def test_sample_adaptive_solvers(tmp_path):
    res, (_, meta) = _sample_npz(tmp_path, "--solver", "dpm_adaptive", "--rtol", "0.05")
    assert res.exit_code == 0, res.output
    assert meta["solver"] == "dpm_adaptive" and meta["rtol"] == 0.05 and meta["nfe"] > 10
    res, (_, meta) = _sample_npz(tmp_path, "--solver", "rk45", "--rtol", "1e-2", "--atol", "1e-2")
    assert res.exit_code == 0, res.output
    assert meta["solver"] == "rk45" and meta["rtol"] == 1e-2 and meta["nfe"] > 10
    res, _ = _sample_npz(tmp_path, "--solver", "rk45", "--nfe", "10")
    assert res.exit_code == 2 and "rk45 chooses its own steps: omit --nfe" in res.output
    res, _ = _sample_npz(tmp_path, "--solver", "unipc", "--rtol", "1e-3")
    assert res.exit_code == 2 and "--rtol/--atol are for the adaptive solvers" in res.output
    res, _ = _sample_npz(tmp_path, "--solver", "rk45", "--rtol", "-1")
    assert res.exit_code == 2 and "must be positive" in res.output


def test_sample_refuses_negative_guidance(tmp_path):
    res, _ = _sample_npz(tmp_path, "--guidance", "-3", "--label", "7")
    assert res.exit_code == 2 and "negative" in res.output


def test_fd_digits_without_the_digits_extra_is_refused_before_work(tmp_path, monkeypatch):
    import importlib.util

    import diffsolve.bench.networks as networks_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a)
    )

    def no_work(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(networks_mod, "run_network_benchmark", no_work)
    out = tmp_path / "d"
    res = runner.invoke(app, ["bench", "--model", "digits-vp", "--quick", "--out", str(out)])
    assert res.exit_code == 2 and "needs scikit-learn" in res.output and not out.exists()
    res, _ = _sample_npz(tmp_path, "--score")
    assert res.exit_code == 2 and 'pip install -e ".[digits]"' in res.output
    assert not (tmp_path / "g.png").exists()
