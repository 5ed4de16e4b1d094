"""PFGM++ (Xu et al., ICML 2023): EDM's path with a heavy-tailed prior for finite D.

PFGM++ augments data y ∈ R^N with z ∈ R^D; only r = ‖z‖ matters. Its perturbation kernel is

    p_r(x | y) ∝ (‖x − y‖² + r²)^{−(N+D)/2},

and the field ODE is dx/dr = (x − E_w[y | x])/r with weights w_i ∝ p_r(x | y_i). With the
alignment r = σ·sqrt(D) this is dx/dσ = (x − D(x, σ))/σ: *the EDM ODE* (Karras et al. 2022),
with D(x, σ) = E_w[y | x] the denoiser of the model trained with that kernel. So in σ the
process is EDM's (α = 1, σ = t; every ODE solver runs unchanged) and only two things depend on
D: the network (trained with the finite-D kernel; the exact one for a finite data set is
:func:`diffsolve.bench.pfgmpp.exact_points_denoiser`) and the prior, the kernel at
r_max = σ_max·sqrt(D) (:meth:`PFGMPP.prior`).
As D → ∞ the kernel tends to N(y, σ²I) and PFGM++ becomes EDM.

What does *not* carry over for finite D: the kernel is not Gaussian, so ε̂ = (x − D)/σ is not
−σ·∇log p_σ, and the SDE samplers (``ddpm``, ``euler_maruyama``, ``mrs`` SDE, …), which assume
∇log p = −ε̂/σ, do not sample PFGM++'s marginals. ODE solvers do (the field ODE above).

Radial law of the kernel (and prior): with R = ‖x − y‖ the density is
p(R) ∝ R^{N−1}·(R² + r²)^{−(N+D)/2}, so R²/r² ~ BetaPrime(N/2, D/2), i.e.
B = R²/(R² + r²) ~ Beta(N/2, D/2) and R = r·sqrt(B/(1 − B)) (the official code's sampler).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import as_time
from .ve import EDM

__all__ = ["PFGMPP"]


class PFGMPP(EDM):
    """PFGM++ with augmentation dimension D, aligned to EDM by r = σ·sqrt(D).

    Args:
        D: augmentation dimension (> 0; the paper uses 128 or 2048; D = ∞ is EDM).
        sigma_min, sigma_max: EDM's σ range (r_max = σ_max·sqrt(D)); the official code uses
            σ_max = 80 (unless N > 256²·3).

    The network is an EDM-style denoiser D(x; σ) (``prediction="x0"``, time input σ);
    ``r_of_sigma``/``sigma_of_r`` convert to PFGM++'s own variable.
    """

    def __init__(self, D: float, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(sigma_min, sigma_max)
        if not D > 0 or math.isinf(D):
            raise ValueError(f"D must be a finite number > 0 (D = ∞ is EDM), got {D!r}")
        self.D = float(D)

    def r_of_sigma(self, sigma: float | Tensor) -> Tensor:
        """r = σ·sqrt(D)."""
        return as_time(sigma) * math.sqrt(self.D)

    def sigma_of_r(self, r: float | Tensor) -> Tensor:
        """σ = r/sqrt(D)."""
        return as_time(r) / math.sqrt(self.D)

    def prior_std(self) -> float:
        # E‖x‖²/N = σ_max²·D/(D − 2): finite only for D > 2
        return self.sigma_max * math.sqrt(self.D / (self.D - 2)) if self.D > 2 else math.inf

    def radial_cdf(self, radius: Tensor | np.ndarray, dim: int, sigma: float | None = None) -> Any:
        """P(‖x − y‖ ≤ radius) under the kernel at σ (default σ_max) in ``dim`` = N dimensions:
        I_{R²/(R² + r²)}(N/2, D/2), the regularised incomplete beta function."""
        from scipy.special import betainc

        r2 = (self.sigma_max if sigma is None else float(sigma)) ** 2 * self.D
        rr = np.asarray(radius, dtype=np.float64) ** 2
        return betainc(dim / 2, self.D / 2, rr / (rr + r2))

    def kernel_log_prob(self, x: Tensor, sigma: float | None = None) -> Tensor:
        """log p_r(x | y = 0), the kernel at r = σ·sqrt(D) (σ default σ_max: the prior's
        exact log-density), for x of shape (B, ...) in N = prod(shape[1:]) dimensions; (B,),
        float64. Closed form (normalised over R^N):

            log Γ((N + D)/2) − log Γ(D/2) − (N/2)·log π + D·log r − ((N + D)/2)·log(‖x‖² + r²).
        """
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        n = xf.shape[1]
        r2 = (self.sigma_max if sigma is None else float(sigma)) ** 2 * self.D
        const = (
            math.lgamma((n + self.D) / 2)
            - math.lgamma(self.D / 2)
            - 0.5 * n * math.log(math.pi)
            + 0.5 * self.D * math.log(r2)
        )
        return const - 0.5 * (n + self.D) * torch.log(xf.pow(2).sum(1) + r2)

    def kernel_from_normal(self, z: Tensor, sigma: float | None = None) -> Tensor:
        """Map standard normal draws z (B, ...) to PFGM++ kernel noise at σ (default σ_max).

        Direction z/‖z‖ (uniform on the sphere) and radius by quantile transport: the
        χ²_N-probability u of ‖z‖² gives B = I^{-1}_u(N/2, D/2) and R = r·sqrt(B/(1 − B)).
        The law is the official sampler's (B ~ Beta(N/2, D/2)); the coupling to z makes the
        result converge to σ·z sample by sample as D → ∞ (EDM's prior from the same z).
        Float64 on the host; returns z's dtype and device.
        """
        from scipy.special import betaincinv, gammainc, gammaincc

        n = z[0].numel()
        a, b = n / 2, self.D / 2
        z64 = z.detach().to("cpu", torch.float64).reshape(z.shape[0], -1)
        norm = z64.norm(dim=1)
        half = (norm**2 / 2).numpy()
        lower, upper = gammainc(a, half), gammaincc(a, half)
        # B and 1 − B each from the side where it is accurate (I_x(a,b) = 1 − I_{1−x}(b,a))
        lo = lower <= 0.5
        bb = np.where(lo, betaincinv(a, b, np.where(lo, lower, 0.5)), 0.0)
        cc = np.where(lo, 1.0 - bb, betaincinv(b, a, np.where(lo, 0.5, upper)))
        bb = np.where(lo, bb, 1.0 - cc)
        sig = self.sigma_max if sigma is None else float(sigma)
        radius = torch.from_numpy(sig * math.sqrt(self.D) * np.sqrt(bb / cc))
        x = z64 / norm[:, None] * radius[:, None]
        return x.reshape(z.shape).to(device=z.device, dtype=z.dtype)

    def prior(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """x at σ_max: the kernel at r_max = σ_max·sqrt(D) around 0, in N = prod(shape[1:])
        dimensions (heavy-tailed: ‖x‖²/r_max² ~ BetaPrime(N/2, D/2))."""
        dev = generator.device if generator is not None else "cpu"
        z = torch.randn(shape, generator=generator, dtype=torch.float64, device=dev)
        return self.kernel_from_normal(z).to(device=device, dtype=dtype)

    def _repr_fields(self) -> dict[str, object]:
        return {"D": self.D, **super()._repr_fields()}
