"""Operator-level profile of one pyro_bq SVI step next to the hand-written Bayes-by-backprop step.

Runs ``--steps`` steps of each (the harness's ``bq`` and ``bbb-w`` rows) under
:mod:`torch.profiler` and prints the operators that take the most self CPU
time, so that the difference between the two steps can be read off. With
``--predict`` it profiles the harness's prediction rows instead (``bq batched``
next to ``det x32``: 32 weight samples over 1,000 images).

Usage::

    python benchmarks/profile_step.py --net mlp --steps 20
    python benchmarks/profile_step.py --net mlp --predict --steps 3
    python benchmarks/profile_step.py --net lenet --cprofile --batch 1 --steps 100 --threads 1

With ``--cprofile`` it prints the Python functions where the ``bq`` step spends
its time (:mod:`cProfile`, sorted by own time) instead: the host side of a step.
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import bbb_step, bq_step, pred_bq, pred_det  # noqa: E402


def python_profile(step, steps: int, rows: int) -> None:
    """Print the ``rows`` Python functions with the most own time over ``steps`` calls of ``step``."""
    for _ in range(5):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="mlp", choices=["mlp", "lenet"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", type=int, default=14, help="operators shown per step kind")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--predict", action="store_true", help="profile prediction instead of training")
    p.add_argument("--cprofile", action="store_true", help="the bq step's Python functions (cProfile) instead")
    p.add_argument("--batch", type=int, default=harness.BATCH, help="training batch size")
    args = p.parse_args(argv)
    harness.BATCH = args.batch
    torch.set_num_threads(args.threads)
    if args.cprofile:
        return python_profile(bq_step(args.net), args.steps, args.rows)
    if args.predict:
        steps = {"bq batched": pred_bq(args.net), "det x32": pred_det(args.net)}
    else:
        steps = {"bq": bq_step(args.net), "bbb-w": bbb_step(args.net, False)}
    for step in steps.values():
        for _ in range(2 if args.predict else 5):
            step()
    for name, step in steps.items():
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        print(f"{name}: {(time.perf_counter() - t) / args.steps * 1e3:.2f} ms per step (unprofiled)")
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        print(f"\n===== {name}, {args.steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
