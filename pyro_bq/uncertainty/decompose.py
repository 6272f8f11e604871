"""Split predictive uncertainty into its aleatoric and epistemic parts.

Classification, from class probabilities ``p[s, n, c]`` of ``S`` weight draws:

* ``total[n]`` = entropy of the mean prediction ``H[mean_s p[s, n]]``: how
  unsure the model average is about input ``n``'s label;
* ``aleatoric[n]`` = expected entropy ``mean_s H[p[s, n]]``: how unsure each
  single weight draw is, on average (the noise the model sees in the label);
* ``epistemic[n]`` = the mutual information between the label and the weights,
  ``mean_s KL(p[s, n] || mean_s p[s, n])``: how much the draws disagree with
  their average. It equals ``total - aleatoric`` in exact arithmetic, but that
  difference of two entropies of order 1 loses the small values (draws that
  nearly agree, MI of 1e-5 or less) to float32 rounding. The KL form is
  computed in float64, term by term as ``q * f(p/q)`` with
  ``f(r) = r log r - r + 1 >= 0`` (the ``- r + 1`` parts sum to zero over the
  draws), so it is non-negative by construction and accurate to float64
  rounding relative to its own size: it is 0 exactly when all draws agree.

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
#: Float64 elements of the ``(S, n, C)`` block the mutual information works on at once.
_MI_BLOCK = 1 << 21


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


def _draw_parts(probs: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Aleatoric part and mutual information ``(N,)`` (float64) of ``probs`` ``(S, N, C)`` around ``mean`` ``(N, C)``.

    The mutual information is ``mean_s KL(probs[s, n] || mean[n])``, each term
    ``q f(p/q)`` with ``f(r) = r log r - r + 1``, written with ``d = p/q - 1``
    as ``(1 + d) log1p(d) - d`` (accurate for ``d`` near 0); ``p = 0``, or ``p/q``
    so small that ``d`` rounds to ``-1``, gives ``q``, ``q = 0`` (then every ``p`` is 0) gives 0. Inputs are processed in
    blocks of :data:`_MI_BLOCK` float64 elements.
    """
    num, n, c = probs.shape
    aleatoric = torch.empty(n, dtype=torch.float64, device=probs.device)
    info = torch.empty(n, dtype=torch.float64, device=probs.device)
    step = max(1, _MI_BLOCK // max(1, num * c))
    for start in range(0, n, step):
        block = slice(start, start + step)
        p = probs[:, block].double()
        q = mean[block].expand_as(p)
        positive = q > 0
        d = torch.where(positive, (p - q) / torch.where(positive, q, 1.0), 0.0)
        # f(p/q) >= 0; p/q below float64's resolution (d == -1, p = 0 included) picks f(0) = 1, not 0 * log(0)
        g = torch.where(d > -1, (1 + d) * torch.log1p(d) - d, 1.0)
        info[block] = (q * g.clamp_min(0.0)).sum(-1).mean(0)
        aleatoric[block] = _entropy(p).mean(0)
    return aleatoric, info


def decompose(probs: torch.Tensor) -> dict:
    """Total, aleatoric and epistemic uncertainty (nats) from sampled class probabilities.

    :param probs: tensor ``(S, N, C)`` of class probabilities for ``S`` weight
        draws, ``N`` inputs and ``C`` classes (e.g. from
        :func:`~pyro_bq.uncertainty.predictive_probs`); a ``(S, C)`` tensor is
        taken as a single input.
    :returns: dict with ``mean_probs`` ``(N, C)`` and ``total``, ``aleatoric``,
        ``epistemic`` of shape ``(N,)``, in nats, all in the dtype of ``probs``
        (computed in float64). ``epistemic`` is the mutual information
        ``mean_s KL(p_s || mean_probs)``, which is ``total - aleatoric`` up to
        rounding and never negative (see the module docstring).
    :raises ValueError: if ``probs`` is not a tensor of probability vectors.

    Usage::

        parts = decompose(predictive_probs(model, guide, x, num_samples=100))
        parts["epistemic"].mean()   # mean mutual information, nats
    """
    probs = check_probs("probs", probs)
    if probs.dim() == 2:
        probs = probs.unsqueeze(1)
    mean = probs.sum(0, dtype=torch.float64) / probs.shape[0]
    total = _entropy(mean)
    aleatoric, epistemic = _draw_parts(probs, mean)
    dtype = probs.dtype
    return {"mean_probs": mean.to(dtype), "total": total.to(dtype), "aleatoric": aleatoric.to(dtype),
            "epistemic": epistemic.to(dtype)}


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
