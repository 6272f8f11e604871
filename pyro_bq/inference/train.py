"""A resumable SVI training loop for pyro_bq models and guides.

:func:`fit_svi` runs stock Pyro SVI (``elbo.loss_and_grads`` plus a Pyro
optimizer, exactly what ``pyro.infer.SVI.step`` does) over minibatches of an
:class:`~pyro_bq.data.InMemoryDataset`, with

* checkpoints every ``checkpoint_every`` steps (atomic, pickle-free) and
  automatic resumption from the latest valid one;
* a guard against non-finite losses and gradients that names the site(s) and
  the step, saves the last good state, then raises or skips the step;
* a progress bar with the running ELBO;
* data-parallel training on ``torch.distributed`` when launched with
  ``torchrun`` (see :mod:`pyro_bq.inference.distributed`), with the same
  model, guide and call.

A run resumed after a kill ends in exactly the state of an uninterrupted run
with the same seed: data order is a function of ``(seed, epoch)`` and the RNG
states are part of the checkpoint.
"""

from __future__ import annotations

import functools
import math
import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyro
import pyro.optim
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, TraceMeanField_ELBO
from pyro.infer.util import zero_grads

from pyro_bq._validation import check_choice, check_int, check_positive
from pyro_bq.data.dataset import InMemoryDataset
from pyro_bq.io.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state

from . import distributed as _dist

__all__ = ["fit_svi", "FitResult", "NonFiniteError", "seed_everything", "svi_step"]


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN or infinite during training."""


@dataclass
class FitResult:
    """What :func:`fit_svi` returns."""

    losses: list = field(default_factory=list)
    steps: int = 0
    skipped_steps: list = field(default_factory=list)
    resumed_from: Optional[str] = None


def seed_everything(seed: int) -> None:
    """Seed torch, numpy, Python and Pyro."""
    seed = check_int("seed", seed, low=0)
    pyro.set_rng_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _nonfinite_sites(guide, params) -> list[str]:
    """Names of the guide sites (or parameters) whose gradient is not finite."""
    bad = []
    sites = getattr(guide, "sites", None) or {}
    for name, p in params.items():
        g = p.grad
        if g is None or bool(torch.isfinite(g).all()):
            continue
        flat = g.reshape(-1)
        matched = False
        if sites and flat.numel() == sum(i.numel for i in sites.values()):
            for site, info in sites.items():
                if not bool(torch.isfinite(flat[info.offset : info.offset + info.numel]).all()):
                    bad.append(site)
                    matched = True
        if not matched:
            bad.append(name)
    return bad


def svi_step(model, guide, optim, elbo: ELBO, *args, on_nonfinite: str = "raise", step: int = 0, **kwargs):
    """One SVI step; returns ``(loss, ok)``. Raises :class:`NonFiniteError` on NaN/inf
    when ``on_nonfinite == "raise"`` (nothing is updated), or skips the update."""
    return _svi_step(model, guide, optim, elbo, args, kwargs, on_nonfinite, step)


def _svi_step(model, guide, optim, elbo, args, kwargs, on_nonfinite, step, reduce=None):
    """:func:`svi_step`; ``reduce(params, loss) -> loss`` (data-parallel runs) replaces each
    parameter's gradient by the average over ranks and returns the global loss, between
    ``loss_and_grads`` and the NaN guard, so every rank takes the same decision."""
    with poutine.trace(param_only=True) as capture:
        loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
    params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    if reduce is not None:
        loss = reduce(params, loss)
    loss_ok = math.isfinite(loss)
    bad = [] if not loss_ok else _nonfinite_sites(guide, params)
    if not loss_ok or bad:
        zero_grads(set(params.values()))
        what = "the loss" if not loss_ok else f"the gradient of site(s) {', '.join(bad)}"
        if on_nonfinite == "raise":
            raise NonFiniteError(f"step {step}: {what} is not finite (loss = {loss})")
        return loss, False
    optim(set(params.values()))
    zero_grads(set(params.values()))
    return loss, True


def _state(model, guide, optim, step, losses, skipped):
    return {
        "step": step,
        "model": model.state_dict() if isinstance(model, torch.nn.Module) else {},
        "guide": guide.state_dict(),
        "optim": optim.get_state(),
        "rng": rng_state(),
        "losses": list(losses),
        "skipped": list(skipped),
    }


def fit_svi(
    model,
    guide,
    data: InMemoryDataset,
    *,
    num_epochs: Optional[int] = 1,
    num_steps: Optional[int] = None,
    batch_size: int = 128,
    optim: Optional[pyro.optim.PyroOptim] = None,
    lr: float = 1e-3,
    elbo: Optional[ELBO] = None,
    seed: int = 0,
    checkpoint_dir: Optional[os.PathLike] = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    on_nonfinite: str = "raise",
    progress: bool = True,
    callback: Optional[Callable[[int, float], None]] = None,
    step_hook: Optional[Callable[[], None]] = None,
    distributed: Optional[bool] = None,
) -> FitResult:
    """Train ``guide`` for ``model`` with SVI on ``data``.

    :param num_epochs: passes over ``data`` (ignored when ``num_steps`` is set).
    :param num_steps: total optimizer steps, across epochs.
    :param batch_size: examples per optimizer step; in a data-parallel run the
        *global* batch, split across the ranks.
    :param optim: a Pyro optimizer; default ``pyro.optim.Adam({"lr": lr})``.
    :param elbo: default ``TraceMeanField_ELBO()``.
    :param checkpoint_dir: where ``ckpt-{step}.bq`` files go; with ``resume`` the
        run continues from the latest valid one there.
    :param on_nonfinite: ``"raise"`` (save the last good state, then raise
        :class:`NonFiniteError` naming the site(s) and step) or ``"skip"``.
    :param callback: called as ``callback(step, loss)`` after every step (on
        every rank; in a data-parallel run ``loss`` is the global batch's loss).
    :param step_hook: called after every optimizer step (e.g. to re-apply masks).
    :param distributed: ``None`` (default): data-parallel over ``torch.distributed``
        when a process group of more than one rank exists or ``torchrun``'s
        environment describes one; ``False``: always one process; ``True``:
        require a group. See :mod:`pyro_bq.inference.distributed`: every rank
        passes the same full ``data`` and arguments; each gets a disjoint shard
        of every global batch; gradients are averaged (weighted by shard size)
        before each optimizer step, which makes the step that of one process on
        the global batch; only rank 0 writes checkpoints and shows progress; a
        checkpoint resumes with any number of ranks.

    Usage::

        result = fit_svi(model, guide, load_mnist(train=True), num_epochs=5, lr=1e-3)
        # the same line, launched with: torchrun --standalone --nproc_per_node 4 train.py
    """
    if not isinstance(data, InMemoryDataset):
        raise TypeError(f"data must be a pyro_bq InMemoryDataset, got {type(data).__name__}")
    batch_size = check_int("batch_size", batch_size, low=1)
    if num_steps is None:
        if num_epochs is None:
            raise ValueError("give num_epochs or num_steps")
        num_epochs = check_int("num_epochs", num_epochs, low=1)
        total = num_epochs * data.num_batches(batch_size)
    else:
        total = check_int("num_steps", num_steps, low=1)
    check_choice("on_nonfinite", on_nonfinite, ("raise", "skip"))
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, low=1)
    seed = check_int("seed", seed, low=0)
    optim = optim if optim is not None else pyro.optim.Adam({"lr": check_positive("lr", lr)})
    elbo = elbo if elbo is not None else TraceMeanField_ELBO()
    dp = _dist.resolve(distributed)
    rank = 0 if dp is None else dp.info.rank
    world = 1 if dp is None else dp.info.world_size
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    folder_error = None
    if folder is not None and rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if dp is None:
                raise
            folder_error = f"checkpoint_dir {str(folder)!r} cannot be created: {err}"
        if folder_error is None and not os.access(folder, os.W_OK):
            folder_error = f"checkpoint_dir {str(folder)!r} is not writable; choose another folder"
            if dp is None:
                raise ValueError(folder_error)
    if dp is not None:
        dp.agree(
            {
                "seed": seed,
                "batch_size": batch_size,
                "num_steps": total,
                "checkpoint_every": checkpoint_every,
                "resume": bool(resume),
                "on_nonfinite": on_nonfinite,
                "data": (len(data), tuple(data.x.shape[1:]), zlib.crc32(data.y.detach().cpu().numpy().tobytes())),
            },
            folder_error,
        )

    result = FitResult()
    per_epoch = data.num_batches(batch_size)
    seed_everything(_dist.rank_seed(seed, rank))
    first_x, first_y = next(data.batches(batch_size))
    if hasattr(guide, "setup"):
        guide.setup(first_x, first_y)
    else:
        guide(first_x, first_y)
    step = 0
    if folder is not None and resume:
        ckpt = latest_checkpoint(folder) if rank == 0 else None
        local = ckpt
        if dp is not None:
            local = dp.broadcast_file(ckpt)
        if local is not None:
            try:
                state = load_checkpoint(local)
            finally:
                if local != ckpt:
                    Path(local).unlink(missing_ok=True)
            if isinstance(model, torch.nn.Module):
                model.load_state_dict(state["model"])
            guide.load_state_dict(state["guide"])
            optim.set_state(state["optim"])
            step = int(state["step"])
            saved_ranks = state.get("rng_ranks")
            if rank == 0:
                set_rng_state(state["rng"])
            elif saved_ranks is not None and len(saved_ranks) == world:
                set_rng_state(saved_ranks[rank])
            else:
                seed_everything(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint32)[0]))
            result.losses = list(state["losses"])
            result.skipped_steps = list(state["skipped"])
            result.resumed_from = str(ckpt) if ckpt is not None else str(folder / f"ckpt-{step}.bq")  # rank 0's file
    if dp is not None:
        # rank 0's parameters everywhere, whatever each rank's initialisation was
        dp.broadcast_modules(model, guide)
        buffers = _dist.floating_buffers(model, guide)

    def checkpoint(at: int):
        if folder is None:
            return
        state = None
        if dp is not None:
            ranks = dp.all_gather(rng_state(), f"gathering the RNG states at step {at}")
        if rank == 0:
            state = _state(model, guide, optim, at, result.losses, result.skipped_steps)
            if dp is not None:
                state["world_size"] = world
                state["rng_ranks"] = ranks
        if dp is None:
            _write(folder, at, state)
            return
        error = None
        if rank == 0:
            try:
                _write(folder, at, state)
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
                error = err
        if not dp.all_ok(error is None, f"the checkpoint of step {at}"):
            if error is not None:
                raise error
            raise _dist.DistributedError(f"rank {rank}: rank 0 failed to write the checkpoint of step {at}")

    def batches(order):
        if dp is None:
            yield from data.batches(batch_size, indices=order)
            return
        for start in range(0, len(order), batch_size):
            mine, weight = _dist.shard_batch(order[start : start + batch_size], rank, world)
            yield data.x[mine], data.y[mine], weight, min(batch_size, len(order) - start)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="SVI", dynamic_ncols=True, leave=False)
    running = None
    try:
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            order = data.epoch_order(epoch, seed)[offset * batch_size :]
            for batch in batches(order):
                reduce = None
                if dp is None:
                    xb, yb = batch
                    n_global = len(xb)
                else:
                    xb, yb, weight, n_global = batch
                    reduce = functools.partial(_reduce, dp, weight=weight, buffers=buffers, step=step)
                try:
                    loss, ok = _svi_step(model, guide, optim, elbo, (xb, yb), {}, on_nonfinite, step, reduce)
                except NonFiniteError:
                    checkpoint(step)
                    raise
                if not ok:
                    result.skipped_steps.append(step)
                else:
                    if step_hook is not None:
                        step_hook()
                    result.losses.append(loss / n_global)
                    running = loss if running is None else 0.95 * running + 0.05 * loss
                step += 1
                if bar is not None:
                    bar.update(1)
                    if running is not None:
                        bar.set_postfix(elbo=f"{-running:.4g}")
                if callback is not None:
                    callback(step, loss)
                if step % checkpoint_every == 0 or step == total:
                    checkpoint(step)
                if step >= total:
                    break
    finally:
        if bar is not None:
            bar.close()
    result.steps = step
    return result


def _reduce(dp, params, loss, *, weight, buffers, step):
    return dp.average(params, loss, weight, buffers, step)


def _write(folder: Path, at: int, state: dict) -> None:
    save_checkpoint(folder / f"ckpt-{at}.bq", state)
    for old in folder.glob("ckpt-*.bq"):
        if old.name != f"ckpt-{at}.bq":
            old.unlink(missing_ok=True)
