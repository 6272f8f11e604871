"""One call that evaluates a guide on in-distribution and out-of-distribution data."""

from __future__ import annotations

from typing import Optional

import torch

from pyro_bq._validation import check_int

from .decompose import decompose
from .metrics import DEFAULT_ECE_BINS, accuracy, auroc, brier, ece, nll
from .predict import DEFAULT_NUM_SAMPLES, _as_inputs, predictive_probs

__all__ = ["evaluate", "uncertainty_scores"]


def _split(name: str, data, need_labels: bool):
    """``(x, y)`` from an InMemoryDataset, an ``(x, y)`` pair or a tensor ``x``."""
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
    x = _as_inputs(f"{name}.x", x)
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
) -> dict:
    """:func:`~pyro_bq.uncertainty.decompose` of several datasets with the same weight draws.

    :param datasets: ``{name: data}`` where data is an ``InMemoryDataset``, an
        ``(x, y)`` pair or a tensor of inputs.
    :returns: ``{name: {"mean_probs", "total", "aleatoric", "epistemic"}}`` (nats).

    Usage::

        parts = uncertainty_scores(model, guide, {"MNIST": test, "Fashion": fashion})
        plot_uncertainty(parts, "uncertainty.png")
    """
    if not isinstance(datasets, dict) or not datasets:
        raise TypeError("datasets must be a non-empty dict {name: dataset}")
    out = {}
    for name, data in datasets.items():
        x, _ = _split(f"datasets[{name!r}]", data, need_labels=False)
        probs = predictive_probs(
            model, guide, x, num_samples=num_samples, batch_size=batch_size, sample_chunk=sample_chunk, seed=seed, method=method
        )
        out[name] = decompose(probs)
    return out


def evaluate(
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
    return_details: bool = False,
):
    """Accuracy, NLL, Brier, ECE and uncertainty figures of a guide, as one flat record.

    Every dataset is scored with the same ``num_samples`` weight draws (seeded
    by ``seed``). Entropies and mutual information are in nats.

    :param in_data: labelled in-distribution data (``InMemoryDataset`` or ``(x, y)``).
    :param ood_data: optional out-of-distribution inputs (labels unused).
    :param ambiguous_data: optional set of ambiguous in-distribution inputs
        (e.g. Ambiguous-MNIST): adds its uncertainty figures and the AUROC of
        the expected entropy (aleatoric) for telling it from ``in_data``.
    :param return_details: also return the per-input decompositions
        ``{"in": ..., "ood": ..., "ambiguous": ...}`` for plots.
    :returns: dict with ``accuracy``, ``nll``, ``brier``, ``ece``, ``num_samples``,
        ``total_in``, ``aleatoric_in``, ``epistemic_in`` (means over inputs),
        and with ``ood_data`` also ``total_out``, ``aleatoric_out``,
        ``epistemic_out``, ``auroc_mi`` (mutual information as the score),
        ``auroc_total`` (predictive entropy) and ``auroc_aleatoric``; with
        ``ambiguous_data`` also ``*_ambiguous`` means, ``auroc_aleatoric_ambiguous``
        and ``auroc_mi_ambiguous``. With ``return_details`` a pair ``(record, details)``.

    Usage::

        record = evaluate(model, guide, mnist_test, fashion_test, num_samples=100)
        print(record["accuracy"], record["auroc_mi"])
    """
    check_int("num_samples", num_samples, low=1)
    num_bins = check_int("num_bins", num_bins, low=1)
    if not isinstance(return_details, bool):
        raise TypeError(f"return_details must be a bool, got {type(return_details).__name__}")
    x_in, y_in = _split("in_data", in_data, need_labels=True)
    sets = {"in": x_in}
    if ood_data is not None:
        sets["ood"] = _split("ood_data", ood_data, need_labels=False)[0]
    if ambiguous_data is not None:
        sets["ambiguous"] = _split("ambiguous_data", ambiguous_data, need_labels=False)[0]
    names = {"in": "in_data", "ood": "ood_data", "ambiguous": "ambiguous_data"}

    details = {}
    record: dict = {"num_samples": num_samples}
    for key, x in sets.items():
        try:
            probs = predictive_probs(
                model, guide, x, num_samples=num_samples, batch_size=batch_size, sample_chunk=sample_chunk, seed=seed,
                method=method
            )
        except (TypeError, ValueError) as err:
            if key == "in":
                raise
            # the arguments were fine for in_data, so the inputs of this dataset are what the network cannot take
            kind = TypeError if isinstance(err, TypeError) else ValueError
            raise kind(f"{names[key]} (inputs of shape {tuple(x.shape)}, dtype {x.dtype}; in_data has "
                       f"{tuple(x_in.shape)}, {x_in.dtype}): {err}") from err
        parts = decompose(probs)
        details[key] = parts
        if key == "in":
            mean = parts["mean_probs"]
            record.update(
                accuracy=accuracy(mean, y_in), nll=nll(mean, y_in), brier=brier(mean, y_in), ece=ece(mean, y_in, num_bins)
            )
        del probs
    suffix = {"in": "in", "ood": "out", "ambiguous": "ambiguous"}
    for key, parts in details.items():
        for part in ("total", "aleatoric", "epistemic"):
            record[f"{part}_{suffix[key]}"] = parts[part].double().mean().item()
    if "ood" in details:
        d_in, d_out = details["in"], details["ood"]
        record["auroc_mi"] = auroc(d_in["epistemic"], d_out["epistemic"])
        record["auroc_total"] = auroc(d_in["total"], d_out["total"])
        record["auroc_aleatoric"] = auroc(d_in["aleatoric"], d_out["aleatoric"])
    if "ambiguous" in details:
        d_in, d_amb = details["in"], details["ambiguous"]
        record["auroc_aleatoric_ambiguous"] = auroc(d_in["aleatoric"], d_amb["aleatoric"])
        record["auroc_mi_ambiguous"] = auroc(d_in["epistemic"], d_amb["epistemic"])
    return (record, details) if return_details else record
