"""scikit-learn's bundled digits (1797 images, 8×8, pixel values 0…16) as tensors in [−1, 1]."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["digits", "from_unit", "to_unit"]


def to_unit(pixels: Tensor) -> Tensor:
    """Pixel values 0…16 → [−1, 1] (x/8 − 1), the scale the shipped networks use."""
    return pixels / 8.0 - 1.0


def from_unit(x: Tensor) -> Tensor:
    """[−1, 1] → pixel values 0…16 (not clipped)."""
    return (x + 1.0) * 8.0


@lru_cache(maxsize=1)
def _load() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data ship with scikit-learn: pip install 'diffsolve[digits]'"
        ) from e
    d = load_digits()  # read from the package's own data folder, never downloaded
    x = to_unit(torch.tensor(d.images, dtype=torch.float32)).unsqueeze(1)
    return x, torch.tensor(d.target, dtype=torch.long)


def digits() -> tuple[Tensor, Tensor]:
    """The 1797 digits as (x, labels): x (1797, 1, 8, 8) float32 in [−1, 1], labels (1797,)."""
    x, y = _load()
    return x.clone(), y.clone()
