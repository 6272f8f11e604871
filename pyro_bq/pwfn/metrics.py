"""Compression and accuracy figures of a PWFN network.

* weight-space entropy (bits): the Shannon entropy of the empirical
  distribution of weight values, ``-sum_v p_v log2 p_v`` with ``p_v`` the
  fraction of weights equal to ``v`` -- over all weights, and "w/o FL-bias":
  without the first and last layers and without biases (the paper's Table 1);
* the number of unique values and the codebook (the sorted unique values);
* the accuracy of an ensemble of sampled networks (softmax probabilities
  averaged over ``num_samples`` draws, 20 in the paper; the mean accuracy of
  the individual draws is reported too), with
  :func:`pyro_bq.uncertainty.accuracy`.

* per-site entropy and unique counts (the paper's Figure 2):
  :func:`per_site_stats`;
* how far the clustering moved the weights it fixed, per codebook value:
  max, mean and std of ``|mu - c| / sigma`` (the distance of Eq. 6, with
  ``mu`` and ``sigma`` as they were when the weight was fixed):
  :func:`cluster_movement` over the group log of
  :func:`~pyro_bq.pwfn.clustering.pwfn_cluster`.

"First" and "last" layer are the modules of the first and last weight sites
in model order (``net.conv1`` and ``net.fc3`` for LeNet-5); a bias is a site
whose name ends in ``bias``.

Readings of the paper:

* The entropy counts zero as a value like any other, over every weight and
  bias of the guide, as the authors' code does (its ``get_weight_entropy``
  over all means, zeros included); the paper's Table 1 also reports the
  "w/o FL-bias" figure.
* Figure 2 plots values per layer; :func:`per_site_stats` reports them per
  Pyro site (a layer's weight and bias are two sites).
* The movement statistics are not in the paper; the authors' code logs
  similar per-cluster summaries (max/min/std/mean of the means and sigmas of
  each group) in its round CSV. Ours are the distances in sigmas of Eq. 6.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from pyro_bq._validation import check_int
from pyro_bq.uncertainty import accuracy
from pyro_bq.uncertainty.predict import predict_with_labels

__all__ = [
    "weight_entropy",
    "unique_values",
    "fl_bias_excluded_sites",
    "compression_stats",
    "ensemble_accuracy",
    "per_site_stats",
    "cluster_movement",
]


def _flat(values, name: str = "values") -> torch.Tensor:
    """All values as one flat tensor, checked to be real and free of NaN (internal)."""
    if isinstance(values, torch.Tensor):
        flat = values.detach().reshape(-1)
        _check_real(name, flat)
        return flat
    if isinstance(values, Mapping):
        if not values:
            raise ValueError(f"{name} must hold at least one site")
        for key, v in values.items():
            if not isinstance(key, str):
                raise TypeError(f"{name} must be keyed by site name (str), got key {key!r}")
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(v).__name__}")
        flat = torch.cat([v.detach().reshape(-1) for v in values.values()])
        _check_real(name, flat)
        return flat
    raise TypeError(f"{name} must be a tensor or a dict site -> tensor, got {type(values).__name__}")


def _check_real(name: str, flat: torch.Tensor) -> None:
    if flat.is_complex():
        raise TypeError(f"{name} must hold real values, got dtype {flat.dtype}")
    if flat.is_floating_point() and bool(torch.isnan(flat).any()):
        raise ValueError(f"{name} must not hold NaN")


def weight_entropy(values) -> float:
    """Entropy in bits of the empirical distribution of the values (tensor or dict of tensors).

    Usage::

        weight_entropy(torch.tensor([0., 0., 0.5, 0.5]))   # 1.0
    """
    flat = _flat(values)
    if flat.numel() == 0:
        raise ValueError("values must hold at least one weight")
    _, counts = torch.unique(flat, return_counts=True)
    return _entropy(counts, flat.numel())


def _entropy(counts: torch.Tensor, total: int) -> float:
    p = counts.double() / total
    return float(-(p * torch.log2(p)).sum())


def unique_values(values) -> torch.Tensor:
    """Sorted unique values (the codebook actually used)."""
    return torch.unique(_flat(values))


def _layer(site: str) -> str:
    return site.rsplit(".", 1)[0] if "." in site else site


def fl_bias_excluded_sites(sites) -> list[str]:
    """The sites that remain after dropping the first and last layers and every bias."""
    sites = list(sites)
    if not sites:
        return []
    first, last = _layer(sites[0]), _layer(sites[-1])
    return [s for s in sites if _layer(s) not in (first, last) and not s.endswith("bias")]


def compression_stats(weights: Mapping[str, torch.Tensor]) -> dict:
    """Entropy, unique count and codebook, overall and w/o first/last layers and biases.

    :param weights: dict site -> tensor in model order (e.g. ``guide.median()``).
    :raises TypeError: if ``weights`` is not a dict of tensors keyed by site name.
    :raises ValueError: if it is empty, holds no weight, or holds NaN.
    """
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a non-empty dict site -> tensor (e.g. guide.median()), got {type(weights).__name__}")
    if not weights:
        raise ValueError("weights must be a non-empty dict site -> tensor (e.g. guide.median()), got an empty one")
    flat = _flat(weights, "weights")
    if flat.numel() == 0:
        raise ValueError("weights must hold at least one weight")
    inner = fl_bias_excluded_sites(weights)
    codebook, counts = torch.unique(flat, return_counts=True)
    out = {
        "num_weights": int(flat.numel()),
        "entropy": _entropy(counts, flat.numel()),
        "unique": int(codebook.numel()),
        "codebook": codebook.tolist(),
    }
    if inner:
        sub = torch.cat([weights[k].detach().reshape(-1) for k in inner])
        sub_codes, sub_counts = torch.unique(sub, return_counts=True)
        out["entropy_wo_fl_bias"] = _entropy(sub_counts, sub.numel()) if sub.numel() else float("nan")
        out["unique_wo_fl_bias"] = int(sub_codes.numel())
    else:
        out["entropy_wo_fl_bias"] = float("nan")
        out["unique_wo_fl_bias"] = 0
    return out


def ensemble_accuracy(
    model, guide, data, *, num_samples: int = 20, batch_size: int = 500, seed: Optional[int] = 0, device=None
) -> dict:
    """Accuracy of the averaged prediction of ``num_samples`` weight draws from ``guide``.

    :param data: a dataset with ``.x`` and ``.y``, a DataLoader or a re-iterable of ``(x, y)`` batches.
    :param device: where the network runs (default: the guide's device).
    :returns: ``{"ensemble": acc, "mean_member": mean accuracy of the draws}``.

    Usage::

        ensemble_accuracy(model, guide, test, num_samples=20)["ensemble"]
    """
    num_samples = check_int("num_samples", num_samples, low=1)
    logits, y = predict_with_labels(model, guide, data, num_samples=num_samples, batch_size=batch_size, seed=seed,
                                    site="logits", device=device, name="data")
    probs = logits.softmax(-1)
    members = [accuracy(p, y) for p in probs]
    return {"ensemble": accuracy(probs, y), "mean_member": sum(members) / len(members)}


def per_site_stats(weights: Mapping[str, torch.Tensor]) -> dict:
    """Per site: ``{"count", "entropy", "unique"}`` of its weight values (the paper's Figure 2).

    :param weights: dict site -> tensor (e.g. ``guide.median()``).
    :raises TypeError: if ``weights`` is not a dict of tensors keyed by site name.

    Usage::

        for site, st in per_site_stats(guide.median()).items():
            print(site, st["unique"], st["entropy"])
    """
    _flat(weights, "weights")  # validates the mapping
    out = {}
    for name, v in weights.items():
        flat = v.detach().reshape(-1)
        if flat.numel() == 0:
            out[name] = {"count": 0, "entropy": float("nan"), "unique": 0}
            continue
        codes, counts = torch.unique(flat, return_counts=True)
        out[name] = {"count": int(flat.numel()), "entropy": _entropy(counts, flat.numel()), "unique": int(codes.numel())}
    return out


_MOVE_KEYS = ("centre", "count", "d_max", "d_sum", "d_sumsq")


def cluster_movement(groups) -> list:
    """Per codebook value: how many weights were fixed to it and ``max/mean/std`` of ``|mu - c| / sigma``.

    :param groups: the group dicts of :attr:`ClusterResult.groups` (of one or
        several rounds), each with ``centre``, ``count``, ``d_max``, ``d_sum``, ``d_sumsq``.
    :returns: one dict ``{"centre", "count", "max", "mean", "std"}`` per codebook
        value, sorted by centre (std: population standard deviation over all
        weights fixed to the value); JSON-ready, so it can go into a checkpoint.
    :raises ValueError: for a group without those fields.

    Usage::

        res = cluster_guide_(guide, 1.0)
        [(m["centre"], m["max"]) for m in cluster_movement(res.groups)]
    """
    acc: dict = {}
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping) or any(k not in g for k in _MOVE_KEYS):
            raise ValueError(f"groups[{i}] must be a dict with {', '.join(_MOVE_KEYS)} (a ClusterResult.groups entry)")
        a = acc.setdefault(float(g["centre"]), [0, 0.0, 0.0, 0.0])
        a[0] += int(g["count"])
        a[1] = max(a[1], float(g["d_max"]))
        a[2] += float(g["d_sum"])
        a[3] += float(g["d_sumsq"])
    out = []
    for c in sorted(acc):
        n, mx, s1, s2 = acc[c]
        mean = s1 / n if n else float("nan")
        var = max(s2 / n - mean * mean, 0.0) if n else float("nan")
        out.append({"centre": c, "count": n, "max": mx, "mean": mean, "std": var**0.5})
    return out
