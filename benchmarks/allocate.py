"""Time the bit allocators (Quantile Inform, Random Bits) on LeNet-5 and ResNet-20 posteriors.

The baseline, measured in the same run, is one pass that reads every site's
(loc, scale) from the guide and computes ``|mu| / sigma`` for all weights.
LeNet-5 uses the cached MNIST-trained BNN of the mixed-precision example when
it exists; otherwise, and for ResNet-20, a synthetic posterior of the right
size (means ~ N(0, 0.1), scales ~ U(0.005, 0.05)). The script sets torch's
intra-op threads from ``--threads`` (default 1: the allocators are many
small tensor ops, and on a loaded 2-core machine two threads made them
30-100x slower); the library itself never changes the thread count. Timings on a shared machine are noisy: read the ratios.

Run::

    python benchmarks/allocate.py                  # both networks, target 3.2 bits
    python benchmarks/allocate.py --nets lenet5 --repeats 1 --rb-steps 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import pyro
import torch

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal, softplus_inverse
from pyro_bq.mixed import informativeness, posterior_params, quantile_inform, quantize_means, random_bits
from pyro_bq.models import BayesianClassifier, LeNet5, ResNet20
from pyro_bq.recipes import load_meanfield_guide

#: the BNN examples/mixed_precision_mnist.py trains and caches
EXAMPLE_CHECKPOINT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyro_bq/mixed/lenet5_mnist_bnn.bq"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="time the QI and RB bit allocators")
    p.add_argument("--nets", default="lenet5,resnet20")
    p.add_argument("--target", type=float, default=3.2)
    p.add_argument("--candidates", default="2-8")
    p.add_argument("--rb-steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the whole run")
    p.add_argument("--checkpoint", default=None, help="trained LeNet-5 cache (default: the example's)")
    p.add_argument("--synthetic", action="store_true", help="ignore the cached LeNet-5 posterior")
    return p


def _guide(net_name: str, checkpoint, synthetic: bool):
    pyro.clear_param_store()
    if net_name == "lenet5":
        if not synthetic:
            model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=60000)
            guide = load_meanfield_guide(checkpoint or EXAMPLE_CHECKPOINT, model, torch.zeros(2, 1, 28, 28))
            if guide is not None:
                return guide, "trained on MNIST"
        net, x = LeNet5(), torch.zeros(2, 1, 28, 28)
    elif net_name == "resnet20":
        net, x = ResNet20(), torch.zeros(2, 3, 32, 32)
    else:
        raise ValueError(f"unknown net {net_name!r}; use lenet5 or resnet20")
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=50000)
    guide = AutoMeanFieldNormal(model)
    guide.setup(x)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        guide.loc.copy_(0.1 * torch.randn(guide.loc.shape, generator=gen))
        guide.scale_raw.copy_(softplus_inverse(0.005 + 0.045 * torch.rand(guide.loc.shape, generator=gen)))
    return guide, "synthetic"


def _time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    lo, hi = (int(v) for v in args.candidates.split("-"))
    cand = range(lo, hi + 1)
    rows = []
    for net_name in [n.strip() for n in args.nets.split(",") if n.strip()]:
        guide, kind = _guide(net_name, args.checkpoint, args.synthetic)
        quantile_inform(guide, args.target, candidate_bits=cand)  # warm-up (imports, caches)
        random_bits(guide, args.target, candidate_bits=cand, num_steps=5)

        def baseline():
            return {n: informativeness(l, s) for n, (l, s) in posterior_params(guide).items()}

        base, _ = _time(baseline, max(args.repeats, 3))
        t_qiu, qiu = _time(lambda: quantile_inform(guide, args.target, candidate_bits=cand), args.repeats)
        t_qinu, qinu = _time(lambda: quantile_inform(guide, args.target, candidate_bits=cand, grid="gaussian"), args.repeats)
        def grid():
            return quantize_means(guide, qinu)

        t_grid, _ = _time(grid, args.repeats)
        t_rb, rb = _time(
            lambda: random_bits(guide, args.target, candidate_bits=cand, num_steps=args.rb_steps), max(1, args.repeats // 2)
        )
        n_w = guide.num_params
        print(f"\n{net_name}: {len(guide.sites)} sites, {n_w} weights ({kind} posterior), target {args.target}, "
              f"candidates {lo}-{hi}, {args.threads} thread(s)")
        print(f"{'step':<34}{'seconds':>10}{'x baseline':>12}{'mean bits':>11}")
        for label, t, alloc in (
            ("baseline: |mu|/sigma of all weights", base, None),
            ("QIU allocation", t_qiu, qiu),
            ("QINU allocation", t_qinu, qinu),
            ("QINU grid (Lloyd) + quantize", t_grid, None),
            (f"RB allocation ({args.rb_steps} steps)", t_rb, rb),
        ):
            mb = f"{alloc.mean_bits:.3f}" if alloc is not None else ""
            print(f"{label:<34}{t:>10.4f}{t / base:>12.1f}{mb:>11}")
            rows.append({"net": net_name, "step": label, "seconds": t, "ratio": t / base})
    return rows


if __name__ == "__main__":
    main(build_parser().parse_args())
