"""Monte Carlo predictions of a model under a guide, vectorized over weight samples.

Two paths give the same numbers for the same weight draws:

* **vectorized** (default whenever possible): weight samples come from
  ``guide.sample_latents(S)`` (any :class:`~pyro_bq.guides.AutoGaussianSites`
  guide, quantized guides included) or, for other guides, from the guide run
  under :class:`pyro.infer.Predictive`; the network then runs many samples at
  once (:func:`~pyro_bq.inference.prediction.predict_batched`);
* **predictive**: stock :class:`pyro.infer.Predictive` over the model, which
  runs one model pass per sample
  (:func:`~pyro_bq.inference.prediction.predict_looped`). Used for models
  without ``functional_net``.

Inputs are processed in batches of ``batch_size`` rows and samples in chunks
of ``sample_chunk`` draws (default: as many as keep the activations of one
pass within ``max_bytes``), whatever the size of ``x``. The ``S`` weight draws
are made once, in one vectorized call, and used for every input batch; with a
``seed`` they do not depend on the chunk sizes.

**Data.** ``x`` is a tensor of inputs, a dataset with an ``.x`` tensor, or any
source of ``(x, y)`` batches that :func:`~pyro_bq.inference.as_batches` reads (a
``torch.utils.data.DataLoader``, a list or other re-iterable of batches): each
batch is checked (a malformed one raises a :class:`~pyro_bq.inference.BatchError`
naming its index) and predicted with the same weight draws, and the outputs are
concatenated in the order the batches came. A shuffling DataLoader is read in
the order its ``(seed=0, epoch=0)`` permutation gives, so repeated calls agree.

**Device.** ``device=`` (``"auto"``, ``"cpu"``, ``"cuda"``, a ``torch.device``)
is where the network runs; by default where the weight draws are (the guide's
device). Inputs move there batch by batch (asynchronously from pinned memory),
and the outputs stay there.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Optional

import pyro.poutine as poutine
import torch
from pyro.infer import Predictive

from pyro_bq._validation import check_callable, check_choice, check_int, resolve_device
from pyro_bq.inference.batches import as_batches
from pyro_bq.inference.prediction import DEFAULT_MAX_BYTES, as_inputs, check_draws, predict_batched, predict_looped
from pyro_bq.quant.activation import check_calibrated

__all__ = [
    "predictive_logits",
    "predictive_probs",
    "predictive_regression",
    "sample_weights",
    "predict_with_labels",
    "is_batch_source",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_NUM_SAMPLES",
]

#: Number of weight draws when ``num_samples`` is not given.
DEFAULT_NUM_SAMPLES = 100

_METHODS = ("auto", "vectorized", "predictive")


def is_batch_source(data) -> bool:
    """True for data read batch by batch (a DataLoader, a re-iterable of ``(x, y)`` batches), False for a
    tensor of inputs or a dataset with an ``.x`` tensor."""
    return not isinstance(data, torch.Tensor) and not isinstance(getattr(data, "x", None), torch.Tensor) and (
        not hasattr(data, "__array__")) and hasattr(data, "__iter__") and not isinstance(data, (str, bytes, dict))


def first_inputs(name: str, data) -> torch.Tensor:
    """A few example inputs of ``data`` (its first batch, or the tensor itself), e.g. to set a guide up."""
    if is_batch_source(data):
        return as_batches(data, name=name).first()[0]
    return as_inputs(name, data)


def _check_num_samples(num_samples) -> int:
    return check_int("num_samples", num_samples, low=1)


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Run the block with torch's CPU RNG seeded, leaving the global state as it was."""
    if seed is None:
        yield
        return
    seed = check_int("seed", seed, low=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _ensure_setup(guide, x: torch.Tensor) -> None:
    if getattr(guide, "prototype_trace", "missing") is None:
        if hasattr(guide, "setup"):
            try:
                guide.setup(x[:1])
            except ValueError as err:
                raise ValueError(
                    f"could not set up the untrained {type(guide).__name__} from x alone ({err}); "
                    "train it first or call guide.setup(x, y)"
                ) from err
        else:
            raise ValueError(
                f"the {type(guide).__name__} guide has no parameters yet: train it, or call it once "
                "with the model's arguments (e.g. guide(x, y)), before predicting"
            )


def _latent_names(guide, x: torch.Tensor) -> list[str]:
    trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(x[:1])
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("is_auxiliary", False)
    ]


@torch.no_grad()
def sample_weights(model, guide, num_samples: int, x: Optional[torch.Tensor] = None, *, seed: Optional[int] = None) -> dict:
    """``num_samples`` joint draws of the guide's latent sites: ``{site: (S, *shape)}``.

    Uses the guide's vectorized ``sample_latents`` when it has one; otherwise
    runs the guide under :class:`pyro.infer.Predictive` (``x`` is then needed
    as example input, a single row is enough).

    Usage::

        draws = sample_weights(model, guide, 100)
        logits = predictive_logits(model, x=x, samples=draws)   # (100, N, C)
    """
    num_samples = _check_num_samples(num_samples)
    with _seeded(seed):
        if hasattr(guide, "sample_latents"):
            if x is not None:
                _ensure_setup(guide, first_inputs("x", x))
            return guide.sample_latents(num_samples)
        if x is None:
            raise ValueError("x (example inputs) is needed to sample from a guide without sample_latents")
        x = first_inputs("x", x)
        names = _latent_names(guide, x)
        if not names:
            raise ValueError("the guide has no latent sample sites to draw")
        # run the guide alone: its sample sites are the latents, shaped (S, *site_shape)
        return Predictive(guide, num_samples=num_samples, return_sites=names)(x[:1])


@torch.no_grad()
def predictive_logits(
    model,
    guide=None,
    x=None,
    *,
    num_samples: Optional[int] = None,
    batch_size: int = 500,
    sample_chunk: Optional[int] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    samples: Optional[Mapping[str, torch.Tensor]] = None,
    seed: Optional[int] = None,
    method: str = "auto",
    site: Optional[str] = None,
    device=None,
) -> torch.Tensor:
    """Network outputs (e.g. logits) for ``S`` weight draws: a tensor ``(S, N, ...)``.

    :param model: a Pyro model; a :class:`~pyro_bq.models.BayesianModel` gives the
        vectorized path.
    :param guide: the guide to draw weights from (not needed when ``samples`` is given).
    :param x: inputs ``(N, ...)``, a dataset with an ``.x`` tensor, a DataLoader or a
        re-iterable of ``(x, y)`` batches (see the module docstring).
    :param num_samples: number of weight draws ``S`` (>= 1; default
        :data:`DEFAULT_NUM_SAMPLES`, or the number of draws in ``samples``).
    :param batch_size: inputs per network pass (within each batch of a loader).
    :param sample_chunk: weight draws per vectorized pass; default as many as keep
        the activations of one pass within ``max_bytes``.
    :param max_bytes: activation memory budget of one vectorized pass (bytes).
    :param samples: precomputed draws ``{site: (S, ...)}`` (e.g. from
        :func:`sample_weights`) instead of drawing from ``guide``.
    :param seed: seed for the weight draws (the global RNG state is left untouched);
        equal seeds give equal draws whatever ``x``, ``batch_size``, ``sample_chunk``
        and ``method``, so several datasets can share them.
    :param method: ``"auto"``, ``"vectorized"`` (needs ``model.functional_net``)
        or ``"predictive"`` (stock :class:`pyro.infer.Predictive`).
    :param site: the deterministic output site read by the ``"predictive"`` path
        (default ``model.output_site``).
    :param device: where the network runs; default where the draws are.

    The ``S`` weight draws are held at once (``S`` times the number of weights).

    Usage::

        logits = predictive_logits(model, guide, test.x, num_samples=50, seed=0)   # (50, N, C)
        logits = predictive_logits(model, guide, DataLoader(ds, batch_size=256), device="cuda")
    """
    return predict_with_labels(model, guide, x, num_samples=num_samples, batch_size=batch_size,
                               sample_chunk=sample_chunk, max_bytes=max_bytes, samples=samples, seed=seed,
                               method=method, site=site, device=device)[0]


@torch.no_grad()
def predict_with_labels(model, guide, x, *, num_samples=None, batch_size: int = 500, sample_chunk=None,
                        max_bytes: int = DEFAULT_MAX_BYTES, samples=None, seed=None, method: str = "auto",
                        site=None, device=None, name: str = "x") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(outputs, labels)``: :func:`predictive_logits` of ``x`` (arguments as there) and the labels that
    came with the inputs (a dataset's ``.y``, the batches' ``y`` concatenated; ``None`` for a tensor).

    ``name`` is how error messages call ``x``.

    Usage::

        logits, y = predict_with_labels(model, guide, loader, num_samples=50, seed=0)
    """
    check_callable("model", model, "a Pyro model (e.g. a pyro_bq BayesianClassifier)")
    if guide is not None and not callable(guide):
        raise TypeError(f"guide must be a Pyro guide (e.g. AutoMeanFieldNormal) or None, got {type(guide).__name__}")
    streamed = is_batch_source(x)
    labels = None if streamed or isinstance(x, torch.Tensor) else getattr(x, "y", None)
    x = x if streamed else as_inputs(name, x)
    check_choice("method", method, _METHODS)
    batch_size = check_int("batch_size", batch_size, low=1)
    if sample_chunk is not None:
        check_int("sample_chunk", sample_chunk, low=1)
    if num_samples is not None:
        _check_num_samples(num_samples)
    if samples is None:
        if guide is None:
            raise ValueError("give a guide to draw weights from, or samples=")
        num_samples = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
    else:
        samples, num_samples = check_draws(samples, num_samples)
    vectorizable = hasattr(model, "functional_net")
    if method == "vectorized" and not vectorizable:
        raise ValueError(f"method='vectorized' needs a model with functional_net; {type(model).__name__} has none")
    probe = first_inputs(name, x) if streamed and (guide is not None) else x
    if guide is not None:
        _ensure_setup(guide, probe)
    if hasattr(model, "net"):
        check_calibrated(model)  # an uncalibrated fake-quant activation would give every input one prediction
    with _seeded(seed):
        if samples is None:  # all draws at once, so they do not depend on batch_size or sample_chunk
            samples = sample_weights(model, guide, num_samples, probe[:1])
        device = next(iter(samples.values())).device if device is None else resolve_device(device)

        def run(inputs):
            if method == "predictive" or not vectorizable:
                return predict_looped(model, None, inputs, samples=samples, site=site, batch_size=batch_size,
                                      device=device)
            return predict_batched(model, None, inputs, samples=samples, batch_size=batch_size,
                                   chunk_size=sample_chunk, max_bytes=max_bytes, device=device)

        if not streamed:
            return run(x), labels
        outs, ys = [], []
        for _, xb, yb in as_batches(x, device=device, name=name).epoch(0, seed=0):
            outs.append(run(xb))
            ys.append(yb)
        return torch.cat(outs, 1), torch.cat(ys)


def predictive_probs(model, guide=None, x=None, **options) -> torch.Tensor:
    """Class probabilities for ``S`` weight draws: a tensor ``(S, N, C)``.

    The softmax of :func:`predictive_logits` of the ``"logits"`` site; ``options`` as there.

    Usage::

        probs = predictive_probs(model, guide, test.x, num_samples=100)
        parts = decompose(probs)          # entropies in nats
    """
    logits = predictive_logits(model, guide, x, site="logits", **options)
    if logits.dim() != 3:
        raise ValueError(f"the model's outputs must be logits of shape (S, N, C), got {tuple(logits.shape)}")
    return logits.softmax(-1)


def predictive_regression(model, guide=None, x=None, **options) -> dict:
    """Predicted means ``loc`` ``(S, N)`` and the noise scale of a regression model.

    Returns ``{"loc": (S, N), "noise_scale": tensor}`` where ``loc`` is
    :func:`predictive_logits` of the ``"loc"`` site (``options`` as there) and the
    noise scale is ``model.noise_scale()`` (a scalar for
    :class:`~pyro_bq.models.BayesianRegressor`). Feed it to
    :func:`~pyro_bq.uncertainty.decompose_regression`.

    Usage::

        pred = predictive_regression(model, guide, x, num_samples=200)
        parts = decompose_regression(pred["loc"], pred["noise_scale"])
    """
    if not hasattr(model, "noise_scale"):
        raise TypeError(f"model must be a regression model with noise_scale(), got {type(model).__name__}")
    return {"loc": predictive_logits(model, guide, x, site="loc", **options), "noise_scale": model.noise_scale()}
