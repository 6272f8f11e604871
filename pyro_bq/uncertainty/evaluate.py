"""One call that evaluates a guide on in-distribution and out-of-distribution data.

Each data argument is an ``InMemoryDataset`` (or any dataset with ``.x``/``.y``
tensors), an ``(x, y)`` pair of tensors, a tensor ``x``, or a source of ``(x, y)``
batches (a DataLoader, a list of batches; see
:mod:`pyro_bq.uncertainty.predict`). The same data as a DataLoader gives the same
figures as in memory; a malformed batch raises an error naming the set and the
batch index.
"""

from __future__ import annotations

from typing import Optional

import torch

from pyro_bq._validation import check_int
from pyro_bq.guides.base import AutoGaussianSites
from pyro_bq.guides.quantized import deterministic_sites, varying_fraction

from .decompose import decompose
from .metrics import DEFAULT_ECE_BINS, accuracy, auroc, brier, ece, nll
from .predict import DEFAULT_NUM_SAMPLES, as_inputs, is_batch_source, predict_with_labels, sample_weights

__all__ = ["evaluate", "evaluate_details", "uncertainty_scores"]


def _is_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def _split(name: str, data, need_labels: bool):
    """``(x, y)`` from an InMemoryDataset, an ``(x, y)`` pair or a tensor ``x``; a source of batches
    is returned as it is (``(data, None)``), read and checked batch by batch later."""
    tensors = isinstance(data, (tuple, list)) and bool(data) and isinstance(data[0], torch.Tensor)
    if not tensors and is_batch_source(data):
        return data, None
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"{name} must be a dataset, an (x, y) pair or a tensor x; got a sequence of length {len(data)}")
        x, y = data
    elif isinstance(data, torch.Tensor):
        x, y = data, None
    else:
        x, y = getattr(data, "x", None), getattr(data, "y", None)
        if x is None:
            raise TypeError(
                f"{name} must be an InMemoryDataset, an (x, y) pair or a tensor x; got {type(data).__name__}"
            )
    x = as_inputs(f"{name}.x", x)
    finite = torch.isfinite(x).reshape(len(x), -1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().reshape(-1)
        raise ValueError(f"{name}.x holds NaN or infinite values in {len(bad)} of its {len(x)} inputs (the first at "
                         f"row {int(bad[0])}), which would make every prediction on them NaN; drop or repair those "
                         "inputs first (e.g. x[torch.isfinite(x).flatten(1).all(1)])")
    if need_labels and not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} needs labels: pass an InMemoryDataset or an (x, y) pair")
    return x, y


def uncertainty_scores(
    model,
    guide,
    datasets: dict,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    batch_size: int = 500,
    sample_chunk: Optional[int] = None,
    seed: int = 0,
    method: str = "auto",
    device=None,
) -> dict:
    """:func:`~pyro_bq.uncertainty.decompose` of several datasets with the same weight draws.

    :param datasets: ``{name: data}`` where data is a dataset with ``.x``, an
        ``(x, y)`` pair, a tensor of inputs or a source of ``(x, y)`` batches (a DataLoader).
    :param device: where the network runs (default: the guide's device); the results stay there.
    :returns: ``{name: {"mean_probs", "total", "aleatoric", "epistemic"}}`` (nats).
    :raises TypeError, ValueError: for bad arguments; an error of a dataset after
        the first, which the network could take, names that dataset and both shapes.

    Usage::

        parts = uncertainty_scores(model, guide, {"MNIST": test, "Fashion": fashion})
        plot_uncertainty(parts, "uncertainty.png")
    """
    logits = _predict_sets(model, guide, datasets, num_samples=num_samples, batch_size=batch_size,
                           sample_chunk=sample_chunk, seed=seed, method=method, device=device)
    return {name: decompose(value.softmax(-1)) for name, value in logits.items()}


def _predict_sets(model, guide, datasets: dict, labels: bool = False, **options) -> dict:
    """``{name: logits (S, N, C)}`` of several datasets with the same weight draws (``options`` of
    predictive_logits); with ``labels``, ``{name: (logits, y)}``."""
    if not isinstance(datasets, dict) or not datasets:
        raise TypeError("datasets must be a non-empty dict {name: dataset}")
    out, first = {}, None
    for name, data in datasets.items():
        x, y = _split(f"datasets[{name!r}]", data, need_labels=False)
        if first is not None and "samples" not in options:
            options = _shared_draws(model, guide, options)
        try:
            logits, read = predict_with_labels(model, guide, x, site="logits", name=name, **options)
        except (TypeError, ValueError) as err:
            if first is None or not isinstance(x, torch.Tensor):  # a batch error names its set and batch already
                raise
            # the arguments were fine for the first dataset, so the inputs of this one are what the network cannot take
            raise type(err)(f"{name} (inputs of shape {tuple(x.shape)}, dtype {x.dtype}; {first[0]} has "
                            f"{first[1]}): {err}") from err
        if logits.dim() != 3:
            raise ValueError(f"the model's outputs must be logits of shape (S, N, C), got {tuple(logits.shape)}")
        if first is None and isinstance(x, torch.Tensor):
            first = (name, f"{tuple(x.shape)}, {x.dtype}")
        out[name] = (logits, y if y is not None else read) if labels else logits
    return out


def _shared_draws(model, guide, options: dict) -> dict:
    """``options`` with ``samples=``: the draws every set would make again from the same ``seed``.

    Drawn once, after the first set ran (so its argument checks came first), where the
    draws depend on the seed alone: a set-up guide with ``sample_latents``, a seed given
    and ``num_samples`` given. The draws are made as :func:`predict_with_labels` makes
    them (``sample_weights`` under the seed), so the numbers are the same as drawing per set.
    """
    seed, num = options.get("seed"), options.get("num_samples")
    if seed is None or num is None or not callable(getattr(guide, "sample_latents", None)) or (
            getattr(guide, "prototype_trace", "missing") is None):
        return options
    return {**options, "samples": sample_weights(model, guide, num, seed=seed)}


def evaluate_details(
    model,
    guide,
    in_data,
    ood_data=None,
    *,
    ambiguous_data=None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    batch_size: int = 500,
    sample_chunk: Optional[int] = None,
    num_bins: int = DEFAULT_ECE_BINS,
    seed: int = 0,
    method: str = "auto",
    device=None,
    keep_logits: bool = False,
) -> tuple[dict, dict]:
    """The record of :func:`evaluate` and the per-input decompositions behind it, for plots.

    Every dataset is scored with the same ``num_samples`` weight draws (seeded
    by ``seed``). Entropies and mutual information are in nats.

    What the record's numbers count (means over the inputs of a set):

    * ``accuracy``: the fraction of ``in_data`` whose label is the model average's top class;
    * ``nll``: ``-log`` of the model average's probability of the label (a log-mean-exp of the
      per-draw log-softmax of the logits; nothing clipped); ``brier``, ``ece``: see
      :mod:`pyro_bq.uncertainty.metrics`;
    * ``total_*``: the entropy of the model average (all uncertainty about the label);
      ``aleatoric_*``: the mean entropy of single draws (the label noise each draw sees);
      ``epistemic_*``: the mutual information between label and weights (how much the draws
      disagree; 0 when they all agree), see :func:`~pyro_bq.uncertainty.decompose`;
    * ``auroc_*``: the probability that a random input of the other set scores above a random
      input of ``in_data`` (0.5: no separation);
    * ``varying_fraction``: the fraction of the guide's weights whose draws are not all equal
      (:func:`~pyro_bq.guides.varying_fraction`, seeded by ``seed``; an
      :class:`~pyro_bq.guides.AutoGaussianSites` guide only), ``varying_fraction_sites`` the same
      per site ``{site: fraction}``, and ``deterministic_sites`` the sites below :data:`~pyro_bq.guides.DETERMINISTIC_THRESHOLD`: where draws do not vary,
      ``epistemic_*`` is about 0 whatever the input.

    :param in_data: labelled in-distribution data (a dataset with ``.x`` and ``.y``, ``(x, y)``, or a
        DataLoader / re-iterable of ``(x, y)`` batches).
    :param ood_data: optional out-of-distribution inputs (labels unused).
    :param ambiguous_data: optional set of ambiguous in-distribution inputs
        (e.g. Ambiguous-MNIST): adds its uncertainty figures and the AUROC of
        the expected entropy (aleatoric) for telling it from ``in_data``.
    :returns: ``(record, details)``: the record is a dict with ``accuracy``, ``nll``,
        ``brier``, ``ece``, ``num_samples``, ``total_in``, ``aleatoric_in``,
        ``epistemic_in`` (means over inputs), and with ``ood_data`` also
        ``total_out``, ``aleatoric_out``, ``epistemic_out``, ``auroc_mi`` (mutual
        information as the score), ``auroc_total`` (predictive entropy) and
        ``auroc_aleatoric``; with ``ambiguous_data`` also ``*_ambiguous`` means,
        ``auroc_aleatoric_ambiguous`` and ``auroc_mi_ambiguous``. ``details`` holds
        the decompositions ``{"in": ..., "ood": ..., "ambiguous": ...}`` of the given sets;
        with ``keep_logits``, each also holds ``"logits"``, the network outputs ``(S, N, C)``
        of the draws (e.g. for :func:`~pyro_bq.uncertainty.to_arviz`'s ``logits=``).

    Usage::

        record, details = evaluate_details(model, guide, mnist_test, fashion_test, num_samples=100)
        plot_uncertainty(details, "uncertainty.png")
    """
    check_int("num_samples", num_samples, low=1)
    num_bins = check_int("num_bins", num_bins, low=1)
    sets = {"in_data": in_data, "ood_data": ood_data, "ambiguous_data": ambiguous_data}
    sets = {k: v for k, v in sets.items() if v is not None or k == "in_data"}
    for k, v in sets.items():  # tensors are checked up front, so errors name the set before any prediction
        _split(k, v, need_labels=k == "in_data")
    logits = _predict_sets(model, guide, sets, labels=True, num_samples=num_samples, batch_size=batch_size,
                           sample_chunk=sample_chunk, seed=seed, method=method, device=device)
    y_in = logits["in_data"][1]
    logits = {k: v[0] for k, v in logits.items()}
    suffix = {"in": "in", "ood": "out", "ambiguous": "ambiguous"}
    details = {key: decompose(logits[f"{key}_data"].softmax(-1)) for key in suffix if f"{key}_data" in logits}
    if keep_logits:
        for key, parts in details.items():
            parts["logits"] = logits[f"{key}_data"]
    record = _record(details, logits["in_data"], y_in, num_samples, num_bins, suffix)
    if isinstance(guide, AutoGaussianSites):
        record.update(_varying_record(guide, 0 if seed is None else seed))
    return record, details


def _varying_record(guide, seed: int) -> dict:
    """The record's ``varying_fraction``, ``deterministic_sites`` and ``varying_fraction_sites``."""
    fractions = varying_fraction(guide, seed=seed)
    overall, deterministic = deterministic_sites(fractions, {name: info.numel for name, info in guide.sites.items()})
    return {"varying_fraction": overall, "deterministic_sites": deterministic, "varying_fraction_sites": fractions}


def _record(details: dict, logits_in: torch.Tensor, y_in: torch.Tensor, num_samples: int, num_bins: int,
            suffix: dict) -> dict:
    """The figures of :func:`evaluate_details`'s record computed from the per-set decompositions."""
    mean = details["in"]["mean_probs"]
    record: dict = {"num_samples": num_samples, "accuracy": accuracy(mean, y_in),
                    "nll": nll(None, y_in, logits=logits_in),
                    "brier": brier(mean, y_in), "ece": ece(mean, y_in, num_bins)}
    for key, parts in details.items():
        for part in ("total", "aleatoric", "epistemic"):
            record[f"{part}_{suffix[key]}"] = parts[part].double().mean().item()
    d_in = details["in"]
    if "ood" in details:
        for part, name in (("epistemic", "mi"), ("total", "total"), ("aleatoric", "aleatoric")):
            record[f"auroc_{name}"] = auroc(d_in[part], details["ood"][part])
    if "ambiguous" in details:
        for part, name in (("aleatoric", "aleatoric"), ("epistemic", "mi")):
            record[f"auroc_{name}_ambiguous"] = auroc(d_in[part], details["ambiguous"][part])
    return record


def evaluate(model, guide, in_data, ood_data=None, **options) -> dict:
    """Accuracy, NLL, Brier, ECE and uncertainty figures of a guide, as one flat record.

    The record of :func:`evaluate_details` (arguments and keys as there); that
    function also returns the per-input decompositions.

    Usage::

        record = evaluate(model, guide, mnist_test, fashion_test, num_samples=100)
        print(record["accuracy"], record["auroc_mi"])
    """
    return evaluate_details(model, guide, in_data, ood_data, **options)[0]
