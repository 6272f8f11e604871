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
``--isolated`` removes it the other way: every row runs in a fresh process of
its own (per round, rows in turn), so no row inherits another's allocator state;
each process warms up, then times ``--calls`` calls and reports their median.

Usage::

    python benchmarks/profile_cpu_rows.py --net resnet20 --rows det,bbb-w,bq --reps 5
    python benchmarks/profile_cpu_rows.py --net mlp --kind pred --reps 5
    python benchmarks/profile_cpu_rows.py --net resnet20 --rows det,bbb-w,bt,bq --reps 3 --isolated
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch

import harness as H  # noqa: E402  (sibling script)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="resnet20", choices=H.NETS)
    p.add_argument("--kind", default="train", choices=("train", "pred"))
    p.add_argument("--rows", default=None, help="comma-separated rows (default: all of the kind)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--isolated", action="store_true", help="each row in a fresh process per round")
    p.add_argument("--calls", type=int, default=9, help="timed calls per process (--isolated)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per process first (--isolated)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = H.train_rows(args.net) if args.kind == "train" else H.pred_rows(args.net)
    base = "det" if args.kind == "train" else "det x32"
    if args.child is not None:
        return _child(rows, args)
    if args.isolated:
        use = _isolated(list(H.select(rows, args.rows, base)), args)
    else:
        use = _round_robin({k: make() for k, make in H.select(rows, args.rows, base).items()}, args.reps)
    med = {k: statistics.median(u + s for u, s, _ in v) for k, v in use.items()}
    user = {k: statistics.median(u for u, _, _ in v) for k, v in use.items()}
    faults = {k: statistics.median(f for _, _, f in v) for k, v in use.items()}
    how = f"a fresh process per row and round, median of {args.calls} calls each" if args.isolated else "one process"
    print(f"# {args.net} {args.kind}: median process CPU of {args.reps} rounds ({how}), {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"| row | CPU s | x `{base}` | user s | user x `{base}` | minor faults |\n|---|---:|---:|---:|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med[base]:.2f} | {user[k]:.3f} | {user[k] / user[base]:.2f} | {faults[k]:.0f} |")
    return med


def _round_robin(fns: dict, reps: int) -> dict:
    """``{row: [(user, system, faults), ...]}``: the rows called in turn in this process."""
    for fn in fns.values():
        fn()  # warm-up
    use = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            use[k].append(_usage(fn))
    return use


def _isolated(names: list, args) -> dict:
    """``{row: [(user, system, faults) per round]}``, each from a fresh child process."""
    use = {k: [] for k in names}
    for _ in range(args.reps):
        for k in names:
            cmd = [sys.executable, os.path.abspath(__file__), "--net", args.net, "--kind", args.kind,
                   "--threads", str(args.threads), "--calls", str(args.calls), "--warmup", str(args.warmup), "--child", k]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            use[k].append(tuple(json.loads(out.strip().splitlines()[-1])))
    return use


def _child(rows: dict, args) -> tuple:
    """In a child process: build row ``args.child``, warm up, print the median call's ``[user, system, faults]``."""
    fn = H.select(rows, args.child, args.child)[args.child]()
    for _ in range(args.warmup):
        fn()
    calls = sorted((_usage(fn) for _ in range(args.calls)), key=lambda t: t[0] + t[1])
    mid = calls[len(calls) // 2]
    print(json.dumps(list(mid)))
    return mid


def _usage(fn) -> tuple:
    """``(user s, system s, minor page faults)`` of the process during one call of ``fn``."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    fn()
    b = resource.getrusage(resource.RUSAGE_SELF)
    return b.ru_utime - a.ru_utime, b.ru_stime - a.ru_stime, b.ru_minflt - a.ru_minflt


if __name__ == "__main__":
    main()
