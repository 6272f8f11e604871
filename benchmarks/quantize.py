"""Time to quantize and bit-pack a guide of ResNet-18 size (about 11M weights, random values).

Prints wall-clock and CPU seconds of each step and ratios against a baseline
measured in the same run: writing the float guide's ``state_dict`` with
``torch.save``. Timings on a shared machine are noisy; run it a few times.

Usage::

    python benchmarks/quantize.py                 # JQ at 4 bits, default quantizers
    python benchmarks/quantize.py --bits 2 --policy vpq --threads 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal, quantize
from pyro_bq.io import memory_report, save_packed
from pyro_bq.models import BayesianClassifier
from pyro_bq.quant import make_policy


def build_guide(num_params: float):
    """A mean-field guide over an MLP with about ``num_params`` weights, filled with random values."""
    width = int(((num_params - 1024 * 512) / 3) ** 0.5)  # three width x width layers dominate
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 512), nn.ReLU(), nn.Linear(512, 10),
    )
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=50_000)
    guide = AutoMeanFieldNormal(model, init_scale=1e-2).setup(torch.zeros(2, width), torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        guide.loc.copy_(torch.randn(guide.loc.shape, generator=g) * 0.05)
        guide.scale_raw.copy_(torch.randn(guide.scale_raw.shape, generator=g) - 5.0)
    return model, guide


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(args=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=11.2e6)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--policy", default="jq", choices=["vpq", "spq", "jq"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(args)
    torch.set_num_threads(args.threads)

    model, guide = build_guide(args.params)
    n = guide.num_params
    policy = make_policy(args.policy, args.bits)
    folder = Path(tempfile.mkdtemp(prefix="bq-bench-"))
    rows = []
    for rep in range(args.repeat):
        _, bw, bc = timed(lambda: torch.save(guide.state_dict(), folder / "float.pt"))
        q, qw, qc = timed(lambda: quantize(guide, policy))
        size, pw, pc = timed(lambda: save_packed(q, folder / "q.bq"))
        rows.append((bw, bc, qw, qc, pw, pc, size))
    bw, bc, qw, qc, pw, pc, size = min(rows, key=lambda r: r[2] + r[4])
    float_size = os.path.getsize(folder / "float.pt")
    report = memory_report(q)
    print(f"guide: {n / 1e6:.2f}M weights, policy {policy!r}, {args.threads} threads (best of {args.repeat})")
    print(f"baseline torch.save(float state_dict): {bw:7.3f} s wall {bc:7.3f} s cpu  {float_size / 1e6:8.2f} MB")
    print(f"quantize (calibrate every site)      : {qw:7.3f} s wall {qc:7.3f} s cpu  ({qw / bw:5.2f}x baseline)")
    print(f"save_packed (encode, bit-pack, write): {pw:7.3f} s wall {pc:7.3f} s cpu  ({pw / bw:5.2f}x baseline)  "
          f"{size / 1e6:8.2f} MB")
    print(f"quantize + pack                      : {qw + pw:7.3f} s wall {qc + pc:7.3f} s cpu  "
          f"({(qw + pw) / bw:5.2f}x baseline); goal < 2 s")
    print(f"bits/param {report.bits_per_param:.3f}; packed file is 1/{float_size / size:.2f} of the float state_dict")
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
