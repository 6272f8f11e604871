"""The study over several seeds: one complete study per seed, and a summary with mean ± std.

``run_seeds(cfg, (0, 1, 2))`` runs :func:`~pyro_bq.study.runner.run_study` with
each seed in ``OUT_DIR/seed-K/`` (each a complete, resumable study folder with
its own lock, fingerprints and row files; the generated Ambiguous-MNIST caches
are shared in ``OUT_DIR/cache``), then writes ``OUT_DIR/results.{md,csv,json}``:
every row's metrics as the mean over the seeds with the sample standard
deviation (``<column>_std``) and a 95% Student-t interval half-width
(``<column>_ci95``), and ``OUT_DIR/metrics_vs_bits.png`` with error bars (± std).
The Δ columns are averaged per seed (paired differences from the matched baseline
of the same seed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from pathlib import Path

from .config import StudyConfig, check_out_dir
from .plots import plot_metrics_vs_bits
from .report import columns_of, with_budget_deltas, write_tables
from .runner import _folder_lock, run_study

__all__ = ["run_seeds", "summarize_seeds", "T95"]

log = logging.getLogger("pyro_bq.study")

#: Two-sided 95% Student-t quantiles by degrees of freedom (1..10); larger counts use 1.96.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def summarize_seeds(per_seed: dict) -> list[dict]:
    """Rows averaged over seeds: ``per_seed`` is ``{seed: [row, ...]}``; each numeric column
    becomes its mean, with ``<column>_std`` (sample std; 0 for one seed) and ``<column>_ci95``.

    Rows are matched by ``config`` and kept in the first seed's order; ``seeds`` counts the
    seeds a row has numbers from (a row that failed in a seed is left out there).

    Usage::

        rows = summarize_seeds({0: result0["rows"], 1: result1["rows"]})
    """
    if not isinstance(per_seed, dict) or not per_seed:
        raise ValueError("per_seed must be a non-empty dict {seed: rows}")
    with_deltas = {k: with_budget_deltas([r for r in rows if "error" not in r]) for k, rows in per_seed.items()}
    order = []
    for rows in with_deltas.values():
        order += [r["config"] for r in rows if r["config"] not in order]
    out = []
    for name in order:
        runs = [r for rows in with_deltas.values() for r in rows if r["config"] == name]
        merged = dict(runs[0])
        merged.pop("details", None)
        for col in columns_of(runs):
            values = [r.get(col) for r in runs]
            if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v is None for v in values):
                continue
            if col in ("bits", "act_bits", "packed_bytes"):
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            merged[col], merged[f"{col}_std"] = mean, std
            merged[f"{col}_ci95"] = T95.get(len(values) - 1, 1.96) * std / math.sqrt(len(values)) if len(values) > 1 else None
        merged["seeds"] = len(runs)
        out.append(merged)
    return out


def run_seeds(cfg: StudyConfig, seeds) -> dict:
    """Run (or resume) the study once per seed in ``cfg.out_dir/seed-K`` and write the summary.

    :param seeds: distinct non-negative ints.
    :returns: ``{"rows": summary rows, "seeds": {seed: StudyResult}, "files": {...}}``.
    :raises StudyBusyError: another multi-seed study holds ``out_dir``.

    Usage::

        run_seeds(StudyConfig(data_dir="data", out_dir="runs/study3"), (0, 1, 2))
    """
    if not isinstance(cfg, StudyConfig):
        raise TypeError(f"cfg must be a StudyConfig, got {type(cfg).__name__}")
    seeds = tuple(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct non-negative ints, e.g. 0,1,2; got {seeds!r}")
    out = check_out_dir("out_dir", cfg.out_dir)
    cache = cfg.cache_dir or str(out / "cache")
    with _folder_lock(out):
        results = {}
        for seed in seeds:
            log.info("seed %d of %s", seed, ",".join(map(str, seeds)))
            results[seed] = run_study(dataclasses.replace(cfg, seed=seed, out_dir=str(out / f"seed-{seed}"), cache_dir=cache))
        rows = summarize_seeds({k: list(r["rows"]) + [{"config": n, "error": e} for n, e in r["errors"].items()]
                                for k, r in results.items()})
        files = write_tables(rows, out, data_info={"seeds": ",".join(map(str, seeds))}, config=cfg)
        if rows:
            files["metrics_vs_bits"] = plot_metrics_vs_bits(rows, Path(out) / "metrics_vs_bits.png")
    return {"rows": rows, "seeds": results, "files": files}
