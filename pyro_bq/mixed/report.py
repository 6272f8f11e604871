"""Reporting: bits per layer (table and plot), bit counts, and the evaluation record.

Every record names what it counts: ``code_bits`` (the weights' own codes,
the papers' mean bit-width) and ``storage_bits`` (everything a packed file
needs to decode the quantized means); ``accuracy_at_means`` (the
deterministic network at the quantized means, the Quantile Inform paper's
metric) and ``accuracy_sampled`` (the posterior predictive over weight
draws; also ``accuracy``, the name :func:`pyro_bq.uncertainty.evaluate`
gives it); ``training``: ``"data-free"`` or ``"trained"``.

Readings of the paper: the Quantile Inform paper reports only the accuracy
at the means; the sampled accuracy and the uncertainty figures (NLL, ECE,
AUROC) are ours, to show what quantization does to the posterior.

Usage::

    allocs = {"QIU": quantile_inform(guide, 3.2), "RB": random_bits(guide, 3.2)}
    print(bits_table(allocs))
    plot_bits(allocs, "bits.png")
    row = evaluate_allocation(model, guide, allocs["QIU"], mnist_test, fashion_test)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pyro_bq._validation import check_choice, check_int
from pyro_bq.guides.quantized import quantize
from pyro_bq.io import atomic_write
from pyro_bq.quant.policies import make_policy
from pyro_bq.uncertainty import accuracy, evaluate, predictive_probs

from .informativeness import BitAllocation

__all__ = ["bits_table", "plot_bits", "evaluate_allocation", "evaluate_float", "results_table", "accuracy_at_means"]


def _check_allocs(allocs) -> dict[str, BitAllocation]:
    if isinstance(allocs, BitAllocation):
        allocs = {allocs.method: allocs}
    if not isinstance(allocs, Mapping) or not allocs:
        raise TypeError("allocs must be a BitAllocation or a non-empty dict {label: BitAllocation}")
    for label, a in allocs.items():
        if not isinstance(a, BitAllocation):
            raise TypeError(f"allocs[{label!r}] must be a BitAllocation, got {type(a).__name__}")
    return dict(allocs)


def bits_table(allocs) -> str:
    """A Markdown table: one row per site (weights, bits per allocation), then the
    size-weighted mean code bits, the storage bits per weight (codes, bit map and
    grid data) and whether the allocator trained on data. Per-parameter maps show
    their mean width.

    Usage::

        print(bits_table({"QIU": quantile_inform(guide, 3.2), "RB": random_bits(guide, 3.2)}))
    """
    allocs = _check_allocs(allocs)
    sites: list[str] = []
    sizes: dict[str, int] = {}
    for a in allocs.values():
        for s in a:
            if s not in sizes:
                sites.append(s)
                sizes[s] = a.sizes[s]
    labels = list(allocs)
    lines = ["| site | weights | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    for s in sites:
        cells = []
        for label in labels:
            a = allocs[label]
            if s not in a:
                cells.append("float")
                continue
            v = a[s]
            cells.append(f"{float(v.double().mean()):.2f}" if isinstance(v, torch.Tensor) else str(int(v)))
        lines.append(f"| {s} | {sizes[s]} | " + " | ".join(cells) + " |")
    lines.append("| **code bits** | " + str(sum(sizes.values())) + " | "
                 + " | ".join(f"**{allocs[l].code_bits:.3f}**" for l in labels) + " |")
    storage = [allocs[l].storage_bits for l in labels]
    lines.append("| **storage bits** | | " + " | ".join("" if v is None else f"**{v:.3f}**" for v in storage) + " |")
    lines.append("| training | | " + " | ".join(allocs[l].training for l in labels) + " |")
    return "\n".join(lines)


def plot_bits(allocs, path=None, *, title: str = "bits per layer"):
    """Grouped bars of bits per site for each allocation; saved to ``path`` if given.

    Returns the matplotlib figure.
    """
    allocs = _check_allocs(allocs)
    sites = list(dict.fromkeys(s for a in allocs.values() for s in a))
    fig = Figure(figsize=(max(6, 0.7 * len(sites) + 2), 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(allocs)
    for i, (label, a) in enumerate(allocs.items()):
        per = a.layer_bits()
        xs = [j + (i - (len(allocs) - 1) / 2) * width for j in range(len(sites))]
        ax.bar(xs, [per.get(s, math.nan) for s in sites], width, label=f"{label} ({a.mean_bits:.2f})")
    ax.set_xticks(range(len(sites)))
    ax.set_xticklabels([s.removeprefix("net.") for s in sites], rotation=45, ha="right")
    ax.set_ylabel("bits")
    ax.set_title(title)
    ax.legend(title="method (mean bits)", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    if path is not None:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    return fig


def accuracy_at_means(model, means, data, *, batch_size: int = 2000) -> float:
    """Accuracy on ``data`` of the deterministic network whose weights are ``means`` (``M_det``).

    :param means: ``{site: tensor}`` for every weight site of ``model`` (e.g.
        :func:`~pyro_bq.mixed.quantize_means`, or a guide's ``median()``).
    :param data: a dataset with ``x`` and ``y``.

    Usage::

        acc = accuracy_at_means(model, quantize_means(guide, alloc), validation)
    """
    point = {k: v[None] for k, v in means.items()}
    return accuracy(predictive_probs(model, x=data.x, samples=point, batch_size=batch_size), data.y)


def _record(model, guide, in_data, ood_data, num_samples, seed):
    """The evaluation record; ``accuracy`` (the posterior predictive's, from ``num_samples`` draws) is
    also given as ``accuracy_sampled``, next to ``accuracy_at_means``: the deterministic network at the
    guide's (quantized) means, the Quantile Inform paper's metric."""
    rec = evaluate(model, guide, in_data, ood_data, num_samples=num_samples, seed=seed)
    rec["accuracy_sampled"] = rec["accuracy"]
    rec["accuracy_at_means"] = accuracy_at_means(model, guide.median(), in_data)
    return rec


def evaluate_float(model, guide, in_data, ood_data=None, *, num_samples: int = 32, seed: int = 0) -> dict:
    """The float baseline's evaluation record (``method="float"``, 32 code bits; ``storage_bits`` 32
    per mean; ``training="trained"``: the float BNN itself was trained on data).

    Usage::

        rec = evaluate_float(model, guide, mnist_test, num_samples=8)
        rec["accuracy_at_means"], rec["accuracy_sampled"]
    """
    check_int("num_samples", num_samples, low=1)
    rec = _record(model, guide, in_data, ood_data, num_samples, seed)
    return {"method": "float", "training": "trained", "mean_bits": 32.0, "code_bits": 32.0, "storage_bits": 32.0,
            **rec}


def evaluate_allocation(
    model,
    guide,
    allocation: BitAllocation,
    in_data,
    ood_data=None,
    *,
    mode: str = "vpq",
    num_samples: int = 32,
    seed: int = 0,
    **policy_kwargs,
) -> dict:
    """Quantize ``guide`` with the allocation (its widths and grid, in the policy of mode
    ``"vpq"``/``"spq"``/``"jq"``; other keywords go to the policy) and evaluate it with
    :func:`pyro_bq.uncertainty.evaluate`.

    For SMOL pass the tuned guide that :func:`~pyro_bq.mixed.smol.smol` returns.
    Returns the evaluation record plus ``method``, ``training``
    (``"data-free"`` or ``"trained"``), ``code_bits`` (mean code bits per
    weight; ``mean_bits`` is the same), ``storage_bits`` (bits per weight to
    decode the quantized means), ``accuracy_at_means`` (the deterministic
    network at the quantized means, the Quantile Inform paper's metric),
    ``accuracy_sampled`` (the posterior predictive, ``num_samples`` draws; also
    under ``accuracy``) and ``mode``.

    Usage::

        rec = evaluate_allocation(model, guide, quantile_inform(guide, 3.2), mnist_test)
        rec["code_bits"], rec["storage_bits"], rec["accuracy_at_means"], rec["accuracy_sampled"]
    """
    if not isinstance(allocation, BitAllocation):
        raise TypeError(f"allocation must be a BitAllocation, got {type(allocation).__name__}")
    check_choice("mode", mode, ("vpq", "spq", "jq"))
    check_int("num_samples", num_samples, low=1)
    policy = make_policy(mode, 8, site_bits=allocation.site_bits, site_quantizers=allocation.site_quantizers,
                         **policy_kwargs)
    qguide = quantize(guide, policy)
    rec = _record(model, qguide, in_data, ood_data, num_samples, seed)
    return {"method": allocation.method, "training": allocation.training, "mean_bits": allocation.code_bits,
            "code_bits": allocation.code_bits, "storage_bits": allocation.storage_bits, "mode": mode, **rec}


def results_table(records, columns=("method", "training", "code_bits", "storage_bits", "accuracy_at_means",
                                    "accuracy_sampled", "nll", "ece", "auroc_mi")) -> str:
    """A Markdown table of evaluation records (accuracies in %).

    Usage::

        print(results_table([evaluate_float(model, guide, test), evaluate_allocation(model, guide, alloc, test)]))
    """
    if not records:
        raise ValueError("records must hold at least one evaluation record")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        cells = []
        for c in columns:
            v = r.get(c, "")
            if c.startswith("accuracy") and isinstance(v, float):
                cells.append(f"{100 * v:.2f}")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if c.endswith("bits") else f"{v:.4g}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
