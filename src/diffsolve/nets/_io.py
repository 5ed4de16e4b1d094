"""The weights-file format of the shipped networks: safetensors with a JSON metadata header.

Header keys (all strings, as safetensors requires): ``format`` (``diffsolve-net``),
``format_version``, ``name``, ``arch`` (class name), ``config`` (architecture, JSON), for
generative networks ``process`` (JSON) and ``prediction``, ``data`` (a description) and
``training`` (JSON: the training configuration, seeds, steps, wall and CPU seconds), and
``sha256``: the SHA-256 of the file's tensor data and of the rest of its header (canonical JSON),
written by :func:`save_weights` (:func:`stamp_digest`) and checked by :func:`read_weights`, so a
file with corrupted bytes is refused even where safetensors still parses it. Loading never
unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DIGEST_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "WeightsError",
    "digest",
    "read_weights",
    "save_weights",
    "stamp_digest",
]

FORMAT = "diffsolve-net"
FORMAT_VERSION = "1"
REQUIRED = ("format", "format_version", "name", "arch", "config")
JSON_FIELDS = ("config", "process", "training")  # the other header fields are plain strings
DIGEST_KEY = "sha256"


class WeightsError(ValueError):
    """A weights file is missing, corrupted or does not match its architecture."""


def save_weights(
    path: str | Path, module: nn.Module, meta: dict[str, Any], dtype: torch.dtype = torch.float32
) -> Path:
    """Write ``module``'s state dict (``dtype``, contiguous) and ``meta`` (JSON-encoded values).

    float16 halves a file (the package ships several networks under 5 MB together); loading
    casts the tensors into the float32 module as usual, so only the rounding is stored."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in module.state_dict().items()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION}
    for k, v in meta.items():
        header[k] = json.dumps(v, sort_keys=True) if k in JSON_FIELDS else str(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    stamp_digest(path)
    path.chmod(0o644)  # package data: readable by everyone
    return path


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (decoded JSON) and its data section, byte for byte."""
    if len(raw) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ValueError("header length past the end of the file")
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, raw[8 + n :]


def digest(header: dict[str, Any], data: bytes) -> str:
    """SHA-256 (hex) of the tensor data and of the header without its own ``sha256`` field (as
    canonical JSON: sorted keys, no spaces), so padding and key order do not matter."""
    h = dict(header)
    meta = dict(h.get("__metadata__") or {})
    meta.pop(DIGEST_KEY, None)
    h["__metadata__"] = meta
    canon = json.dumps(h, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(len(canon).to_bytes(8, "little") + canon + data).hexdigest()


def stamp_digest(path: str | Path) -> str:
    """Store the file's :func:`digest` in its header metadata (``sha256``), in place.

    Only the header is rewritten; the tensor data bytes are copied unchanged (their offsets are
    relative to the data section), so the tensors are bit for bit the same. Returns the digest.
    """
    path = Path(path)
    header, data = _split(path.read_bytes())
    value = digest(header, data)
    header = dict(header)
    header["__metadata__"] = {**(header.get("__metadata__") or {}), DIGEST_KEY: value}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(len(text).to_bytes(8, "little") + text + data)
    os.replace(tmp, path)
    return value


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
    recorded = header.get(DIGEST_KEY)
    if recorded is not None:
        try:
            actual = digest(*_split(raw))
        except (ValueError, UnicodeDecodeError) as e:
            raise WeightsError(f"weights file {path}: unreadable header ({e})") from None
        if actual != recorded:
            raise WeightsError(
                f"weights file {path} is corrupted: its SHA-256 is {actual[:16]}…, the one "
                f"recorded when it was saved is {recorded[:16]}… ({len(raw)} bytes); "
                "reinstall diffsolve or re-save the network"
            )
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
