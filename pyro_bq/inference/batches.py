"""Any data as epochs of checked ``(x, y)`` batches on a device: the one place that reads a data argument.

:func:`as_batches` turns what a user passes as data into a :class:`Batches`:

* an in-memory dataset (tensors ``.x``, ``.y`` and ``epoch_order(epoch, seed)``,
  e.g. :class:`pyro_bq.data.InMemoryDataset`), cut into batches of ``batch_size``;
* a ``torch.utils.data.DataLoader`` (its own batch size, collate, workers, pinning);
* any re-iterable of ``(x, y)`` batches (a list, an object whose ``__iter__``
  starts a new pass each time). A one-shot iterator (a generator) is refused:
  a second epoch would be empty.

**Dataset size** (the ``N`` that scales a minibatch likelihood): ``dataset_size=``
when given, else ``len(data)`` of an in-memory dataset, else
``len(loader.dataset)`` when the loader's dataset has a length. Otherwise it is
``None``, and :meth:`Batches.require_size` raises a ``ValueError`` that asks for
``dataset_size=``.

**Order.** An in-memory dataset is shuffled with ``epoch_order(epoch, seed)``. A
DataLoader is made a function of ``(seed, epoch)`` at the start of each epoch:
a ``RandomSampler`` (``shuffle=True``) draws from a generator seeded with
:func:`pyro_bq._rng.epoch_seed` ``(seed, epoch)`` for that epoch (its own
generator is put back afterwards), so a shuffled DataLoader over a
``TensorDataset`` yields exactly the batches of the in-memory dataset with the
same seed; a sampler with ``set_epoch`` (``DistributedSampler``) gets the epoch;
the loader's ``generator``, when it has one, is re-seeded from ``(seed, epoch)``,
which fixes the worker seeds and so random augmentations in workers. Starting an
epoch never draws from torch's global RNG (the weight noise stays the same
whatever the loader). A plain iterable must give the same batches on each pass,
or at least an order that depends only on how many passes came before.

**Resume.** :meth:`Batches.epoch` with ``skip=k`` starts an epoch at its batch
``k``: an in-memory dataset jumps there; a loader or iterable loads and discards
``k`` batches, with torch's global RNG put back afterwards (random transforms run
in the main process do not shift the run's RNG).

**Checks.** Every batch is checked before use, with one device synchronization:
``(x, y)`` tensors with as many rows, each ``x`` row shaped like the first
batch's, no NaN/inf in ``x`` (or a floating ``y``), integer labels in
``[0, num_classes)``. A failure raises :class:`BatchError` (a ``ValueError``;
:class:`NonFiniteBatchError` for NaN/inf) naming the epoch, the batch index and
what is wrong.

**Device.** Batches move to ``device`` with ``non_blocking=True`` when the loader
pins memory (``pin_memory=True``) or the tensors are pinned.

Usage::

    batches = as_batches(DataLoader(ds, batch_size=128, shuffle=True), device="cuda")
    n = batches.require_size("fit_svi")
    for index, xb, yb in batches.epoch(0, seed=0):
        ...
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from pyro_bq._rng import epoch_generator, epoch_seed
from pyro_bq._validation import check_int, resolve_device

__all__ = ["as_batches", "Batches", "BatchError", "NonFiniteBatchError", "NonFiniteError", "is_in_memory",
           "module_device", "same_device", "module_mode"]


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN or infinite during training, or the model
    failed on a minibatch that holds NaN or infinite values."""


class BatchError(ValueError):
    """A batch of the data is malformed (shape, labels); the message names its epoch and index."""


class NonFiniteBatchError(BatchError, NonFiniteError):
    """A batch of the data holds NaN or infinite values; the message names its epoch, index and rows."""


def is_in_memory(data) -> bool:
    """True for a dataset with tensors ``.x``, ``.y`` and a method ``epoch_order(epoch, seed)``."""
    return (isinstance(getattr(data, "x", None), torch.Tensor) and isinstance(getattr(data, "y", None), torch.Tensor)
            and callable(getattr(data, "epoch_order", None)))


def module_device(*modules, default: str = "cpu") -> torch.device:
    """The device of the first parameter or buffer of ``modules`` (``default`` when they have none).

    Usage::

        device = module_device(model)     # where the model's weights are
    """
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for t in module.parameters():
                return t.device
            for t in module.buffers():
                return t.device
    return torch.device(default)


@contextlib.contextmanager
def module_mode(module, training: bool):
    """Put every submodule of ``module`` in training (``True``) or eval mode, and each back in its own mode after.

    :func:`~pyro_bq.inference.fit_svi` trains in training mode (BatchNorm normalizes with the batch's
    statistics and updates its running statistics) and sets a guide up in eval mode; prediction
    runs in eval mode (the running statistics are used, never updated). A module that is not an
    ``nn.Module`` (a plain model function) is left alone.

    Usage::

        with module_mode(model, False):
            logits = model(x)        # BatchNorm reads its running statistics, does not update them
    """
    if not isinstance(module, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def same_device(a: torch.device, b: torch.device) -> bool:
    """True when ``a`` and ``b`` name the same device (``"cuda"`` matches the current ``"cuda:i"``)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None or b.index is None):
        return (a.index if a.index is not None else torch.cuda.current_device()) == (
            b.index if b.index is not None else torch.cuda.current_device())
    return a.index == b.index


def _size_of(data, dataset_size) -> Optional[int]:
    if dataset_size is not None:
        return check_int("dataset_size", dataset_size, low=1)
    if is_in_memory(data):
        return int(data.x.shape[0])
    inner = getattr(data, "dataset", None) if isinstance(data, DataLoader) else None
    try:
        return len(inner) if inner is not None else None
    except TypeError:  # an IterableDataset without a length
        return None


class Batches:
    """Epochs of checked ``(x, y)`` batches of one data argument, on one device; see :func:`as_batches`.

    Usage::

        for index, xb, yb in as_batches(train, batch_size=128).epoch(0, seed=0):
            ...
    """

    def __init__(self, data, *, batch_size: Optional[int], dataset_size: Optional[int], device, num_classes,
                 name: str):
        self.data, self.name, self.num_classes = data, name, num_classes
        self.in_memory = is_in_memory(data)
        self.batch_size = check_int("batch_size", batch_size, low=1) if self.in_memory else None
        self.dataset_size = _size_of(data, dataset_size)
        self.device = None if device is None else resolve_device(device)
        self.pinned = bool(getattr(data, "pin_memory", False))
        self._row_shape = None

    def __repr__(self) -> str:
        return f"Batches({type(self.data).__name__}, size={self.dataset_size}, per_epoch={self.num_batches})"

    @property
    def num_batches(self) -> Optional[int]:
        """Batches per epoch, or ``None`` when the data has no length."""
        if self.in_memory:
            return -(-int(self.data.x.shape[0]) // self.batch_size)
        try:
            return len(self.data)
        except TypeError:
            return None

    def require_size(self, what: str) -> int:
        """The dataset size, or a ``ValueError`` saying that ``what`` needs ``dataset_size=``."""
        if self.dataset_size is None:
            raise ValueError(
                f"{what} cannot tell how many examples {self.name} holds (a {type(self.data).__name__} "
                "without len(data.dataset)); pass dataset_size=<number of training examples>")
        return self.dataset_size

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch of epoch 0 (unshuffled for an in-memory dataset) on the device, e.g. to set up a
        guide; its shape is checked, its values when training reaches it. Torch's CPU RNG is left as it was."""
        with torch.random.fork_rng(devices=[]):
            for item in self._raw(0, 0, 0, not self.in_memory):
                xb, yb = _pair(f"{self.name}: batch 0", item)
                _check_structure(f"{self.name}: batch 0", xb, yb)
                return self.to_device(xb), self.to_device(yb)
        raise ValueError(f"{self.name} yields no batches; it must hold at least one (x, y) batch")

    def epoch(self, epoch: int, seed: int, *, skip: int = 0, shuffle: bool = True
              ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(index, x, y)`` for the batches of ``epoch`` from batch ``skip`` on, checked and on the device."""
        epoch, skip = check_int("epoch", epoch, low=0), check_int("skip", skip, low=0)
        for index, item in enumerate(self._raw(epoch, seed, skip, shuffle), start=skip):
            xb, yb = self.check(epoch, index, *_pair(f"{self.name}: batch {index} of epoch {epoch}", item))
            yield index, self.to_device(xb), self.to_device(yb)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on this source's device (asynchronously from pinned memory)."""
        if self.device is None or same_device(t.device, self.device):
            return t
        return t.to(self.device, non_blocking=self.pinned or (t.device.type == "cpu" and t.is_pinned()))

    def _raw(self, epoch: int, seed: int, skip: int, shuffle: bool):
        if self.in_memory:
            n = int(self.data.x.shape[0])
            order = self.data.epoch_order(epoch, seed) if shuffle else torch.arange(n)
            for start in range(skip * self.batch_size, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield self.data.x[idx], self.data.y[idx]
            return
        with _seeded(self.data, seed, epoch, shuffle):
            with torch.random.fork_rng(devices=[]):  # iter() of a DataLoader draws a base seed
                it = iter(self.data)
            if it is self.data:
                raise TypeError(f"{self.name} is a one-shot iterator ({type(self.data).__name__}); pass a "
                                "DataLoader, a list of (x, y) batches or another re-iterable object")
            _skip(it, skip)
            yield from it

    def check(self, epoch: int, index: int, xb, yb) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xb, yb)`` if it is a well-formed batch, else a :class:`BatchError` naming ``epoch`` and ``index``."""
        where = f"{self.name}: batch {index} of epoch {epoch}"
        _check_structure(where, xb, yb)
        if self._row_shape is None:
            self._row_shape = tuple(xb.shape[1:])
        elif tuple(xb.shape[1:]) != self._row_shape:
            raise BatchError(f"{where} has x of shape {tuple(xb.shape)}, but the first batch's rows have shape "
                             f"{self._row_shape}; every example must have the same shape")
        _check_values(where, xb, yb, self.num_classes)
        return xb, yb


def _skip(it, count: int) -> None:
    """Advance ``it`` by ``count`` items with torch's CPU RNG put back afterwards."""
    if count:
        with torch.random.fork_rng(devices=[]):
            for _ in range(count):
                if next(it, None) is None:
                    return


@contextlib.contextmanager
def _seeded(data, seed: int, epoch: int, shuffle: bool):
    """Make a DataLoader's order for ``epoch`` a function of ``(seed, epoch)``; put its samplers' generators back."""
    if not isinstance(data, DataLoader):
        yield
        return
    samplers = [s for s in (data.sampler, getattr(data.batch_sampler, "sampler", None)) if s is not None]
    saved = []
    try:
        for s in samplers:
            if callable(getattr(s, "set_epoch", None)):
                s.set_epoch(epoch)
            if isinstance(s, torch.utils.data.RandomSampler) and shuffle and not any(s is t for t, _ in saved):
                saved.append((s, s.generator))
                s.generator = epoch_generator(seed, epoch)
        if data.generator is not None:
            data.generator.manual_seed(epoch_seed(seed, epoch) ^ 0x5EED)
        yield
    finally:
        for s, generator in saved:
            s.generator = generator


def _pair(where: str, item) -> tuple:
    """``item`` as ``(x, y)``, or a :class:`BatchError` when it is not a pair."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    what = f"a sequence of {len(item)} items" if isinstance(item, (tuple, list)) else type(item).__name__
    raise BatchError(f"{where} is {what}, not an (x, y) pair; the data must yield (inputs, targets) pairs")


def _check_structure(where: str, xb, yb) -> None:
    if not isinstance(xb, torch.Tensor) or not isinstance(yb, torch.Tensor):
        raise BatchError(f"{where} is not an (x, y) pair of tensors: got {type(xb).__name__} and "
                         f"{type(yb).__name__}; the data must yield (inputs, targets) tensor pairs")
    if xb.dim() < 2 or yb.dim() == 0 or xb.shape[0] != yb.shape[0] or xb.shape[0] == 0:
        raise BatchError(f"{where} has x of shape {tuple(xb.shape)} and y of shape {tuple(yb.shape)}; both need "
                         "the same, non-zero number of rows (one per example), and x at least one feature dimension")
    if not (yb.is_floating_point() or yb.dim() == 1):
        raise BatchError(f"{where} has integer labels y of shape {tuple(yb.shape)}; class labels must be a vector")


def _check_values(where: str, xb: torch.Tensor, yb: torch.Tensor, num_classes: Optional[int]) -> None:
    """One fused test, one synchronization: finite x (and floating y), integer labels in range."""
    flags = []
    if xb.is_floating_point():
        flags.append(torch.isfinite(xb).all())
    if yb.is_floating_point():
        flags.append(torch.isfinite(yb).all())
    else:
        flags.append((yb >= 0).all() & ((yb < num_classes).all() if num_classes else True))
    if bool(torch.stack(flags).all()):
        return
    for name, t in (("x", xb), ("y", yb)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            rows = (~torch.isfinite(t).reshape(len(t), -1).all(1)).nonzero().reshape(-1).tolist()
            raise NonFiniteBatchError(f"{where}: {name} holds NaN/inf values in row(s) {rows[:10]}"
                                      f"{' ...' if len(rows) > 10 else ''}; remove or fix those examples")
    lo, hi = int(yb.min()), int(yb.max())
    allowed = f"[0, {num_classes})" if num_classes else "[0, inf)"
    raise BatchError(f"{where}: labels y lie in [{lo}, {hi}], outside {allowed}; class labels must be "
                     f"0 .. num_classes - 1")


def as_batches(data, *, batch_size: Optional[int] = 128, dataset_size: Optional[int] = None, device=None,
               num_classes: Optional[int] = None, name: str = "data") -> Batches:
    """``data`` (an in-memory dataset, a DataLoader or a re-iterable of ``(x, y)`` batches) as :class:`Batches`.

    :param batch_size: examples per batch of an in-memory dataset (a loader or iterable keeps its own).
    :param dataset_size: the number of examples, when ``data`` cannot tell (see the module docstring).
    :param device: where batches go (``"auto"``, ``"cpu"``, ``"cuda"``, a ``torch.device``); ``None``: where they are.
    :param num_classes: when given, integer labels must lie in ``[0, num_classes)``.
    :param name: how error messages call ``data``.
    :raises TypeError: for an object that is none of these.

    Usage::

        batches = as_batches(loader, device="auto", num_classes=10)
        size = batches.require_size("fit_svi")
    """
    if isinstance(data, (str, bytes, torch.Tensor, dict)) or not (is_in_memory(data) or hasattr(data, "__iter__")):
        raise TypeError(f"{name} must be an InMemoryDataset, a torch DataLoader or a re-iterable of (x, y) batches, "
                        f"got {type(data).__name__} (wrap a torch Dataset in a DataLoader)")
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError(f"{name} is a {type(data).__name__} of tensors, not of (x, y) batches; pass "
                        "InMemoryDataset(x, y), a DataLoader(TensorDataset(x, y)), or a list of batches [(x, y)]")
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, low=1)
    return Batches(data, batch_size=batch_size, dataset_size=dataset_size, device=device, num_classes=num_classes,
                   name=name)
