"""Predictive uncertainty, metrics, ArviZ export and plots.

Usage::

    from pyro_bq.uncertainty import predictive_probs, decompose, evaluate

    probs = predictive_probs(model, guide, test.x, num_samples=100)   # (S, N, C)
    parts = decompose(probs)          # mean_probs, total, aleatoric, epistemic (nats)
    record = evaluate(model, guide, mnist_test, fashion_test)          # one row of a table
    record, details = evaluate_details(model, guide, mnist_test, fashion_test)   # and the per-input parts

All entropies and mutual informations are in nats (natural logarithm).
"""

from .arviz_export import DEFAULT_MAX_SITE_SIZE, to_arviz
from .decompose import check_probs, decompose, decompose_regression, entropy
from .evaluate import evaluate, evaluate_details, uncertainty_scores
from .metrics import DEFAULT_ECE_BINS, accuracy, auroc, brier, ece, nll, reliability_data
from .plots import plot_reliability, plot_uncertainty
from .predict import (DEFAULT_MAX_BYTES, DEFAULT_NUM_SAMPLES, predictive_logits, predictive_probs,
                      predictive_regression, sample_weights)

__all__ = [
    "predictive_probs",
    "predictive_logits",
    "predictive_regression",
    "sample_weights",
    "decompose",
    "decompose_regression",
    "entropy",
    "check_probs",
    "accuracy",
    "nll",
    "brier",
    "ece",
    "reliability_data",
    "auroc",
    "evaluate",
    "evaluate_details",
    "uncertainty_scores",
    "to_arviz",
    "plot_uncertainty",
    "plot_reliability",
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_ECE_BINS",
    "DEFAULT_MAX_SITE_SIZE",
]
