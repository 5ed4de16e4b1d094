"""Sharded, resumable sampling (issue 14): torchrun world-size invariance, SIGKILL and rerun,
split invariance, refusals, verification and the streamed summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import diffsolve as ds
from diffsolve import nets
from diffsolve.cli import app
from diffsolve.shards import cycle_labels, load_shards, sample_shards, shard_summary

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
CLI = ["sample", "--model", "digits-vp", "--nfe", "3", "--label", "all", "--no-progress"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


class GaussianX0(torch.nn.Module):
    """The exact x̂0 of data N(m, s²I) on the flow path x_t = (1 − t)·x0 + t·ε:
    E[x0 | x_t] = m + a·s²·(x − a·m)/(a²s² + t²), a = 1 − t. Elementwise, so a sample's bits do
    not depend on its batch. Counts its calls."""

    def __init__(self, m: float = 0.5, s: float = 0.3):
        super().__init__()
        self.register_buffer("m", torch.tensor(m))
        self.s2 = s * s
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        a = 1 - t
        x0 = self.m + a * self.s2 * (x - a * self.m) / (a * a * self.s2 + t * t)
        return x0 + 0.01 * cond["label"].reshape(t.shape).to(x.dtype) if cond else x0


def _gauss(m: float = 0.5) -> ds.Denoiser:
    return ds.Denoiser(GaussianX0(m), ds.FlowMatching(), "x0", sample_shape=(3,))


def test_torchrun_two_ranks_equal_one_rank_bit_for_bit(tmp_path):
    args = [*CLI, "--num-samples", "22", "--shard-size", "5", "--batch", "3"]
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "diffsolve", *args, "--out-dir", str(two)]  # fmt: skip
    # its own process group: on a timeout the ranks go too, not only the launcher
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    one = tmp_path / "one"
    res1 = runner.invoke(app, [*args, "--out-dir", str(one)])
    assert res1.exit_code == 0, res1.output
    a, ia = load_shards(one)
    b, ib = load_shards(two)
    assert torch.equal(ia, torch.arange(22)) and torch.equal(ib, ia)
    assert torch.equal(a, b)  # bit for bit
    man = json.loads((two / "manifest.json").read_text())
    assert man["complete"] and man["world_size"] == 2
    assert [r["rank"] for r in man["shards"]] == [0, 1, 0, 1, 0]  # shard k on rank k mod 2
    assert man["config"] == json.loads((one / "manifest.json").read_text())["config"]
    # the labels rule: sample i asked for digit i mod 10
    with np.load(two / "shard-000003.npz") as z:
        assert z["indices"].tolist() == [15, 16, 17, 18, 19]
        assert z["cond_label"].tolist() == [5, 6, 7, 8, 9]


def test_sigkill_mid_run_then_rerun_completes_without_loss_or_duplicate(tmp_path):
    out = tmp_path / "run"
    args = [*CLI, "--num-samples", "400", "--shard-size", "4", "--batch", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffsolve", *args, "--out-dir", str(out)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (out.is_dir() and any(p.suffix == ".npz" for p in out.iterdir())):
        assert proc.poll() is None, "the run ended before its first shard was seen"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    names = _files(out)
    done = sorted(int(n[6:12]) for n in names if n.endswith(".npz"))
    assert 1 <= len(done) < 100, "killed mid-run"
    for n in names:  # every visible shard is whole: it loads and has its 4 indices
        if n.endswith(".npz"):
            with np.load(out / n) as z:
                k = int(n[6:12])
                assert z["indices"].tolist() == list(range(4 * k, 4 * k + 4))
    recorded = [k for k in done if f"shard-{k:06d}.json" in names]  # .npz and its record
    kept = {k: (out / f"shard-{k:06d}.npz").stat() for k in recorded}
    res = runner.invoke(app, [*args, "--out-dir", str(out)])
    assert res.exit_code == 0, res.output
    for k, st in kept.items():  # finished shards are verified, not rewritten
        now = (out / f"shard-{k:06d}.npz").stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not [n for n in _files(out) if n.endswith(".tmp")]  # the killed run's partial file
    x, idx = load_shards(out)  # verified: hashes, indices 0..399 exactly once
    assert torch.equal(idx, torch.arange(400))
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["shards"]) == 100 and man["complete"]
    # shards from before and after the kill are what ds.sample gives those samples
    model = nets.model("digits-vp")
    for k in (done[0], 99):
        i = range(4 * k, 4 * k + 4)
        x_T = torch.cat(
            [
                model.process.prior((1, 1, 8, 8), generator=torch.Generator().manual_seed(j))
                for j in i
            ]
        )
        want = ds.sample(
            model, x_T, ds.get_solver("unipc"), 3, cond={"label": torch.tensor(i) % 10}
        )
        assert torch.equal(x[4 * k : 4 * k + 4], want)
    again = runner.invoke(app, [*args, "--out-dir", str(out)])
    said = " ".join(again.output.split())
    assert "100 shards of 400 samples" in said and "(100 already done" in said


def test_same_samples_for_any_shard_and_batch_size_and_equal_to_one_by_one(tmp_path):
    model = _gauss()
    kw = dict(num_samples=13, solver="dpmpp_2m_sde", nfe=6, seed=7, progress=False)
    cond = cycle_labels([0, 1, 2])
    runs = []
    for k, (s, b) in enumerate([(13, 13), (4, 3), (5, 1)]):
        run = sample_shards(
            model, shard_size=s, batch_size=b, out_dir=tmp_path / str(k), cond_fn=cond, **kw
        )
        assert run.written == list(range(-(-13 // s)))
        runs.append(load_shards(tmp_path / str(k))[0])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # sample i is ds.sample on x_T from its own generator seed+i and noise keyed by seed+i
    for i in (0, 6, 12):
        x_T = model.process.prior((1, 3), generator=torch.Generator().manual_seed(7 + i))
        x = ds.sample(
            model,
            x_T,
            "dpmpp_2m_sde",
            6,
            cond={"label": torch.tensor([i % 3])},
            noise=ds.NoiseSource.from_seeds([7 + i]),
        )
        assert torch.equal(x[0], runs[0][i])
    assert not torch.equal(runs[0][0], runs[0][3])  # same label, different seeds


def test_other_run_in_the_directory_is_refused_before_any_network_call(tmp_path):
    kw = dict(num_samples=6, shard_size=4, out_dir=tmp_path, progress=False)
    sample_shards(_gauss(), nfe=4, **kw)
    for change, field in [
        (dict(nfe=5), "nfe"),
        (dict(nfe=4, solver="ddim"), "solver"),
        (dict(nfe=4, seed=1), "seed"),
        (dict(nfe=4, cond_fn=cycle_labels([1])), "labels"),
    ]:
        model = _gauss()
        with pytest.raises(ValueError, match=rf"another run .*{field}: "):
            sample_shards(model, **{**kw, **change})
        assert model.net.calls == 0
    other = _gauss(m=0.4)  # same architecture, other weights
    with pytest.raises(ValueError, match="model_sha256"):
        sample_shards(other, nfe=4, **kw)
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "shard-000000.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        sample_shards(_gauss(), nfe=4, **{**kw, "out_dir": loose})
    with pytest.raises(ValueError, match="shard_size"):
        sample_shards(_gauss(), nfe=4, **{**kw, "shard_size": 0})
    res = runner.invoke(app, [*CLI, "--num-samples", "6", "--out-dir", str(tmp_path)])
    assert res.exit_code == 2 and "another run" in res.output


def test_corrupted_or_unrecorded_shards_are_redone_and_verified(tmp_path):
    kw = dict(num_samples=12, shard_size=4, out_dir=tmp_path, nfe=4, progress=False)
    sample_shards(_gauss(), **kw)
    ref = load_shards(tmp_path)[0]
    bad = tmp_path / "shard-000001.npz"
    data = bytearray(bad.read_bytes())
    data[-30] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_shards(tmp_path)
    (tmp_path / "shard-000002.json").unlink()  # killed between the .npz and its record
    run = sample_shards(_gauss(), **kw)
    assert run.written == [1, 2] and run.skipped == [0]
    assert torch.equal(load_shards(tmp_path)[0], ref)


def test_streamed_summary_equals_whole_set_statistics(tmp_path):
    from diffsolve.bench.digits import fd_digits

    run = sample_shards(
        nets.model("digits-vp"),
        num_samples=30,
        shard_size=8,
        out_dir=tmp_path,
        nfe=3,
        cond_fn=cycle_labels([3, 5]),
        summary="digits",
        progress=False,
    )
    x = load_shards(tmp_path)[0].double().numpy()
    s = run.summary
    assert s == json.loads((tmp_path / "manifest.json").read_text())["summary"]
    assert s["values"] == x.size and s["min"] == x.min() and s["max"] == x.max()
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert s["std"] == pytest.approx(x.std(), rel=1e-9)
    assert s["fraction_outside_unit"] == (np.abs(x) > 1).mean()
    whole = fd_digits(torch.from_numpy(x).float(), torch.tensor([3, 5]))
    assert s["fd_digits"] == pytest.approx(whole, rel=1e-6)
    assert shard_summary(tmp_path) == {k: v for k, v in s.items() if "fd" not in k}
