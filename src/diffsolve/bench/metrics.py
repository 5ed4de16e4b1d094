"""Metrics of the exact benchmark: errors to the exact ODE solution and distances to the data.

ODE solvers are scored by the relative RMSE ‖x − x_ref‖/‖x_ref‖ to the exact PF-ODE solution from
the same x_T (over the whole batch); SDE solvers, whose samples are not paths of the ODE, by
distances between sample sets (sliced Wasserstein-2, MMD) and the mean log-likelihood under the
true mixture. ``nfe_to_reach`` turns an error-vs-NFE sweep into the budget a solver needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .gmm import GaussianMixture

__all__ = [
    "mean_log_likelihood",
    "mmd_rbf",
    "nfe_to_reach",
    "per_sample_rel_err",
    "rel_rmse",
    "sliced_w2",
]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def rel_rmse(x: Tensor, ref: Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ over the whole batch (Frobenius norms), float64."""
    x, ref = _flat(x), _flat(ref)
    return float((x - ref).norm() / ref.norm())


def per_sample_rel_err(x: Tensor, ref: Tensor) -> Tensor:
    """‖x_i − ref_i‖ / ‖ref_i‖ for each sample i, shape (B,)."""
    x, ref = _flat(x), _flat(ref)
    return (x - ref).norm(dim=1) / ref.norm(dim=1)


def sliced_w2(
    x: Tensor, y: Tensor, projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced Wasserstein-2 distance between the empirical measures of x (N, ...) and y (M, ...).

    SW2² = E_θ W2²(θᵀx, θᵀy) over directions θ uniform on the sphere (Bonneel et al. 2015),
    estimated with ``projections`` random directions; each 1-D W2 compares quantile functions
    (sorted values; for N ≠ M both are read at the same M∨N quantile levels).
    """
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    if px.shape[0] != py.shape[0]:
        n = max(px.shape[0], py.shape[0])
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        px = torch.quantile(px, levels, dim=0, interpolation="linear")
        py = torch.quantile(py, levels, dim=0, interpolation="linear")
    return float(((px - py) ** 2).mean().sqrt())


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Maximum mean discrepancy with the Gaussian kernel k(a, b) = exp(−‖a − b‖²/(2ℓ²)).

    The biased (V-statistic) estimate MMD² = mean K_xx + mean K_yy − 2·mean K_xy (Gretton et al.
    2012, eq. 5), returned as its square root (≥ 0, exactly 0 for identical sets). ℓ defaults to
    the median heuristic: the median pairwise distance of the pooled samples.
    """
    x, y = _flat(x), _flat(y)
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth is None:
        off = d2[~torch.eye(z.shape[0], dtype=torch.bool)]
        bandwidth = float(off.median().sqrt()) if off.numel() else 1.0
        bandwidth = bandwidth if bandwidth > 0 else 1.0
    k = torch.exp(-d2 / (2 * bandwidth**2))
    n = x.shape[0]
    mmd2 = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
    return math.sqrt(max(float(mmd2), 0.0))


def mean_log_likelihood(gmm: GaussianMixture, x: Tensor) -> float:
    """Mean log-density of samples x under the true mixture (nats per sample)."""
    return float(gmm.log_prob(x.to(torch.float64)).mean())


def nfe_to_reach(
    nfes: Sequence[float], errors: Sequence[float | None], target: float
) -> float | None:
    """The NFE from which the error stays at or below ``target``, by log-log interpolation.

    The sweep is sorted by NFE; missing or non-finite errors are dropped. Between the last point
    above the target and the next one (at or below it), log error is taken linear in log NFE;
    a lucky dip below the target followed by a rise does not count. Returns the smallest NFE if
    every point meets the target (the budget is then "at most" it) and None if the largest
    budget does not.
    """
    pts = sorted(
        (float(n), float(e))
        for n, e in zip(nfes, errors)
        if e is not None and math.isfinite(e) and e > 0
    )
    if not pts or pts[-1][1] > target:
        return None
    above = [j for j, (_, e) in enumerate(pts) if e > target]
    if not above:
        return pts[0][0]
    (n0, e0), (n1, e1) = pts[above[-1]], pts[above[-1] + 1]
    w = (math.log(e0) - math.log(target)) / (math.log(e0) - math.log(e1))
    return math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0)))
