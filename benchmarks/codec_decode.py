"""Decoding speed of entropy-coded packed files against fixed-width ones, and their sizes.

Builds a JQ(4) LeNet-5 guide (bell-shaped random means, as trained weights are;
or ``--guide``, a trained float guide saved with
:func:`pyro_bq.recipes.save_meanfield_guide`), writes it fixed-width and with each
codec, and times in one process, round-robin (``--reps`` rounds, medians):
:func:`~pyro_bq.io.load_packed` of each file, and the raw code-stream decode
(:func:`pyro_bq.io.codec.decode` against :func:`pyro_bq.io.unpack_bits`) of the
guide's loc codes. Prints ratios against the fixed-width file of the same run, and
the sizes with the codes' entropy.

Usage::

    python benchmarks/codec_decode.py --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal, quantize
from pyro_bq.io import codec, load_packed, memory_report, pack_bits, save_packed, unpack_bits
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.quant import JQ
from pyro_bq.recipes import load_meanfield_guide


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--loc-std", type=float, default=0.05)
    p.add_argument("--guide", default=None, help="a trained float guide file (save_meanfield_guide)")
    p.add_argument("--codecs", nargs="+", default=["ans", "lzma", "zlib"], choices=list(codec.CODECS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(args) -> dict:
    torch.manual_seed(args.seed)
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=60_000)
    x = torch.zeros(2, 1, 28, 28)
    guide = load_meanfield_guide(args.guide, model, x) if args.guide else None
    if guide is None:
        guide = AutoMeanFieldNormal(model, init_scale=1e-2)
        guide(x)
        with torch.no_grad():
            guide.loc.copy_(torch.randn(guide.loc.shape) * args.loc_std)
    q = quantize(guide, JQ(args.bits))
    site = "net.fc1.weight"
    loc_q = q.quantizers[site].loc
    codes = loc_q.encode(q.base.get_loc_scale(site)[0].detach()).reshape(-1)
    packed = pack_bits(codes.numpy(), args.bits)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fixed": Path(tmp) / "fixed.bq"}
        sizes = {"fixed": save_packed(q, paths["fixed"])}
        for name in args.codecs:
            paths[name] = Path(tmp) / f"{name}.bq"
            sizes[name] = save_packed(q, paths[name], codec=name)
        load = {name: median_time(lambda p=p: load_packed(p, model), args.reps) for name, p in paths.items()}
    streams = {"fixed": median_time(lambda: unpack_bits(packed, codes.numel(), args.bits), args.reps)}
    for name in args.codecs:
        data, header = codec.encode(codes, 2**args.bits, name)
        streams[name] = median_time(lambda d=data, h=header: codec.decode(d, h), args.reps)
    report = memory_report(q, codec="ans")
    entropy = sum(s.entropy_bits for s in report.sites) / 8
    print(f"LeNet-5 JQ({args.bits}): {report.num_params} weights, code streams' entropy {entropy:.0f} B")
    print(f"{'file':8s} {'bytes':>9s} {'vs fixed':>9s} {'load_packed s':>14s} {'ratio':>7s} "
          f"{site + ' decode s':>26s} {'ratio':>7s}")
    for name in paths:
        print(f"{name:8s} {sizes[name]:9d} {sizes['fixed'] / sizes[name]:8.2f}x {load[name]:14.4f} "
              f"{load[name] / load['fixed']:6.2f}x {streams[name]:26.5f} {streams[name] / streams['fixed']:6.2f}x")
    return {"sizes": sizes, "load_s": load, "stream_s": streams}


if __name__ == "__main__":
    main(parse_args())
