"""Classification metrics and a rank-based AUROC, in plain torch.

Every metric takes predicted class probabilities ``(N, C)``; a tensor
``(S, N, C)`` of per-draw probabilities is averaged over draws first (the
Bayesian model average). Labels are integer class indices ``(N,)``.
"""

from __future__ import annotations

import torch

from pyro_bq._validation import check_int, check_tensor

from .decompose import check_probs

__all__ = ["accuracy", "nll", "brier", "ece", "reliability_data", "auroc", "DEFAULT_ECE_BINS"]

#: Number of equal-width confidence bins of :func:`ece` and :func:`reliability_data`.
DEFAULT_ECE_BINS = 15

_EPS = 1e-12


def _mean_probs_and_labels(probs, y) -> tuple[torch.Tensor, torch.Tensor]:
    probs = check_probs("probs", probs)
    if probs.dim() == 3:
        probs = probs.mean(0)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class labels, got {type(y).__name__}")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer tensor of class labels, got shape {tuple(y.shape)} dtype {y.dtype}")
    if y.shape[0] != probs.shape[0]:
        raise ValueError(f"y has {y.shape[0]} labels but probs has {probs.shape[0]} rows; they must match")
    num_classes = probs.shape[-1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y must hold class labels in [0, {num_classes - 1}], got values in [{int(y.min())}, {int(y.max())}]")
    return probs, y.long()


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of inputs whose most probable class is the label.

    Usage::

        accuracy(predictive_probs(model, guide, test.x), test.y)
    """
    probs, y = _mean_probs_and_labels(probs, y)
    return (probs.argmax(-1) == y).double().mean().item()


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log predictive probability of the labels (nats).

    Probabilities are clipped at 1e-12 so a confidently wrong prediction costs
    about 27.6 nats rather than infinity.
    """
    probs, y = _mean_probs_and_labels(probs, y)
    p = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1).double()
    return (-p.clamp_min(_EPS).log()).mean().item()


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Multi-class Brier score: mean over inputs of ``sum_c (p_c - 1[c = y])^2`` (in [0, 2])."""
    probs, y = _mean_probs_and_labels(probs, y)
    onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).to(torch.float64)
    return ((probs.double() - onehot) ** 2).sum(-1).mean().item()


def reliability_data(probs: torch.Tensor, y: torch.Tensor, num_bins: int = DEFAULT_ECE_BINS) -> dict:
    """Per-bin figures of a reliability diagram.

    The confidence (largest class probability) is binned into ``num_bins``
    equal-width bins ``(0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]``.

    :returns: dict of tensors (float64) ``edges`` ``(B+1,)``, ``counts`` ``(B,)``,
        ``accuracy`` and ``confidence`` ``(B,)`` (mean within each bin, NaN
        for an empty bin) and the float ``ece``.
    """
    probs, y = _mean_probs_and_labels(probs, y)
    num_bins = check_int("num_bins", num_bins, low=1)
    if probs.shape[0] == 0:
        raise ValueError("probs must hold at least one input")
    conf, pred = probs.double().max(-1)
    correct = (pred == y).double()
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=False)  # bin b holds (edges[b], edges[b+1]]
    counts = torch.bincount(idx, minlength=num_bins).double()
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, idx, correct)
    nonempty = counts > 0
    safe = counts.clamp_min(1)
    mean_conf = torch.where(nonempty, conf_sum / safe, torch.full_like(safe, float("nan")))
    mean_acc = torch.where(nonempty, acc_sum / safe, torch.full_like(safe, float("nan")))
    gap = (acc_sum - conf_sum).abs()  # = counts * |acc_b - conf_b|
    ece_value = (gap.sum() / counts.sum()).item()
    return {"edges": edges, "counts": counts, "accuracy": mean_acc, "confidence": mean_conf, "ece": ece_value}


def ece(probs: torch.Tensor, y: torch.Tensor, num_bins: int = DEFAULT_ECE_BINS) -> float:
    """Expected calibration error with ``num_bins`` equal-width confidence bins (default 15).

    ``sum_b (n_b / N) |accuracy_b - confidence_b|`` over the bins of
    :func:`reliability_data`.

    Usage::

        ece(probs, test.y)          # 0 for a perfectly calibrated model
    """
    return reliability_data(probs, y, num_bins)["ece"]


def _as_scores(name: str, scores) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        try:
            scores = torch.as_tensor(scores, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 1-D tensor or sequence of real scores, got {type(scores).__name__}") from err
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"{name} must hold real scores, got dtype {scores.dtype}")
    scores = scores.reshape(-1).double() if scores.dim() <= 1 else check_tensor(name, scores, ndim=1)
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty; AUROC needs at least one score in each set")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} must hold finite scores (no NaN or inf)")
    return scores


def auroc(score_in, score_out) -> float:
    """Area under the ROC curve for telling ``score_out`` from ``score_in``.

    Higher scores are taken to mean "out" (e.g. mutual information for
    out-of-distribution detection). Equals the probability that a random
    out-score exceeds a random in-score, ties counting one half, computed from
    average ranks (Mann-Whitney U) in ``O(n log n)``.

    :raises ValueError: if either set is empty or holds NaN/inf.

    Usage::

        auroc(parts_mnist["epistemic"], parts_fashion["epistemic"])   # 0.5 = chance
    """
    a = _as_scores("score_in", score_in)
    b = _as_scores("score_out", score_out)
    both = torch.cat([a, b])
    values, inverse, counts = torch.unique(both, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # mean of ranks start..end (1-based)
    ranks = avg_rank[inverse]
    n_in, n_out = a.numel(), b.numel()
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return (u / (n_in * n_out)).item()
