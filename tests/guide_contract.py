"""The shared contract every guide (and every quantization policy's guide) passes.

Each area registers factories in a ``tests/factories_*.py`` module as a list
``FACTORIES`` of :class:`GuideCase`. ``tests/test_guide_contract.py`` runs the
same checks on all of them: shapes, median, quantiles, vectorized samples,
Predictive, an SVI step with both ELBOs, state_dict save/load, and the exact
conjugate posterior where the case says one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class GuideCase:
    """A named factory ``make() -> (model, guide, x, y)``.

    ``trainable``: SVI steps must run (False for post-hoc guides that are not
    meant to be trained). ``conjugate``: a callable ``() -> None`` that fits the
    guide on a conjugate Bayesian linear regression and asserts the exact
    posterior (None where the family cannot represent it).
    ``reload``: ``(guide, path) -> guide`` saving and loading the guide in the
    guide's own format; default: ``state_dict`` round trip into a fresh ``make()``.
    """

    name: str
    make: Callable[[], tuple]
    trainable: bool = True
    mean_field_kl: bool = True
    conjugate: Optional[Callable[[], None]] = None
    reload: Optional[Callable] = None
    exact_median: bool = True
    tags: set = field(default_factory=set)


def tiny_classifier(net_name: str = "mlp", n: int = 32, seed: int = 0):
    """A small BayesianClassifier with inputs shaped like MNIST (random pixels)."""
    import pyro

    from pyro_bq import IIDNormal
    from pyro_bq.models import MLP, BayesianClassifier, LeNet5

    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    net = MLP((784, 16, 10)) if net_name == "mlp" else LeNet5()
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=100)
    x = torch.randn(n, 1, 28, 28)
    y = torch.randint(0, 10, (n,))
    return model, x, y


def spread_guide(scale: float, net_name: str = "mlp"):
    """``(model, guide, x, y)``: :func:`tiny_classifier` (64 inputs) with a mean-field guide whose
    every scale is ``scale`` and whose locs are spread uniformly over [-1, 1] (seeded)."""
    from pyro_bq.guides import AutoMeanFieldNormal

    model, x, y = tiny_classifier(net_name, n=64)
    guide = AutoMeanFieldNormal(model, init_scale=scale)
    guide(x, y)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        guide.loc.copy_(torch.rand(guide.loc.shape, generator=gen) * 2 - 1)
    return model, guide, x, y


def float_guide(net_name: str = "mlp", n: int = 32):
    """``(model, guide, x, y)``: :func:`tiny_classifier` with a set-up mean-field guide (scale 0.05)."""
    from pyro_bq.guides import AutoMeanFieldNormal

    model, x, y = tiny_classifier(net_name, n=n)
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    guide(x, y)
    return model, guide, x, y


def packed_reload(guide, path):
    """A guide saved with :func:`pyro_bq.io.save_packed` and read back with :func:`pyro_bq.io.load_packed`."""
    from pyro_bq.io import load_packed, save_packed

    save_packed(guide, path)
    return load_packed(path, guide.model)
