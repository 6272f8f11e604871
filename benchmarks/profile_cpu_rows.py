"""Process-CPU-time ratios of harness rows: a load-tolerant companion to ``harness.py``.

On a shared machine the wall clock mostly measures the other jobs. This script
runs chosen rows of :mod:`harness` round-robin in one process and reports the
median *process CPU time* of each as a multiple of the baseline row (``det`` for
training, ``det x32`` for prediction). Use one thread (the default): with more,
OpenMP threads spin while a partner thread is descheduled and inflate the CPU time.

Besides the total (user + system) CPU time, the table gives the user time alone
and the minor page faults per call: the system time is mostly the kernel
zeroing pages that glibc's allocator handed back between calls (heap trimming),
which depends on the process's allocation history rather than on the row's
computation. ``MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=67108864``
in the environment keeps freed memory in the process and removes that term.

Usage::

    python benchmarks/profile_cpu_rows.py --net resnet20 --rows det,bbb-w,bq --reps 5
    python benchmarks/profile_cpu_rows.py --net mlp --kind pred --reps 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics

import torch

import harness as H  # noqa: E402  (sibling script)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="resnet20", choices=H.NETS)
    p.add_argument("--kind", default="train", choices=("train", "pred"))
    p.add_argument("--rows", default=None, help="comma-separated rows (default: all of the kind)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = H.train_rows(args.net) if args.kind == "train" else H.pred_rows(args.net)
    base = "det" if args.kind == "train" else "det x32"
    fns = {k: make() for k, make in H.select(rows, args.rows, base).items()}
    for fn in fns.values():
        fn()  # warm-up
    use = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, fn in fns.items():
            use[k].append(_usage(fn))
    med = {k: statistics.median(u + s for u, s, _ in v) for k, v in use.items()}
    user = {k: statistics.median(u for u, _, _ in v) for k, v in use.items()}
    faults = {k: statistics.median(f for _, _, f in v) for k, v in use.items()}
    print(f"# {args.net} {args.kind}: median process CPU of {args.reps} rounds, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"| row | CPU s | x `{base}` | user s | user x `{base}` | minor faults |\n|---|---:|---:|---:|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med[base]:.2f} | {user[k]:.3f} | {user[k] / user[base]:.2f} | {faults[k]:.0f} |")
    return med


def _usage(fn) -> tuple:
    """``(user s, system s, minor page faults)`` of the process during one call of ``fn``."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    fn()
    b = resource.getrusage(resource.RUSAGE_SELF)
    return b.ru_utime - a.ru_utime, b.ru_stime - a.ru_stime, b.ru_minflt - a.ru_minflt


if __name__ == "__main__":
    main()
