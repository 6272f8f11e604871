"""Compare the outputs of two study runs: results.csv column by column, the scores and the ArviZ files.

Prints, per numeric column of ``results.csv``, the largest relative difference
between the runs (0 where equal to the last digit), any text column that
differs, and per row file (``configs/<row>.scores.bq``, ``configs/<row>.nc``)
the largest relative difference over its arrays. Exits with status 1 when a
difference exceeds ``--rtol``. Timing columns are not compared.

Usage::

    python benchmarks/compare_studies.py /tmp/study-before /tmp/study-after
    python benchmarks/compare_studies.py A B --rtol 1e-6 --skip-files
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from pyro_bq.io import read_container


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if same.all():
        return 0.0
    scale = np.maximum(np.abs(a), np.abs(b))
    return float(np.max(np.where(same, 0.0, np.abs(a - b) / np.where(scale > 0, scale, 1.0))))


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def compare_tables(a: Path, b: Path) -> float:
    """Largest relative difference over the numeric cells of two results.csv files (printed per column)."""
    ra, rb = list(csv.DictReader(a.open())), list(csv.DictReader(b.open()))
    if [r["config"] for r in ra] != [r["config"] for r in rb]:
        print("rows differ:", [r["config"] for r in ra], [r["config"] for r in rb])
        return float("inf")
    worst = 0.0
    for col in ra[0]:
        values = [(x[col], y[col]) for x, y in zip(ra, rb)]
        nums = [(_number(x), _number(y)) for x, y in values]
        if all(x is not None and y is not None for x, y in nums):
            d = _rel(np.array([x for x, _ in nums]), np.array([y for _, y in nums]))
            worst = max(worst, d)
            print(f"{col:24s} max rel diff {d:.3g}")
        elif any(x != y for x, y in values):
            worst = float("inf")
            print(f"{col:24s} DIFFERS: {[(x, y) for x, y in values if x != y][:3]}")
        else:
            print(f"{col:24s} equal")
    return worst


def compare_row_files(a: Path, b: Path) -> float:
    """Largest relative difference over the arrays of each row's scores and ArviZ files (printed per file)."""
    worst = 0.0
    for fa in sorted((a / "configs").glob("*.scores.bq")):
        _, ta = read_container(fa, "study-scores")
        _, tb = read_container(b / "configs" / fa.name, "study-scores")
        d = max([_rel(ta[k].numpy(), tb[k].numpy()) for k in ta] + [0.0 if ta.keys() == tb.keys() else float("inf")])
        worst = max(worst, d)
        print(f"{fa.name:32s} max rel diff {d:.3g}")
    for fa in sorted((a / "configs").glob("*.nc")):
        d = 0.0
        for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
            ga, gb = xr.open_dataset(fa, group=group), xr.open_dataset(b / "configs" / fa.name, group=group)
            if set(ga.data_vars) != set(gb.data_vars):
                d = float("inf")
            for name in ga.data_vars:
                d = max(d, _rel(ga[name].values, gb[name].values))
        worst = max(worst, d)
        print(f"{fa.name:32s} max rel diff {d:.3g}")
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--skip-files", action="store_true", help="compare results.csv only")
    args = p.parse_args(argv)
    worst = compare_tables(args.before / "results.csv", args.after / "results.csv")
    if not args.skip_files:
        worst = max(worst, compare_row_files(args.before, args.after))
    print(f"\nlargest relative difference: {worst:.3g} ({'within' if worst <= args.rtol else 'ABOVE'} rtol {args.rtol:g})")
    return 0 if worst <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
