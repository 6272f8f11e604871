"""Training and prediction helpers."""

from .train import FitResult, NonFiniteError, default_optim, fit_svi, seed_everything, svi_step

__all__ = ["fit_svi", "default_optim", "FitResult", "NonFiniteError", "seed_everything", "svi_step"]
