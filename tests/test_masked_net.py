"""The shipped digits-masked network: loads offline, samples digits, FD-digits under a bound."""

import torch

import diffsolve as ds
from diffsolve import nets
from diffsolve.bench.digits import fd_digits
from diffsolve.nets.masked import DigitsMaskedNet, tokens_to_images


def test_loads_with_digest_and_samples_without_masks():
    torch.set_num_threads(1)
    net, process, info = nets.load("digits-masked")
    assert isinstance(net, DigitsMaskedNet) and process is None
    assert info.sha256 is not None and info.path.stat().st_size < 2_000_000
    assert info.training["steps"] > 0 and info.training["wall_seconds"] < 600
    model = nets.masked_model()
    assert (model.vocab_size, model.mask_id) == (17, 17)
    with torch.no_grad():
        x, run = ds.sample_masked(
            model, 4, 64, "fhs", generator=torch.Generator().manual_seed(0), return_info=True
        )
    assert run.nfe == 64 and x.shape == (4, 64) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) <= 16
    logits = net(torch.full((2, 64), 17), torch.ones(2))
    assert logits.shape == (2, 64, 17)


def test_fd_digits_of_samples():
    # measured: 146 and 157 (200 samples, FHS 16 calls, seeds 0 and 1); pixels drawn
    # independently from the data's per-position marginals score 418, uniform tokens 725
    torch.set_num_threads(1)
    with torch.no_grad():
        x = ds.sample_masked(
            nets.masked_model(),
            200,
            64,
            "fhs",
            steps=16,
            generator=torch.Generator().manual_seed(0),
        )
    assert fd_digits(tokens_to_images(x)) < 210


def test_cli_sample_masked(tmp_path):
    import numpy as np
    from typer.testing import CliRunner

    from diffsolve.cli import app

    out = tmp_path / "grid.png"
    args = ["sample", "--model", "digits-masked", "--sampler", "ancestral", "--steps", "8"]
    res = CliRunner().invoke(app, [*args, "--n", "4", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert out.is_file()
    s = np.load(tmp_path / "grid.npz")["samples"]
    assert s.shape == (4, 1, 8, 8) and np.allclose((s + 1) * 8, np.round((s + 1) * 8))
    res = CliRunner().invoke(app, ["sample", "--model", "digits-vp", "--sampler", "fhs"])
    assert res.exit_code == 2 and "digits-masked" in res.output
