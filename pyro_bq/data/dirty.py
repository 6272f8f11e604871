"""Dirty-MNIST: MNIST plus Ambiguous-MNIST, with Fashion-MNIST as the OOD set.

The training set is MNIST's training split followed by Ambiguous-MNIST's
training split; the three test sets are MNIST (in-distribution, clean),
Ambiguous-MNIST (in-distribution, high aleatoric uncertainty) and Fashion-MNIST
(out of distribution, high epistemic uncertainty). All share MNIST's
normalisation.

``noise_std`` adds Gaussian noise of that standard deviation to the
normalised images, as the published Dirty-MNIST reader does with 0.05
(:data:`~pyro_bq.data.ambiguous.DDU_NOISE_STD`); it is off by default. Here the
noise is drawn from a seeded generator, and the test sets all get it (Fashion
too), so an OOD set is not told apart by the noise alone.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from pyro_bq._validation import check_float, check_int

from .ambiguous import AmbiguousConfig, load_ambiguous_mnist
from .dataset import InMemoryDataset
from .mnist import load_fashion_mnist, load_mnist

__all__ = ["DirtyMNIST", "dirty_mnist_test_sets", "TEST_SETS", "add_noise"]

#: Names of the three Dirty-MNIST test sets, in report order.
TEST_SETS = ("mnist", "ambiguous", "fashion")

PathLike = Union[str, os.PathLike]


def add_noise(data: InMemoryDataset, std: float, seed: int) -> InMemoryDataset:
    """A copy of ``data`` with N(0, ``std``) noise added to ``x`` (drawn from ``seed``); ``std=0``: ``data`` itself.

    Usage::

        noisy = add_noise(load_mnist(train=False), 0.05, seed=0)
    """
    std = check_float("noise_std", std, low=0.0)
    seed = check_int("seed", seed, low=0)
    if std == 0.0:
        return data
    gen = torch.Generator().manual_seed(seed)
    return InMemoryDataset(data.x + torch.randn(data.x.shape, generator=gen, dtype=data.x.dtype) * std, data.y,
                           name=data.name)


def _limit(data: InMemoryDataset, n: Optional[int], seed: int, name: str) -> InMemoryDataset:
    if n is None or n >= len(data):
        return data
    return data.subset(check_int(name, n, low=1), seed=seed)


class DirtyMNIST(InMemoryDataset):
    """The Dirty-MNIST training (or test) split: MNIST rows, then Ambiguous-MNIST rows.

    :param root: data root holding ``MNIST/raw`` (and optionally the original
        Ambiguous-MNIST files, see :func:`~pyro_bq.data.ambiguous.load_ambiguous_mnist`).
    :param train: training or test split.
    :param cache_dir: cache of the generated Ambiguous-MNIST.
    :param source: ``"auto"``, ``"original"`` or ``"generated"`` Ambiguous-MNIST.
    :param config: generator settings (:class:`~pyro_bq.data.ambiguous.AmbiguousConfig`).
    :param mnist_limit: keep a random subset of this many MNIST rows (seeded).
    :param ambiguous_limit: keep a random subset of this many Ambiguous-MNIST rows.
    :param seed: seed of the subsets and of the noise.
    :param noise_std: Gaussian noise added to the normalised images (0: none).

    ``is_ambiguous`` is a boolean vector marking the Ambiguous-MNIST rows.

    Usage::

        train = DirtyMNIST("data", train=True, cache_dir="cache")
        for xb, yb in train.batches(128, shuffle=True):
            ...
    """

    def __init__(
        self,
        root: Optional[PathLike] = None,
        train: bool = True,
        *,
        cache_dir: Optional[PathLike] = None,
        source: str = "auto",
        config: Optional[AmbiguousConfig] = None,
        mnist_limit: Optional[int] = None,
        ambiguous_limit: Optional[int] = None,
        seed: int = 0,
        normalize: bool = True,
        progress: bool = True,
        noise_std: float = 0.0,
    ):
        if not isinstance(train, bool):
            raise TypeError(f"train must be a bool, got {type(train).__name__}")
        seed = check_int("seed", seed, low=0)
        mnist = _limit(load_mnist(root, train=train, normalize=normalize), mnist_limit, seed, "mnist_limit")
        amb = load_ambiguous_mnist(
            root, train, cache_dir=cache_dir, source=source, config=config, normalize=normalize, progress=progress
        )
        amb = _limit(amb, ambiguous_limit, seed + 1, "ambiguous_limit")
        noise_std = check_float("noise_std", noise_std, low=0.0)
        mnist, amb = add_noise(mnist, noise_std, seed + 2), add_noise(amb, noise_std, seed + 3)
        x = torch.cat([mnist.x, amb.x])
        y = torch.cat([mnist.y, amb.y])
        super().__init__(x, y, name=f"DirtyMNIST-{'train' if train else 'test'}")
        self.is_ambiguous = torch.cat([torch.zeros(len(mnist), dtype=torch.bool), torch.ones(len(amb), dtype=torch.bool)])
        self.num_mnist, self.num_ambiguous = len(mnist), len(amb)


def dirty_mnist_test_sets(
    root: Optional[PathLike] = None,
    *,
    cache_dir: Optional[PathLike] = None,
    source: str = "auto",
    config: Optional[AmbiguousConfig] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    normalize: bool = True,
    progress: bool = True,
    noise_std: float = 0.0,
) -> dict[str, InMemoryDataset]:
    """The three Dirty-MNIST test sets ``{"mnist", "ambiguous", "fashion"}``.

    :param limit: keep a seeded random subset of at most ``limit`` rows of each.
    :param noise_std: Gaussian noise added to every set's normalised images (0: none).

    Usage::

        tests = dirty_mnist_test_sets("data", cache_dir="cache", limit=2000)
        x_ood = tests["fashion"].x
    """
    seed = check_int("seed", seed, low=0)
    noise_std = check_float("noise_std", noise_std, low=0.0)
    if limit is not None:
        limit = check_int("limit", limit, low=1)
    sets = {
        "mnist": load_mnist(root, train=False, normalize=normalize),
        "ambiguous": load_ambiguous_mnist(
            root, False, cache_dir=cache_dir, source=source, config=config, normalize=normalize, progress=progress
        ),
        "fashion": load_fashion_mnist(root, train=False, normalize=normalize),
    }
    return {k: add_noise(_limit(v, limit, seed + i, "limit"), noise_std, seed + 10 + i) for i, (k, v) in enumerate(sets.items())}
