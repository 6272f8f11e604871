"""Data-parallel SVI of a Bayesian LeNet-5 (or MLP) on MNIST with torch.distributed.

One process (plain python) or many (torchrun); the model, the guide and the
``fit_svi`` call are the same either way:

    python examples/train_distributed.py --data-dir /work/shared/data --num-steps 50
    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --data-dir /work/shared/data
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 4 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 --rdzv_id run1 examples/train_distributed.py --data-dir DATA

``--batch-size`` is the global batch: each of N ranks gets 1/N of it. Only
rank 0 prints and writes checkpoints (and ``--out``). Backend: ``nccl`` with
CUDA, else ``gloo``; ``--backend`` overrides.

Usage::

    from examples.train_distributed import main
    summary = main(["--data-dir", "/work/shared/data", "--num-steps", "20"])
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import pyro
import pyro.optim
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal

from pyro_bq import IIDNormal
from pyro_bq.data import load_mnist
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import fit_svi
from pyro_bq.inference.distributed import BACKENDS, destroy_distributed, init_distributed
from pyro_bq.io import save_checkpoint
from pyro_bq._validation import resolve_device
from pyro_bq.models import MLP, BayesianClassifier, LeNet5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with MNIST/raw/ (default: $PYRO_BQ_DATA)")
    p.add_argument("--train-size", type=int, default=2000, help="first N training images (default 2000)")
    p.add_argument("--num-steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size, split across ranks (default 128)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optim", choices=("adam", "sgd"), default="adam")
    p.add_argument("--net", choices=("lenet5", "mlp"), default="lenet5")
    p.add_argument("--hidden", type=int, default=100, help="hidden units of --net mlp")
    p.add_argument("--guide", choices=("meanfield", "autonormal", "autodelta"), default="meanfield",
                   help="pyro_bq's AutoMeanFieldNormal, or stock Pyro's AutoNormal or AutoDelta (MAP)")
    p.add_argument("--init-scale", type=float, default=1e-3, help="initial posterior scale of each weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (rank 0 writes; resumes from it)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available); with torchrun "
                   "and cuda each rank takes the GPU of its LOCAL_RANK")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a missing or dead rank is an error")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--out", default=None, help="rank 0 saves the trained guide and the losses here (.bq)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check(args) -> None:
    resolve_device(args.device, name="--device")
    for name in ("train_size", "num_steps", "batch_size", "checkpoint_every", "threads", "hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr", "init_scale", "timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")


def build(args, dataset_size: int, device: torch.device):
    """The model and guide of the run (the same on every rank)."""
    torch.manual_seed(args.seed)
    net = LeNet5() if args.net == "lenet5" else MLP((784, args.hidden, 10))
    model = BayesianClassifier(net.to(device), IIDNormal(1.0), dataset_size=dataset_size)
    if args.guide == "meanfield":
        guide = AutoMeanFieldNormal(model, init_scale=args.init_scale)
    elif args.guide == "autonormal":
        guide = AutoNormal(model, init_scale=args.init_scale)
    else:
        guide = AutoDelta(model)
    return model, guide


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the training; returns a summary dict (on every rank)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
    except (TypeError, ValueError) as err:
        parser.error(str(err))  # one line and exit status 2, no traceback
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, name="--device")
    info = init_distributed(args.backend or ("nccl" if device.type == "cuda" else "gloo"), timeout=args.timeout)
    try:
        device = info.device if info.backend == "nccl" else device
        train = load_mnist(args.data_dir, train=True, limit=args.train_size)
        if device.type != "cpu":
            train = type(train)(train.x.to(device), train.y.to(device), name=train.name)
        pyro.clear_param_store()
        model, guide = build(args, len(train), device)
        optim = (pyro.optim.Adam if args.optim == "adam" else pyro.optim.SGD)({"lr": args.lr})
        start = time.perf_counter()
        result = fit_svi(
            model,
            guide,
            train,
            num_steps=args.num_steps,
            batch_size=args.batch_size,
            optim=optim,
            seed=args.seed,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            progress=not args.no_progress,
        )
        seconds = time.perf_counter() - start
        summary = {
            "rank": info.rank,
            "world_size": info.world_size,
            "backend": info.backend or "none",
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "seconds": seconds,
            "final_loss": result.losses[-1] if result.losses else float("nan"),
        }
        if info.is_main:
            print(
                f"world_size={info.world_size} backend={summary['backend']} steps={result.steps} "
                f"final loss/example={summary['final_loss']:.4f} time={seconds:.2f}s"
                + (f" resumed_from={result.resumed_from}" if result.resumed_from else ""),
                flush=True,
            )
            if args.out:
                save_checkpoint(
                    args.out,
                    {
                        "guide": {k: v.detach().cpu() for k, v in guide.state_dict().items()},
                        "losses": list(result.losses),
                        "steps": result.steps,
                        "world_size": info.world_size,
                        "seconds": seconds,
                        "resumed_from": result.resumed_from or "",
                    },
                )
        return summary
    finally:
        destroy_distributed()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
