"""Stochastic rounding of sampled weights against round to nearest, at 2-3 bits.

Trains a mean-field LeNet-5 on MNIST (``fit_meanfield_bnn``, ``init_scale=1e-3``
by default), quantizes every layer with each policy and each rounding rule
(every rule of ``ROUNDINGS``) and prints per row:
accuracy on MNIST test, the fraction of weights whose 16 draws are not all
equal, the fraction rounded stochastically (``memory_report``'s uniforms per
draw over the weights), the variance of the quantized draws over the posterior's (mean over
weights of the per-weight ratio of draw variance to ``scale**2``, from 64 draws,
and the same ratio of the totals), the mean mutual information on MNIST and
Fashion-MNIST and the AUROC of the MI for telling them apart.

Usage::

    python benchmarks/stochastic_rounding.py --data-dir ../shared/data                     # small: 5,000 images
    python benchmarks/stochastic_rounding.py --data-dir ../shared/data --train-limit 20000 --test-limit 2000
"""

from __future__ import annotations

import argparse
import warnings

import pyro
import torch

from pyro_bq.data import load_fashion_mnist, load_mnist
from pyro_bq.guides import DeterministicDrawsWarning, quantize
from pyro_bq.io import memory_report
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.priors import LayerwiseNormal
from pyro_bq.quant import FloatPolicy, make_policy
from pyro_bq.quant.grids import ROUNDINGS
from pyro_bq.recipes import fit_meanfield_bnn, load_meanfield_guide, save_meanfield_guide
from pyro_bq.uncertainty import evaluate


@torch.no_grad()
def variance_ratios(qguide, num_draws: int = 64, seed: int = 0) -> tuple[float, float]:
    """``(median over weights of Var[draw] / scale**2, sum of Var[draw] / sum of scale**2)`` over
    ``num_draws`` draws of every site (``scale``: the guide's, quantized for VPQ and JQ)."""
    pyro.set_rng_seed(seed)
    draws = qguide.sample_latents(num_draws)
    ratios, var_sum, s2_sum = [], 0.0, 0.0
    for name, d in draws.items():
        s2 = qguide.get_loc_scale(name)[1].double() ** 2
        v = d.double().var(0)
        ratios.append((v / s2.clamp(min=1e-30)).reshape(-1))
        var_sum += float(v.sum())
        s2_sum += float(s2.sum())
    return float(torch.cat(ratios).median()), var_sum / s2_sum


def _guide(args, model, train):
    guide = None
    key = {"train": args.train_limit, "epochs": args.epochs, "init_scale": args.init_scale, "seed": args.seed}
    if args.cache:
        guide = load_meanfield_guide(args.cache, model, train.x[:2], key=key)
    if guide is None:
        guide, _ = fit_meanfield_bnn(model, train, init_scale=args.init_scale, num_epochs=args.epochs, seed=args.seed,
                                     progress=False)
        if args.cache:
            save_meanfield_guide(args.cache, guide, key=key)
    return guide


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-limit", type=int, default=5000)
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--init-scale", type=float, default=1e-3)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--policies", default="float,spq2,jq3,jq2")
    p.add_argument("--roundings", default=",".join(ROUNDINGS))
    p.add_argument("--cache", default=None, help="a file to keep the trained guide in (reused when it exists)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    train = load_mnist(args.data_dir, train=True, limit=args.train_limit)
    test = load_mnist(args.data_dir, train=False, limit=args.test_limit)
    fashion = load_fashion_mnist(args.data_dir, train=False, limit=args.test_limit)
    model = BayesianClassifier(LeNet5(), LayerwiseNormal(1.0), len(train))
    guide = _guide(args, model, train)
    scales = guide.flat_loc_scale()[1].detach()
    print(f"trained: {args.train_limit} images, {args.epochs} epoch(s), init_scale {args.init_scale}; scale median "
          f"{scales.median():.2e}; test {args.test_limit} MNIST vs {args.test_limit} Fashion, {args.num_samples} draws")
    print(f"{'policy':8s} {'rounding':29s} {'acc':>7s} {'varying':>8s} {'SR':>7s} {'var/s2 med':>10s} "
          f"{'var/s2 tot':>10s} "
          f"{'MI MNIST':>10s} {'MI Fashion':>10s} {'AUROC MI':>9s}")
    for name in args.policies.split(","):
        for rounding in (("-",) if name == "float" else args.roundings.split(",")):
            policy = FloatPolicy() if name == "float" else make_policy(name[:-1], int(name[-1]), rounding=rounding)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeterministicDrawsWarning)
                qguide = quantize(guide, policy)
            record = evaluate(model, qguide, test, fashion, num_samples=args.num_samples, seed=args.seed)
            med, tot = variance_ratios(qguide, seed=args.seed)
            memory = memory_report(qguide)
            stochastic = memory.uniforms_per_draw / memory.num_params
            print(f"{name:8s} {rounding:29s} {record['accuracy']:7.4f} {record['varying_fraction']:8.2%} "
                  f"{stochastic:7.1%} {med:10.3g} "
                  f"{tot:10.3g} {record['epistemic_in']:10.2e} {record['epistemic_out']:10.2e} "
                  f"{record['auroc_mi']:9.4f}", flush=True)


if __name__ == "__main__":
    main()
