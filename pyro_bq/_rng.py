"""Standard-normal draws for large CPU tensors, filled by parallel streams.

torch's CPU ``normal_`` runs on one core (its Mersenne Twister is sequential):
about 5 ns a value on the 2-core machines this was measured on, which makes
drawing a mean-field network's weights the largest single cost of an SVI step
and of multi-sample prediction. :func:`standard_normal` splits a large tensor
into fixed chunks of :data:`CHUNK` values, gives each chunk its own generator
seeded from torch's default generator (so ``torch.manual_seed`` /
``pyro.set_rng_seed`` make it reproducible) and fills the chunks on all of
torch's intra-op threads. The chunking depends only on the size, so a seed
gives the same draws whatever the number of threads. Tensors below
:data:`MIN_PARALLEL` values, and tensors on other devices, use one plain
``normal_()`` call.

Determinism per device. On CPU a seed gives the same draws bit for bit,
whatever the number of threads. On CUDA, :func:`standard_normal` and
:func:`normal_rows` make one ``normal_()`` call on the device, driven by
torch's CUDA generator (``torch.manual_seed`` / ``pyro.set_rng_seed`` seed it
too): a seed gives the same draws on the same GPU model, driver and torch
version, but not the CPU's draws, and not necessarily another GPU's. What the
network then computes from those draws is bitwise reproducible on CUDA only
with ``torch.use_deterministic_algorithms(True)`` (and
``CUBLAS_WORKSPACE_CONFIG=:4096:8``); without it, atomics in some kernels
(convolution backward, ``index_add``) can change the last bits between runs,
so a run killed and resumed on a GPU ends close to, not exactly at, an
uninterrupted one.

:func:`epoch_seed` is the one rule that makes a data order a function of
``(seed, epoch)``: :class:`pyro_bq.data.InMemoryDataset` shuffles with it, and
:func:`pyro_bq.inference.batches.as_batches` re-seeds a shuffling DataLoader's
sampler with it at the start of every epoch.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["standard_normal", "normal_rows", "epoch_seed", "epoch_generator", "CHUNK", "MIN_PARALLEL"]

#: values per stream
CHUNK = 1 << 17
#: smallest tensor drawn in chunks (smaller ones: one ``normal_()`` call)
MIN_PARALLEL = 2 * CHUNK



def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order in a run seeded with ``seed`` (a 64-bit int).

    Usage::

        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(0, 3)))
    """
    return (int(seed) * 1_000_003 + int(epoch)) % 2**64


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with :func:`epoch_seed` ``(seed, epoch)``.

    Usage::

        order = torch.randperm(n, generator=epoch_generator(0, 3))
    """
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


_pool: ThreadPoolExecutor | None = None
_pool_key: tuple | None = None
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    """A thread pool with ``workers`` threads, made anew after a fork (threads do not survive one)."""
    global _pool, _pool_key
    key = (os.getpid(), workers)
    with _pool_lock:
        if _pool_key != key:
            if _pool is not None and _pool_key[0] == os.getpid():
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pyro_bq_rng")
            _pool_key = key
        return _pool


@torch.no_grad()
def _fill(tasks) -> None:
    for piece, seed, loc, scale in tasks:
        piece.normal_(generator=torch.Generator().manual_seed(seed))
        if scale is not None:  # while the piece is still in cache; the same op as the guide's draw
            torch.addcmul(loc, scale, piece, out=piece)


def _run(tasks) -> None:
    """Run the fill tasks on up to ``torch.get_num_threads()`` threads, in contiguous groups."""
    workers = max(1, min(torch.get_num_threads(), len(tasks)))
    if workers == 1:
        _fill(tasks)
        return
    bounds = [len(tasks) * k // workers for k in range(workers + 1)]
    pool = _executor(workers - 1)
    futures = [pool.submit(_fill, tasks[a:b]) for a, b in zip(bounds[1:-1], bounds[2:])]
    _fill(tasks[: bounds[1]])
    for f in futures:
        f.result()


def _plain(out: torch.Tensor, n: int) -> bool:
    """Whether a draw of ``n`` values per row into ``out`` is one plain ``normal_()`` per row."""
    return out.device.type != "cpu" or n < MIN_PARALLEL or not out.is_floating_point()


def _row_tasks(row: torch.Tensor, loc=None, scale=None) -> list:
    """Fill tasks for one 1-D ``row``: its chunks of :data:`CHUNK` values, each with a seed of
    its own (drawn now, in order) and the matching pieces of ``loc`` and ``scale`` if given."""
    starts = range(0, row.numel(), CHUNK)
    seeds = _distinct_seeds(len(starts))
    return [(row[a : a + CHUNK], seed, None if loc is None else loc[a : a + CHUNK],
             None if scale is None else scale[a : a + CHUNK]) for a, seed in zip(starts, seeds)]


def standard_normal(shape, *, dtype=None, device=None) -> torch.Tensor:
    """A tensor of ``shape`` filled with independent ``Normal(0, 1)`` draws.

    Same distribution as ``torch.randn(shape)``; large CPU tensors are filled
    by parallel streams (see the module docstring), so the values differ from
    ``torch.randn``'s under the same seed.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    if _plain(out, out.numel()):
        return out.normal_()
    _run(_row_tasks(out.view(-1)))
    return out


def normal_rows(loc: torch.Tensor, scale: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``num_rows`` draws of ``Normal(loc, scale)`` for 1-D ``loc`` and ``scale``: shape ``(num_rows, n)``.

    Row ``r`` holds ``loc + scale * eps`` with ``eps`` exactly the values of the
    ``r``-th of ``num_rows`` successive :func:`standard_normal` calls (so many
    draws at once equal as many single draws under the same seed). The scaling
    is done chunk by chunk in the same parallel pass, while the chunk is in cache.
    The result is not differentiable (``loc`` and ``scale`` are read detached).
    """
    loc, scale = loc.detach(), scale.detach()
    out = torch.empty((num_rows, loc.numel()), dtype=loc.dtype, device=loc.device)
    if _plain(out, loc.numel()):
        for row in out:
            torch.addcmul(loc, scale, row.normal_(), out=row)
        return out
    _run([task for row in out for task in _row_tasks(row, loc, scale)])
    return out


def _distinct_seeds(k: int) -> list:
    """``k`` different seeds from torch's default generator.

    torch seeds its Mersenne Twister with the low 32 bits of a seed, so the
    seeds are drawn below 2**32, and one that repeats an earlier one is redrawn
    (two chunks of one draw must never share a stream).
    """
    seeds, seen = [], set()
    for s in torch.randint(0, 2**32, (k,), dtype=torch.int64).tolist():
        while s in seen:
            s = int(torch.randint(0, 2**32, (), dtype=torch.int64))
        seen.add(s)
        seeds.append(s)
    return seeds
