"""Quantize an SVI-trained LeNet-5 BNN on real MNIST: VPQ, SPQ and JQ at several bit widths.

Trains (once; the guide is cached with :func:`pyro_bq.recipes.save_meanfield_guide`)
a mean-field LeNet-5 on MNIST, quantizes it with every policy at every bit
width, optionally fine-tunes low-bit JQ guides with quantization-aware SVI
(straight-through), and evaluates each row with the same seed: accuracy, NLL,
ECE, AUROC of the mutual information for MNIST (in) versus Fashion-MNIST
(out), bits per parameter and the packed file's size.

Run (the full table, with PASS/FAIL lines for the accuracy and size thresholds)::

    python examples/quantize_mnist.py --epochs 4 --num-samples 32 --table table.md

A tiny smoke run::

    python examples/quantize_mnist.py --train-limit 500 --test-limit 200 --epochs 1 --bits 4 --num-samples 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from pyro_bq import IIDNormal
from pyro_bq._validation import resolve_device
from pyro_bq.data import load_fashion_mnist, load_mnist
from pyro_bq.guides import quantize
from pyro_bq.inference import fit_svi
from pyro_bq.io import memory_report, save_packed
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.quant import FloatPolicy, make_policy
from pyro_bq.recipes import fit_meanfield_bnn, load_meanfield_guide, save_meanfield_guide
from pyro_bq.uncertainty import evaluate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="folder with MNIST/raw and FashionMNIST/raw (default: PYRO_BQ_DATA)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test images (MNIST and Fashion)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init-scale", type=float, default=1e-3)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4, 3, 2])
    p.add_argument("--policies", nargs="+", default=["vpq", "spq", "jq"], choices=["vpq", "spq", "jq"])
    p.add_argument("--qat-bits", type=int, nargs="*", default=[3, 2], help="JQ bit widths that also get a fine-tuned row")
    p.add_argument("--qat-epochs", type=float, default=1.0, help="epochs of quantization-aware fine-tuning")
    p.add_argument("--qat-lr", type=float, default=1e-4, help="Adam learning rate of the fine-tuning (lower than training: the grid is already set)")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="cache of the trained float guide (default: <out-dir>/lenet_mfvi.bq)")
    p.add_argument("--out-dir", default=None, help="where packed files go (default: a temporary folder)")
    p.add_argument("--table", default=None, help="write the table as Markdown to this file")
    p.add_argument("--json", default=None, help="write the rows as JSON to this file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (more threads only help on an idle machine)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (rows are still printed)")
    args = p.parse_args(argv)
    try:
        check_args(args)
    except (TypeError, ValueError) as err:
        p.error(str(err))  # exits with status 2 and the usage line
    return args


def check_args(args) -> None:
    """Check every option before any work (data, training), so a bad one fails at once.

    :raises ValueError: naming the option (e.g. ``--bits``) and its allowed values.

    Usage::

        check_args(parse_args(["--bits", "4"]))
    """
    _device(args)
    def positive_int(option, value, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option} must be an int >= 1, got {value!r}")

    def positive(option, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{option} must be a positive finite number, got {value!r}")

    for option in ("train_limit", "test_limit"):
        positive_int(f"--{option.replace('_', '-')}", getattr(args, option), allow_none=True)
    for option in ("epochs", "batch_size", "num_samples", "threads"):
        positive_int(f"--{option.replace('_', '-')}", getattr(args, option))
    for option in ("lr", "init_scale", "qat_epochs", "qat_lr"):
        positive(f"--{option.replace('_', '-')}", getattr(args, option))
    if isinstance(args.seed, bool) or not isinstance(args.seed, int) or args.seed < 0:
        raise ValueError(f"--seed must be an int >= 0, got {args.seed!r}")
    if not args.bits or not args.policies:
        raise ValueError("--bits and --policies each need at least one value")
    for option, widths in (("--bits", args.bits), ("--qat-bits", args.qat_bits)):
        for bits in widths:
            for mode in args.policies:  # each policy checks its bit widths as it will when quantizing
                try:
                    make_policy(mode, bits)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{option} {bits}: {err}") from err
    for option in ("table", "json"):
        path = getattr(args, option)
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"--{option} {path!r}: its folder {str(Path(path).resolve().parent)!r} does not exist; "
                             "create it first")


def _device(args):
    return resolve_device(getattr(args, "device", "auto"), name="--device")


def train_or_load(args, train, ckpt: Path):
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train))
    key = {"train": len(train), "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
           "init_scale": args.init_scale, "seed": args.seed}
    guide = load_meanfield_guide(ckpt, model, train.x[:2], key=key)
    if guide is not None:
        return model, guide, 0.0
    t0 = time.perf_counter()
    guide, _ = fit_meanfield_bnn(model, train, init_scale=args.init_scale, num_epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=_device(args),
                                 progress=not (args.quiet or args.no_progress))
    save_meanfield_guide(ckpt, guide, key=key)
    return model, guide, time.perf_counter() - t0


def fine_tune(args, model, qguide, train):
    """Quantization-aware SVI of a quantized guide (straight-through), recalibrating every 50 steps."""
    pyro.clear_param_store()
    steps = max(1, int(args.qat_epochs * train.num_batches(args.batch_size)))

    def every(step, loss):
        if step % 50 == 0:
            qguide.recalibrate_()

    fit_svi(model, qguide, train, num_steps=steps, batch_size=args.batch_size, lr=args.qat_lr, seed=args.seed + 1,
            elbo=TraceMeanField_ELBO(), progress=not (args.quiet or args.no_progress), callback=every,
            device=_device(args))
    qguide.recalibrate_()
    return qguide


def evaluate_row(args, name, bits, model, qguide, test, fashion, out_dir: Path):
    record = evaluate(model, qguide, test, fashion, num_samples=args.num_samples, seed=args.seed)
    path = out_dir / f"{name.replace('+', '_')}-{bits}.bq"
    size = save_packed(qguide, path)
    report = memory_report(qguide)
    return {
        "policy": name,
        "bits": bits,
        "accuracy": 100.0 * record["accuracy"],
        "nll": record["nll"],
        "ece": record["ece"],
        "auroc_mi": record["auroc_mi"],
        "bits_per_param": report.bits_per_param,
        "packed_bytes": size,
        "report_bytes": report.file_bytes,
    }


def format_table(rows) -> str:
    head = "| policy | bits | accuracy (%) | NLL | ECE | AUROC (MI) | bits/param | packed bytes |\n"
    head += "|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['policy']} | {r['bits']} | {r['accuracy']:.2f} | {r['nll']:.4f} | {r['ece']:.4f} | {r['auroc_mi']:.4f} "
        f"| {r['bits_per_param']:.2f} | {r['packed_bytes']} |\n"
        for r in rows
    )
    return head + body


def check_thresholds(rows) -> list[str]:
    """The accuracy, AUROC and file-size thresholds against the float row, as human-readable PASS/FAIL lines."""
    base = next(r for r in rows if r["policy"] == "float")
    out = []

    def line(ok, text):
        out.append(f"{'PASS' if ok else 'FAIL'}: {text}")

    for r in rows:
        if r["policy"] in ("VPQ", "SPQ", "JQ") and r["bits"] in (8, 4):
            d_acc, d_au = base["accuracy"] - r["accuracy"], base["auroc_mi"] - r["auroc_mi"]
            line(d_acc <= 0.3 and d_au <= 0.02, f"{r['policy']} {r['bits']} bits: {-d_acc:+.2f} points, {-d_au:+.4f} AUROC vs float")
    for r in rows:
        if r["policy"] in ("JQ", "JQ+QAT") and r["bits"] == 3:
            d_acc, d_au = base["accuracy"] - r["accuracy"], base["auroc_mi"] - r["auroc_mi"]
            line(d_acc <= 1.0 and d_au <= 0.03, f"{r['policy']} 3 bits: {-d_acc:+.2f} points, {-d_au:+.4f} AUROC vs float")
        if r["policy"] == "JQ+QAT" and r["bits"] == 2:
            line(r["accuracy"] >= 95.0, f"JQ+QAT 2 bits: {r['accuracy']:.2f}% (>= 95)")
        if r["policy"] == "JQ" and r["bits"] == 4:
            ratio = base["packed_bytes"] / r["packed_bytes"]
            line(ratio >= 7.0, f"JQ 4 bits packed file is 1/{ratio:.2f} of the float one (>= 7)")
    return out


def main(args=None):
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    check_args(args)
    torch.set_num_threads(max(1, args.threads))
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="quantize_mnist-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else out_dir / "lenet_mfvi.bq"

    train = load_mnist(args.data_root, train=True, limit=args.train_limit)
    test = load_mnist(args.data_root, train=False, limit=args.test_limit)
    fashion = load_fashion_mnist(args.data_root, train=False, limit=args.test_limit)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    model, guide, seconds = train_or_load(args, train, ckpt)
    say(f"float guide: {'trained in %.0f s' % seconds if seconds else 'loaded from ' + str(ckpt)}")

    rows = []
    t0 = time.perf_counter()
    rows.append(evaluate_row(args, "float", 32, model, quantize(guide, FloatPolicy()), test, fashion, out_dir))
    say(format_table(rows[-1:]).splitlines()[-1])
    for bits in args.bits:
        for mode in args.policies:
            qguide = quantize(guide, make_policy(mode, bits))
            rows.append(evaluate_row(args, mode.upper(), bits, model, qguide, test, fashion, out_dir))
            say(format_table(rows[-1:]).splitlines()[-1])
        if "jq" in args.policies and bits in args.qat_bits:
            qguide = fine_tune(args, model, quantize(guide, make_policy("jq", bits)), train)
            rows.append(evaluate_row(args, "JQ+QAT", bits, model, qguide, test, fashion, out_dir))
            say(format_table(rows[-1:]).splitlines()[-1])
    say(f"quantized and evaluated {len(rows)} rows in {time.perf_counter() - t0:.0f} s")
    table = format_table(rows)
    verdicts = check_thresholds(rows)
    say(table)
    say("\n".join(verdicts))
    if args.table:
        cmd = "python examples/quantize_mnist.py " + " ".join(sys.argv[1:]) if __name__ == "__main__" else "main(...)"
        Path(args.table).write_text(f"Command: `{cmd}`\n\n{table}\n" + "\n".join(verdicts) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
