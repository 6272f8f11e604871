"""Mixed precision from uncertainty on a LeNet-5 BNN trained on real MNIST.

Trains (once; cached with pyro_bq.io.save_checkpoint) a mean-field LeNet-5
BNN on the MNIST training images minus a validation split (``--val-size``,
the last training images), allocates bits with Quantile Inform (QIU, QINU),
Random Bits (RB) and SMOL at a target mean bit-width, quantizes the guide's
means with each allocation (VPQ: quantized means, 8-bit log2 scales, float
sampling) and evaluates them against the float guide on the test set.

Each row gives its ``training`` (``data-free``: QI, RB read only the
posterior; ``trained``: SMOL trains on the training images), its
``code_bits`` (mean code bits per weight) and ``storage_bits`` (bits per
weight of everything a packed file needs to decode the quantized means: the
codes, a 4-bit width per weight for SMOL's per-weight map, each site's
interval or scale), ``accuracy_at_means`` (the deterministic network at the
quantized means, the Quantile Inform paper's metric) and
``accuracy_sampled`` (the posterior predictive), then NLL, ECE and the AUROC
of the mutual information for MNIST vs Fashion-MNIST. Quantile Inform
chooses among its threshold trials by accuracy on the validation split
(the paper's Step 4; ``--qi-select nearest`` takes the mean bits nearest the target).

Run::

    python examples/mixed_precision_mnist.py --target 3.2            # full run
    python examples/mixed_precision_mnist.py --train-limit 1000 --test-limit 200 \\
        --pretrain-epochs 1 --svi-epochs 1 --smol-steps 5 --finetune-steps 5 --num-samples 4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pyro
import torch

from pyro_bq import IIDNormal
from pyro_bq._validation import resolve_device
from pyro_bq.data import InMemoryDataset, load_fashion_mnist, load_mnist
from pyro_bq.mixed import (
    bits_table,
    evaluate_allocation,
    evaluate_float,
    plot_bits,
    quantile_inform,
    random_bits,
    results_table,
    smol,
)
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.recipes import fit_meanfield_bnn, load_meanfield_guide, pretrain, save_meanfield_guide

#: where the trained BNN is cached (benchmarks/allocate.py reads the same file)
DEFAULT_CHECKPOINT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyro_bq/mixed/lenet5_mnist_bnn.bq"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=None, help="MNIST-family root (default: $PYRO_BQ_DATA or ~/.cache/pyro_bq/data)")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="cache file of the trained BNN (default: %(default)s)")
    p.add_argument("--retrain", action="store_true", help="train even if the cache exists")
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--test-limit", type=int, default=None, help="use only this many MNIST / Fashion-MNIST test images")
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--svi-epochs", type=int, default=5)
    p.add_argument("--target", type=float, default=3.2, help="target mean bits (gamma)")
    p.add_argument("--candidates", default="2-8", help="candidate widths, e.g. 2-8 or 2,3,4,8")
    p.add_argument("--aggregate", default="mean", choices=("mean", "entropy"))
    p.add_argument("--val-size", type=int, default=5000,
                   help="training images held out for Quantile Inform's choice of trial (at most a fifth of them)")
    p.add_argument("--qi-select", default="validation", choices=("validation", "nearest"))
    p.add_argument("--layer", default="site", choices=("site", "module"),
                   help="a layer of QI/RB: each Pyro site, or a module's weight and bias together")
    p.add_argument("--no-clip", action="store_true", help="QIU on the means' full range, not the 5th-95th percentile")
    p.add_argument("--rb-steps", type=int, default=1000)
    p.add_argument("--smol-lam", type=float, default=1e-5)
    p.add_argument("--smol-steps", type=int, default=400, help="SMOL precision-training steps")
    p.add_argument("--finetune-steps", type=int, default=200, help="SMOL fine-tuning steps")
    p.add_argument("--num-samples", type=int, default=32, help="posterior samples for the evaluation")
    p.add_argument("--mode", default="vpq", choices=("vpq", "spq", "jq"))
    p.add_argument("--methods", default="QIU,QINU,RB,RB-budget,SMOL", help="comma-separated subset")
    p.add_argument("--out", default=None, help="folder for bits.png, bits.md, results.md, results.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    return p


def parse_candidates(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(t) for t in text.split(",") if t]


def main(args) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def load_or_fit(args, train):
    """The LeNet-5 BNN cached at ``args.checkpoint`` for these settings, or a new one (pretrained, then SVI)."""
    path = Path(args.checkpoint)
    key = {"train_size": len(train), "pretrain_epochs": args.pretrain_epochs, "svi_epochs": args.svi_epochs}
    pyro.clear_param_store()
    device = resolve_device(getattr(args, "device", "auto"), name="--device")
    if not args.retrain:
        model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train)).to(device)
        guide = load_meanfield_guide(path, model, train.x[:2].to(device), key=key)
        if guide is not None:
            return model, guide, False
    net = pretrain(LeNet5, train, epochs=args.pretrain_epochs, device=device)
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=len(train))
    guide, _ = fit_meanfield_bnn(model, train, pretrained=net, num_epochs=args.svi_epochs, progress=False,
                                 device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_meanfield_guide(path, guide, key=key)
    return model, guide, True


def _run(args) -> dict:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - {"QIU", "QINU", "RB", "RB-budget", "SMOL", "SMOL-L"}
    if unknown:
        raise ValueError(f"--methods has unknown entries {sorted(unknown)}")
    candidates = parse_candidates(args.candidates)
    t0 = time.perf_counter()
    full = load_mnist(args.data_root, train=True, limit=args.train_limit)
    cut = len(full) - min(args.val_size, len(full) // 5)
    train = InMemoryDataset(full.x[:cut], full.y[:cut], name="mnist-train")
    val = InMemoryDataset(full.x[cut:], full.y[cut:], name="mnist-validation")
    test = load_mnist(args.data_root, train=False, limit=args.test_limit)
    ood = load_fashion_mnist(args.data_root, train=False, limit=args.test_limit)
    model, guide, trained = load_or_fit(args, train)
    print(f"BNN: {'trained' if trained else 'loaded'} {args.checkpoint} ({time.perf_counter() - t0:.1f} s)")

    allocs, guides, times = {}, {}, {}
    for m in methods:
        t = time.perf_counter()
        if m in ("QIU", "QINU"):
            grid = "uniform" if m == "QIU" else "gaussian"
            allocs[m] = quantile_inform(
                guide, args.target, candidate_bits=candidates, aggregate=args.aggregate, grid=grid,
                clip=not args.no_clip, layers=args.layer,
                validation=(model, val) if args.qi_select == "validation" else None,
            )
        elif m in ("RB", "RB-budget"):
            allocs[m] = random_bits(
                guide, args.target, candidate_bits=candidates, num_steps=args.rb_steps,
                rounding="nearest" if m == "RB" else "budget", layers=args.layer,
            )
        else:
            allocs[m], guides[m] = smol(
                model, guide, train, lam=args.smol_lam, granularity="parameter" if m == "SMOL" else "layer",
                precision_steps=args.smol_steps, finetune_steps=args.finetune_steps, init_bits=6.0,
            )
        times[m] = time.perf_counter() - t
        a = allocs[m]
        print(f"{m} ({a.training}): {a.code_bits:.3f} code bits, {a.storage_bits:.3f} storage bits per weight "
              f"({times[m]:.2f} s)")

    records = [evaluate_float(model, guide, test, ood, num_samples=args.num_samples)]
    for m, a in allocs.items():
        rec = evaluate_allocation(model, guides.get(m, guide), a, test, ood, mode=args.mode, num_samples=args.num_samples)
        rec["method"] = m
        rec["alloc_seconds"] = times[m]
        records.append(rec)
    table = results_table(records)
    bits = bits_table(allocs) if allocs else ""
    print(bits)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bits.md").write_text(bits + "\n")
        (out / "results.md").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps(records, indent=1, default=float))
        if allocs:
            plot_bits(allocs, out / "bits.png", title=f"LeNet-5 bits per layer (target {args.target})")
    return {"records": records, "allocations": allocs, "bits_table": bits, "results_table": table}


if __name__ == "__main__":
    parser = build_parser()
    cli = parser.parse_args()
    try:
        resolve_device(cli.device, name="--device")
    except (TypeError, ValueError) as err:
        parser.error(str(err))  # one line and exit status 2, no traceback
    main(cli)
