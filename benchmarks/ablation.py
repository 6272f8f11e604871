"""Ablation of the SVI-step speed-ups, round-robin in one run (medians).

Rows (all: BayesianClassifier + AutoMeanFieldNormal + TraceMeanField_ELBO, batch 128):

* ``bq``                every speed-up (fused flat guide draw, scalar-parameter prior, no guide plates)
* ``bq no-validation``  the same with ``pyro.enable_validation(False)`` (the user's choice)
* ``per-site guide``    guide sampling each site separately (as before the fused draw)
* ``full-tensor prior`` prior ``Normal(zeros, zeros + 1)`` with full-size tensors (as before)
* ``det``               plain PyTorch step, the reference

Usage::

    python benchmarks/ablation.py --net mlp --reps 20
"""

import argparse
import os
import statistics
import sys

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BATCH, DATASET_SIZE, INIT_SCALE, LR, data, det_step, make_net, round_robin  # noqa: E402

from pyro_bq import IIDNormal, Prior  # noqa: E402
from pyro_bq.guides import AutoMeanFieldNormal  # noqa: E402
from pyro_bq.models import BayesianClassifier  # noqa: E402


class PerSiteGuide(AutoMeanFieldNormal):
    """Overrides get_loc_scale (same values), which disables the fused path."""

    def get_loc_scale(self, name):
        return super().get_loc_scale(name)


class FullTensorNormal(Prior):
    def distribution(self, module, module_name, param_name, param):
        zeros = torch.zeros_like(param)
        return dist.Normal(zeros, zeros + 1.0)


def step(net, prior, guide_cls, validation=True):
    model = BayesianClassifier(make_net(net), prior, DATASET_SIZE)
    guide = guide_cls(model, init_scale=INIT_SCALE)
    x, y = data(BATCH)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), TraceMeanField_ELBO())

    def run():
        with pyro.validation_enabled(validation):
            svi.step(x, y)

    return model, guide, run


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--net", default="mlp", choices=["lenet", "mlp"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {
        "bq": (IIDNormal(1.0), AutoMeanFieldNormal, True),
        "bq no-validation": (IIDNormal(1.0), AutoMeanFieldNormal, False),
        "per-site guide": (IIDNormal(1.0), PerSiteGuide, True),
        "full-tensor prior": (FullTensorNormal(), AutoMeanFieldNormal, True),
    }
    fns = {"det": det_step(args.net)}
    for name, (prior, guide_cls, val) in rows.items():
        # the guides' parameters ("loc", "scale_raw") share Pyro's global param store;
        # for timing that is harmless (same shapes, same operations)
        _, _, fns[name] = step(args.net, prior, guide_cls, val)
    times = round_robin(fns, args.reps, 2)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"| {args.net} variant | median ms | x det | x bq |\n|---|---:|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.2f} | {v / med['det']:.2f} | {v / med['bq']:.2f} |")


if __name__ == "__main__":
    main()
