"""Mixed-precision pretraining: a ``pretrain`` step in float32 against ``autocast=torch.bfloat16``.

The step is the one :func:`pyro_bq.recipes.pretrain` takes (cross entropy under
``torch.autocast`` when asked, backward, Adam), on random batches of the
network's input shape. Both precisions are timed round-robin in one process
(wall clock, medians of ``--reps`` after one warm-up step each), and the script
prints the bfloat16 time as a ratio of the float32 time measured in the same
run. On CPUs without bfloat16 units (no AMX or AVX-512 BF16) the ratio can be
above 1.

Usage::

    python benchmarks/autocast_pretrain.py --nets resnet20,lenet --reps 10
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pyro_bq.models import LeNet5, ResNet20

NETS = {
    "resnet20": lambda: ResNet20(num_classes=10, in_channels=1),
    "lenet": LeNet5,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="resnet20,lenet", help=f"comma-separated, from {','.join(NETS)}")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p


def _step(net, opt, x, y, dtype) -> None:
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def time_net(name: str, args) -> dict:
    """Median seconds per step of each precision, timed round-robin."""
    torch.manual_seed(args.seed)
    net = NETS[name]().to(args.device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(args.batch, 1, 28, 28, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    rows = {"float32": None, "bfloat16": torch.bfloat16}
    times = {k: [] for k in rows}
    for dtype in rows.values():
        _step(net, opt, x, y, dtype)
    for _ in range(args.reps):
        for key, dtype in rows.items():
            t = time.perf_counter()
            _step(net, opt, x, y, dtype)
            times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    for name in args.nets.split(","):
        if name not in NETS:
            raise SystemExit(f"--nets: unknown net {name!r}; choose from {', '.join(NETS)}")
        med = time_net(name, args)
        out[name] = med
        print(f"{name:9s} batch {args.batch}: float32 {med['float32']:.4f} s/step, bfloat16 "
              f"{med['bfloat16']:.4f} s/step = {med['bfloat16'] / med['float32']:.2f}x float32")
    return out


if __name__ == "__main__":
    main()
