"""The study's figures (PNG, written atomically; matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pyro_bq.io import atomic_write_bytes, read_container
from pyro_bq.uncertainty import plot_reliability

__all__ = ["make_plots", "plot_densities", "plot_metrics_vs_bits"]

log = logging.getLogger("pyro_bq.study")

_SETS = (("mnist", "MNIST"), ("ambiguous", "Ambiguous-MNIST"), ("fashion", "Fashion-MNIST"))


def _figure(w, h, nrows, ncols):
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, [buf.getvalue()])
    return str(path)


def _scores(row_dir: Path, name: str):
    _, tensors = read_container(row_dir / f"{name}.scores.bq", "study-scores")
    return tensors


def plot_densities(scores: dict, path: Path, *, bins: int = 40) -> str:
    """Densities of expected entropy and mutual information per test set, one row per configuration.

    :param scores: ``{config name: tensors}`` as stored in ``configs/<name>.scores.bq``.
    """
    names = list(scores)
    sets = list(_SETS) + [(k[: -len("_aleatoric")], k[: -len("_aleatoric")]) for k in scores[names[0]]
                          if k.endswith("_aleatoric") and k[: -len("_aleatoric")] not in dict(_SETS)]
    fig, axes = _figure(10, 3.2 * len(names), len(names), 2)
    for q, (col, label) in enumerate((("aleatoric", "expected entropy (aleatoric) [nats]"),
                                      ("epistemic", "mutual information (epistemic) [nats]"))):
        hi = max(float(scores[n][f"{s}_{col}"].max()) for n in names for s, _ in sets)
        edges = torch.linspace(0.0, max(hi, 1e-6), bins + 1).numpy()
        for r, name in enumerate(names):
            ax = axes[r][q]
            for s, title in sets:
                v = scores[name][f"{s}_{col}"].double().numpy()
                ax.hist(v, bins=edges, density=True, histtype="step", linewidth=1.5, label=f"{title} (mean {v.mean():.3g})")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("density")
            ax.set_title(name)
            ax.legend(fontsize="small")
    return _save(fig, path)


def plot_metrics_vs_bits(rows: list[dict], path: Path) -> str:
    """Accuracy and the AUROCs against bits, one line per policy (float as a dotted level).

    Extra OOD sets (``auroc_mi_ood_NAME`` / ``auroc_total_ood_NAME`` columns) get a panel
    each; rows holding ``<metric>_std`` (a multi-seed summary) get ± std error bars
    (a shaded band around the float level).
    """
    metrics = [("accuracy", "MNIST accuracy"), ("auroc_mi_fashion", "AUROC MI: MNIST vs Fashion"),
               ("auroc_ee_ambiguous", "AUROC EE: MNIST vs Ambiguous")]
    for key in (rows[0] if rows else {}):
        for prefix, label in (("auroc_mi_ood_", "AUROC MI: MNIST vs {}"), ("auroc_total_ood_", "AUROC TE: MNIST vs {}")):
            if key.startswith(prefix) and not key.endswith(("_std", "_ci95")):
                metrics.append((key, label.format(key[len(prefix):])))
    fig, axes = _figure(5 * len(metrics), 4, 1, len(metrics))
    plain = [r for r in rows if r.get("act_bits") is None]
    acts = [r for r in rows if r.get("act_bits") is not None]
    floats = {r["act_bits"]: r for r in rows if r["policy"] == "float" and r.get("config") in ("float", f"float+act{r['act_bits']}")}
    families = []
    for r in rows:
        key = (r["policy"], r.get("act_bits"))
        if r["policy"] != "float" and r.get("bits") is not None and key not in families:
            families.append(key)
    for ax, (m, title) in zip(axes[0], metrics):
        for fam, act in families:
            pts = sorted((r["bits"], r[m], r.get(f"{m}_std") or 0.0) for r in (acts if act is not None else plain)
                         if r["policy"] == fam and r.get("act_bits") == act and r.get("bits") is not None)
            if not pts:
                continue
            xs, ys, err = zip(*pts)
            label = fam.upper() if act is None else f"{fam.upper()} + act{act}"
            ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o" if len(xs) > 1 else "s",
                        linestyle="-" if act is None else "--", capsize=3, label=label)
        for act, r in floats.items():
            color = "black" if act is None else "grey"
            ax.axhline(r[m], color=color, linestyle=":", label="float" if act is None else f"float + act{act}")
            if r.get(f"{m}_std"):
                ax.axhspan(r[m] - r[f"{m}_std"], r[m] + r[f"{m}_std"], color=color, alpha=0.1)
        ax.set_xlabel("bits")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, path)


def make_plots(rows: list[dict], row_dir: Path, out: Path) -> dict:
    """All figures of the study; returns ``{figure: path}``."""
    files = {}
    names = {r["config"] for r in rows}
    pair = [n for n in ("float", "jq4") if n in names]
    if pair:
        files["densities"] = plot_densities({n: _scores(row_dir, n) for n in pair}, out / "uncertainty_densities.png")
    if "float" in names:
        s = _scores(row_dir, "float")
        fig = plot_reliability(s["mnist_mean_probs"], s["mnist_y"], title=None)
        files["reliability"] = _save(fig, out / "reliability_float.png")
        if "jq4" in names:
            s = _scores(row_dir, "jq4")
            files["reliability_jq4"] = _save(plot_reliability(s["mnist_mean_probs"], s["mnist_y"]),
                                             out / "reliability_jq4.png")
    if rows:
        files["metrics_vs_bits"] = plot_metrics_vs_bits(rows, out / "metrics_vs_bits.png")
    return files
