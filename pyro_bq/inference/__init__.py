"""Training and prediction helpers."""

from .train import FitResult, NonFiniteError, fit_svi, seed_everything, svi_step

__all__ = ["fit_svi", "FitResult", "NonFiniteError", "seed_everything", "svi_step"]
