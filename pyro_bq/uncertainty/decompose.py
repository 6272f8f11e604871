"""Split predictive uncertainty into its aleatoric and epistemic parts.

Classification, from class probabilities ``p[s, n, c]`` of ``S`` weight draws:

* ``total[n]`` = entropy of the mean prediction ``H[mean_s p[s, n]]``;
* ``aleatoric[n]`` = expected entropy ``mean_s H[p[s, n]]``;
* ``epistemic[n]`` = ``total - aleatoric``, the mutual information between the
  label and the weights (>= 0 up to rounding; clipped at 0).

All entropies use the natural logarithm, so they are in **nats**; the largest
possible value for ``C`` classes is ``log(C)``.

Regression, from predicted means ``loc[s, n]`` and noise scales:

* ``aleatoric[n]`` = mean predicted noise variance;
* ``epistemic[n]`` = variance of the predicted mean over weight draws;
* ``total`` = their sum, the variance of the predictive mixture.
"""

from __future__ import annotations

from typing import Union

import torch

from pyro_bq._validation import check_positive, check_tensor

__all__ = ["decompose", "decompose_regression", "entropy", "check_probs", "PROB_TOLERANCE"]

#: Allowed deviation of each probability vector's sum from 1.
PROB_TOLERANCE = 1e-3


def check_probs(name: str, probs, ndim=(2, 3)) -> torch.Tensor:
    """Check that ``probs`` holds probability vectors along its last dimension.

    :raises TypeError: not a floating-point tensor.
    :raises ValueError: wrong number of dimensions, no classes, values outside
        [0, 1] or NaN, or rows that do not sum to 1 (within :data:`PROB_TOLERANCE`).
    """
    check_tensor(name, probs, ndim=ndim, floating=True)
    if probs.numel() == 0 or probs.shape[-1] < 1:
        raise ValueError(f"{name} must be non-empty with a class dimension last, got shape {tuple(probs.shape)}")
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{name} must hold probabilities in [0, 1], found NaN or inf")
    if bool((probs < 0).any()) or bool((probs > 1 + PROB_TOLERANCE).any()):
        raise ValueError(
            f"{name} must hold probabilities in [0, 1], got values in [{probs.min().item():.3g}, "
            f"{probs.max().item():.3g}]; pass probabilities (softmax of logits), not logits"
        )
    err = (probs.sum(-1) - 1).abs().max().item()
    if err > PROB_TOLERANCE:
        raise ValueError(
            f"{name} must sum to 1 over its last (class) dimension (tolerance {PROB_TOLERANCE}); "
            f"the worst row is off by {err:.3g}. Pass probabilities (softmax of logits), not logits"
        )
    return probs


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last dimension (``0 log 0 = 0``); no checks (internal, for checked inputs)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of probability vectors along the last dimension (``0 log 0 = 0``).

    :param probs: class probabilities ``(N, C)`` or ``(S, N, C)``, checked with :func:`check_probs`.
    :returns: a tensor of the leading shape, ``(N,)`` or ``(S, N)``.
    :raises TypeError: if ``probs`` is not a floating-point tensor.
    :raises ValueError: if ``probs`` does not hold probability vectors.
    """
    return _entropy(check_probs("probs", probs))


def decompose(probs: torch.Tensor) -> dict:
    """Total, aleatoric and epistemic uncertainty (nats) from sampled class probabilities.

    :param probs: tensor ``(S, N, C)`` of class probabilities for ``S`` weight
        draws, ``N`` inputs and ``C`` classes (e.g. from
        :func:`~pyro_bq.uncertainty.predictive_probs`); a ``(S, C)`` tensor is
        taken as a single input.
    :returns: dict with ``mean_probs`` ``(N, C)`` and ``total``, ``aleatoric``,
        ``epistemic`` of shape ``(N,)``, in nats. ``epistemic`` is the mutual
        information ``total - aleatoric``.
    :raises ValueError: if ``probs`` is not a tensor of probability vectors.

    Usage::

        parts = decompose(predictive_probs(model, guide, x, num_samples=100))
        parts["epistemic"].mean()   # mean mutual information, nats
    """
    probs = check_probs("probs", probs)
    if probs.dim() == 2:
        probs = probs.unsqueeze(1)
    mean = probs.mean(0)
    total = _entropy(mean)
    aleatoric = _entropy(probs).mean(0)
    epistemic = (total - aleatoric).clamp_min(0.0)
    return {"mean_probs": mean, "total": total, "aleatoric": aleatoric, "epistemic": epistemic}


def decompose_regression(loc: torch.Tensor, noise_scale: Union[float, torch.Tensor]) -> dict:
    """Aleatoric and epistemic variance of a regression model's predictions.

    :param loc: predicted means ``(S, N)`` for ``S`` weight draws.
    :param noise_scale: observation noise standard deviation: a positive float,
        a scalar tensor, or a floating-point tensor of positive values
        broadcastable to ``(S, N)`` (heteroscedastic or sampled noise).
    :returns: dict with ``mean`` ``(N,)``, ``aleatoric`` (mean noise variance),
        ``epistemic`` (variance of ``loc`` over draws, population variance) and
        ``total`` = ``aleatoric + epistemic``.

    Usage::

        pred = predictive_regression(model, guide, x)
        parts = decompose_regression(pred["loc"], pred["noise_scale"])
    """
    check_tensor("loc", loc, ndim=2, floating=True)
    if not bool(torch.isfinite(loc).all()):
        raise ValueError("loc must be finite")
    if isinstance(noise_scale, torch.Tensor):
        if not noise_scale.is_floating_point():
            raise TypeError(f"noise_scale must be a positive float or a floating-point tensor, got dtype {noise_scale.dtype}")
        noise = noise_scale.to(dtype=loc.dtype, device=loc.device)
        if noise.numel() == 0 or not bool(torch.isfinite(noise).all()) or bool((noise <= 0).any()):
            raise ValueError("noise_scale must hold finite values > 0 (observation noise standard deviations)")
    else:
        noise = torch.tensor(check_positive("noise_scale", noise_scale), dtype=loc.dtype, device=loc.device)
    try:
        noise_var = torch.broadcast_to(noise**2, loc.shape)
    except RuntimeError as err:
        raise ValueError(f"noise_scale of shape {tuple(noise.shape)} does not broadcast to loc's {tuple(loc.shape)}") from err
    aleatoric = noise_var.mean(0)
    epistemic = loc.var(0, unbiased=False)
    return {"mean": loc.mean(0), "total": aleatoric + epistemic, "aleatoric": aleatoric, "epistemic": epistemic}
