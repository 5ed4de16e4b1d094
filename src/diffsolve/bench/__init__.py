"""The exact benchmark: analytic models, exact references, metrics, tables and plots."""

from .gmm import GMMS, GaussianMixture, get_gmm, gmm2d, gmm64, gmm3072
from .reference import exact_x0_at, solve_pf_ode

__all__ = ["GMMS", "GaussianMixture", "exact_x0_at", "get_gmm", "gmm2d", "gmm64", "gmm3072",
           "solve_pf_ode"]
