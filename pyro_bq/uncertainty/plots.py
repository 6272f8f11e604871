"""Plots of uncertainty and calibration, drawn with matplotlib's Agg canvas.

The figures are built as :class:`matplotlib.figure.Figure` objects without
pyplot, so nothing here changes matplotlib's global backend or opens a window;
pass ``path`` to save a PNG (or any format matplotlib knows from the suffix).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pyro_bq._validation import check_bool, check_int, check_path, check_str
from pyro_bq.io import atomic_write

from .metrics import DEFAULT_ECE_BINS, reliability_data

__all__ = ["plot_uncertainty", "plot_reliability"]


def _figure(width: float, height: float, ncols: int):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _check_save_path(path):
    """``None`` or a :class:`pathlib.Path` whose suffix (if any) names a format matplotlib can write."""
    if path is None:
        return None
    path = check_path("path", path)
    suffix = path.suffix[1:].lower()
    if suffix:
        formats = FigureCanvasAgg.get_supported_filetypes()
        if suffix not in formats:
            raise ValueError(f"path {str(path)!r} has the suffix {path.suffix!r}, which matplotlib cannot write; "
                             f"use one of {', '.join('.' + f for f in sorted(formats))}")
    return path


def _save(fig, path) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))


def plot_uncertainty(
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    path: Optional[os.PathLike] = None,
    *,
    bins: int = 40,
    quantities=("aleatoric", "epistemic"),
    log_y: bool = True,
):
    """Histograms of aleatoric and epistemic uncertainty (nats) for several datasets.

    One panel per quantity, side by side; each dataset is one outlined
    density histogram on the same bins, so the datasets can be compared.

    :param parts: ``{dataset name: decomposition}`` as returned by
        :func:`~pyro_bq.uncertainty.decompose` (or
        :func:`~pyro_bq.uncertainty.uncertainty_scores`).
    :param path: where to save the figure (optional).
    :param quantities: keys of the decompositions to plot.
    :param log_y: logarithmic density axis (mutual information is very skewed).
    :returns: the :class:`matplotlib.figure.Figure`.

    Usage::

        parts = uncertainty_scores(model, guide, {"MNIST": test, "Fashion-MNIST": fashion})
        plot_uncertainty(parts, "uncertainty.png")
    """
    if not isinstance(parts, Mapping) or not parts:
        raise TypeError("parts must be a non-empty dict {dataset name: decomposition dict}")
    path = _check_save_path(path)
    bins = check_int("bins", bins, low=1)
    log_y = check_bool("log_y", log_y)
    quantities = (quantities,) if isinstance(quantities, str) else tuple(quantities)
    for name, d in parts.items():
        missing = [q for q in quantities if not isinstance(d, Mapping) or q not in d]
        if missing:
            raise ValueError(f"parts[{name!r}] lacks {missing}; pass decompositions from decompose()")
    fig, axes = _figure(5.0 * len(quantities), 3.6, len(quantities))
    for ax, q in zip(axes, quantities):
        values = {name: torch.as_tensor(d[q]).detach().double().reshape(-1).cpu() for name, d in parts.items()}
        hi = max(float(v.max()) for v in values.values() if v.numel()) if any(v.numel() for v in values.values()) else 1.0
        edges = torch.linspace(0.0, max(hi, 1e-6), bins + 1).numpy()
        for name, v in values.items():
            ax.hist(v.numpy(), bins=edges, density=True, histtype="step", linewidth=1.5, label=f"{name} (mean {float(v.mean()):.3f})")
        if log_y:
            ax.set_yscale("log")
        label = {"epistemic": "epistemic (mutual information)", "aleatoric": "aleatoric (expected entropy)",
                 "total": "total (predictive entropy)"}.get(q, q)
        ax.set_xlabel(f"{label} [nats]")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    _save(fig, path)
    return fig


def plot_reliability(
    probs: torch.Tensor,
    y: torch.Tensor,
    path: Optional[os.PathLike] = None,
    *,
    num_bins: int = DEFAULT_ECE_BINS,
    title: Optional[str] = None,
):
    """Reliability diagram: accuracy against confidence in equal-width bins, with ECE.

    :param probs: class probabilities ``(N, C)`` or ``(S, N, C)`` (averaged over draws).
    :param y: labels ``(N,)``.
    :param path: where to save the figure (optional).
    :returns: the :class:`matplotlib.figure.Figure`.

    Usage::

        plot_reliability(parts["mean_probs"], test.y, "reliability.png")
    """
    path = _check_save_path(path)
    if title is not None:
        check_str("title", title, nonempty=False)
    data = reliability_data(probs, y, num_bins)
    edges = data["edges"].numpy()
    width = edges[1:] - edges[:-1]
    acc = torch.nan_to_num(data["accuracy"], nan=0.0).numpy()
    conf = data["confidence"].numpy()
    fig, (ax, ax_count) = _figure(9.0, 4.0, 2)
    ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.plot(conf, data["accuracy"].numpy(), "o", color="tab:red", markersize=4, label="bin (mean confidence, accuracy)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"ECE = {data['ece']:.4f} ({num_bins} bins)")
    ax.legend(fontsize="small", loc="upper left")
    ax_count.bar(edges[:-1], data["counts"].numpy(), width=width, align="edge", edgecolor="black")
    ax_count.set_yscale("log")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("inputs per bin")
    _save(fig, path)
    return fig
