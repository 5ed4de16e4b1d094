"""The weights-file format of the shipped networks: safetensors with a JSON metadata header.

Header keys (all strings, as safetensors requires): ``format`` (``diffsolve-net``),
``format_version``, ``name``, ``arch`` (class name), ``config`` (architecture, JSON), for
generative networks ``process`` (JSON) and ``prediction``, ``data`` (a description) and
``training`` (JSON: the training configuration, seeds, steps, wall and CPU seconds). Loading never
unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FORMAT", "FORMAT_VERSION", "WeightsError", "read_weights", "save_weights"]

FORMAT = "diffsolve-net"
FORMAT_VERSION = "1"
REQUIRED = ("format", "format_version", "name", "arch", "config")
JSON_FIELDS = ("config", "process", "training")  # the other header fields are plain strings


class WeightsError(ValueError):
    """A weights file is missing, corrupted or does not match its architecture."""


def save_weights(path: str | Path, module: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``module``'s state dict (float32, contiguous) and ``meta`` (JSON-encoded values)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        k: v.detach().to(torch.float32).contiguous().clone() for k, v in module.state_dict().items()
    }
    header = {"format": FORMAT, "format_version": FORMAT_VERSION}
    for k, v in meta.items():
        header[k] = json.dumps(v, sort_keys=True) if k in JSON_FIELDS else str(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    path.chmod(0o644)  # package data: readable by everyone
    return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and the decoded header; raise :class:`WeightsError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    raw = path.read_bytes()
    try:
        tensors = load(raw)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(
            f"weights file {path} is not a readable safetensors file ({len(raw)} bytes): {e}"
        ) from None
    missing = [k for k in REQUIRED if k not in header]
    if missing:
        raise WeightsError(f"weights file {path}: header lacks {', '.join(missing)}")
    if header["format"] != FORMAT:
        raise WeightsError(f"weights file {path}: format {header['format']!r}, expected {FORMAT!r}")
    if header["format_version"] != FORMAT_VERSION:
        raise WeightsError(
            f"weights file {path}: format version {header['format_version']!r}, "
            f"this diffsolve reads {FORMAT_VERSION!r}"
        )
    meta: dict[str, Any] = {}
    for k, v in header.items():
        if k not in JSON_FIELDS:
            meta[k] = v
            continue
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError as e:
            raise WeightsError(
                f"weights file {path}: header field {k!r} is not JSON ({e})"
            ) from None
    return tensors, meta
