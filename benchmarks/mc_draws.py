"""How the mutual information and AUROC(MI) depend on the number of weight draws.

Trains (or reuses) the study's float guide with the study's default settings
(``pyro-bq study --policies float``), then evaluates it on the study's test
sets with 10, 20, 50, 100 and 200 weight draws, ``--repeats`` times each with
different draw seeds. Prints, per draw count: the mean MI on MNIST and on
Fashion-MNIST (nats), AUROC(MI, MNIST vs Fashion) and AUROC(EE, MNIST vs
Ambiguous) as mean ± std over the repeats, the AUROC(MI) gap to the largest
draw count, and the seconds one evaluation takes. The study's default
``--num-samples`` is the smallest count whose mean AUROC(MI) is within 0.005 of
the largest count's (docs/mc_draws.md holds a measured table).

Run::

    python benchmarks/mc_draws.py --data-dir ../shared/data --out-dir /tmp/mc-draws
    python benchmarks/mc_draws.py --draws 10,20 --repeats 1 --eval-limit 200   # a quick look
    python benchmarks/mc_draws.py --checkpoint OLD_STUDY/train/FP/guide.bq      # an already trained float guide
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pyro_bq.recipes import load_meanfield_guide
from pyro_bq.study import StudyConfig, run_study
from pyro_bq.study.runner import _load_data, _make_model
from pyro_bq.uncertainty import evaluate_details

TOLERANCE = 0.005


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-dir", default="mc-draws-study", help="study folder of the float guide (reused when present)")
    p.add_argument("--draws", default="10,20,50,100,200", help="comma-separated draw counts")
    p.add_argument("--repeats", type=int, default=3, help="evaluations per draw count, each with its own draw seed")
    p.add_argument("--eval-limit", type=int, default=2000, help="rows per test set (the study's default)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="a float guide.bq of an earlier default study, used instead of training")
    return p


def _float_guide(args):
    cfg = StudyConfig(data_dir=args.data_dir, out_dir=args.out_dir, policies=("float",), act_policies=(), bits=(4,),
                      eval_limit=args.eval_limit, num_samples=4, arviz_samples=2, arviz_limit=10, progress=False,
                      threads=args.threads, checkpoint=args.checkpoint)
    run_study(cfg)
    train, tests, _ = _load_data(cfg)
    model = _make_model(cfg, len(train))
    path = args.checkpoint or Path(args.out_dir) / "train" / cfg.train_fingerprint() / "guide.bq"
    guide = load_meanfield_guide(path, model, tests["mnist"].x[:2])
    return model, guide, tests


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    draws = [int(d) for d in args.draws.split(",") if d]
    model, guide, tests = _float_guide(args)
    results = {}
    for n in draws:
        recs, secs = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            rec, _ = evaluate_details(model, guide, tests["mnist"], tests["fashion"], ambiguous_data=tests["ambiguous"],
                                      num_samples=n, seed=1000 + r)
            secs.append(time.perf_counter() - t0)
            recs.append(rec)
        col = lambda k: [x[k] for x in recs]  # noqa: E731
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        results[n] = {"mi_mnist": statistics.fmean(col("epistemic_in")), "mi_fashion": statistics.fmean(col("epistemic_out")),
                      "auroc_mi": statistics.fmean(col("auroc_mi")), "auroc_mi_std": sd(col("auroc_mi")),
                      "auroc_ee": statistics.fmean(col("auroc_aleatoric_ambiguous")),
                      "auroc_ee_std": sd(col("auroc_aleatoric_ambiguous")), "seconds": statistics.median(secs)}
    ref = results[max(draws)]["auroc_mi"]
    print(f"float guide, {len(tests['mnist'])} rows per test set, {args.repeats} draw seeds per count")
    print("| draws | mean MI MNIST | mean MI Fashion | AUROC MI (Fashion) | |Δ| vs max | AUROC EE (Ambiguous) | s/eval |")
    print("|---|---|---|---|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['mi_mnist']:.2e} | {r['mi_fashion']:.2e} | {r['auroc_mi']:.4f} ± {r['auroc_mi_std']:.4f} | "
              f"{abs(r['auroc_mi'] - ref):.4f} | {r['auroc_ee']:.4f} ± {r['auroc_ee_std']:.4f} | {r['seconds']:.1f} |")
    ok = [n for n in draws if abs(results[n]["auroc_mi"] - ref) < TOLERANCE]
    print(f"smallest draw count within {TOLERANCE} of {max(draws)} draws: {min(ok)}")
    return results


if __name__ == "__main__":
    main()
