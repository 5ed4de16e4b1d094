"""The shipped digits networks: loading, sample quality (FD-digits), guidance, errors, offline use,
the ``diffsolve sample`` command and the exact denoiser of the finite data set.

Everything uses the weights in the package (never retrains). Numbers quoted in comments were
measured with the shipped weights (see the training header of each file).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve import nets
from diffsolve.bench.digits import (
    FiniteData,
    class_accuracy,
    digits_data,
    digits_finite,
    fd_digits,
    frechet_distance,
)
from diffsolve.nets import WeightsError
from diffsolve.nets._io import read_weights, save_weights

N = 256  # samples per FD estimate (FD is biased upward at small N: compare at equal N)


@cache
def _samples(name: str, nfe: int, guidance: float | None = None, label: int | None = None):
    model = nets.model(name, guidance=guidance)
    g = torch.Generator().manual_seed(0)
    n = N if label is None else 64
    x_T = ds.prior(model.process, (n, 1, 8, 8), generator=g)
    cond = {} if label is None else {"label": torch.full((n,), label)}
    return ds.sample(model, x_T, solver="unipc", nfe=nfe, cond=cond)


@cache
def _noise_fd() -> float:
    return fd_digits(torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(1)))


# -- loading ------------------------------------------------------------------------------------
def test_shipped_networks_load_with_their_process_and_prediction():
    vp = nets.model("digits-vp")
    assert isinstance(vp, ds.Denoiser) and vp.prediction == "eps"
    assert isinstance(vp.process, ds.VPDiscrete) and vp.process.num_train_steps == 1000
    ref = ds.VPDiscrete.from_betas("linear")
    assert torch.equal(vp.process.alphas_cumprod, ref.alphas_cumprod)
    fl = nets.model("digits-flow")
    assert fl.prediction == "velocity" and isinstance(fl.process, ds.FlowMatching)
    assert vp.sample_shape == (1, 8, 8)
    _, _, info = nets.load("digits-vp")
    assert 1e5 < info.num_params < 1e6
    assert info.training["steps"] > 0 and info.training["cpu_seconds"] > 0


def test_weights_are_small_safetensors_in_the_package():
    files = sorted(nets.WEIGHTS_DIR.glob("*.safetensors"))
    assert {f.stem for f in files} == set(nets.available())
    assert sum(f.stat().st_size for f in files) < 5 * 2**20
    for f in files:
        assert f.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle


def test_label_none_and_minus_one_are_the_null_class():
    net, _, _ = nets.load("digits-vp")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 500.0)
    a = net(x, t)
    assert torch.equal(a, net(x, t, torch.full((4,), -1)))
    assert torch.equal(a, net(x, t, -1))
    assert not torch.allclose(a, net(x, t, torch.full((4,), 3)))


def test_skip_connections_are_hook_points():
    net, _, _ = nets.load("digits-vp")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 300.0)
    base = net(x, t)
    assert len(net.skips) == 3 and net.skip_channels == (20, 40, 40)
    outs = []
    for i in range(3):
        h = net.skips[i].register_forward_hook(lambda m, inp, out: out * 1.0)
        assert torch.equal(net(x, t), base)
        h.remove()
        h = net.skips[i].register_forward_hook(lambda m, inp, out: out * 0.5)
        outs.append(net(x, t))
        h.remove()
        assert not torch.allclose(outs[-1], base, atol=1e-4)  # every skip carries signal
    assert torch.equal(net(x, t), base)  # removed hooks leave no trace


# -- sample quality -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["digits-vp", "digits-flow"])
def test_ten_nfe_samples_are_digits_by_fd(name):
    # measured at N = 256: digits-vp 65, digits-flow 54; real-data floor 21; noise 653
    fd = fd_digits(_samples(name, 10))
    noise = _noise_fd()
    real = digits_data()[0]
    perm = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(0))[:N]
    fd_real = fd_digits(real[perm])  # the floor at this sample count
    assert fd_real < fd < 0.15 * noise, (fd_real, fd, noise)


def test_cfg_raises_class_accuracy():
    label = 7
    acc_uncond = class_accuracy(_samples("digits-vp", 10), label)
    acc_cond = class_accuracy(_samples("digits-vp", 10, None, label), label)
    acc_cfg = class_accuracy(_samples("digits-vp", 10, 3.0, label), label)
    # measured: 0.12 unconditional, 0.89 conditional (w = 1), 1.00 at w = 3
    assert acc_uncond < 0.3
    assert acc_cfg > acc_cond > acc_uncond + 0.5, (acc_uncond, acc_cond, acc_cfg)


def test_classifiers_are_accurate():
    _, _, info = nets.load("digits-classifier")
    assert info.training["test_accuracy"] > 0.95
    x, y = digits_data()
    assert class_accuracy(x, y) > 0.97
    net, proc = nets.noisy_classifier()
    assert proc.num_train_steps == 1000
    g = torch.Generator().manual_seed(0)
    t = proc.time_of_index([100])
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    xt = a * x + s * torch.randn(x.shape, generator=g)
    acc = float((net(xt, torch.full((x.shape[0],), 100.0)).argmax(1) == y).float().mean())
    assert acc > 0.9


# -- broken files -------------------------------------------------------------------------------
@pytest.fixture()
def shipped_copy(tmp_path):
    dst = tmp_path / "digits-vp.safetensors"
    shutil.copy(nets.WEIGHTS_DIR / "digits-vp.safetensors", dst)
    return dst


def _rewrite(src: Path, dst: Path, tensors=None, **header_changes) -> Path:
    from safetensors.torch import save_file

    t, _ = read_weights(src)
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
    header.pop("sha256", None)  # a hand-made file: no digest (checked only where present)
    header.update(header_changes)
    header = {k: v for k, v in header.items() if v is not None}
    save_file(tensors if tensors is not None else t, str(dst), metadata=header)
    return dst


def test_truncated_file_names_the_file(shipped_copy):
    data = shipped_copy.read_bytes()
    shipped_copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"digits-vp\.safetensors.*not a readable safetensors"):
        nets.load(shipped_copy)


def test_garbage_and_missing_files(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(WeightsError, match=r"x\.safetensors"):
        nets.load(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        nets.load(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="unknown network"):
        nets.load("digits-gan")


def test_bad_header(shipped_copy, tmp_path):
    dst = tmp_path / "h.safetensors"
    with pytest.raises(WeightsError, match=r"h\.safetensors: header lacks arch"):
        nets.load(_rewrite(shipped_copy, dst, arch=None))
    with pytest.raises(WeightsError, match="not JSON"):
        nets.load(_rewrite(shipped_copy, dst, config="{channels: 20"))
    with pytest.raises(WeightsError, match="unknown architecture 'ResNet'"):
        nets.load(_rewrite(shipped_copy, dst, arch="ResNet"))
    with pytest.raises(WeightsError, match="unknown process kind"):
        nets.load(_rewrite(shipped_copy, dst, process=json.dumps({"kind": "Brownian"})))
    with pytest.raises(WeightsError, match="format version"):
        nets.load(_rewrite(shipped_copy, dst, format_version="99"))


def test_mismatched_tensors(shipped_copy, tmp_path):
    t, meta = read_weights(shipped_copy)
    dst = tmp_path / "m.safetensors"
    few = {k: v for k, v in t.items() if not k.startswith("mid.")}
    with pytest.raises(
        WeightsError, match=r"m\.safetensors does not match.*missing tensors 'mid\."
    ):
        nets.load(_rewrite(shipped_copy, dst, tensors=few))
    extra = {**t, "bonus.weight": torch.zeros(3)}
    with pytest.raises(WeightsError, match=r"unexpected tensors 'bonus\.weight'"):
        nets.load(_rewrite(shipped_copy, dst, tensors=extra))
    # a config that disagrees with the tensors: every shape is named
    wide = json.dumps({**meta["config"], "channels": 16})
    with pytest.raises(WeightsError, match=r"tensor 'conv_in.weight' has shape \(20, 1, 3, 3\)"):
        nets.load(_rewrite(shipped_copy, dst, config=wide))
    nan = {**t, "conv_out.bias": torch.full_like(t["conv_out.bias"], float("nan"))}
    with pytest.raises(WeightsError, match="NaN"):
        nets.load(_rewrite(shipped_copy, dst, tensors=nan))


def test_save_and_reload_roundtrip(tmp_path):
    net, _, info = nets.load("digits-flow")
    p = save_weights(
        tmp_path / "mine.safetensors",
        net,
        {
            "name": "mine",
            "arch": "DigitsUNet",
            "config": info.config,
            "process": info.process,
            "prediction": "velocity",
        },
    )
    net2, proc2, _ = nets.load(p)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(net(x, 0.5), net2(x, 0.5)) and isinstance(proc2, ds.FlowMatching)


# -- offline ------------------------------------------------------------------------------------
def test_loading_and_sampling_work_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    nets._read_cached.cache_clear()
    from diffsolve.nets import data

    data._load.cache_clear()
    model = nets.model("digits-flow", guidance=2.0)
    x = ds.prior(model.process, (8, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    out = ds.sample(model, x, solver="dpmpp_2m", nfe=4, cond={"label": torch.arange(8)})
    assert out.shape == (8, 1, 8, 8) and bool(torch.isfinite(out).all())
    assert math.isfinite(fd_digits(out))


# -- the command --------------------------------------------------------------------------------
def test_cli_sample_writes_png_and_npz_reproducibly(tmp_path):
    from typer.testing import CliRunner

    from diffsolve.cli import app

    runner = CliRunner()
    args = [
        "sample",
        "--model",
        "digits-vp",
        "--solver",
        "unipc",
        "--nfe",
        "5",
        "--guidance",
        "3",
        "--label",
        "7",
        "--n",
        "9",
        "--no-progress",
    ]
    r1 = runner.invoke(app, [*args, "--seed", "0", "--out", str(tmp_path / "a.png")])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, [*args, "--seed", "0", "--out", str(tmp_path / "b.png")])
    r3 = runner.invoke(app, [*args, "--seed", "1", "--out", str(tmp_path / "c.png")])
    assert r2.exit_code == 0 and r3.exit_code == 0
    from matplotlib import image as mimage

    img = mimage.imread(str(tmp_path / "a.png"))
    assert img.shape[0] == img.shape[1] == 3 * (8 * 4 + 1) + 1
    a, b, c = (np.load(tmp_path / f"{k}.npz") for k in "abc")
    assert a["samples"].shape == (9, 1, 8, 8) and (a["labels"] == 7).all()
    assert json.loads(str(a["meta"]))["nfe"] == 5
    assert np.array_equal(a["samples"], b["samples"])
    assert not np.allclose(a["samples"], c["samples"])
    bad = runner.invoke(app, ["sample", "--label", "12", "--out", str(tmp_path / "d.png")])
    assert bad.exit_code != 0


# -- the exact denoiser of the finite data set --------------------------------------------------
def test_finite_data_denoiser_matches_brute_force():
    fd = digits_finite()
    pts = fd.points.numpy()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64)
    for a, s in ((0.3, 0.95), (0.9, 0.45), (0.999, 0.05), (1.0, 0.01)):
        xt = a * fd.sample(5, g) + s * x if s < 0.5 else x
        got = fd.x0_mean(xt, a, s).reshape(5, -1).numpy()
        for b in range(5):
            xb = xt[b].reshape(-1).numpy()
            logw = np.array([-np.sum((xb - a * p) ** 2) / (2 * s * s) for p in pts])
            w = np.exp(logw - logw.max())
            want = (w[:, None] * pts).sum(0) / w.sum()
            np.testing.assert_allclose(got[b], want, rtol=1e-10, atol=1e-12)
    one = FiniteData(fd.points[:1], (1, 8, 8))
    assert torch.allclose(
        one.x0_mean(x, 0.5, 0.8), fd.points[0].reshape(1, 1, 8, 8).expand(5, -1, -1, -1)
    )


def test_finite_data_as_a_model_on_any_process():
    fd = digits_finite()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for proc, pred in (
        (ds.VPDiscrete.from_betas("linear"), "eps"),
        (ds.FlowMatching(), "velocity"),
    ):
        model = fd.denoiser(proc, pred)
        t = 0.4
        p = model(x, t)
        want = fd.x0_mean(x, float(proc.alpha(t)), float(proc.sigma(t)))
        assert float((p.x0 - want).abs().max()) < 1e-10
    # ODE samples of the exact denoiser land on the data (it has memorised the set)
    model = fd.denoiser(ds.VPDiscrete.from_betas("linear"), "eps")
    xT = ds.prior(
        model.process, (4, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    out = ds.sample(model, xT, solver="dpmpp_2m", nfe=30)
    d = torch.cdist(out.reshape(4, -1), fd.points).min(1).values
    assert float(d.max()) < 0.05


def test_frechet_distance_identities():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
    # 1-D closed form: (μ1 − μ2)² + (s1 − s2)²
    assert frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([0.0]), np.array([[1.0]])
    ) == (pytest.approx(1.0 + 1.0))


def test_fd_digits_against_the_requested_classes():
    x, y = digits_data()
    sevens = x[y == 7]
    # all-7 real digits are far from the 10-class distribution, close to the real 7s
    assert fd_digits(sevens, 7) < 0.2 * fd_digits(sevens)
    assert fd_digits(sevens, torch.full((sevens.shape[0],), 7)) == fd_digits(sevens, 7)


# -- issue 11: digests and conditioning checked before any work ---------------------------------
def _data_offset(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


def test_shipped_weights_carry_a_matching_sha256():
    from diffsolve.nets._io import _split, digest

    for name in nets.available():
        path = nets.WEIGHTS_DIR / f"{name}.safetensors"
        header, data = _split(path.read_bytes())
        recorded = header["__metadata__"]["sha256"]
        assert len(recorded) == 64 and recorded == digest(header, data)
        assert nets.load(name)[2].sha256 == recorded


def test_zeroed_bytes_are_detected(shipped_copy):
    raw = bytearray(shipped_copy.read_bytes())
    at = _data_offset(bytes(raw)) + 4096
    assert any(raw[at : at + 64])
    raw[at : at + 64] = bytes(64)  # 16 float32 weights set to 0.0: still a valid safetensors file
    shipped_copy.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match=r"digits-vp\.safetensors is corrupted: its SHA-256"):
        nets.load(shipped_copy)
    with pytest.raises(WeightsError, match="corrupted"):
        read_weights(shipped_copy)


def test_stamping_a_digest_keeps_the_tensors_bit_for_bit(shipped_copy, tmp_path):
    from safetensors.torch import load_file

    from diffsolve.nets._io import _split, stamp_digest

    bare = _rewrite(shipped_copy, tmp_path / "bare.safetensors")  # written without a digest
    before = bare.read_bytes()
    value = stamp_digest(bare)
    after = bare.read_bytes()
    assert before[_data_offset(before) :] == after[_data_offset(after) :]
    old, new = load_file(str(shipped_copy)), load_file(str(bare))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert _split(after)[0]["__metadata__"]["sha256"] == value
    assert nets.load(bare)[2].sha256 == value


def test_save_weights_writes_a_digest_and_a_shipped_name_needs_one(tmp_path, monkeypatch):
    net, _, info = nets.load("digits-classifier")
    meta = {"name": "c", "arch": "DigitsClassifier", "config": info.config}
    p = save_weights(tmp_path / "c.safetensors", net, meta)
    assert len(read_weights(p)[1]["sha256"]) == 64
    # a path without a digest loads (made by hand), a shipped name without one does not
    bare = _rewrite(p, tmp_path / "digits-classifier.safetensors")
    assert nets.load(bare)[2].sha256 is None
    monkeypatch.setattr(nets, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsError, match="shipped network without its SHA-256"):
        nets.load("digits-classifier")


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize(
    ("cond", "match"),
    [
        ({"labels": torch.arange(4)}, r"unknown key\(s\) \['labels'\] \(did you mean 'label'\?\)"),
        ({"label": torch.tensor([1, 2, 3, 12])}, r"label 12 out of range.*0…9 \(−1: no label\)"),
        ({"label": torch.tensor([-2, 0, 0, 0])}, "label -2 out of range"),
        ({"label": torch.ones(4)}, "label must be integer classes"),
        ({"label": torch.zeros(4, 1, dtype=torch.long)}, r"one per sample \(shape \(4,\)\)"),
    ],
)
def test_bad_conditioning_raises_before_the_first_call(cond, match, guidance):
    den = nets.model("digits-vp", guidance=guidance)
    inner = den.model if guidance else den
    calls = []
    inner.net.register_forward_hook(lambda *a: calls.append(1))
    x_T = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match=match):
        ds.sample(den, x_T, "unipc", nfe=5, cond=cond)
    assert calls == []
    ds.sample(den, x_T, "unipc", nfe=5, cond={"label": torch.tensor([0, 9, -1, 3])})
    assert len(calls) == 5


def test_negative_guidance_is_refused():
    with pytest.raises(ValueError, match="negative"):
        nets.model("digits-vp", guidance=-2.0)
