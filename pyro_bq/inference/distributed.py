"""Data-parallel SVI on PyTorch's own distributed engine (``torch.distributed``).

Launch any script that calls :func:`~pyro_bq.inference.fit_svi` (directly, or
through the PWFN driver or the study's training step) with ``torchrun``; the
model and the guide stay stock Pyro and unchanged::

    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --data-dir DATA

What happens under ``torchrun`` (``WORLD_SIZE > 1``):

* **Process group.** :func:`init_distributed` joins the group that torchrun
  describes in the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``). Backend: ``nccl`` when CUDA is available, else ``gloo``;
  override with the ``backend`` argument or ``$PYRO_BQ_DIST_BACKEND``. The
  ``timeout`` bounds the rendezvous and, on gloo, every collective, so a dead
  or stuck rank makes the others fail with :class:`DistributedError` instead of
  hanging. ``fit_svi`` calls it itself when torchrun's variables are set.
* **Data.** ``batch_size`` is the *global* batch. Every rank holds the full
  dataset (or the same full DataLoader, without a ``DistributedSampler``); the
  epoch order is a function of ``(seed, epoch)``, the same on every rank
  (:mod:`pyro_bq.inference.batches`), and each global batch is cut into
  ``world_size`` contiguous, disjoint shards (:meth:`SingleProcess.shard`,
  :func:`shard_batch`), so each rank sees a disjoint shard of each epoch,
  reshuffled per epoch.
* **Gradients.** After ``elbo.loss_and_grads`` and before the Pyro optimizer
  step, the gradients of all parameters in the step's param trace are
  all-reduced: rank ``r`` contributes ``w_r * grad_r`` with
  ``w_r = b_r / B`` (its shard size over the global batch size; ``1/world_size``
  for even shards). This explicit all-reduce rather than
  ``DistributedDataParallel``: Pyro creates parameters lazily and steps them
  one by one through the param store; a DDP wrapper would need the parameters
  up front and would change what users pass to SVI, while the all-reduce sits
  between the two calls that ``pyro.infer.SVI.step`` already makes.
* **ELBO scaling.** The model's ``pyro.plate("data", N, subsample_size=b_r)``
  scales each rank's likelihood to the full dataset size ``N``, so rank ``r``'s
  loss is ``KL + N/b_r * sum(nll over its shard)``. Then
  ``sum_r w_r * loss_r = KL + N/B * sum(nll over the global batch)``: the
  averaged gradient is exactly the single-process gradient of the global
  batch, uneven shards included.
* **Seeds.** Data order: ``seed`` on every rank. Weight sampling: rank 0 uses
  ``seed`` (so one process behaves exactly as before), rank ``r`` uses
  :func:`rank_seed` ``(seed, r)``.
* **Checkpoints, logging.** Only rank 0 writes checkpoints and shows progress.
  A checkpoint holds rank 0's RNG state under ``"rng"`` and every rank's under
  ``"rng_ranks"``; on resume rank 0 reads the file and broadcasts its bytes, so
  ranks on other machines need no shared folder. Resuming with the same number
  of ranks continues exactly; with a different number the steps, parameters
  and optimizer state carry over, and ranks without a saved RNG state are
  seeded from ``(seed, rank, step)``.

``fit_svi`` has no rank branches: a strategy, :class:`SingleProcess` or
:class:`DataParallel` (:func:`resolve` picks it), does each of these steps.

Usage::

    from pyro_bq.inference import fit_svi
    from pyro_bq.inference.distributed import init_distributed

    info = init_distributed()           # torchrun sets the environment; no-op otherwise
    fit_svi(model, guide, train, num_steps=1000, batch_size=256, checkpoint_dir="ckpt")
"""

from __future__ import annotations

import datetime
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyro
import torch
import torch.distributed as dist

from pyro_bq._validation import check_choice, check_int, check_positive
from pyro_bq.io.checkpoint import load_checkpoint, set_rng_state

__all__ = [
    "DistInfo", "DistributedError", "default_backend", "init_distributed", "destroy_distributed", "dist_info",
    "rank_seed", "shard_batch", "broadcast_modules", "BACKENDS", "SingleProcess", "DataParallel", "resolve"
]

BACKENDS = ("gloo", "nccl")
_ENV_BACKEND = "PYRO_BQ_DIST_BACKEND"
_ENV_TIMEOUT = "PYRO_BQ_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """A collective operation failed: another rank died, timed out or disagreed.

    Usage::

        try:
            fit_svi(model, guide, train, num_steps=1000)
        except DistributedError as err:   # a peer died: restart the job; it resumes
            print(err)
    """


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the process group.

    Usage::

        info = dist_info()
        if info.is_main:
            print(f"rank 0 of {info.world_size}")
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes checkpoints and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def default_backend() -> str:
    """``$PYRO_BQ_DIST_BACKEND`` if set, else ``"nccl"`` with CUDA, else ``"gloo"``.

    Usage::

        backend = default_backend()   # "gloo" on a CPU-only machine
    """
    env = os.environ.get(_ENV_BACKEND)
    if env:
        return check_choice(_ENV_BACKEND, env, BACKENDS)
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def launched_distributed() -> bool:
    """True when the environment describes a group of more than one process (torchrun).

    Usage::

        if launched_distributed():
            init_distributed()
    """
    return (_env_int("WORLD_SIZE") or 1) > 1


def dist_info() -> DistInfo:
    """The current process group (or a single process when none is initialised).

    Usage::

        if dist_info().is_main:
            save_checkpoint(path, state)   # only rank 0 writes
    """
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    backend = dist.get_backend()
    local_rank = _env_int("LOCAL_RANK") or 0
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def init_distributed(backend: Optional[str] = None, *, timeout: Optional[float] = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment.

    Without torchrun's variables (``WORLD_SIZE`` unset or 1) nothing is
    initialised and a single-process :class:`DistInfo` is returned, so one
    script runs both ways. Calling it again returns the existing group.

    :param backend: ``"gloo"`` or ``"nccl"``; default :func:`default_backend`.
    :param timeout: seconds for the rendezvous and (gloo) each collective;
        default ``$PYRO_BQ_DIST_TIMEOUT`` or 600.
    :raises ValueError: for an unknown backend, a bad timeout, ``nccl``
        without CUDA, or an incomplete torchrun environment.

    Usage::

        info = init_distributed()          # under torchrun --nproc_per_node 2
        print(info.rank, info.world_size, info.backend)
    """
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        check_choice("backend", backend, BACKENDS)
    if timeout is None:
        timeout = float(os.environ.get(_ENV_TIMEOUT, DEFAULT_TIMEOUT))
    timeout = check_positive("timeout", timeout)
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    if not launched_distributed():
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed support")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE > 1 but the environment lacks {missing}; launch with torchrun "
            "(e.g. torchrun --standalone --nproc_per_node 2 script.py)"
        )
    backend = backend or default_backend()
    local_rank = _env_int("LOCAL_RANK") or 0
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA GPUs; use backend='gloo' on CPU")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return dist_info()


def destroy_distributed() -> None:
    """Leave the process group, if any (call at the end of a torchrun script).

    Usage::

        init_distributed()
        try:
            fit_svi(model, guide, train)
        finally:
            destroy_distributed()
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """The weight-sampling seed of ``rank``: ``seed`` on rank 0, a distinct derived seed elsewhere.

    Usage::

        pyro.set_rng_seed(rank_seed(0, dist.get_rank()))
    """
    seed = check_int("seed", seed, low=0)
    rank = check_int("rank", rank, low=0)
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0])


def shard_batch(indices: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, float]:
    """Rank ``rank``'s shard of a global batch and its gradient weight ``b_r / B``.

    The global batch is cut into ``world_size`` contiguous pieces whose sizes
    differ by at most one. A rank left without examples (a global batch
    smaller than the world) gets the batch's first example and weight 0, so
    every rank runs the same collectives.

    Usage::

        local, weight = shard_batch(order[:256], rank=1, world_size=4)   # 64 indices, 0.25
    """
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.numel() == 0:
        raise ValueError("indices must be a non-empty 1-D tensor of example indices")
    world_size = check_int("world_size", world_size, low=1)
    rank = check_int("rank", rank, low=0, high=world_size - 1)
    local = torch.tensor_split(indices, world_size)[rank]
    if local.numel() == 0:
        return indices[:1], 0.0
    return local, local.numel() / indices.numel()


def broadcast_modules(*modules) -> None:
    """Copy rank 0's parameters and buffers into the same modules on every rank (in place).

    A no-op in a single process. Code that changes parameters outside
    :func:`~pyro_bq.inference.fit_svi` with rank-dependent randomness (e.g. a
    clustering step between training rounds) calls it to keep the ranks equal.

    Usage::

        cluster_weights(guide)           # may differ between ranks
        broadcast_modules(model, guide)  # now rank 0's result everywhere
    """
    info = dist_info()
    if info.distributed:
        DataParallel(info).broadcast_modules(*modules)


def _signature(names: Iterable[str], tensors: Iterable[torch.Tensor]) -> int:
    text = ";".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in zip(names, tensors))
    return zlib.crc32(text.encode()) & 0xFFFFF  # 20 bits: its square sums exactly in float64


class SingleProcess:
    """The training strategy of one process, and the interface of :class:`DataParallel`: the rank and
    world size, each rank's shard of a global batch, the gradient average, "only rank 0 logs and
    writes", agreement between ranks. In one process each is the identity or a plain call.

    Usage::

        strategy = resolve(None)    # SingleProcess() outside torchrun
        for xb, yb in global_batches:
            x_local, y_local, weight, n = strategy.shard(xb, yb)
    """

    rank = 0
    world_size = 1
    distributed = False

    def main_only(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on rank 0 (returns its result); None on the other ranks."""
        return fn(*args, **kwargs)

    def agree(self, settings: dict, check=None) -> None:
        """Run ``check()`` on rank 0 (e.g. make the checkpoint folder) and check that every rank
        was given the same ``settings``; a ``ValueError`` of either is raised on every rank."""
        if check is not None:
            check()

    def shard(self, xb: torch.Tensor, yb: torch.Tensor):
        """``(x, y, weight, global batch size)`` of this rank's shard (:func:`shard_batch`) of the
        global batch ``(xb, yb)``; in one process the whole batch with weight 1."""
        if self.world_size == 1:
            return xb, yb, 1.0, len(xb)
        mine, weight = shard_batch(torch.arange(len(xb)), self.rank, self.world_size)
        mine = mine.to(xb.device)
        return xb[mine], yb[mine.to(yb.device)], weight, len(xb)

    def average(self, params: dict, loss: float, *, weight: float, step: int) -> float:
        """Replace every gradient by ``sum_r w_r grad_r`` and return ``sum_r w_r loss_r``
        (``w_r``: rank ``r``'s ``weight``); in one process the gradients and ``loss`` as they are."""
        return loss

    def share_modules(self, *modules) -> None:
        """Give every rank rank 0's parameters and buffers (in place) before training."""

    def share_checkpoint(self, path: Optional[Path], folder: Path) -> Optional[tuple[dict, str, str]]:
        """Rank 0's checkpoint ``path`` loaded on every rank, as ``(state, where, name)`` (``where``:
        the file for error messages; ``name``: the path reported as resumed from), or None."""
        return None if path is None else (load_checkpoint(path), str(path), str(path))

    def restore_rng(self, state: dict, seed: int, step: int) -> None:
        """Set this rank's RNG states from the checkpoint ``state`` of ``step``."""
        set_rng_state(state["rng"])

    def rng_record(self, rng: dict, step: int) -> dict:
        """What a checkpoint of ``step`` records besides rank 0's RNG states ``rng``."""
        return {}

    def write(self, fn, what: str) -> None:
        """Run ``fn()`` (which writes ``what``) on rank 0; every rank raises if it failed."""
        fn()

    def save_after_local_error(self, save) -> None:
        """Call ``save()`` after the model failed on this rank alone, when no other rank waits on it."""
        save()


class DataParallel(SingleProcess):
    """The data-parallel strategy of a :func:`fit_svi` run on ``torch.distributed`` (one object per run).

    Usage::

        strategy = resolve(None)    # DataParallel(dist_info()) under torchrun
    """

    distributed = True

    def __init__(self, info: DistInfo):
        self.info = info
        self.rank, self.world_size = info.rank, info.world_size
        self._buffers: dict = {}

    def _run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DistributedError:
            raise
        except (RuntimeError, ConnectionError, OSError) as err:  # DistBackendError is a RuntimeError
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({type(err).__name__}: {err}). "
                "Another rank probably died, raised an error or timed out; see its output."
            ) from err

    def all_gather(self, obj, what: str) -> list:
        out = [None] * self.world_size
        self._run(what, dist.all_gather_object, out, obj)
        return out

    def all_ok(self, ok: bool, what: str) -> bool:
        flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float64, device=self.info.device)
        self._run(what, dist.all_reduce, flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def main_only(self, fn, *args, **kwargs):
        return fn(*args, **kwargs) if self.info.is_main else None

    def agree(self, settings: dict, check=None) -> None:
        error = None
        try:
            self.main_only(check or (lambda: None))
        except ValueError as err:
            error = str(err)
        everyone = self.all_gather((settings, error), "the start-up handshake")
        for rank, (_, err) in enumerate(everyone):
            if err is not None:
                raise ValueError(f"rank {rank}: {err}")
        for key, value in settings.items():
            values = [s[key] for s, _ in everyone]
            if any(v != values[0] for v in values):
                raise ValueError(
                    f"{key} differs between ranks ({values}); every rank must call fit_svi with the same "
                    "arguments and the same full dataset (fit_svi shards the data itself)"
                )

    def write(self, fn, what: str) -> None:
        error = None
        if self.info.is_main:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
                error = err
        try:
            ok = self.all_ok(error is None, what)
        except DistributedError:
            if error is not None:  # rank 0's own failure first; the collective's is its __context__
                raise error
            raise
        if not ok:
            if error is not None:
                raise error
            raise DistributedError(f"rank {self.rank}: rank 0 failed to write {what}")

    def save_after_local_error(self, save) -> None:
        """Nothing: the other ranks wait inside a collective, so a (collective) checkpoint would hang."""

    def share_checkpoint(self, path, folder):
        """Rank 0 sends the bytes of its checkpoint file; the others load them from a temporary copy."""
        payload = [Path(path).read_bytes() if path is not None else None]  # None on the other ranks
        self._run("broadcasting the checkpoint", dist.broadcast_object_list, payload, src=0)
        if self.info.is_main or payload[0] is None:
            return super().share_checkpoint(path, folder)
        fd, tmp = tempfile.mkstemp(prefix=f"pyro_bq-rank{self.rank}-", suffix=".bq")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload[0])
            state = load_checkpoint(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)
        step = state.get("step")
        return state, f"rank 0's {folder}/ckpt-{step}.bq", str(Path(folder) / f"ckpt-{step}.bq")

    def restore_rng(self, state: dict, seed: int, step: int) -> None:
        """Rank 0's saved states on rank 0; each other rank's own when the checkpoint has as many
        ranks, else a seed derived from ``(seed, rank, step)``."""
        saved = state.get("rng_ranks")
        if self.info.is_main:
            set_rng_state(state["rng"])
        elif saved is not None and len(saved) == self.world_size:
            set_rng_state(saved[self.rank])
        else:
            pyro.set_rng_seed(int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1, dtype=np.uint32)[0]))

    def rng_record(self, rng: dict, step: int) -> dict:
        ranks = self.all_gather(rng, f"gathering the RNG states at step {step}")
        return {"world_size": self.world_size, "rng_ranks": ranks}

    def share_modules(self, *modules) -> None:
        """Also remember the floating-point buffers (BatchNorm statistics), which each step averages."""
        self.broadcast_modules(*modules)
        self._buffers = {f"{i}.{name}": b for i, m in enumerate(modules) if isinstance(m, torch.nn.Module)
                         for name, b in m.named_buffers() if b.is_floating_point()}

    def broadcast_modules(self, *modules) -> None:
        """Copy rank 0's parameters and buffers into every rank's modules (in place)."""
        tensors = []
        for module in modules:
            if isinstance(module, torch.nn.Module):
                state = module.state_dict(keep_vars=True)
                tensors += [state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)]
        with torch.no_grad():
            for t in tensors:
                data = t.data
                if not data.is_contiguous() or (self.info.backend == "nccl" and not data.is_cuda):
                    data = data.contiguous().to(self.info.device)
                self._run("broadcasting rank 0's parameters", dist.broadcast, data, src=0)
                if data is not t.data:
                    t.data.copy_(data)

    # -- the per-step gradient average -----------------------------------------------
    def average(self, params: dict, loss: float, *, weight: float, step: int) -> float:
        """Floating-point buffers (BatchNorm statistics) get the same weighted average.
        Parameters without a gradient on every rank keep ``grad = None``."""
        buffers = self._buffers
        names, bnames = sorted(params), sorted(buffers)
        sig = _signature(names + bnames, [params[n] for n in names] + [buffers[n] for n in bnames])
        w = float(weight)
        meta = torch.tensor(
            [0.0 if w == 0 else w * loss, float(sig), float(sig) ** 2, 1.0], dtype=torch.float64, device=self.info.device
        )
        self._run(f"the all-reduce of step {step}", dist.all_reduce, meta)
        R = self.world_size
        if meta[3].item() != R or meta[1].item() != R * sig or meta[2].item() != R * float(sig) ** 2:
            raise DistributedError(
                f"rank {self.rank}: the ranks' models and guides have different parameters at step {step}; "
                "every rank must build the same model and guide"
            )
        # one flat buffer per (dtype, device): weighted grads, then has-grad flags, then buffers
        groups: dict = {}
        for n in names:
            groups.setdefault((params[n].dtype, params[n].device), ([], []))[0].append(n)
        for n in bnames:
            groups.setdefault((buffers[n].dtype, buffers[n].device), ([], []))[1].append(n)
        for (dtype, device), (pnames, bn) in sorted(groups.items(), key=lambda kv: str(kv[0])):
            self._average_group(dtype, device, [params[n] for n in pnames], [buffers[n] for n in bn], w, step)
        return float(meta[0].item())

    def _average_group(self, dtype, device, params: list, buffers: list, w: float, step: int) -> None:
        """All-reduce the weighted gradients, has-grad flags and buffers of one (dtype, device) in one buffer."""
        has_grad = [p.grad is not None and w != 0 for p in params]
        parts = [p.grad.reshape(-1) * w if ok else torch.zeros(p.numel(), dtype=dtype, device=device)
                 for p, ok in zip(params, has_grad)]
        parts.append(torch.tensor([1.0 if ok else 0.0 for ok in has_grad], dtype=dtype, device=device))
        parts += [b.reshape(-1) * w for b in buffers]
        flat = torch.cat(parts)
        comm = flat if self.info.backend != "nccl" or flat.is_cuda else flat.to(self.info.device)
        self._run(f"the gradient all-reduce of step {step}", dist.all_reduce, comm)
        pieces = comm.to(device).split([p.numel() for p in params] + [len(params)] + [b.numel() for b in buffers])
        flags = pieces[len(params)].tolist()
        for p, piece, flag in zip(params, pieces, flags):
            p.grad = None if flag == 0 else piece.view_as(p).clone()
        with torch.no_grad():
            for b, piece in zip(buffers, pieces[len(params) + 1 :]):
                b.copy_(piece.view_as(b))


def resolve(distributed: Optional[bool], backend: Optional[str] = None) -> SingleProcess:
    """The training strategy for ``fit_svi(distributed=...)``: :class:`DataParallel` or :class:`SingleProcess`.

    ``None``: data-parallel when a process group of more than one rank exists
    or torchrun's environment describes one (then it is initialised).

    Usage::

        strategy = resolve(None)
        print(strategy.rank, strategy.world_size)
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool or None, got {type(distributed).__name__}")
    if distributed is False:
        return SingleProcess()
    if not (dist.is_available() and dist.is_initialized()):
        if launched_distributed():
            init_distributed(backend)
        elif distributed:
            raise ValueError(
                "distributed=True but no process group exists and WORLD_SIZE is not > 1; "
                "launch with torchrun --nproc_per_node N or call init_distributed() first"
            )
    info = dist_info()
    if info.world_size <= 1:
        return SingleProcess()
    return DataParallel(info)
