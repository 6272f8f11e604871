"""onnxruntime against pyro_bq: prediction time of a JQ(4) LeNet-5 BNN, and file sizes.

Times, in one process and round-robin (one call of each per round, ``--reps``
rounds; medians reported), the prediction of ``--num-samples`` weight draws over
``--num-images`` MNIST-shaped images:

* ``pyro_bq``: :func:`pyro_bq.uncertainty.predictive_probs` of the quantized guide (draws included);
* ``onnxruntime``: one session of :func:`pyro_bq.export.to_onnx`'s graph (noise drawn in the
  graph), fed in batches of ``--batch-size`` images.

It prints the ratio of the medians, then the sizes of the ``.onnx`` file, of the
point network, and of the packed ``.bq`` file (fixed width and ANS-coded). The
guide's means are bell-shaped random values (``--loc-std``), as trained weights are;
``--guide`` reads a trained float guide saved with :func:`pyro_bq.recipes.save_meanfield_guide` instead.

Usage::

    python benchmarks/onnx_predict.py --reps 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pyro_bq import IIDNormal
from pyro_bq.export import to_onnx, to_onnx_point
from pyro_bq.guides import AutoMeanFieldNormal, quantize
from pyro_bq.io import save_packed
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.quant import JQ
from pyro_bq.recipes import load_meanfield_guide
from pyro_bq.uncertainty import predictive_probs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250, help="images per onnxruntime call")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--loc-std", type=float, default=0.05)
    p.add_argument("--guide", default=None, help="a trained float guide file (save_meanfield_guide)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for option in ("num_samples", "num_images", "batch_size", "reps", "threads", "bits"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1")
    return args


def build(args):
    torch.manual_seed(args.seed)
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=60_000)
    x = torch.randn(args.num_images, 1, 28, 28)
    guide = load_meanfield_guide(args.guide, model, x[:2]) if args.guide else None
    if guide is None:
        guide = AutoMeanFieldNormal(model, init_scale=1e-2)
        guide(x[:2])
        with torch.no_grad():
            guide.loc.copy_(torch.randn(guide.loc.shape) * args.loc_std)
    return model, quantize(guide, JQ(args.bits)), x


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    model, qguide, x = build(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sizes = {"onnx": to_onnx(model, qguide, folder / "m.onnx", num_samples=args.num_samples,
                                 example_input=x[:1], noise="graph"),
                 "onnx point": to_onnx_point(model, qguide, folder / "p.onnx", example_input=x[:1]),
                 ".bq": save_packed(qguide, folder / "m.bq"),
                 ".bq (ANS)": save_packed(qguide, folder / "a.bq", codec="ans")}
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(folder / "m.onnx"), options, providers=["CPUExecutionProvider"])
    xs = x.numpy()

    def run_onnx():
        return np.concatenate([sess.run(["probs"], {"x": xs[i: i + args.batch_size]})[0]
                               for i in range(0, len(xs), args.batch_size)])

    def run_bq():
        return predictive_probs(model, qguide, x, num_samples=args.num_samples, seed=args.seed)

    rows = {"pyro_bq": run_bq, "onnxruntime": run_onnx}
    times = {name: [] for name in rows}
    for fn in rows.values():  # warm-up
        fn()
    for _ in range(args.reps):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"LeNet-5 JQ({args.bits}), {args.num_samples} draws x {args.num_images} images, {args.threads} thread(s), "
          f"median of {args.reps}")
    for name, t in med.items():
        print(f"  {name:12s} {t:8.3f} s  ({t / med['pyro_bq']:.2f}x pyro_bq)")
    print("file sizes:")
    for name, size in sizes.items():
        print(f"  {name:12s} {size:9d} B  ({size / sizes['.bq']:.2f}x the .bq file)")
    return {"seconds": med, "sizes": sizes}


if __name__ == "__main__":
    main(parse_args())
