"""A dataset held as two tensors, with seeded minibatch iteration."""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from pyro_bq._rng import epoch_generator
from pyro_bq._validation import check_bool, check_int, check_str

__all__ = ["InMemoryDataset"]

#: The largest seed a ``torch.Generator`` takes.
_MAX_SEED = 2**64 - 1


class InMemoryDataset:
    """Inputs ``x`` and targets ``y`` in memory, iterated in minibatches by index.

    Usage::

        data = load_mnist(train=True)
        for xb, yb in data.batches(128, shuffle=True, seed=0):
            svi.step(xb, yb)
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str = "data"):
        """
        :param x: inputs, one example per row (at least one row).
        :param y: targets, as many rows as ``x``.
        :param name: a label shown in ``repr``.
        :raises TypeError: if ``x`` or ``y`` is not a tensor or ``name`` is not a str.
        :raises ValueError: if ``x`` and ``y`` have different numbers of rows or none.
        """
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"x and y must be torch.Tensors, got {type(x).__name__} and {type(y).__name__}")
        if x.dim() == 0 or y.dim() == 0:
            raise ValueError(f"x and y must have one row per example, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}; they must match")
        if x.shape[0] == 0:
            raise ValueError("x and y hold no examples (0 rows); a dataset needs at least one")
        name = check_str("name", name, nonempty=False)
        self.x, self.y, self.name = x, y, name

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        return f"InMemoryDataset({self.name!r}, n={len(self)}, x={tuple(self.x.shape[1:])})"

    def subset(self, n: int, *, seed: Optional[int] = None) -> "InMemoryDataset":
        """The first ``n`` examples, or ``n`` random ones when ``seed`` is given."""
        n = check_int("n", n, low=1, high=len(self))
        if seed is None:
            idx = torch.arange(n)
        else:
            seed = check_int("seed", seed, low=0, high=_MAX_SEED)
            idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return InMemoryDataset(self.x[idx], self.y[idx], name=self.name)

    def epoch_order(self, epoch: int, seed: int) -> torch.Tensor:
        """The shuffled index order of ``epoch``: a function of ``(seed, epoch)`` only."""
        epoch = check_int("epoch", epoch, low=0)
        seed = check_int("seed", seed, low=0)
        return torch.randperm(len(self), generator=epoch_generator(seed, epoch))

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        indices: Optional[torch.Tensor] = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` minibatches; the order depends only on ``(seed, epoch)``.

        :param indices: a 1-D integer tensor of rows in ``[0, len(self))`` to iterate
            in this order instead (then ``shuffle``, ``seed`` and ``epoch`` are not used).
        """
        batch_size = check_int("batch_size", batch_size, low=1)
        shuffle = check_bool("shuffle", shuffle)
        seed = check_int("seed", seed, low=0)
        epoch = check_int("epoch", epoch, low=0)
        drop_last = check_bool("drop_last", drop_last)
        if indices is None:
            indices = self.epoch_order(epoch, seed) if shuffle else torch.arange(len(self))
        else:
            indices = self._check_indices(indices)
        return self._batches(batch_size, drop_last, indices)

    def _batches(self, batch_size: int, drop_last: bool, indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stop = len(indices) - (len(indices) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = indices[start : start + batch_size]
            yield self.x[idx], self.y[idx]

    def _check_indices(self, indices) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a 1-D integer torch.Tensor of rows or None, got {type(indices).__name__}")
        if indices.dim() != 1:
            raise ValueError(f"indices must be a 1-D tensor of rows, got shape {tuple(indices.shape)}")
        if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"indices must be an integer tensor of rows (e.g. torch.long), got dtype {indices.dtype}")
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= len(self):
                raise ValueError(f"indices must lie in [0, {len(self) - 1}] for {len(self)} examples, got values in [{lo}, {hi}]")
        return indices

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """The number of minibatches of ``batch_size`` per pass (a last partial one counts unless ``drop_last``)."""
        batch_size = check_int("batch_size", batch_size, low=1)
        drop_last = check_bool("drop_last", drop_last)
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)
