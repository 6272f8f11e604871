"""Collapsed draws: how much of a quantized guide still varies, and what that does to the mutual information.

Trains a mean-field LeNet-5 on MNIST as a new user would (``fit_meanfield_bnn``
with its defaults: ``init_scale=1e-3``, one learning rate), quantizes every
layer with each policy, and prints per policy: accuracy on MNIST test, the
fraction of weights whose 16 draws are not all equal
(:func:`~pyro_bq.guides.varying_fraction`), the mean mutual information on
MNIST and Fashion-MNIST and the AUROC of the MI for telling them apart.

Usage::

    python benchmarks/collapsed_draws.py --data-dir ../shared/data                     # small: 5,000 images, 1 epoch
    python benchmarks/collapsed_draws.py --data-dir ../shared/data --train-limit 60000 --epochs 3 --test-limit 10000
"""

from __future__ import annotations

import argparse
import warnings

import torch

from pyro_bq.data import load_fashion_mnist, load_mnist
from pyro_bq.guides import DeterministicDrawsWarning, quantize, varying_fraction
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.priors import LayerwiseNormal
from pyro_bq.quant import FloatPolicy, make_policy
from pyro_bq.recipes import fit_meanfield_bnn
from pyro_bq.uncertainty import evaluate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-limit", type=int, default=5000)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--init-scale", type=float, default=1e-3)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--policies", default="float,vpq2,spq2,jq2,jq3,jq4")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    train = load_mnist(args.data_dir, train=True, limit=args.train_limit)
    test = load_mnist(args.data_dir, train=False, limit=args.test_limit)
    fashion = load_fashion_mnist(args.data_dir, train=False, limit=args.test_limit)
    model = BayesianClassifier(LeNet5(), LayerwiseNormal(1.0), len(train))
    guide, _ = fit_meanfield_bnn(model, train, init_scale=args.init_scale, num_epochs=args.epochs, seed=args.seed,
                                 progress=False)
    scales = guide.flat_loc_scale()[1].detach()
    print(f"trained: {args.train_limit} images, {args.epochs} epoch(s); scale median {scales.median():.2e}, "
          f"90th percentile {scales.quantile(0.9):.2e}")
    print(f"{'policy':8s} {'acc':>7s} {'varying':>8s} {'MI MNIST':>10s} {'MI Fashion':>10s} {'AUROC MI':>9s}  "
          "sites below 1%")
    for name in args.policies.split(","):
        policy = FloatPolicy() if name == "float" else make_policy(name[:-1], int(name[-1]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeterministicDrawsWarning)
            qguide = quantize(guide, policy)
        record = evaluate(model, qguide, test, fashion, num_samples=args.num_samples, seed=args.seed)
        fractions = varying_fraction(qguide)
        low = [s.split(".", 1)[1] for s, f in fractions.items() if f < 0.01]
        print(f"{name:8s} {record['accuracy']:7.4f} {record['varying_fraction']:8.2%} {record['epistemic_in']:10.2e} "
              f"{record['epistemic_out']:10.2e} {record['auroc_mi']:9.4f}  {','.join(low) or '-'}"
              + ("  (warned)" if caught else ""))


if __name__ == "__main__":
    main()
