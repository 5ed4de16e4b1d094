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
