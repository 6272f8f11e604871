"""Reporting: bits per layer (table and plot), mean bits, and the evaluation record.

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

__all__ = ["bits_table", "plot_bits", "evaluate_allocation", "evaluate_float", "results_table"]


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
    size-weighted mean bits. Per-parameter maps show their mean width."""
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
    lines.append("| **mean bits** | " + str(sum(sizes.values())) + " | "
                 + " | ".join(f"**{allocs[l].mean_bits:.3f}**" for l in labels) + " |")
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


def _record(model, guide, in_data, ood_data, num_samples, seed):
    """The evaluation record plus ``accuracy_mean``, of the deterministic network at the guide's means (``M_det``)."""
    rec = evaluate(model, guide, in_data, ood_data, num_samples=num_samples, seed=seed)
    point = {k: v[None] for k, v in guide.median().items()}
    rec["accuracy_mean"] = accuracy(predictive_probs(model, x=in_data, samples=point, batch_size=2000), in_data.y)
    return rec


def evaluate_float(model, guide, in_data, ood_data=None, *, num_samples: int = 32, seed: int = 0) -> dict:
    """The float baseline's evaluation record (``method="float"``, ``mean_bits=32``)."""
    check_int("num_samples", num_samples, low=1)
    rec = _record(model, guide, in_data, ood_data, num_samples, seed)
    return {"method": "float", "mean_bits": 32.0, **rec}


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
    Returns the evaluation record plus ``method``, ``mean_bits`` (of the
    allocation, weighted by site size), ``accuracy_mean`` (the quantized
    deterministic network at the means) and ``mode``.
    """
    if not isinstance(allocation, BitAllocation):
        raise TypeError(f"allocation must be a BitAllocation, got {type(allocation).__name__}")
    check_choice("mode", mode, ("vpq", "spq", "jq"))
    check_int("num_samples", num_samples, low=1)
    policy = make_policy(mode, 8, site_bits=allocation.site_bits, site_quantizers=allocation.site_quantizers,
                         **policy_kwargs)
    qguide = quantize(guide, policy)
    rec = _record(model, qguide, in_data, ood_data, num_samples, seed)
    return {"method": allocation.method, "mean_bits": allocation.mean_bits, "mode": mode, **rec}


def results_table(records, columns=("method", "mean_bits", "accuracy", "accuracy_mean", "nll", "ece", "auroc_mi")) -> str:
    """A Markdown table of evaluation records (accuracies in %)."""
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
                cells.append(f"{v:.4g}" if c != "mean_bits" else f"{v:.3f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
