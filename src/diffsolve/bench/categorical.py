"""An exact masked-diffusion model: a mixture of K product-categorical distributions.

p(x) = Σ_k w_k · Π_i π_k,i(x_i) over L positions with V values each. Given any set S of visible
positions the clean-token posterior of a masked position j is closed-form (Bayes):

    r_k(x_S) ∝ w_k · Π_{i∈S} π_k,i(x_i),      p(x_j = v | x_S) = Σ_k r_k(x_S) · π_k,j(v),

which is the exact optimum of the masked-diffusion loss at every t (the absorbing posterior does
not depend on t). So :meth:`ProductMixture.net` is a perfect network, and a correct sampler must
reproduce p exactly. Checked quantities, all closed-form:

- pair laws P(x_i = a, x_j = b) = Σ_k w_k π_k,i(a) π_k,j(b), and the total variation of the
  sample's empirical pair laws against them (:func:`pair_tv`), with the level expected from
  sampling noise alone (:func:`pair_tv_noise`): E|p̂ − p| ≈ sqrt(2p(1 − p)/(πN)) per cell;
- component frequencies: the responsibilities r_k(x) of full samples average to w_k exactly
  under p (E_p[r_k(x)] = w_k), so their sample mean estimates w_k with a measurable error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ProductMixture", "pair_tv", "pair_tv_noise", "product_mixture"]


@dataclass(frozen=True)
class ProductMixture:
    """Σ_k w_k Π_i Categorical(π_k,i). ``weights`` (K,), ``probs`` (K, L, V); float64."""

    weights: Tensor
    probs: Tensor

    @property
    def length(self) -> int:
        return self.probs.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.probs.shape[2]

    def responsibilities(self, tokens: Tensor, mask_id: int | None = None) -> Tensor:
        """r_k given the visible tokens of ``tokens`` (B, L) (mask id = V unless given): (B, K)."""
        mask_id = self.vocab_size if mask_id is None else mask_id
        vis = tokens != mask_id
        safe = torch.where(vis, tokens, torch.zeros_like(tokens)).long()
        logp = self.probs.log()  # (K, L, V)
        # log π_k,i(x_i) for every sample, component and position: (B, K, L)
        idx = safe[:, None, :, None].expand(-1, logp.shape[0], -1, 1)
        lp = logp[None].expand(tokens.shape[0], -1, -1, -1).gather(3, idx)[..., 0]
        lp = torch.where(vis[:, None, :], lp, torch.zeros_like(lp)).sum(2)
        return torch.softmax(lp + self.weights.log(), dim=1)

    def posterior(self, tokens: Tensor, mask_id: int | None = None) -> Tensor:
        """p(x_j = v | visible tokens) for every position j: (B, L, V), float64."""
        r = self.responsibilities(tokens, mask_id)
        return torch.einsum("bk,klv->blv", r, self.probs)

    def net(self, mask_id: int | None = None):
        """The exact network: ``net(tokens (B, L), t (B,)) -> logits (B, L, V)`` (float64)."""

        def exact(tokens: Tensor, t: Tensor) -> Tensor:
            return self.posterior(tokens, mask_id).log()

        return exact

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact draws (n, L), long: component, then each position independently."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        p = self.probs[k].reshape(-1, self.vocab_size)
        return torch.multinomial(p, 1, generator=generator).reshape(n, self.length)

    def pair_law(self, i: int, j: int) -> Tensor:
        """P(x_i = a, x_j = b): (V, V)."""
        return torch.einsum("k,ka,kb->ab", self.weights, self.probs[:, i], self.probs[:, j])

    def component_frequencies(self, tokens: Tensor) -> Tensor:
        """Mean responsibilities of full samples (N, L): (K,); equals w_k in expectation."""
        return self.responsibilities(tokens).mean(0)


def product_mixture(
    k: int = 3, length: int = 6, vocab: int = 4, concentration: float = 0.5, seed: int = 0
) -> ProductMixture:
    """A random mixture: weights and each π_k,i drawn from Dirichlet(concentration) (small
    concentration: peaked, well-separated components, hence strong pair correlations)."""
    g = torch.Generator().manual_seed(seed)
    gam = torch.distributions.Gamma(torch.tensor(concentration, dtype=torch.float64), 1.0)
    state = torch.random.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    try:
        w = gam.sample((k,)) + 0.5
        p = gam.sample((k, length, vocab)) + 1e-3
    finally:
        torch.random.set_rng_state(state)
    return ProductMixture(w / w.sum(), p / p.sum(-1, keepdim=True))


def _pairs(length: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(length) for j in range(i + 1, length)]


def pair_tv(model: ProductMixture, tokens: Tensor) -> Tensor:
    """Total variation between the empirical and the exact law of every pair (i < j): (P,)."""
    v, n = model.vocab_size, tokens.shape[0]
    out = []
    for i, j in _pairs(model.length):
        counts = torch.bincount(tokens[:, i] * v + tokens[:, j], minlength=v * v)
        emp = counts.to(torch.float64) / n
        out.append(0.5 * (emp - model.pair_law(i, j).reshape(-1)).abs().sum())
    return torch.stack(out)


def pair_tv_noise(model: ProductMixture, n: int) -> Tensor:
    """Expected pair TV of n exact samples (sampling noise only), per pair: (P,).

    Normal approximation of each cell: E|p̂ − p| = sqrt(2p(1 − p)/(πn)).
    """
    out = []
    for i, j in _pairs(model.length):
        p = model.pair_law(i, j).reshape(-1)
        out.append(0.5 * torch.sqrt(2.0 * p * (1.0 - p) / (math.pi * n)).sum())
    return torch.stack(out)
