"""Digits benchmark pieces: FD-digits, class accuracy, and the exact denoiser of the data set.

- **FD-digits**: the Fréchet distance (Heusel et al. 2017, FID's formula) between Gaussians fitted
  to the penultimate-layer features of the shipped digits classifier,
  FD = ‖μ_s − μ_r‖² + tr(C_s + C_r − 2·(C_s·C_r)^{1/2}), samples s against the 1797 real digits
  r (or the real digits of the requested classes). Features are 64-D, so a few hundred samples
  give a stable number (it is biased upward for small sample counts, like FID: compare at equal
  counts; 256 real digits against all 1797 score 21, 512 score 12, Gaussian noise ~630).
- **Class accuracy**: the fraction of samples the classifier assigns to the requested label.
- **Exact finite-data denoiser**: for the empirical distribution p = (1/N)·Σ_i δ(x − x_i) of the
  N = 1797 digits, E[x_0 | x_t = x] = Σ_i w_i·x_i with w = softmax_i(−‖x − α·x_i‖²/(2σ²)) on any
  Gaussian path x_t = α·x_0 + σ·ε. It is the optimum of the denoising loss on this data set (a
  network that memorised it), stiff near the data, and usable everywhere an analytic model is
  (``.denoiser(process, prediction)``, ``x0_mean`` for the exact references).

Samples are in the networks' scale (pixel/8 − 1, shape (B, 1, 8, 8)).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ..denoiser import PREDICTIONS, Denoiser
from ..processes.base import GaussianProcess

__all__ = [
    "DigitsScore",
    "FiniteData",
    "class_accuracy",
    "digits_data",
    "digits_features",
    "digits_finite",
    "fd_digits",
    "frechet_distance",
    "score_digits",
]


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(C1 + C2 − 2·(C1·C2)^{1/2}) (float64; scipy.linalg.sqrtm)."""
    from scipy import linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        # singular product (few samples): regularise as the FID reference code does
        off = np.eye(cov1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((cov1 + off) @ (cov2 + off))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean), 0.0))


def _stats(f: Tensor) -> tuple[np.ndarray, np.ndarray]:
    a = f.to(torch.float64).numpy()
    return a.mean(0), np.cov(a, rowvar=False)


@lru_cache(maxsize=1)
def _classifier():
    from ..nets import classifier

    return classifier()


@torch.no_grad()
def digits_features(x: Tensor, clip: bool = True) -> Tensor:
    """Penultimate features of the shipped classifier, (B, 64), float32; x in [−1, 1].

    ``clip`` clamps to [−1, 1] first, as saving the samples as images does.
    """
    x = x.detach().to("cpu", torch.float32).reshape(-1, 1, 8, 8)
    if clip:
        x = x.clamp(-1.0, 1.0)
    net = _classifier()
    return torch.cat([net.features(c) for c in x.split(1024)])


def digits_data() -> tuple[Tensor, Tensor]:
    """The 1797 real digits (1797, 1, 8, 8) in [−1, 1] and their labels."""
    from ..nets.data import digits

    return digits()


@lru_cache(maxsize=16)
def _real_stats(classes: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_data()
    if classes is not None:
        x = x[torch.isin(y, torch.tensor(classes))]
    return _stats(digits_features(x))


def fd_digits(x: Tensor, labels: Tensor | int | None = None, clip: bool = True) -> float:
    """FD-digits of samples x (B, 1, 8, 8) against the real digits (lower is better).

    The reference is all 1797 digits, or with ``labels`` (the classes the samples were asked
    for) the real digits of those classes, so class-conditional samples are not charged for
    the classes they were not asked to draw.
    """
    if x.shape[0] < 2:
        raise ValueError("FD-digits needs at least 2 samples")
    classes = None
    if labels is not None:
        classes = tuple(sorted({int(v) for v in torch.as_tensor(labels).reshape(-1) if v >= 0}))
        classes = classes or None
    mu, cov = _stats(digits_features(x, clip))
    mu_r, cov_r = _real_stats(classes)
    return frechet_distance(mu, cov, mu_r, cov_r)


@torch.no_grad()
def class_accuracy(x: Tensor, labels: Tensor | int, clip: bool = True) -> float:
    """Fraction of samples the shipped classifier assigns to ``labels`` ((B,) or one int)."""
    f = digits_features(x, clip)
    pred = _classifier().head(f).argmax(1)
    lab = torch.as_tensor(labels).reshape(-1).expand(pred.shape[0])
    return float((pred == lab).float().mean())


@dataclass(frozen=True)
class DigitsScore:
    fd: float
    accuracy: float | None
    n: int


def score_digits(x: Tensor, labels: Tensor | int | None = None) -> DigitsScore:
    """FD-digits (against the real digits of ``labels``' classes when given) and class accuracy."""
    acc = None if labels is None else class_accuracy(x, labels)
    return DigitsScore(fd_digits(x, labels), acc, int(x.shape[0]))


# -- the exact denoiser of a finite data set ------------------------------------------------------
@dataclass(frozen=True)
class FiniteData:
    """The empirical distribution of N points: an analytic model with a closed-form denoiser.

    Attributes:
        points: (N, D) float64.
        shape: per-sample shape, prod(shape) = D.
        name: label for tables.
    """

    points: Tensor
    shape: tuple[int, ...]
    name: str = "finite"

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def weights(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """Posterior weights w_i = softmax_i(−‖x − α·x_i‖²/(2σ²)), shape (B, N), float64."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        pts = self.points
        if sigma == 0.0:
            d2 = torch.cdist(xf, alpha * pts)
            return torch.nn.functional.one_hot(d2.argmin(1), pts.shape[0]).to(torch.float64)
        # −‖x − αx_i‖² = 2α·x·x_i − α²‖x_i‖² − ‖x‖²; the last term is the same for every i
        logits = (2.0 * alpha * (xf @ pts.T) - alpha**2 * (pts * pts).sum(1)) / (2.0 * sigma**2)
        return torch.softmax(logits, dim=1)

    def x0_mean(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """E[x_0 | x_t = x] = Σ_i w_i·x_i for x of shape (B, *shape); float64."""
        return (self.weights(x, alpha, sigma) @ self.points).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws (with replacement) from the data, shape (n, *shape), float64."""
        idx = torch.randint(0, self.points.shape[0], (n,), generator=generator)
        return self.points[idx].reshape(n, *self.shape)

    def denoiser(self, process: GaussianProcess, prediction: str = "eps") -> Denoiser:
        """An exact Denoiser on ``process`` whose "network" outputs ``prediction`` (the network
        receives process time; x̂_0 is computed in float64)."""
        from .gmm import _ExactNet

        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        return Denoiser(
            _ExactNet(self, process, prediction),  # type: ignore[arg-type]
            process,
            prediction,
            time_map=lambda t: t,
            sample_shape=self.shape,
        )


def digits_finite(labels: Tensor | int | None = None) -> FiniteData:
    """The 1797 digits (or those of one class) as a :class:`FiniteData` model, shape (1, 8, 8)."""
    x, y = digits_data()
    if labels is not None:
        keep = torch.isin(y, torch.as_tensor(labels).reshape(-1))
        x = x[keep]
    return FiniteData(x.reshape(x.shape[0], -1).to(torch.float64), (1, 8, 8), "digits")
