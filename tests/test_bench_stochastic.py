"""`diffsolve bench --stochastic`: distribution distances of SDE samplers next to ODE solvers."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from diffsolve.bench.stochastic import default_sde_solvers, run_stochastic_benchmark
from diffsolve.cli import app


def test_distances_fall_with_nfe_and_frame_the_exact_floor(sd):
    res = run_stochastic_benchmark(
        "gmm2d", sd, solver_names=["ddpm"], nfes=(3, 50), n=1024, ode=("euler",), extras=False
    )
    by = {(r["label"], r["nfe"]): r for r in res.rows}
    assert {r["kind"] for r in res.rows} == {"exact", "ode", "sde"}
    assert all(r["error"] is None for r in res.rows)
    floor = by[("exact samples", 3)]["sw2"]
    # ancestral sampling at 3 steps is far off; at 50 it is near the Monte-Carlo floor
    # (measured: sw2 0.295 → 0.056, floor 0.066; |loglik − exact| 8.3 → 0.27 nats)
    assert by[("ddpm", 3)]["sw2"] > 3 * by[("ddpm", 50)]["sw2"]
    assert by[("ddpm", 50)]["sw2"] < 1.5 * floor
    exact_ll = by[("exact samples", 3)]["loglik"]
    assert abs(by[("ddpm", 50)]["loglik"] - exact_ll) < abs(by[("ddpm", 3)]["loglik"] - exact_ll)
    assert by[("ddpm", 50)]["nfe_used"] == 50


def test_default_samplers_are_the_stochastic_ones(sd):
    names = default_sde_solvers(sd)
    assert {"ddpm", "euler_maruyama", "pc", "dpmpp_2m_sde"} <= set(names)
    assert "euler" not in names and "mrs" not in names


def test_cli_stochastic_writes_json_and_markdown(tmp_path):
    out = tmp_path / "sde"
    args = ["bench", "--stochastic", "--solvers", "ddpm", "--nfe", "5", "--batch", "128"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "bench-stochastic.json").read_text())
    assert data["meta"]["model"] == "gmm2d" and data["meta"]["n"] == 128
    assert {r["label"] for r in data["rows"]} >= {"exact samples", "ddpm", "auto"}
    md = (out / "bench-stochastic.md").read_text()
    assert "| sde | ddpm |" in md and "sliced W2" in md
