"""Mixed-precision acceptance on LeNet-5 MNIST: Quantile Inform, Random Bits and SMOL against float.

Trains (once; cached) a LeNet-5 (:func:`pyro_bq.recipes.pretrain`) and a
mean-field BNN from it (:func:`pyro_bq.recipes.fit_meanfield_bnn`) on the
MNIST training images minus a validation split (the last ``--val-size``
training images), then allocates bits with QIU, QINU, RB and SMOL and prints
one row per method:

* ``training``: ``data-free`` (QI, RB: they read only the posterior) or
  ``trained`` (SMOL: it trains on the training data);
* ``code bits``: mean code bits per weight (``BitAllocation.code_bits``);
* ``storage bits``: bits per weight of everything needed to decode the
  quantized means (``BitAllocation.storage_bits``);
* ``accuracy_at_means``: accuracy of the deterministic network at the
  quantized means (the paper's metric), and ``accuracy_sampled``: the
  posterior predictive accuracy with ``--num-samples`` draws (VPQ: quantized
  means, float sampling); with ``--ood`` also ``auroc_mi``, MNIST against
  Fashion-MNIST.

QIU spans its grid from the 5th to the 95th percentile of a layer's means
(the paper's grid); ``QIU-minmax`` is the unclipped variant. Random Bits
rounds with ``--rb-rounding at_most`` by default, so its mean code bits
never exceed the target (``RB-budget``, ``RB-nearest``: the other roundings).

QI picks among its threshold trials by accuracy on the validation split
(the paper's Step 4, ``select="validation"``) unless ``--qi-select nearest``.
All test figures are on the MNIST test set (``--test-limit`` images).

Run::

    python benchmarks/mixed_acceptance.py                      # small: 2000 train / 1000 test images
    nice -n 10 python benchmarks/mixed_acceptance.py --full    # 55k train, 5k validation, 10k test
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pyro
import torch

from pyro_bq import IIDNormal
from pyro_bq.data import InMemoryDataset, load_fashion_mnist, load_mnist
from pyro_bq.mixed import evaluate_allocation, evaluate_float, quantile_inform, random_bits, results_table, smol
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.recipes import fit_meanfield_bnn, load_meanfield_guide, pretrain, save_meanfield_guide

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyro_bq/mixed"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--full", action="store_true", help="60k training images (55k + 5k validation), 10k test images")
    p.add_argument("--train-limit", type=int, default=3000, help="training images used (with the validation split)")
    p.add_argument("--val-size", type=int, default=500, help="validation images split off the training images")
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--svi-epochs", type=int, default=1)
    p.add_argument("--target", type=float, default=3.2)
    p.add_argument("--rb-steps", type=int, default=1000)
    p.add_argument("--rb-rounding", default="at_most", choices=("nearest", "budget", "at_most"),
                   help="at_most: the mean code bits never exceed the target")
    p.add_argument("--smol-lam", type=float, default=1e-5)
    p.add_argument("--smol-steps", type=int, default=400)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--qi-select", default="validation", choices=("validation", "nearest"))
    p.add_argument("--layer", default="site", choices=("site", "module"), help="a layer: one site, or weight + bias")
    p.add_argument("--methods", default="QIU,QIU-minmax,QINU,RB,SMOL")
    p.add_argument("--ood", action="store_true", help="also the AUROC of the mutual information, MNIST vs Fashion-MNIST")
    p.add_argument("--train-only", action="store_true", help="train and cache the BNN, then stop")
    p.add_argument("--threads", type=int, default=1)
    return p


def split(args):
    """``(train, validation, test)``: the validation images are the last of the training images."""
    n = None if args.full else args.train_limit
    full = load_mnist(args.data_root, train=True, limit=n)
    val_size = 5000 if args.full else args.val_size
    cut = len(full) - val_size
    train = InMemoryDataset(full.x[:cut], full.y[:cut], name="mnist-train")
    val = InMemoryDataset(full.x[cut:], full.y[cut:], name="mnist-validation")
    test = load_mnist(args.data_root, train=False, limit=None if args.full else args.test_limit)
    return train, val, test


def load_or_fit(args, train):
    """The cached BNN for these settings, or a new one (pretrained, then SVI)."""
    key = {"train_size": len(train), "pretrain_epochs": args.pretrain_epochs, "svi_epochs": args.svi_epochs}
    path = CACHE / f"acceptance_lenet5_{len(train)}_{args.pretrain_epochs}_{args.svi_epochs}.bq"
    pyro.clear_param_store()
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train))
    guide = load_meanfield_guide(path, model, train.x[:2], key=key)
    if guide is not None:
        return model, guide
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    net = pretrain(LeNet5, train, epochs=args.pretrain_epochs, checkpoint=path.with_suffix(".pretrain.bq"))
    print(f"pretrained {args.pretrain_epochs} epochs ({time.perf_counter() - t:.0f} s)", flush=True)
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=len(train))
    guide, _ = fit_meanfield_bnn(model, train, pretrained=net, num_epochs=args.svi_epochs, progress=False)
    print(f"SVI {args.svi_epochs} epochs ({time.perf_counter() - t:.0f} s)", flush=True)
    save_meanfield_guide(path, guide, key=key)
    return model, guide


def main(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    if args.full:
        args.pretrain_epochs = max(args.pretrain_epochs, 12)
        args.svi_epochs = max(args.svi_epochs, 5)
    train, val, test = split(args)
    model, guide = load_or_fit(args, train)
    if args.train_only:
        return []
    return run_methods(args, model, guide, train, val, test)


def allocate(args, method, model, guide, train, val):
    """``(allocation, guide to quantize)`` of one method."""
    validation = (model, val) if args.qi_select == "validation" else None
    if method in ("QIU", "QIU-minmax", "QINU"):
        grid = "gaussian" if method == "QINU" else "uniform"
        alloc = quantile_inform(guide, args.target, grid=grid, clip=method != "QIU-minmax", layers=args.layer,
                                validation=validation)
        return alloc, guide
    if method in ("RB", "RB-budget", "RB-nearest"):
        rounding = args.rb_rounding if method == "RB" else method.split("-")[1]
        return random_bits(guide, args.target, num_steps=args.rb_steps, layers=args.layer, rounding=rounding), guide
    if method == "SMOL":
        return smol(model, guide, train, lam=args.smol_lam, precision_steps=args.smol_steps,
                    finetune_steps=args.finetune_steps, init_bits=6.0)
    raise ValueError(f"--methods: unknown method {method!r}")


def run_methods(args, model, guide, train, val, test):
    ood = load_fashion_mnist(args.data_root, train=False, limit=len(test)) if args.ood else None
    records = [evaluate_float(model, guide, test, ood, num_samples=args.num_samples)]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t = time.perf_counter()
        alloc, qbase = allocate(args, method, model, guide, train, val)
        rec = evaluate_allocation(model, qbase, alloc, test, ood, num_samples=args.num_samples)
        rec["method"] = method if method != "QIU" or alloc.method == "QIU" else alloc.method
        rec["seconds"] = time.perf_counter() - t
        records.append(rec)
        print(f"{method}: code bits {alloc.code_bits:.3f}, storage bits {alloc.storage_bits:.3f}, "
              f"accuracy at means {100 * rec['accuracy_at_means']:.2f}% ({rec['seconds']:.0f} s)", flush=True)
    print(f"\nLeNet-5 MNIST, {len(train)} training images ({len(val)} more for validation), {len(test)} test images, "
          f"target {args.target} bits, QI trial selection: {args.qi_select}, layer: {args.layer}\n")
    columns = ("method", "training", "code_bits", "storage_bits", "accuracy_at_means", "accuracy_sampled")
    print(results_table(records, columns=columns + (("auroc_mi",) if args.ood else ())))
    floor = records[0]["accuracy_at_means"]
    for r in records[1:]:
        print(f"{r['method']}: gap to float at the means {100 * (floor - r['accuracy_at_means']):+.2f} points")
    return records


if __name__ == "__main__":
    main(build_parser().parse_args())
