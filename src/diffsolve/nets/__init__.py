"""Networks that ship with diffsolve: trained on scikit-learn's digits, loaded offline.

=============================  ======================================================  ==========
name                           network                                                 prediction
=============================  ======================================================  ==========
``digits-vp``                  class-conditional UNet, DDPM linear VP (1000 steps)     eps
``digits-flow``                class-conditional UNet, rectified flow (α=1−t, σ=t)     velocity
``digits-ctm``                 CTM G(x_t, t, s) distilled from digits-flow (ds.CTM)    velocity
``digits-classifier``          CNN on clean digits: FD-digits features, accuracy       —
``digits-noisy-classifier``    CNN on x_t of digits-vp (classifier guidance)           —
``digits-masked``              transformer, masked diffusion on 17 grey-level tokens   logits
=============================  ======================================================  ==========

Samples are (B, 1, 8, 8) in [−1, 1] (pixel value / 8 − 1). The generative networks take
``label`` (B,) integer classes 0…9; −1 (or no label) is the null class of label dropout, so::

    import diffsolve as ds
    from diffsolve import nets

    model = nets.model("digits-vp")                      # a ds.Denoiser, process baked in
    x_T = ds.prior(model.process, (16, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    x0 = ds.sample(nets.model("digits-vp", guidance=3.0), x_T, solver="unipc", nfe=10,
                   cond={"label": torch.full((16,), 7)})

Weights are safetensors files inside the package (``diffsolve/nets/weights``); nothing is ever
downloaded and nothing is unpickled. Each file carries the SHA-256 of its contents in its header,
checked at load. A missing, truncated, corrupted or mismatched file raises
:class:`WeightsError` naming the file and the problem. The training script is
``python -m diffsolve.nets.train`` (``scripts/train_digits.py``).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..ctm import CTM
from ..denoiser import CFG, Denoiser
from ..processes.base import GaussianProcess
from ..processes.flow import FlowMatching
from ..processes.vp import VPDiscrete
from ._io import DIGEST_KEY, WeightsError, read_weights
from .ctm import CTMUNet
from .masked import DigitsMaskedNet, MaskedConfig, masked_model
from .unet import (
    ClassifierConfig,
    DigitsClassifier,
    DigitsUNet,
    NoisyDigitsClassifier,
    UNetConfig,
)

__all__ = [
    "NETWORKS",
    "WEIGHTS_DIR",
    "ClassifierConfig",
    "DigitsClassifier",
    "DigitsUNet",
    "NetInfo",
    "NoisyDigitsClassifier",
    "UNetConfig",
    "WeightsError",
    "available",
    "classifier",
    "load",
    "masked_model",
    "model",
    "noisy_classifier",
]

WEIGHTS_DIR = Path(__file__).with_name("weights")

NETWORKS: dict[str, str] = {
    "digits-vp": "class-conditional UNet on digits, ε-prediction, DDPM linear VP (1000 steps)",
    "digits-flow": "class-conditional UNet on digits, velocity prediction, rectified flow",
    "digits-ctm": "consistency trajectory model G(x_t, t, s) distilled from digits-flow",
    "digits-classifier": "digits classifier on clean images (FD-digits features, accuracy)",
    "digits-noisy-classifier": "noise-conditional digits classifier on the digits-vp process",
    "digits-masked": "masked discrete diffusion on the digits' grey levels (nets.masked_model)",
}

_ARCHS: dict[str, tuple[type[nn.Module], type]] = {
    "DigitsUNet": (DigitsUNet, UNetConfig),
    "DigitsClassifier": (DigitsClassifier, ClassifierConfig),
    "NoisyDigitsClassifier": (NoisyDigitsClassifier, ClassifierConfig),
    "CTMUNet": (CTMUNet, UNetConfig),
    "DigitsMaskedNet": (DigitsMaskedNet, MaskedConfig),
}

SAMPLE_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class NetInfo:
    """What a weights file says about its network."""

    name: str
    arch: str
    config: dict[str, Any]
    path: Path
    prediction: str | None = None
    process: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    num_params: int = 0
    sha256: str | None = None  # the digest stored in the file (checked when it was read)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return SAMPLE_SHAPE


def available() -> dict[str, str]:
    """Shipped network names with one-line descriptions."""
    return dict(NETWORKS)


def _path_of(name: str | Path) -> Path:
    p = Path(name)
    if p.suffix == ".safetensors":
        return p
    if str(name) not in NETWORKS:
        raise ValueError(
            f"unknown network {name!s}; shipped: {', '.join(NETWORKS)} "
            "(or pass a path to a .safetensors file)"
        )
    return WEIGHTS_DIR / f"{name}.safetensors"


@lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int, size: int) -> tuple[dict, dict]:
    return read_weights(path)


def _process_of(spec: Any, path: Path) -> GaussianProcess:
    if not isinstance(spec, dict) or "kind" not in spec:
        raise WeightsError(f"weights file {path}: header field 'process' is not a process spec")
    kind = spec["kind"]
    args = {k: v for k, v in spec.items() if k != "kind"}
    try:
        if kind == "VPDiscrete.from_betas":
            return VPDiscrete.from_betas(
                args["beta_schedule"], args["beta_start"], args["beta_end"], args["steps"]
            )
        if kind == "FlowMatching":
            return FlowMatching(**args)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"weights file {path}: bad process spec {spec} ({e!r})") from None
    raise WeightsError(f"weights file {path}: unknown process kind {kind!r}")


def load(
    name: str | Path, *, device: torch.device | str | None = None
) -> tuple[nn.Module, GaussianProcess | None, NetInfo]:
    """Build a shipped network (or one from a .safetensors path) with its weights.

    Returns ``(net, process, info)``: the module in eval mode with gradients off, the process it
    was trained on (None for the clean classifier) and a :class:`NetInfo`. Every call builds a
    fresh module, so hooks (Skip-Tuning) on one never leak into another.

    Raises:
        WeightsError: the file is missing, not safetensors, truncated, corrupted (its SHA-256
            differs from the one stored in its header; a shipped network must have one), has a
            bad header, or its tensors do not match the architecture (missing/unexpected keys,
            wrong shapes, non-finite values).
    """
    path = _path_of(name)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    st = path.stat()
    tensors, meta = _read_cached(str(path), st.st_mtime_ns, st.st_size)
    if Path(name).suffix != ".safetensors" and DIGEST_KEY not in meta:
        raise WeightsError(
            f"weights file {path}: a shipped network without its SHA-256 digest; reinstall "
            "diffsolve"
        )
    arch = meta["arch"]
    if arch not in _ARCHS:
        raise WeightsError(
            f"weights file {path}: unknown architecture {arch!r}; known: {', '.join(_ARCHS)}"
        )
    cls, cfg_cls = _ARCHS[arch]
    config = meta["config"]
    try:
        net = cls(cfg_cls(**config))
    except (TypeError, ValueError) as e:
        raise WeightsError(f"weights file {path}: bad {arch} config {config} ({e})") from None
    _check_state(path, net, tensors)
    net.load_state_dict(tensors, strict=True)
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    process = _process_of(meta["process"], path) if "process" in meta else None
    prediction = meta.get("prediction")
    if prediction is not None and process is None:
        raise WeightsError(f"weights file {path}: a {prediction!r} network without a process")
    info = NetInfo(
        name=str(meta["name"]),
        arch=arch,
        config=dict(config),
        path=path,
        prediction=prediction,
        process=meta.get("process"),
        training=dict(meta.get("training", {})),
        num_params=sum(p.numel() for p in net.parameters()),
        sha256=meta.get(DIGEST_KEY),
    )
    return net, process, info


def _check_state(path: Path, net: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    for k in sorted(set(expected) & set(tensors)):
        if tuple(tensors[k].shape) != tuple(expected[k].shape):
            problems.append(
                f"tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                f"the architecture needs {tuple(expected[k].shape)}"
            )
        elif not tensors[k].is_floating_point():
            problems.append(f"tensor {k!r} has dtype {tensors[k].dtype}, expected floating point")
        elif not bool(torch.isfinite(tensors[k]).all()):
            problems.append(f"tensor {k!r} has NaN/Inf values")
    if problems:
        raise WeightsError(
            f"weights file {path} does not match its architecture: " + "; ".join(problems)
        )


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def model(
    name: str | Path = "digits-vp",
    *,
    guidance: float | None = None,
    device: torch.device | str | None = None,
) -> Denoiser | CFG:
    """A ready :class:`~diffsolve.Denoiser` for a shipped generative network.

    The prediction type and the process come from the weights file; ``sample_shape`` is
    (1, 8, 8). With ``guidance=w`` the Denoiser is wrapped in :class:`~diffsolve.CFG` whose
    unconditional branch is the null class (label −1); pass ``cond={"label": labels}`` to
    ``ds.sample`` (labels of shape (B,)). One guided call is one NFE (a doubled batch).
    """
    net, process, info = load(name, device=device)
    if info.prediction is None or process is None:
        raise ValueError(f"{info.name} is not a generative network (it has no prediction type)")
    # a CTM (digits-ctm) is a Denoiser too: g(x, t, t); ds.CTMGamma samples its jumps
    kind = CTM if isinstance(net, CTMUNet) else Denoiser
    den = kind(net, process, info.prediction, sample_shape=SAMPLE_SHAPE)
    den.info = info  # type: ignore[attr-defined]
    # ds.sample calls it (through CFG and other wrappers) before the first network call
    checker = partial(check_cond, int(info.config.get("num_classes", 10)))
    den.check_cond = checker  # type: ignore[attr-defined]
    if guidance is None:
        return den
    return CFG(den, guidance, uncond={"label": torch.tensor(-1)})


def check_cond(num_classes: int, x: torch.Tensor, cond: Mapping[str, Any]) -> None:
    """The conditioning a class-conditional digits network takes: ``{"label": labels}`` only,
    integer classes 0…num_classes−1 (−1, or no label, for the null class), one per sample or
    one for all. Raises ``ValueError`` naming the problem (``ds.sample`` calls it before any
    network call)."""
    unknown = sorted(set(cond) - {"label"})
    if unknown:
        hint = difflib.get_close_matches(unknown[0], ["label"], n=1, cutoff=0.5)
        raise ValueError(
            f"the digits networks take cond={{'label': classes}} only; unknown key(s) {unknown}"
            + (" (did you mean 'label'?)" if hint else "")
        )
    if cond.get("label") is None:
        return
    lab = torch.as_tensor(cond["label"])
    if lab.dtype == torch.bool or lab.is_floating_point() or lab.is_complex():
        raise ValueError(f"label must be integer classes, got dtype {lab.dtype}")
    b = x.shape[0]
    if lab.ndim > 1 or lab.numel() not in (1, b):
        raise ValueError(
            f"label must be one class or one per sample (shape ({b},)), got shape "
            f"{tuple(lab.shape)}"
        )
    bad = lab[(lab < -1) | (lab >= num_classes)]
    if bad.numel():
        shown = sorted({int(v) for v in bad.reshape(-1)[:100]})[:5]
        raise ValueError(
            f"label {', '.join(map(str, shown))} out of range: the digits networks have classes "
            f"0…{num_classes - 1} (−1: no label)"
        )


def classifier(device: torch.device | str | None = None) -> DigitsClassifier:
    """The shipped clean-digits classifier (eval mode, no gradients)."""
    net, _, _ = load("digits-classifier", device=device)
    assert isinstance(net, DigitsClassifier)
    return net


def noisy_classifier(
    device: torch.device | str | None = None,
) -> tuple[NoisyDigitsClassifier, GaussianProcess]:
    """The noise-conditional classifier and its process (digits-vp): ``net(x_t, t_model)``.

    ``t_model`` is the process's model time (``process.model_time(t)``, the DDPM index); the
    classifier's parameters have gradients off, but gradients with respect to x_t flow.
    """
    net, process, _ = load("digits-noisy-classifier", device=device)
    assert isinstance(net, NoisyDigitsClassifier) and process is not None
    return net, process


def describe(name: str) -> str:
    """The header of a weights file as indented JSON (for ``diffsolve list``-style output)."""
    _, _, info = load(name)
    return json.dumps(
        {
            "name": info.name,
            "arch": info.arch,
            "config": info.config,
            "params": info.num_params,
            "prediction": info.prediction,
            "process": info.process,
            "training": info.training,
        },
        indent=1,
    )
