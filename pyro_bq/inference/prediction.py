"""Fast posterior prediction: many weight samples in one vectorized pass.

:func:`predict_batched` draws ``num_samples`` joint weight samples from the
guide in one call (``guide.sample_latents``: parallel random streams, see
:mod:`pyro_bq._rng`) and evaluates the network for all of them with
``model.batched_forward``, which takes the fastest of its ways for the input
shape (the samples folded into one pass, ``torch.func.vmap``, or one ordinary
pass per sample), splitting the samples (and, if needed, the inputs) into
chunks so that the activations fit a memory budget.

:func:`predict_looped` evaluates the *same* samples one at a time through the
ordinary Pyro model with :class:`~pyro.infer.Predictive`; it is the reference
the vectorized path is checked against (same seed, same result up to float
rounding).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch.func import functional_call

from pyro_bq._validation import check_int, check_tensor

__all__ = ["predict_batched", "predict_looped", "activation_bytes_per_sample"]

#: default memory budget for the activations of one chunk
DEFAULT_MAX_BYTES = 1 << 30


def _check_model_guide(model, guide):
    if not callable(getattr(model, "batched_forward", None)):
        raise TypeError(
            f"model must be a pyro_bq BayesianModel (with batched_forward), got {type(model).__name__}"
        )
    if not callable(getattr(guide, "sample_latents", None)):
        raise TypeError(
            f"guide must be a pyro_bq guide (with sample_latents), got {type(guide).__name__}"
        )


@torch.no_grad()
def activation_bytes_per_sample(model, x: torch.Tensor) -> int:
    """Bytes of all layer outputs of one forward pass of ``model``'s network on ``x``.

    Computed on the meta device (no real computation), by summing the sizes of
    every submodule's output.
    """
    template = model._template
    sizes = []

    def hook(_module, _inp, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in template.modules()]
    try:
        params = {k: torch.empty_like(v, device="meta") for k, v in model.net.named_parameters()}
        params.update({k: torch.empty_like(v, device="meta") for k, v in model.net.named_buffers()})
        functional_call(template, params, (x.to("meta"),))
    finally:
        for h in handles:
            h.remove()
    return int(sum(sizes)) + x.numel() * x.element_size()


def _activation_bytes_cached(model, x: torch.Tensor) -> int:
    """:func:`activation_bytes_per_sample`, remembered per input shape and dtype on the model."""
    cache = model._memo("_activation_bytes")
    key = (tuple(x.shape), x.dtype)
    if key not in cache:
        cache[key] = activation_bytes_per_sample(model, x)
    return cache[key]


@torch.no_grad()
def predict_batched(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int = 32,
    *,
    samples: Optional[Mapping[str, torch.Tensor]] = None,
    chunk_size: Optional[int] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Network outputs for ``num_samples`` posterior weight samples: shape ``(S, N, ...)``.

    :param model: a :class:`~pyro_bq.models.BayesianModel` (e.g. ``BayesianClassifier``).
    :param guide: a trained pyro_bq guide (any :class:`~pyro_bq.guides.AutoGaussianSites`,
        quantized guides included: their ``sample_latents`` gives quantized samples).
    :param x: inputs ``(N, ...)``.
    :param num_samples: number of weight samples ``S`` (ignored when ``samples`` is given).
    :param samples: optional weight samples ``{site: (S, *shape)}`` to use instead
        of drawing them (e.g. to reuse draws).
    :param chunk_size: samples per vectorized call; default: as many as fit ``max_bytes``.
    :param max_bytes: activation memory budget of one call (bytes); inputs are
        split too if one sample on all of ``x`` does not fit.
    :returns: logits (classifier) or means (regressor), ``(S, N, ...)``.
    :raises TypeError, ValueError: for bad arguments.

    Usage::

        pyro.set_rng_seed(0)
        logits = predict_batched(model, guide, x_test, num_samples=32)   # (32, N, C)
        probs = logits.softmax(-1).mean(0)
    """
    _check_model_guide(model, guide)
    check_tensor("x", x, floating=True)
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"x must have shape (batch, ...features) with batch >= 1, got {tuple(x.shape)}")
    max_bytes = check_int("max_bytes", max_bytes, low=1)
    if samples is None:
        num_samples = check_int("num_samples", num_samples, low=1)
        samples = guide.sample_latents(num_samples)
    else:
        if not isinstance(samples, Mapping) or not samples:
            raise TypeError("samples must be a non-empty dict {site: tensor (S, *shape)}")
        sizes = {v.shape[0] for v in samples.values()}
        if len(sizes) != 1:
            raise ValueError(f"samples must share one leading sample dimension, got sizes {sorted(sizes)}")
        num_samples = sizes.pop()
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, low=1)

    per_sample = _activation_bytes_cached(model, x)
    n = x.shape[0]
    if chunk_size is None:
        chunk_size = max(1, min(num_samples, max_bytes // max(per_sample, 1)))
    # split the inputs when a single sample over all inputs exceeds the budget
    rows = n if per_sample * chunk_size <= max_bytes else max(1, int(n * max_bytes // (per_sample * chunk_size)))

    sites = model.weight_sites
    outs = []
    for s0 in range(0, num_samples, chunk_size):
        part = {k: samples[k][s0 : s0 + chunk_size] for k in sites}
        if rows >= n:
            outs.append(model.batched_forward(part, x))
        else:
            outs.append(torch.cat([model.batched_forward(part, x[r : r + rows]) for r in range(0, n, rows)], 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


@torch.no_grad()
def predict_looped(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int = 32,
    *,
    samples: Optional[Mapping[str, torch.Tensor]] = None,
    site: Optional[str] = None,
) -> torch.Tensor:
    """Reference for :func:`predict_batched`: the same draws, one Pyro model run each.

    Draws the weights exactly as :func:`predict_batched` does (so both give the
    same result under the same seed), then runs the ordinary model for each
    sample through :class:`~pyro.infer.Predictive` and returns its
    deterministic output site (``"logits"`` for a classifier, ``"loc"`` for a regressor).

    Usage::

        pyro.set_rng_seed(0); fast = predict_batched(model, guide, x)
        pyro.set_rng_seed(0); slow = predict_looped(model, guide, x)
    """
    from pyro.infer import Predictive

    _check_model_guide(model, guide)
    check_tensor("x", x, floating=True)
    if samples is None:
        samples = guide.sample_latents(check_int("num_samples", num_samples, low=1))
    if site is None:
        site = "logits" if "Classifier" in type(model).__name__ else "loc"
    pred = Predictive(model, posterior_samples=dict(samples), return_sites=[site], parallel=False)
    return pred(x)[site]
