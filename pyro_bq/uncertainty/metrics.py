"""Classification metrics and a rank-based AUROC, in plain torch.

Every metric takes predicted class probabilities ``(N, C)``; a tensor
``(S, N, C)`` of per-draw probabilities is averaged over draws first (the
Bayesian model average). Labels are integer class indices ``(N,)``.

What each number counts:

* :func:`accuracy`: the fraction of inputs whose most probable class under the
  model average is the label;
* :func:`nll`: the mean over inputs of ``-log p(y | x)``, the negative log of
  the model average's probability of the label, in nats. From per-draw
  log-probabilities (or logits) it is a log-mean-exp over draws, so a label
  whose probability underflows float32 still costs its true amount;
* :func:`brier`: the mean over inputs of the squared distance between the
  model average and the one-hot label (0 to 2);
* :func:`ece`: the confidence-weighted gap between accuracy and confidence over
  equal-width confidence bins (0 for a calibrated model);
* :func:`auroc`: the probability that a random "out" input scores above a random
  "in" input (0.5: the score cannot tell them apart).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from pyro_bq._validation import check_int, check_tensor

from .decompose import check_probs

__all__ = ["accuracy", "nll", "brier", "ece", "reliability_data", "auroc", "DEFAULT_ECE_BINS"]

#: Number of equal-width confidence bins of :func:`ece` and :func:`reliability_data`.
DEFAULT_ECE_BINS = 15


def _mean_probs_and_labels(probs, y) -> tuple[torch.Tensor, torch.Tensor]:
    probs = check_probs("probs", probs)
    if probs.dim() == 3:
        probs = probs.mean(0)
    return probs, _check_labels(y, probs.shape[0], probs.shape[-1])


def _check_labels(y, num_inputs: int, num_classes: int) -> torch.Tensor:
    """``y`` as int64 labels of ``num_inputs`` inputs, each in ``[0, num_classes)``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of class labels, got {type(y).__name__}")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer tensor of class labels, got shape {tuple(y.shape)} dtype {y.dtype}")
    if y.shape[0] != num_inputs:
        raise ValueError(f"y has {y.shape[0]} labels but probs has {num_inputs} rows; they must match")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y must hold class labels in [0, {num_classes - 1}], got values in [{int(y.min())}, {int(y.max())}]")
    return y.long()


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of inputs whose most probable class is the label.

    Usage::

        accuracy(predictive_probs(model, guide, test.x), test.y)
    """
    probs, y = _mean_probs_and_labels(probs, y)
    return (probs.argmax(-1) == y).double().mean().item()


def _label_log_probs(probs, y, logits) -> torch.Tensor:
    """Per-draw log-probabilities of the labels, ``(S, N)`` in float64, from ``probs`` or ``logits``."""
    if (probs is None) == (logits is None):
        raise ValueError("give exactly one of probs and logits")
    if logits is not None:
        check_tensor("logits", logits, ndim=(2, 3), floating=True)
        if bool(torch.isnan(logits).any()) or bool((logits == float("inf")).any()):
            raise ValueError("logits must not hold NaN or +inf")
        log_probs = logits.double().log_softmax(-1)
    else:
        log_probs = check_probs("probs", probs).double().log()
    if log_probs.dim() == 2:
        log_probs = log_probs.unsqueeze(0)
    y = _check_labels(y, log_probs.shape[1], log_probs.shape[-1])
    index = y.reshape(1, -1, 1).expand(log_probs.shape[0], -1, 1)
    return log_probs.gather(-1, index).squeeze(-1)


def nll(probs: Optional[torch.Tensor], y: torch.Tensor, *, logits: Optional[torch.Tensor] = None) -> float:
    """Mean negative log predictive probability of the labels, in nats.

    ``-mean_n log( mean_s p_s(y_n | x_n) )``, computed as ``log S - logsumexp_s
    log p_s(y_n | x_n)`` in float64: nothing is clipped, so a label whose
    probability is ``1e-20`` costs its 46 nats, and only a label that every draw
    gives probability exactly 0 costs ``inf``.

    :param probs: class probabilities ``(N, C)`` or per-draw ``(S, N, C)``; or None with ``logits``.
    :param y: integer labels ``(N,)``.
    :param logits: per-draw logits ``(S, N, C)`` (or ``(N, C)``) instead of ``probs``; preferred when
        available, since their log-softmax keeps the log-probabilities that float32 probabilities lose.

    Usage::

        nll(None, test.y, logits=predictive_logits(model, guide, test.x, site="logits"))
        nll(predictive_probs(model, guide, test.x), test.y)
    """
    log_p = _label_log_probs(probs, y, logits)
    per_input = math.log(log_p.shape[0]) - torch.logsumexp(log_p, 0)
    return per_input.mean().item()


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
