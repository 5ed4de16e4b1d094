"""The exact benchmark: analytic models, exact references, metrics, tables and plots."""

from .gmm import (
    GMMS,
    HELDOUT,
    GaussianMixture,
    get_gmm,
    get_heldout,
    gmm2d,
    gmm64,
    gmm3072,
    gmm_conditional,
    heldout16,
    heldout48,
    heldout128,
    heldout_mixtures,
)
from .metrics import (
    mean_log_likelihood,
    mmd_rbf,
    nfe_to_reach,
    per_sample_rel_err,
    rel_rmse,
    sliced_w2,
)
from .reference import check_reference, dopri5, exact_x0_at, solve_exact, solve_pf_ode

__all__ = [
    "GMMS",
    "HELDOUT",
    "GaussianMixture",
    "check_reference",
    "dopri5",
    "exact_x0_at",
    "get_gmm",
    "get_heldout",
    "gmm2d",
    "gmm64",
    "gmm3072",
    "gmm_conditional",
    "heldout16",
    "heldout48",
    "heldout128",
    "heldout_mixtures",
    "mean_log_likelihood",
    "mmd_rbf",
    "nfe_to_reach",
    "per_sample_rel_err",
    "rel_rmse",
    "sliced_w2",
    "solve_exact",
    "solve_pf_ode",
]
