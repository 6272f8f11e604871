"""A dataset held as two tensors, with seeded minibatch iteration."""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from pyro_bq._validation import check_int

__all__ = ["InMemoryDataset"]


class InMemoryDataset:
    """Inputs ``x`` and targets ``y`` in memory, iterated in minibatches by index.

    Usage::

        data = load_mnist(train=True)
        for xb, yb in data.batches(128, shuffle=True, seed=0):
            svi.step(xb, yb)
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str = "data"):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("x and y must be torch.Tensors")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}; they must match")
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
            idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return InMemoryDataset(self.x[idx], self.y[idx], name=self.name)

    def epoch_order(self, epoch: int, seed: int) -> torch.Tensor:
        """The shuffled index order of ``epoch``: a function of ``(seed, epoch)`` only."""
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        return torch.randperm(len(self), generator=gen)

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
        """Yield ``(x, y)`` minibatches; the order depends only on ``(seed, epoch)``."""
        batch_size = check_int("batch_size", batch_size, low=1)
        if indices is None:
            indices = self.epoch_order(epoch, seed) if shuffle else torch.arange(len(self))
        stop = len(indices) - (len(indices) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = indices[start : start + batch_size]
            yield self.x[idx], self.y[idx]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)
