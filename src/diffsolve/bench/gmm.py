"""Gaussian mixtures: data whose denoiser is known in closed form on every Gaussian path.

For data Σ_k w_k·N(m_k, S_k) and x_t = α·x_0 + σ·ε, the marginal of component k is
N(α·m_k, α²·S_k + σ²·I) and

    E[x_0 | x_t] = Σ_k r_k(x_t) · (m_k + α·S_k·(α²·S_k + σ²·I)^{-1}·(x_t − α·m_k)),

with responsibilities r_k ∝ w_k·N(x_t; α·m_k, α²·S_k + σ²·I). Covariances are stored by their
eigendecomposition S_k = Q_k·diag(Λ_k)·Q_kᵀ, so every term is a diagonal solve in the
eigenbasis (Q_k = I for diagonal mixtures). All maths in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..denoiser import PREDICTIONS, Denoiser
from ..lincomb import combination
from ..processes.base import GaussianProcess

__all__ = [
    "GMMS",
    "HELDOUT",
    "GaussianMixture",
    "get_gmm",
    "get_heldout",
    "gmm2d",
    "gmm64",
    "gmm3072",
    "gmm_conditional",
    "heldout12",
    "heldout16",
    "heldout20",
    "heldout24",
    "heldout28",
    "heldout32",
    "heldout36",
    "heldout40",
    "heldout48",
    "heldout60",
    "heldout64",
    "heldout72",
    "heldout80",
    "heldout96",
    "heldout100",
    "heldout108",
    "heldout128",
    "heldout144",
    "heldout192",
    "heldout256",
    "heldout300",
    "heldout400",
    "heldout512",
    "heldout768",
    "heldout_mixtures",
]


@dataclass(frozen=True)
class GaussianMixture:
    """A mixture Σ_k w_k·N(m_k, Q_k·diag(Λ_k)·Q_kᵀ) over samples of shape ``shape``.

    Attributes:
        weights: (K,), positive, summing to 1.
        means: (K, D).
        eigvals: (K, D), the covariances' eigenvalues Λ_k (> 0).
        eigvecs: (K, D, D) orthonormal columns, or None for diagonal covariances.
        shape: per-sample shape, prod(shape) = D.
        name: label for tables.
    """

    weights: Tensor
    means: Tensor
    eigvals: Tensor
    eigvecs: Tensor | None
    shape: tuple[int, ...]
    name: str = "gmm"

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # -- densities and the posterior mean ----------------------------------------------------
    def _components(
        self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per component: log w_k·N(x), the eigenbasis residual y and the variance C."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        var = alpha**2 * self.eigvals + sigma**2  # (K, D)
        resid = xf[:, None, :] - alpha * self.means[None]  # (B, K, D)
        y = resid if self.eigvecs is None else _per_component(resid, self.eigvecs)
        logn = -0.5 * (
            (y**2 / var).sum(-1) + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi)
        )
        return torch.log(self.weights) + logn, y, var

    def x0_mean(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """E[x_0 | x_t = x] for x of shape (B, *shape); float64."""
        if self.eigvecs is None:
            return self._x0_mean_diagonal(x, alpha, sigma)
        logp, y, var = self._components(x, alpha, sigma)
        r = torch.softmax(logp, dim=1)  # (B, K)
        shrink = alpha * self.eigvals / var * y  # (B, K, D) in the eigenbasis
        if self.eigvecs is not None:
            shrink = _per_component(shrink, self.eigvecs.transpose(1, 2))
        mean_k = self.means[None] + shrink
        return (r[..., None] * mean_k).sum(1).reshape(x.shape)

    def _x0_mean_diagonal(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
        """x0_mean for diagonal covariances with no (B, K, D) tensor: the quadratic forms and
        the per-component shrinkage as (B, D) × (D, K) products (gmm3072, where the broadcast
        form was most of a calibration's time). Σ_d (x − α m)²/v = x²·(1/v) − 2α x·(m/v) +
        α² Σ m²/v; E[x_0 | x] = Σ_k r_k (σ² m_k + α Λ_k x)/v_k, no cancellation in the means."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        var = alpha**2 * self.eigvals + sigma**2  # (K, D)
        inv = 1.0 / var
        m = self.means
        quad = (
            (xf * xf) @ inv.T - (2 * alpha) * (xf @ (m * inv).T) + alpha**2 * (m * m * inv).sum(-1)
        )
        logn = -0.5 * (quad + torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi))
        r = torch.softmax(torch.log(self.weights) + logn, dim=1)  # (B, K)
        # α rides on the (K, D) factor: one (B, D) product less, forward and backward
        x0 = torch.addcmul(r @ (sigma**2 * inv * m), xf, r @ (alpha * self.eigvals * inv))
        return x0.reshape(x.shape)

    def log_prob(self, x: Tensor, alpha: float = 1.0, sigma: float = 0.0) -> Tensor:
        """log density of x under the marginal at (α, σ) (the data density by default), (B,)."""
        logp, _, _ = self._components(x, alpha, sigma)
        return torch.logsumexp(logp, dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact data samples, shape (n, *shape), float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        z = z * self.eigvals[k].sqrt()
        if self.eigvecs is not None:  # per component: no (n, D, D) gather of the eigenvectors
            out = torch.empty_like(z)
            for j in k.unique().tolist():
                rows = k == j
                out[rows] = z[rows] @ self.eigvecs[j].T
            z = out
        return (self.means[k] + z).reshape(n, *self.shape)

    # -- as a network ------------------------------------------------------------------------
    def denoiser(self, process: GaussianProcess, prediction: str = "eps") -> Denoiser:
        """An exact Denoiser on ``process`` whose "network" outputs ``prediction``.

        The network receives process time (``time_map`` is the identity) and reports its output
        in the sample's dtype; x̂_0 itself is computed in float64. On a path in x − μ
        (:class:`~diffsolve.processes.MeanReverting`) the network reads μ from ``cond`` and
        is exact for data x_0 ~ this mixture with μ independent of x_0 (y_0 = x_0 − μ).
        """
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        return Denoiser(
            _ExactNet(self, process, prediction),
            process,
            prediction,
            time_map=lambda t: t,
            sample_shape=self.shape,
        )


def _per_component(v: Tensor, mats: Tensor) -> Tensor:
    """(B, K, D) × (K, D, E) → (B, K, E): one batched matmul (einsum is ~100× slower here)."""
    return torch.bmm(v.transpose(0, 1), mats).transpose(0, 1)


class _ExactNet:
    """The exact posterior mean dressed as a network of a given prediction type."""

    def __init__(self, gmm: GaussianMixture, process: GaussianProcess, prediction: str):
        self.gmm, self.process, self.prediction = gmm, process, prediction

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        p = self.process
        t0 = t.reshape(-1)[0]
        a: Tensor | float
        s: Tensor | float
        if t0.requires_grad:  # differentiable in the time (calibrating a grid by gradient)
            tt: Tensor | float = t0.to(torch.float64)
            a, s = p.alpha(tt), p.sigma(tt)
        else:
            tt = float(t0)
            a, s = float(p.alpha(tt)), float(p.sigma(tt))
        x64 = x.to(torch.float64)
        mu = p.offset(cond)
        if mu is not None:
            mu = mu.to(torch.float64)
            # a path in y = x − μ (MeanReverting) with y_0 = x_0 − μ: y + α·μ = α·x_0 + σ·ε
            x64 = x64 - mu
            x0 = self.gmm.x0_mean(x64 + a * mu, a, s) - mu
        else:
            x0 = self.gmm.x0_mean(x64, a, s)
        kind = self.prediction
        if isinstance(a, Tensor) and isinstance(s, Tensor) and kind in ("eps", "v") and mu is None:
            # α, σ in the graph (a grid phase of ds.tune): the output as one combination of x
            # and x̂_0, whose coefficients' gradients are dot products (diffsolve.lincomb), not
            # the full-size products autograd writes for (x − α·x̂_0)/σ
            w = (1 / s, -a / s) if kind == "eps" else (a / s, -(a * a / s + s))
            return combination(torch.stack(w), [x64, x0]).to(x.dtype)
        eps = (x64 - a * x0) / s
        if kind == "x0":
            out = x0
        elif kind == "eps":
            out = eps
        elif kind == "v":
            out = a * eps - s * x0
        elif kind == "score":
            out = -eps / s
        else:
            out = float(p.d_alpha(tt)) * x0 + float(p.d_sigma(tt)) * eps
        if mu is not None:
            out = p.from_path(out, x64, mu, a, s, kind)  # type: ignore[attr-defined]
        return out.to(x.dtype)


def _mixture(
    weights: np.ndarray,
    means: np.ndarray,
    covs: np.ndarray | None,
    diag: np.ndarray | None,
    shape: tuple[int, ...],
    name: str,
) -> GaussianMixture:
    if covs is not None:
        lam, q = np.linalg.eigh(covs)
        eigvals, eigvecs = torch.from_numpy(lam), torch.from_numpy(q)
    else:
        assert diag is not None
        eigvals, eigvecs = torch.from_numpy(diag), None
    w = torch.from_numpy(weights / weights.sum())
    return GaussianMixture(w, torch.from_numpy(means), eigvals, eigvecs, shape, name)


def gmm2d() -> GaussianMixture:
    """Eight anisotropic Gaussians on a ring of radius 1.2 in 2-D (for pictures)."""
    rng = np.random.default_rng(0)
    k = 8
    ang = 2 * np.pi * np.arange(k) / k
    means = 1.2 * np.stack([np.cos(ang), np.sin(ang)], 1)
    covs = []
    for a in ang:
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        covs.append(rot @ np.diag([0.02, 0.002]) @ rot.T)
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, means, np.stack(covs), None, (2,), "gmm2d")


def gmm64() -> GaussianMixture:
    """Six 64-D components with full low-rank-plus-diagonal covariances U·Uᵀ + diag(d)."""
    rng = np.random.default_rng(64)
    k, d, r = 6, 64, 4
    means = rng.normal(0.0, 0.6, (k, d))
    covs = []
    for _ in range(k):
        u = rng.normal(0.0, 0.25, (d, r))
        covs.append(u @ u.T + np.diag(rng.uniform(0.005, 0.05, d)))
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, means, np.stack(covs), None, (d,), "gmm64")


def gmm3072() -> GaussianMixture:
    """Four image-sized (3×32×32) components with diagonal covariances and smooth means."""
    rng = np.random.default_rng(3072)
    k = 4
    yy, xx = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    means = []
    for _ in range(k):
        f = rng.uniform(0.5, 3.0, (3, 2))
        ph = rng.uniform(0, 2 * np.pi, (3,))
        img = 0.7 * np.sin(
            f[:, :1, None] * np.pi * xx + f[:, 1:, None] * np.pi * yy + ph[:, None, None]
        )
        means.append(img.reshape(-1))
    diag = rng.uniform(0.002, 0.05, (k, 3 * 32 * 32))
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, np.stack(means), None, diag, (3, 32, 32), "gmm3072")


GMMS = {"gmm2d": gmm2d, "gmm64": gmm64, "gmm3072": gmm3072}


def get_gmm(name: str) -> GaussianMixture:
    """A built-in mixture by name."""
    if name not in GMMS:
        raise ValueError(f"unknown analytic model {name!r}; valid: {', '.join(GMMS)}")
    return GMMS[name]()


# -- held-out mixtures ---------------------------------------------------------------------------
# Test data for rules and tuned solvers, never design data. Their seeds (the first six digits of
# e, π and √2) were written down once, before any solver, rule or tuned solver was run on them,
# and their dimensions and covariance shapes (a 16-D full-covariance mixture with a condition
# number near 10³, a 3×4×4 diagonal one at several data scales, a 128-D one dominated by three
# heavy components) were used by no rule or default in diffsolve. Nothing may be read off them:
# no threshold, schedule, order or default of ``solver="auto"`` or of ``ds.tune`` is to be chosen
# or adjusted by looking at their numbers. They are not in ``GMMS`` (``diffsolve bench`` and
# ``get_gmm`` do not list them); use ``heldout_mixtures()`` or ``get_heldout(name)``.


def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    """A Haar-random d×d orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _rotated_loguniform(rng: np.random.Generator, d: int, lo: float, hi: float) -> np.ndarray:
    """Q·diag(λ)·Qᵀ: a Haar-random rotation Q (drawn first) of eigenvalues λ log-uniform in
    [lo, hi]."""
    q = _rotation(rng, d)
    return q @ np.diag(np.exp(rng.uniform(np.log(lo), np.log(hi), d))) @ q.T


def heldout16() -> GaussianMixture:
    """Held out. Five 16-D components with full, strongly anisotropic covariances: random
    rotations of eigenvalues log-uniform in [1e-3, 0.5] (condition numbers up to 500)."""
    rng = np.random.default_rng(271828)
    k, d = 5, 16
    means = rng.normal(0.0, 0.8, (k, d))
    covs = [_rotated_loguniform(rng, d, 1e-3, 0.5) for _ in range(k)]
    weights = rng.uniform(0.3, 1.7, k)
    return _mixture(weights, means, np.stack(covs), None, (d,), "heldout16")


def heldout48() -> GaussianMixture:
    """Held out. Three image-shaped (3×4×4) components with diagonal covariances whose three
    channels live at different scales (standard deviations ≈ 1, 0.3 and 0.05), means of
    magnitude ≈ 1.5 (data not normalised to unit scale) and uneven weights."""
    rng = np.random.default_rng(314159)
    k, shape = 3, (3, 4, 4)
    means = 1.5 * rng.normal(0.0, 1.0, (k, *shape))
    scale = np.array([1.0, 0.3, 0.05])[None, :, None, None]
    diag = (scale * rng.uniform(0.3, 1.0, (k, *shape))) ** 2
    weights = np.array([0.6, 0.3, 0.1]) * rng.uniform(0.8, 1.2, k)
    return _mixture(weights, means.reshape(k, -1), None, diag.reshape(k, -1), shape, "heldout48")


def heldout128() -> GaussianMixture:
    """Held out. Twelve 128-D components: three heavy, broad ones (≈ 75 % of the mass, rank-8
    plus diagonal covariances) and nine light, tight ones (rank-2 plus a diagonal of 1e-4 to
    1e-3, stiff near the data)."""
    rng = np.random.default_rng(141421)
    d = 128
    heavy, light = 3, 9
    means = rng.normal(0.0, 0.4, (heavy + light, d))
    covs = []
    for i in range(heavy + light):
        r, su, lo, hi = (8, 0.2, 0.01, 0.1) if i < heavy else (2, 0.1, 1e-4, 1e-3)
        u = rng.normal(0.0, su, (d, r))
        covs.append(u @ u.T + np.diag(rng.uniform(lo, hi, d)))
    weights = np.concatenate(
        [0.75 * rng.dirichlet(np.full(heavy, 5.0)), 0.25 * rng.dirichlet(np.ones(light))]
    )
    return _mixture(weights, means, np.stack(covs), None, (d,), "heldout128")


# A second held-out set (stop 29), written down with its seeds (the first six digits of φ, ln 2
# and √3) before anything ran on it, in shapes no rule or default saw: a 24-D mixture of
# low-rank-plus-diagonal components far from the origin, an image-shaped (2×6×6) one with a
# near-degenerate component, and a 256-D one of twenty isotropic components of very uneven
# weights and scales. Same rule as above: report, never tune on.


def heldout24() -> GaussianMixture:
    """Held out (second set). Seven 24-D components with means on a sphere of radius 2 (data
    off the unit scale) and covariances of rank 3 plus a diagonal in [0.005, 0.05]."""
    rng = np.random.default_rng(161803)
    k, d = 7, 24
    means = rng.normal(0.0, 1.0, (k, d))
    means *= 2.0 / np.linalg.norm(means, axis=1, keepdims=True)
    covs = []
    for _ in range(k):
        u = rng.normal(0.0, 0.3, (d, 3))
        covs.append(u @ u.T + np.diag(rng.uniform(0.005, 0.05, d)))
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, means, np.stack(covs), None, (d,), "heldout24")


def heldout72() -> GaussianMixture:
    """Held out (second set). Four image-shaped (2×6×6) diagonal components; one of them is
    nearly degenerate (standard deviation 3e-3 on half its pixels), the others broad (0.2–0.6)."""
    rng = np.random.default_rng(693147)
    k, shape = 4, (2, 6, 6)
    d = int(np.prod(shape))
    means = rng.normal(0.0, 0.5, (k, d))
    std = rng.uniform(0.2, 0.6, (k, d))
    std[0, rng.permutation(d)[: d // 2]] = 3e-3
    weights = rng.dirichlet(np.full(k, 2.0))
    return _mixture(weights, means, None, std**2, shape, "heldout72")


def heldout256() -> GaussianMixture:
    """Held out (second set). Twenty isotropic 256-D components, standard deviations
    log-uniform in [0.02, 0.7], weights Dirichlet(0.5) (a few dominate), means N(0, 0.3²)."""
    rng = np.random.default_rng(173205)
    k, d = 20, 256
    means = rng.normal(0.0, 0.3, (k, d))
    std = np.exp(rng.uniform(np.log(0.02), np.log(0.7), k))
    weights = rng.dirichlet(np.full(k, 0.5)) + 1e-3  # no component without mass
    return _mixture(weights, means, None, np.repeat(std[:, None] ** 2, d, 1), (d,), "heldout256")


# A third held-out set (stop 30), written down with its seeds (the first six digits of √5, the
# Euler–Mascheroni γ and ζ(3)) before anything ran on it: nested scales (tight components inside
# a broad one), image-shaped components with spatially correlated covariances, and data on a
# union of low-dimensional subspaces. It judges the rule revised in stop 30, which read the
# first two held-out sets; same rule as above: report, never tune on.


def heldout32() -> GaussianMixture:
    """Held out (third set). Six 32-D components at nested scales: one broad component (full
    covariance, eigenvalues log-uniform in [0.05, 1]) holding five tight ones inside it (random
    rotations of eigenvalues log-uniform in [1e-4, 1e-2]), the broad one 40 % of the mass."""
    rng = np.random.default_rng(223606)
    k, d = 6, 32
    centre = rng.normal(0.0, 0.3, d)
    means = np.concatenate([centre[None], centre + rng.normal(0.0, 0.5, (k - 1, d))])
    covs = [
        _rotated_loguniform(rng, d, *((0.05, 1.0) if i == 0 else (1e-4, 1e-2))) for i in range(k)
    ]
    weights = np.concatenate([[0.4], 0.6 * rng.dirichlet(np.full(k - 1, 2.0))])
    return _mixture(weights, means, np.stack(covs), None, (d,), "heldout32")


def heldout100() -> GaussianMixture:
    """Held out (third set). Four image-shaped (1×10×10) components with spatially correlated
    covariances, s²·exp(−|p − q|²/(2ℓ²)) + 1e-4·I over pixel positions (length scales ℓ
    1–3 pixels, s 0.2–0.6), and smooth means (a sinusoid of random frequency and phase)."""
    rng = np.random.default_rng(577215)
    k, side = 4, 10
    yy, xx = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
    dist2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    means, covs = [], []
    for _ in range(k):
        freq, phase, amp = rng.uniform(0.2, 1.0, 2), rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1)
        means.append(amp * np.sin(pos @ freq + phase))
        ell, s = rng.uniform(1.0, 3.0), rng.uniform(0.2, 0.6)
        covs.append(s**2 * np.exp(-dist2 / (2 * ell**2)) + 1e-4 * np.eye(side * side))
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, np.stack(means), np.stack(covs), None, (1, side, side), "heldout100")


def heldout192() -> GaussianMixture:
    """Held out (third set). Eight image-shaped (3×8×8) components on low-dimensional subspaces:
    covariances of rank 16 (scale 0.15) plus a diagonal of 1e-5 (stiff in 176 directions),
    means N(0, 0.5²), weights uniform in [0.5, 1.5]."""
    rng = np.random.default_rng(120205)
    k, shape = 8, (3, 8, 8)
    d = int(np.prod(shape))
    means = rng.normal(0.0, 0.5, (k, d))
    covs = []
    for _ in range(k):
        u = rng.normal(0.0, 0.15, (d, 16))
        covs.append(u @ u.T + 1e-5 * np.eye(d))
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, means, np.stack(covs), None, shape, "heldout192")


# A fourth held-out set (stop 30), written down with its seeds (the first six digits of √7,
# ln 10 and Catalan's constant) before anything ran on it, after the third set had shown the
# continuous-time rule's truncated bottom failing on fine scales: scales spanning five decades,
# nearly discrete (quantised) data, and a natural-image-like power-law spectrum. It judges the
# rule as it stood after the third set (no band above NFE 5 changed); report, never tune on.


def heldout40() -> GaussianMixture:
    """Held out (fourth set). Four 40-D components whose covariances span five decades: random
    rotations of eigenvalues log-uniform in [1e-5, 1]."""
    rng = np.random.default_rng(264575)
    k, d = 4, 40
    means = rng.normal(0.0, 0.7, (k, d))
    covs = [_rotated_loguniform(rng, d, 1e-5, 1.0) for _ in range(k)]
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, means, np.stack(covs), None, (d,), "heldout40")


def heldout64() -> GaussianMixture:
    """Held out (fourth set). Nearly discrete image-shaped (1×8×8) data: sixteen components
    whose means are random ±0.8 patterns and whose isotropic standard deviation is 0.004 (a
    quantisation step of an 8-bit image in [−1, 1])."""
    rng = np.random.default_rng(230258)
    k, shape = 16, (1, 8, 8)
    d = int(np.prod(shape))
    means = 0.8 * rng.choice([-1.0, 1.0], (k, d))
    diag = np.full((k, d), 0.004**2)
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, means, None, diag, shape, "heldout64")


def heldout300() -> GaussianMixture:
    """Held out (fourth set). Six image-shaped (3×10×10) components with a power-law spectrum,
    eigenvalue j ∝ (j + 1)^−2 from 0.5 down to ≈ 6e-6, in random rotations, means N(0, 0.3²)."""
    rng = np.random.default_rng(915965)
    k, shape = 6, (3, 10, 10)
    d = int(np.prod(shape))
    means = rng.normal(0.0, 0.3, (k, d))
    spectrum = 0.5 * (np.arange(d) + 1.0) ** -2
    covs = [(q := _rotation(rng, d)) @ np.diag(spectrum) @ q.T for _ in range(k)]
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, means, np.stack(covs), None, shape, "heldout300")


# A fifth held-out set (stop 31), written down with its seeds (the first six digits of √11, π²
# and ln 3) before anything ran on it, after the fourth set had shown the untuned rule failing on
# fine-scale data: clusters of clusters whose fine structure sits between the rule's truncated
# bottoms, image-shaped components at many scales with 6-bit quantisation, and a large
# image-shaped mixture with a smooth power-law spectrum and means off the unit scale. It judges
# the rule as revised in stop 31 (which read the first four sets); report, never tune on.


def heldout20() -> GaussianMixture:
    """Held out (fifth set). Clusters of clusters in 20-D: three groups (centres N(0, 1)), each
    of four components around the group centre (offsets N(0, 0.1²)) with full covariances of
    eigenvalues log-uniform in [0.02², 0.05²] — structure between σ ≈ 0.02 and 0.1."""
    rng = np.random.default_rng(331662)
    groups, per, d = 3, 4, 20
    centres = rng.normal(0.0, 1.0, (groups, d))
    means = np.repeat(centres, per, 0) + rng.normal(0.0, 0.1, (groups * per, d))
    covs = [_rotated_loguniform(rng, d, 0.02**2, 0.05**2) for _ in range(groups * per)]
    weights = rng.uniform(0.5, 1.5, groups * per)
    return _mixture(weights, means, np.stack(covs), None, (d,), "heldout20")


def heldout108() -> GaussianMixture:
    """Held out (fifth set). Twelve image-shaped (3×6×6) diagonal components: means are 6-bit
    quantised uniform values in [−1, 1], per-component standard deviations log-uniform in
    [0.008, 0.3] (the smallest near one 6-bit quantisation step), weights Dirichlet(1)."""
    rng = np.random.default_rng(986960)
    k, shape = 12, (3, 6, 6)
    d = int(np.prod(shape))
    means = np.round(rng.uniform(-1.0, 1.0, (k, d)) * 31.5) / 31.5
    std = np.exp(rng.uniform(np.log(0.008), np.log(0.3), k))
    weights = rng.dirichlet(np.ones(k)) + 1e-3  # no component without mass
    return _mixture(weights, means, None, np.repeat(std[:, None] ** 2, d, 1), shape, "heldout108")


def heldout512() -> GaussianMixture:
    """Held out (fifth set). Ten image-shaped (2×16×16) diagonal components with a power-law
    spectrum (variance of coordinate j ∝ (j + 1)^−1.5, from 0.3 down to ≈ 2e-5, in a random
    permutation per component) and means of magnitude ≈ 1 (N(0.5, 0.8²))."""
    rng = np.random.default_rng(109861)
    k, shape = 10, (2, 16, 16)
    d = int(np.prod(shape))
    means = rng.normal(0.5, 0.8, (k, d))
    spectrum = 0.3 * (np.arange(d) + 1.0) ** -1.5
    diag = np.stack([spectrum[rng.permutation(d)] for _ in range(k)])
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, means, None, diag, shape, "heldout512")


# A sixth held-out set (stop 31), written down with its seeds (the first six digits of √13, ln 5
# and π/e) before anything ran on it, after the fifth had moved the NFE 6–7 band's bottom: data
# near a curve (tight components along a helix), image-shaped components with correlated
# channels, and a large image-shaped mixture whose scale varies across the image. It judges the
# rule as revised after the fifth set (which read the first five); report, never tune on.


def heldout12() -> GaussianMixture:
    """Held out (sixth set). Thirty 12-D isotropic components along a helix (a random linear
    map of (cos 3s, sin 3s, s), s ∈ [−1, 1], scaled to radius ≈ 1), standard deviations
    log-uniform in [0.005, 0.05]: data near a one-dimensional curve."""
    rng = np.random.default_rng(360555)
    k, d = 30, 12
    s_ = np.sort(rng.uniform(-1.0, 1.0, k))
    curve = np.stack([np.cos(3 * s_), np.sin(3 * s_), s_], 1)
    means = curve @ (rng.normal(0.0, 1.0, (3, d)) / np.sqrt(d / 2))
    std = np.exp(rng.uniform(np.log(0.005), np.log(0.05), k))
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, means, None, np.repeat(std[:, None] ** 2, d, 1), (d,), "heldout12")


def heldout96() -> GaussianMixture:
    """Held out (sixth set). Five image-shaped (6×4×4) components whose six channels are
    correlated (a random 6×6 channel covariance of eigenvalues log-uniform in [1e-3, 0.5],
    shared by every pixel, plus a 1e-4 diagonal), means N(0, 0.6²), one component broad (its
    covariance ×4) and holding half the mass."""
    rng = np.random.default_rng(160943)
    k, shape = 5, (6, 4, 4)
    d = int(np.prod(shape))
    means = rng.normal(0.0, 0.6, (k, d))
    covs = []
    for i in range(k):
        channel = _rotated_loguniform(rng, 6, 1e-3, 0.5) * (4.0 if i == 0 else 1.0)
        covs.append(np.kron(channel, np.eye(16)) + 1e-4 * np.eye(d))
    weights = np.concatenate([[0.5], 0.5 * rng.dirichlet(np.full(k - 1, 2.0))])
    return _mixture(weights, means, np.stack(covs), None, shape, "heldout96")


def heldout768() -> GaussianMixture:
    """Held out (sixth set). Eight image-shaped (3×16×16) diagonal components whose standard
    deviation varies smoothly across the image, from ≈ 0.01 to ≈ 0.5 (a log-scale field: a
    random low-frequency sinusoid per component), means smooth images of amplitude ≈ 0.7."""
    rng = np.random.default_rng(115572)
    k, shape = 8, (3, 16, 16)
    yy, xx = np.meshgrid(np.linspace(0, 1, 16), np.linspace(0, 1, 16), indexing="ij")
    means, diag = [], []
    for _ in range(k):
        f, ph = rng.uniform(0.5, 2.0, (2, 2)), rng.uniform(0, 2 * np.pi, 2)
        mean = 0.7 * np.sin(2 * np.pi * (f[0, 0] * yy + f[0, 1] * xx) + ph[0])
        field = np.sin(2 * np.pi * (f[1, 0] * yy + f[1, 1] * xx) + ph[1])  # in [−1, 1]
        log_std = np.log(0.07) + np.log(7.0) * field  # std from 0.01 to 0.49
        means.append(np.broadcast_to(mean, shape) + rng.normal(0.0, 0.1, (3, 1, 1)))
        diag.append(np.broadcast_to(np.exp(2 * log_std), shape))
    weights = rng.uniform(0.5, 1.5, k)
    m = np.stack(means).reshape(k, -1)
    return _mixture(weights, m, None, np.stack(diag).reshape(k, -1).copy(), shape, "heldout768")


# A seventh held-out set (stop 32), written down with its seeds (the first six digits of √17,
# ln 7 and e²) before anything ran on it, to judge what stop 32 changes in ``ds.tune``: a
# heavy-tailed scale mixture, many flat components with Zipf weights, and binary image patterns.
# Report, never tune on.


def heldout36() -> GaussianMixture:
    """Held out (seventh set). Heavy tails in 36-D: four centres (N(0, 0.8²)), each carrying
    three isotropic components of standard deviations 0.03, 0.2 and 1.0 at one centre (a
    Gaussian scale mixture: most mass tight, some far out), weights uniform in [0.5, 1.5]."""
    rng = np.random.default_rng(412310)
    centres, d = 4, 36
    means = np.repeat(rng.normal(0.0, 0.8, (centres, d)), 3, 0)
    std = np.tile([0.03, 0.2, 1.0], centres)
    weights = rng.uniform(0.5, 1.5, centres * 3) * np.tile([1.0, 0.5, 0.15], centres)
    return _mixture(weights, means, None, np.repeat(std[:, None] ** 2, d, 1), (d,), "heldout36")


def heldout80() -> GaussianMixture:
    """Held out (seventh set). Forty 80-D "pancakes": each a rank-2 plane of variance 0.1 in a
    random orientation plus an isotropic 1e-3, means N(0, 0.5²), Zipf weights (∝ 1/rank)."""
    rng = np.random.default_rng(194591)
    k, d = 40, 80
    means = rng.normal(0.0, 0.5, (k, d))
    covs = []
    for _ in range(k):
        basis = np.linalg.qr(rng.normal(size=(d, 2)))[0]
        covs.append(0.1 * basis @ basis.T + 1e-3 * np.eye(d))
    weights = 1.0 / (1.0 + rng.permutation(k))
    return _mixture(weights, means, np.stack(covs), None, (d,), "heldout80")


def heldout144() -> GaussianMixture:
    """Held out (seventh set). Twenty binary 1×12×12 patterns (each pixel ±0.8, a random blob:
    a thresholded smooth random field) with isotropic standard deviations log-uniform in
    [0.02, 0.15], weights Dirichlet(2)."""
    rng = np.random.default_rng(738905)
    k, side = 20, 12
    yy, xx = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    means = []
    for _ in range(k):
        f, ph = rng.uniform(0.5, 2.5, (2, 2)), rng.uniform(0, 2 * np.pi, 2)
        field = np.sin(2 * np.pi * f[0, 0] * yy + ph[0]) + np.cos(2 * np.pi * f[1, 1] * xx + ph[1])
        means.append(np.where(field > 0, 0.8, -0.8).reshape(-1))
    std = np.exp(rng.uniform(np.log(0.02), np.log(0.15), k))
    weights = rng.dirichlet(np.full(k, 2.0)) + 1e-3
    d = side * side
    diag = np.repeat(std[:, None] ** 2, d, 1)
    return _mixture(weights, np.stack(means), None, diag, (1, side, side), "heldout144")


# An eighth held-out set (stop 32), written down with its seeds (the first six digits of √19,
# ln 11 and π·e) after the seventh had judged ``ds.tune`` and before anything ran on this one:
# two scales with the broad one rare, sparse data, and smooth random-field images. It judges
# what stop 32 changed after reading the seventh. Report, never tune on.


def heldout28() -> GaussianMixture:
    """Held out (eighth set). Two scales in 28-D: six tight anisotropic components (full
    covariances of eigenvalues log-uniform in [0.01², 0.03²], means N(0, 1)) holding 75 % of
    the mass and two broad isotropic ones (standard deviation 0.6, means N(0, 0.5²)) holding
    25 %."""
    rng = np.random.default_rng(435889)
    d = 28
    tight = [_rotated_loguniform(rng, d, 0.01**2, 0.03**2) for _ in range(6)]
    broad = [0.36 * np.eye(d) for _ in range(2)]
    means = np.concatenate([rng.normal(0.0, 1.0, (6, d)), rng.normal(0.0, 0.5, (2, d))])
    weights = np.concatenate([np.full(6, 0.75 / 6), np.full(2, 0.25 / 2)])
    return _mixture(weights, means, np.stack(tight + broad), None, (d,), "heldout28")


def heldout60() -> GaussianMixture:
    """Held out (eighth set). Sparse data in 60-D: fifteen components whose means are ±1 on a
    random 10 % of the coordinates and 0 elsewhere, standard deviation 0.05 on those
    coordinates and 0.005 on the rest, weights uniform in [0.5, 1.5]."""
    rng = np.random.default_rng(239789)
    k, d = 15, 60
    support = rng.uniform(size=(k, d)) < 0.1
    means = np.where(support, rng.choice([-1.0, 1.0], size=(k, d)), 0.0)
    diag = np.where(support, 0.05**2, 0.005**2)
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, means, None, diag, (d,), "heldout60")


def heldout400() -> GaussianMixture:
    """Held out (eighth set). Six smooth 1×20×20 random-field images: each component's
    covariance a squared-exponential kernel over the pixel grid (length scale 0.15–0.4 of the
    image, variance 0.05–0.3) plus a 1e-4 diagonal, means smooth fields of amplitude ≈ 0.5."""
    rng = np.random.default_rng(853973)
    k, side = 6, 20
    yy, xx = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    pts = np.stack([yy.reshape(-1), xx.reshape(-1)], 1)
    dist2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    means, covs = [], []
    for _ in range(k):
        length, var = rng.uniform(0.15, 0.4), rng.uniform(0.05, 0.3)
        cov = var * np.exp(-dist2 / (2 * length**2)) + 1e-4 * np.eye(side * side)
        f, ph = rng.uniform(0.5, 1.5, 2), rng.uniform(0, 2 * np.pi, 2)
        means.append(
            0.5
            * (
                np.sin(2 * np.pi * f[0] * yy + ph[0]) * np.cos(2 * np.pi * f[1] * xx + ph[1])
            ).reshape(-1)
        )
        covs.append(cov)
    weights = rng.uniform(0.5, 1.5, k)
    return _mixture(weights, np.stack(means), np.stack(covs), None, (1, side, side), "heldout400")


HELDOUT = {
    "heldout16": heldout16,
    "heldout48": heldout48,
    "heldout128": heldout128,
    "heldout24": heldout24,
    "heldout72": heldout72,
    "heldout256": heldout256,
    "heldout32": heldout32,
    "heldout100": heldout100,
    "heldout192": heldout192,
    "heldout40": heldout40,
    "heldout64": heldout64,
    "heldout300": heldout300,
    "heldout20": heldout20,
    "heldout108": heldout108,
    "heldout512": heldout512,
    "heldout12": heldout12,
    "heldout96": heldout96,
    "heldout768": heldout768,
    "heldout36": heldout36,
    "heldout80": heldout80,
    "heldout144": heldout144,
    "heldout28": heldout28,
    "heldout60": heldout60,
    "heldout400": heldout400,
}


def heldout_mixtures() -> list[GaussianMixture]:
    """The held-out mixtures (:data:`HELDOUT`): test data only; no rule may be read off them."""
    return [make() for make in HELDOUT.values()]


def get_heldout(name: str) -> GaussianMixture:
    """A held-out mixture by name (a key of :data:`HELDOUT`)."""
    if name not in HELDOUT:
        raise ValueError(f"unknown held-out mixture {name!r}; valid: {', '.join(HELDOUT)}")
    return HELDOUT[name]()


# -- conditionals (the exact answer of inpainting, diffsolve.guidance.inpaint) ---------------------
def gmm_conditional(gmm: GaussianMixture, y: Tensor, mask: Tensor) -> GaussianMixture:
    """The exact law of the unobserved coordinates of ``gmm`` given x_o = y (float64).

    For Σ_k w_k·N(m_k, S_k) and the split x = (x_u, x_o):

        p(x_u | x_o = y) = Σ_k w'_k·N(m_k,u + S_k,uo·S_k,oo⁻¹(y − m_k,o),
                                       S_k,uu − S_k,uo·S_k,oo⁻¹·S_k,ou),
        w'_k ∝ w_k·N(y; m_k,o, S_k,oo).

    Covariances are formed densely (D × D; D = 64 for gmm64) from the stored
    eigendecompositions and factorised by Cholesky, all in float64.

    Args:
        gmm: the mixture, samples of shape ``gmm.shape`` (D entries).
        y: one observation, shape ``gmm.shape`` (or (D,)); unobserved entries are ignored.
        mask: True where observed, same shape; at least one entry observed and one not.

    Returns:
        A :class:`GaussianMixture` over the unobserved entries (in their
        flattened order), shape (n_u,); the conditional mean is
        ``(mix.weights[:, None] * mix.means).sum(0)``.
    """
    d = gmm.dim
    obs = mask.reshape(-1).to(torch.bool).cpu()
    if obs.numel() != d:
        raise ValueError(f"mask has {obs.numel()} entries, the mixture {d}")
    if bool(obs.all()) or not bool(obs.any()):
        raise ValueError("mask must observe at least one entry and leave at least one free")
    yo = y.reshape(-1).to(torch.float64).cpu()[obs]
    o, u = obs.nonzero().squeeze(1), (~obs).nonzero().squeeze(1)
    lam = gmm.eigvals
    if gmm.eigvecs is None:
        cov = torch.diag_embed(lam)
    else:
        cov = gmm.eigvecs @ torch.diag_embed(lam) @ gmm.eigvecs.transpose(1, 2)
    s_oo = cov[:, o][:, :, o]
    s_uo = cov[:, u][:, :, o]
    s_uu = cov[:, u][:, :, u]
    chol = torch.linalg.cholesky(s_oo)
    r = (yo - gmm.means[:, o]).unsqueeze(-1)  # (K, n_o, 1)
    white = torch.linalg.solve_triangular(chol, r, upper=False)  # L⁻¹(y − m_o)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(-1)
    logn = -0.5 * (white.squeeze(-1).pow(2).sum(-1) + logdet + o.numel() * math.log(2 * math.pi))
    weights = torch.softmax(torch.log(gmm.weights) + logn, dim=0)
    a = torch.linalg.solve_triangular(chol, s_uo.transpose(1, 2), upper=False)  # L⁻¹·S_ou
    means = gmm.means[:, u] + (a.transpose(1, 2) @ white).squeeze(-1)
    cond_cov = s_uu - a.transpose(1, 2) @ a
    cond_cov = 0.5 * (cond_cov + cond_cov.transpose(1, 2))
    ev, evec = torch.linalg.eigh(cond_cov)
    return GaussianMixture(
        weights, means, ev.clamp_min(1e-300), evec, (u.numel(),), f"{gmm.name}|observed"
    )
