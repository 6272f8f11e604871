"""The study's results table in Markdown, CSV and JSON (all written atomically)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Optional

from pyro_bq.guides.quantized import DETERMINISTIC_THRESHOLD
from pyro_bq.io import atomic_write_bytes

__all__ = ["write_tables", "markdown_table", "COLUMNS", "HEADERS", "DELTA_METRICS", "with_budget_deltas", "columns_of"]

COLUMNS = (
    "config",
    "policy",
    "bits",
    "act_bits",
    "accuracy",
    "nll",
    "ece",
    "auroc_mi_fashion",
    "auroc_ee_ambiguous",
    "bits_per_param",
    "packed_bytes",
    "training",
    "mi_in",
    "varying_fraction",
    "stochastic_fraction",
    "collapsed",
    "code_bits",
    "storage_bits",
    "baseline",
    "d_accuracy",
    "d_auroc_mi_fashion",
    "d_auroc_ee_ambiguous",
)
#: Metrics whose difference from the matched-budget baseline a trained row shows (``d_<metric>``).
DELTA_METRICS = ("accuracy", "auroc_mi_fashion", "auroc_ee_ambiguous")
#: Prefixes of the per-set columns of extra OOD sets (``--ood-dir``), followed by the set's name.
OOD_PREFIXES = {"auroc_mi_ood_": "AUROC MI (MNIST vs {})", "auroc_total_ood_": "AUROC TE (MNIST vs {})"}
#: Markdown headers of :data:`COLUMNS`.
HEADERS = {
    "config": "config",
    "policy": "policy",
    "bits": "bits",
    "act_bits": "act bits",
    "accuracy": "MNIST acc",
    "nll": "NLL",
    "ece": "ECE",
    "auroc_mi_fashion": "AUROC MI (MNIST vs Fashion)",
    "auroc_ee_ambiguous": "AUROC EE (MNIST vs Ambiguous)",
    "bits_per_param": "bits/param",
    "packed_bytes": "packed bytes",
    "training": "training",
    "mi_in": "mean MI (MNIST)",
    "varying_fraction": "varying weights",
    "stochastic_fraction": "stochastic weights",
    "collapsed": "collapsed draws",
    "code_bits": "code bits",
    "storage_bits": "storage bits",
    "baseline": "matched baseline",
    "d_accuracy": "Δ acc vs baseline",
    "d_auroc_mi_fashion": "Δ AUROC MI vs baseline",
    "d_auroc_ee_ambiguous": "Δ AUROC EE vs baseline",
}


def _header(col: str) -> str:
    for prefix, text in OOD_PREFIXES.items():
        if col.startswith(prefix):
            return text.format(col[len(prefix):])
    return HEADERS.get(col, col)


def columns_of(rows: list[dict]) -> list[str]:
    """:data:`COLUMNS`, then the extra OOD sets' columns the rows hold (in first-seen order)."""
    extra = []
    for row in rows:
        for key in row:
            if key.startswith(tuple(OOD_PREFIXES)) and not key.endswith("_std") and key not in extra:
                extra.append(key)
    return list(COLUMNS) + extra


def with_budget_deltas(rows: list[dict]) -> list[dict]:
    """New rows in which each row with a ``baseline`` holds ``d_<metric>`` = its metric minus the
    baseline row's, for :data:`DELTA_METRICS` (``None`` when either is missing)."""
    by_name = {r["config"]: r for r in rows}
    out = []
    for row in rows:
        base = by_name.get(row.get("baseline"))
        deltas = {}
        if row.get("baseline") is not None:
            for m in DELTA_METRICS:
                a, b = row.get(m), None if base is None else base.get(m)
                deltas[f"d_{m}"] = None if a is None or b is None else a - b
        out.append({**row, **deltas})
    return out


def _fmt(key, value) -> str:
    if value is None:
        return "" if key in ("code_bits", "storage_bits", "baseline") or key.startswith("d_") else "-"
    if isinstance(value, bool):
        return "**yes**" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if key.startswith("d_"):
            return f"{value:+.4f}"
        if key in ("accuracy", "auroc_mi_fashion", "auroc_ee_ambiguous", "ece", "nll") or key.startswith("auroc_"):
            return f"{value:.4f}"
        if key == "mi_in":
            return f"{value:.2e}"
        if key in ("varying_fraction", "stochastic_fraction"):
            return f"{value:.1%}"
        return f"{value:.2f}"
    return str(value)


def _finite(obj):
    """NaN and infinities become None, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _cell(row: dict, col: str) -> str:
    text = _fmt(col, row.get(col))
    std = row.get(f"{col}_std")
    if isinstance(std, float) and math.isfinite(std) and text not in ("-", ""):
        text += f" ± {std:.4f}"
    return text


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table with the study's columns (a failed row shows "-" for its numbers);
    a row holding ``<column>_std`` shows ``mean ± std`` in that column."""
    cols = columns_of(rows)
    lines = ["| " + " | ".join(_header(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, c) for c in cols) + " |")
    return "\n".join(lines)


def write_tables(rows: list[dict], out: Path, *, data_info: Optional[dict] = None, config=None) -> dict:
    """Write ``results.md``, ``results.csv`` and ``results.json`` into ``out``; return their paths.

    A row with an ``"error"`` entry (a row that raised under ``--keep-going``)
    has no numbers; its error text is listed under the Markdown table and
    fills the ``error`` column of the CSV and the JSON.
    """
    out = Path(out)
    rows = with_budget_deltas(rows)
    errors = {r["config"]: r["error"] for r in rows if r.get("error")}
    md = ["# Dirty-MNIST study", ""]
    md.append(markdown_table(rows))
    md.append("")
    md.append("MNIST acc, NLL and ECE on MNIST test; AUROC MI: mutual information (epistemic) as the score for "
              "telling Fashion-MNIST from MNIST; AUROC EE: expected entropy (aleatoric) for telling "
              "Ambiguous-MNIST from MNIST. bits/param and packed bytes: the guide's packed file (float: 64 bits).")
    md.append("")
    md.append("training: `trained` rows train beyond the shared float guide (log-quantized guide, PWFN, SMOL, QAT); "
              "`data-free` rows only quantize it. mean MI (MNIST): the mutual information (nats) averaged over the "
              "MNIST test inputs. varying weights: the fraction of the guide's weights whose 16 seeded draws are not "
              f"all equal; collapsed draws: **yes** when it is below {DETERMINISTIC_THRESHOLD:.0%} for the guide or "
              "for some site (those weights are deterministic, so the mutual information loses their part of the "
              "epistemic signal). stochastic weights: the fraction of the weights whose draws are rounded "
              "stochastically (the `-sr` rows). code bits: bits per weight of the codes alone; storage bits: "
              "per weight, "
              "everything needed to decode (allocation rows only). matched baseline: the float guide trained as "
              "many more SVI steps (`float+N`) from the same start as the trained row; the Δ columns are the "
              "trained row minus that baseline, so an advantage that comes from the extra training alone shows as 0.")
    if config is not None and getattr(config, "ends_bits", None):
        md += ["", f"VPQ/SPQ/JQ rows keep the first and the last layer at {config.ends_bits} bits "
                   "(`--ends-bits`); bits/param counts them."]
    if errors:
        md += ["", "Failed configurations (`--keep-going`):", ""] + [f"- `{k}`: {v}" for k, v in errors.items()]
    if data_info:
        md += ["", "Ambiguous-MNIST: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in data_info.items())]
    atomic_write_bytes(out / "results.md", ["\n".join(md).encode() + b"\n"])

    cols = columns_of(rows)
    stats = [f"{c}{suffix}" for c in cols for suffix in ("_std", "_ci95") if any(f"{c}{suffix}" in r for r in rows)]
    fields = cols + stats + (["seeds"] if any("seeds" in r for r in rows) else []) + ["error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in fields})
    atomic_write_bytes(out / "results.csv", [buf.getvalue().encode()])

    payload = {
        "columns": columns_of(rows),
        "rows": [{c: row.get(c) for c in fields} | {"details": row.get("details", {})} for row in rows],
        "errors": errors,
        "ambiguous_mnist": data_info or {},
        "config": config.to_dict() if config is not None else None,
    }
    text = json.dumps(_finite(payload), indent=2, allow_nan=False)
    atomic_write_bytes(out / "results.json", [text.encode()])
    return {"markdown": str(out / "results.md"), "csv": str(out / "results.csv"), "json": str(out / "results.json")}
