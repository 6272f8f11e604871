"""PWFN acceptance run on LeNet-5 / MNIST: both level rules, the paper's training preset.

Pretrains LeNet-5 once (or loads ``--pretrained``), then for each level rule
(``--rules``) starts a fresh :class:`~pyro_bq.pwfn.AutoPWFN` from it, runs the
PWFN schedule and prints one row per level rule and selection (``--selections``): point accuracy, ensemble accuracy,
unique values, weight entropy, codebook size ``K``, and bits per weight of the
point-network file (:func:`~pyro_bq.pwfn.save_point_network`) against the
Bayesian (mu, sigma) packed file (:func:`~pyro_bq.io.save_packed` of
:func:`~pyro_bq.pwfn.codebook_policy`).

    python benchmarks/pwfn_acceptance.py                                   # small defaults (minutes)
    nice -n 10 python benchmarks/pwfn_acceptance.py --train-limit 0 --test-limit 0 \\
        --pretrain-epochs 5 --pretrained runs/lenet5.bq                    # full MNIST, paper preset

``--train-limit 0`` / ``--test-limit 0`` mean the whole set.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import pyro
import torch

from pyro_bq import IIDNormal
from pyro_bq.data import load_mnist
from pyro_bq.guides import init_to_pretrained, quantize
from pyro_bq.io import memory_report, save_packed
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.pwfn import (
    PWFN, AutoPWFN, ClusterConfig, codebook_policy, compression_stats, load_point_network,
    point_network_bits_per_param, save_point_network,
)
from pyro_bq.recipes import pretrain


@torch.no_grad()
def net_accuracy(net, data, batch_size: int = 1000) -> float:
    correct = 0
    for xb, yb in data.batches(batch_size):
        correct += int((net(xb).argmax(-1) == yb).sum())
    return correct / len(data)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-limit", type=int, default=3000, help="first N training images (0: all 60,000)")
    p.add_argument("--test-limit", type=int, default=1000, help="first N test images (0: all 10,000)")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--pretrained", default=None, help="pretrained LeNet-5 checkpoint (loaded if present)")
    p.add_argument("--preset", choices=("paper", "fast"), default="paper")
    p.add_argument("--num-epochs", type=int, default=None, help="epochs per round (default: the preset's)")
    p.add_argument("--num-steps", type=int, default=None, help="steps per round (overrides epochs)")
    p.add_argument("--rules", nargs="+", choices=("text", "reference"), default=["text", "reference"],
                   help="level rules to measure")
    p.add_argument("--selections", nargs="+", choices=("text", "reference"), default=["reference"],
                   help="selection rules to measure (every pair with --rules)")
    p.add_argument("--scale-step", choices=("raw", "sigma"), default=None,
                   help="what SGD steps for the scales (default: the preset's)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="epochs of training before the first round, nothing fixed (default: the preset's, 0)")
    p.add_argument("--b", type=int, default=7, help="starting precision 2^-b")
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--zero-fix", type=float, default=0.0)
    p.add_argument("--eval-samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="where the exported files go (default: a temporary folder)")
    return p


def run_rule(rule: str, selection: str, net, train, test, args, out_dir: Path) -> dict:
    pyro.clear_param_store()
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=len(train))
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    cluster = ClusterConfig(b=args.b, tau=args.tau, level_rule=rule, selection=selection, zero_fix=args.zero_fix)
    kw = {} if args.scale_step is None else {"scale_step": args.scale_step}
    if args.num_epochs is not None:
        kw["num_epochs"] = args.num_epochs
    if args.warmup_epochs is not None:
        kw["warmup_epochs"] = args.warmup_epochs
    t0 = time.perf_counter()
    result = PWFN(model, guide, train, test_data=test, preset=args.preset, cluster=cluster, num_steps=args.num_steps,
                  seed=args.seed, eval_samples=args.eval_samples, progress=False, **kw).run()
    elapsed = time.perf_counter() - t0
    f = result.final
    tag = f"{rule}-{selection}"
    point = out_dir / f"pwfn-{tag}-point.bq"
    save_point_network(guide, point)
    loaded = load_point_network(point)
    median = guide.median()
    assert all(torch.equal(loaded[k], median[k]) for k in median), "point network does not round-trip"
    bayes = out_dir / f"pwfn-{tag}-bayes.bq"
    qguide = quantize(guide, codebook_policy(guide))
    save_packed(qguide, bayes)
    k = len(f["codebook"])
    flat = torch.cat([v.reshape(-1) for v in median.values()])
    return {
        "rule": tag, "accuracy": f["accuracy"], "ensemble": f["ensemble_accuracy"], "unique": f["unique"],
        "entropy": f["entropy"], "K": k, "log2K": max(1, math.ceil(math.log2(k))),
        "point_bpp": point_network_bits_per_param(point, guide.num_params),
        "bayes_bpp": memory_report(qguide).bits_per_param, "bayes_file_bpp": bayes.stat().st_size * 8 / guide.num_params,
        "zero_fraction": float((flat == 0).float().mean()), "warmup": f["warmup"], "time_s": elapsed, "codebook": f["codebook"], "per_site": f["per_site"], "movement": f["movement"],
    }


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    train = load_mnist(args.data_dir, train=True, limit=args.train_limit or None)
    test = load_mnist(args.data_dir, train=False, limit=args.test_limit or None)
    path = Path(args.pretrained) if args.pretrained else None
    net = pretrain(LeNet5, train, epochs=args.pretrain_epochs, batch_size=128, seed=args.seed, checkpoint=path)
    base = net_accuracy(net, test)
    base_stats = compression_stats({f"net.{k}": v for k, v in net.named_parameters()})
    print(f"train {len(train)}  test {len(test)}  preset {args.preset}  pretrained accuracy {100 * base:.2f}%  "
          f"unique {base_stats['unique']}  entropy {base_stats['entropy']:.2f} bits", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out_dir) if args.out_dir else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [run_rule(rule, sel, net, train, test, args, out_dir) for sel in args.selections for rule in args.rules]
    print("\n| level rule-selection | point acc | gap to pretrained | ensemble acc | unique | entropy (bits) | K | ceil(log2 K) "
          "| point-network bits/param | Bayesian (mu, sigma) bits/param | time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rule']} | {100 * r['accuracy']:.2f}% | {100 * (r['accuracy'] - base):+.2f} | "
              f"{100 * r['ensemble']:.2f}% | {r['unique']} | {r['entropy']:.3f} | {r['K']} | {r['log2K']} | "
              f"{r['point_bpp']:.3f} | {r['bayes_file_bpp']:.3f} | {r['time_s']:.0f}s |")
    for r in rows:
        print(f"\n{r['rule']}: codebook " + ", ".join(f"{c:g}" for c in r["codebook"]))
        print(f"  weights on 0: {100 * r['zero_fraction']:.1f}%  warm-up: {r['warmup']}")
        for site, st in r["per_site"].items():
            print(f"  {site:<20} n={st['count']:<6} unique={st['unique']:<3} entropy={st['entropy']:.3f}")
        for m in r["movement"]:
            print(f"  centre {m['centre']:<10g} fixed={m['count']:<6} |mu-c|/sigma max={m['max']:.3g} mean={m['mean']:.3g} "
                  f"std={m['std']:.3g}")
    return rows


if __name__ == "__main__":
    main()
