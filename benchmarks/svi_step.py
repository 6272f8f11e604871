"""Median time of one pyro_bq SVI step (LeNet-5, batch 128) next to a plain
PyTorch training step of the same network, measured in the same run
(round-robin, so load from other processes hits both alike), and their ratio.

Usage::

    python benchmarks/svi_step.py --reps 50 --threads 2
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bq_step, det_step, round_robin  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="pyro_bq SVI step vs plain PyTorch step")
    p.add_argument("--net", default="lenet", choices=["lenet", "mlp"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    times = round_robin({"plain PyTorch step": det_step(args.net), "pyro_bq SVI step": bq_step(args.net)}, args.reps, args.warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>20}: {v * 1e3:8.2f} ms (median of {args.reps})")
    print(f"{'ratio':>20}: {med['pyro_bq SVI step'] / med['plain PyTorch step']:8.2f}x  ({args.net}, batch 128, {args.threads} threads)")


if __name__ == "__main__":
    main()
