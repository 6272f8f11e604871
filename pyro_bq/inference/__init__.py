"""Training and prediction helpers."""

from .elbo import MeanFieldELBO
from .train import FitResult, NonFiniteError, default_optim, fit_svi, seed_everything, svi_step

__all__ = ["fit_svi", "default_optim", "MeanFieldELBO", "FitResult", "NonFiniteError", "seed_everything", "svi_step"]
