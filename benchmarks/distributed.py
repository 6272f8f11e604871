"""Throughput of data-parallel SVI: 1 versus 2 CPU processes (gloo), 1 thread each.

Trains the Bayesian LeNet-5 of ``examples/train_distributed.py`` with
:func:`~pyro_bq.inference.fit_svi` on real MNIST, launched by ``torchrun``,
and times ``--steps`` optimizer steps after ``--warmup`` steps. Printed:
images/s, the ratio to the 1-process baseline measured in the same run, and
the scaling efficiency ``ratio / processes``, for

* strong scaling: the same global batch split across the processes (each
  2-process step is the 1-process step, see tests/test_distributed.py);
* weak scaling: the per-process batch fixed, so the global batch doubles;

plus the seconds per step each rank spends in the gradient all-reduce.

CPU only (gloo): no GPU in this setting. On a shared machine the timings are
noisy; repeat with ``--repeats``.

Usage::

    python benchmarks/distributed.py --data-dir /work/shared/data
    python benchmarks/distributed.py --data-dir DATA --steps 60 --batch-size 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import pyro.optim
import torch
import torch.distributed as dist

from pyro_bq import IIDNormal
from pyro_bq.data import load_mnist
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import fit_svi
from pyro_bq.inference.distributed import destroy_distributed, init_distributed
from pyro_bq.models import BayesianClassifier, LeNet5

HERE = Path(__file__).resolve()


def worker(args) -> None:
    """One rank under torchrun: train, time the steps after the warm-up, rank 0 writes JSON."""
    torch.set_num_threads(1)
    info = init_distributed("gloo", timeout=300)
    comm = [0.0]
    if info.distributed:
        honest = dist.all_reduce

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return honest(*a, **kw)
            finally:
                comm[0] += time.perf_counter() - t

        dist.all_reduce = timed
    train = load_mnist(args.data_dir, train=True, limit=args.train_size)
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train))
    guide = AutoMeanFieldNormal(model, init_scale=1e-3)
    marks = {}

    def callback(step, loss):
        if step in (args.warmup, args.warmup + args.steps):
            marks[step] = (time.perf_counter(), comm[0])

    fit_svi(
        model, guide, train, num_steps=args.warmup + args.steps, batch_size=args.batch_size,
        optim=pyro.optim.Adam({"lr": 1e-3}), progress=False, callback=callback,
    )
    (t0, c0), (t1, c1) = marks[args.warmup], marks[args.warmup + args.steps]
    seconds = t1 - t0
    if info.is_main:
        Path(args.result).write_text(json.dumps({
            "world_size": info.world_size,
            "batch_size": args.batch_size,
            "seconds": seconds,
            "images_per_s": args.steps * args.batch_size / seconds,
            "allreduce_s_per_step": (c1 - c0) / args.steps,
        }))
    destroy_distributed()


def launch(nproc: int, batch_size: int, args) -> dict:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            torchrun, "--standalone", f"--nproc_per_node={nproc}", str(HERE), "--worker",
            "--data-dir", str(args.data_dir), "--train-size", str(args.train_size), "--batch-size", str(batch_size),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--result", str(result),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("PYRO_BQ_DATA"), help="folder with MNIST/raw/")
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=128, help="global batch of the 1-process baseline")
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("train_size", "batch_size", "steps", "warmup", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.worker:
        worker(args)
        return []
    if args.data_dir is None:
        raise ValueError("--data-dir (or $PYRO_BQ_DATA) is required: the folder with MNIST/raw/")
    print(f"data-parallel SVI, Bayesian LeNet-5 on {args.train_size} MNIST images, gloo on CPU, 1 thread per "
          f"process, {os.cpu_count()} CPU cores (shared: timings are noisy); no GPU")
    rows = []
    for rep in range(args.repeats):
        base = launch(1, args.batch_size, args)
        strong = launch(2, args.batch_size, args)
        weak = launch(2, 2 * args.batch_size, args)
        for label, r in (("1 process (baseline)", base), ("2 processes, same global batch", strong),
                         ("2 processes, same per-process batch", weak)):
            ratio = r["images_per_s"] / base["images_per_s"]
            rows.append({"repeat": rep, "label": label, **r, "ratio": ratio, "efficiency": ratio / r["world_size"]})
    print(f"{'run':38s} {'batch':>6s} {'images/s':>9s} {'vs 1 proc':>9s} {'efficiency':>10s} {'all-reduce s/step':>17s}")
    for r in rows:
        print(f"{r['label']:38s} {r['batch_size']:6d} {r['images_per_s']:9.1f} {r['ratio']:8.2f}x "
              f"{r['efficiency']:9.0%} {r['allreduce_s_per_step']:17.4f}")
    return rows


if __name__ == "__main__":
    main()
