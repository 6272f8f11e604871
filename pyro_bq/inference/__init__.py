"""Training and prediction helpers."""

from .batches import BatchError, Batches, as_batches
from .elbo import MeanFieldELBO
from .prediction import batched_forward, predict_batched, predict_looped
from .train import FitResult, NonFiniteError, compile_network_, default_optim, fit_svi, seed_everything, svi_step

__all__ = ["fit_svi", "default_optim", "MeanFieldELBO", "FitResult", "NonFiniteError", "seed_everything", "svi_step",
           "compile_network_",
           "batched_forward", "as_batches", "Batches", "BatchError", "predict_batched", "predict_looped"]
