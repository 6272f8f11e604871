"""A resumable SVI training loop for pyro_bq models and guides.

:func:`fit_svi` runs stock Pyro SVI (``elbo.loss_and_grads`` plus a Pyro
optimizer, exactly what ``pyro.infer.SVI.step`` does) over minibatches of a
dataset, with a progress bar, in three parts:

* the guarded step (:func:`svi_step`): a non-finite loss or gradient, or an
  error of the model, is reported naming the site(s) and the step; the last
  good state is saved, then the run raises or skips the step;
* resume from the latest valid checkpoint (:mod:`pyro_bq.io.checkpoint`, as
  the PWFN driver does). A run resumed after a kill ends exactly like an
  uninterrupted one: data order is a function of ``(seed, epoch)`` and the RNG
  states are in the checkpoint. A checkpoint of another seed, batch size, data
  (fingerprint) or architecture is refused with a ``ValueError`` naming it;
* a strategy (:mod:`pyro_bq.inference.distributed`): one process, or
  data-parallel ranks under ``torchrun``, with the same model, guide and call.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyro
import pyro.optim
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from pyro.infer.util import zero_grads
from pyro.nn.module import PyroModule, _make_name
from pyro.params.param_store import param_with_module_name
from tqdm.auto import tqdm

from pyro_bq._validation import (check_bool, check_callable, check_choice, check_int, check_path, check_positive,
                                 check_type, resolve_device)
from pyro_bq.io.checkpoint import latest_checkpoint, replace_checkpoint, rng_state
from pyro_bq.io.container import writable_folder

from pyro_bq.models import BayesianClassifier

from .batches import BatchError, Batches, NonFiniteError, as_batches, module_device, module_mode, same_device
from .distributed import SingleProcess, rank_seed, resolve
from .elbo import MeanFieldELBO

__all__ = ["fit_svi", "FitResult", "NonFiniteError", "BatchError", "compile_network_", "default_optim", "seed_everything",
           "svi_step"]


#: The largest seed :func:`seed_everything` takes (numpy's limit).
MAX_SEED = 2**32 - 1
#: Rows of ``x`` that go into the data fingerprint's checksum, besides every byte of ``y``.
_FINGERPRINT_ROWS = 256


@dataclass
class FitResult:
    """What :func:`fit_svi` returns."""

    losses: list = field(default_factory=list)
    steps: int = 0
    skipped_steps: list = field(default_factory=list)
    resumed_from: Optional[str] = None


def _fused_adam_available() -> bool:
    try:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


_FUSED_ADAM = _fused_adam_available()


class _ReleasingOptim(pyro.optim.PyroOptim):
    """A :class:`~pyro.optim.PyroOptim` that drops each gradient once it has been applied
    (``grad = None``, as ``torch.optim.Optimizer.zero_grad()`` does by default).

    ``SVI.step`` then has no zero-filled gradient tensors to allocate, and the next
    backward pass writes its gradients instead of adding them to zeros.
    """

    def __call__(self, params, *args, **kwargs) -> None:
        params = list(params)
        super().__call__(params, *args, **kwargs)
        for p in params:
            p.grad = None


def default_optim(lr: float = 1e-3) -> pyro.optim.PyroOptim:
    """pyro_bq's default optimizer: ``pyro.optim.Adam`` with torch's fused kernel where torch has one,
    which frees each gradient once applied.

    The same Adam update (up to float rounding), done in one kernel per
    parameter tensor instead of about ten element-wise passes. Measured on 2
    CPU cores: the optimizer step of a 478k-weight mean-field guide (two flat
    tensors) alone takes 0.55 ms instead of 3.95 ms; in a whole SVI step of the
    784-400-400-10 MLP it saved about 1 ms (``benchmarks/harness.py``). Pass any
    other optimizer to :func:`fit_svi` with ``optim=``.

    Usage::

        svi = SVI(model, guide, default_optim(1e-3), MeanFieldELBO())
    """
    options = {"lr": check_positive("lr", lr)}
    if _FUSED_ADAM:
        options["fused"] = True
    return _ReleasingOptim(torch.optim.Adam, options)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy, Python and Pyro.

    :param seed: an int in ``[0, 2**32 - 1]``.
    """
    pyro.set_rng_seed(check_int("seed", seed, low=0, high=MAX_SEED))  # torch, numpy and Python's random


def _all_finite(g: torch.Tensor) -> bool:
    """Whether every value of ``g`` is finite, in one read-only reduction when it is.

    A sum with a NaN or an infinity among its terms is NaN or infinite, so a
    finite sum proves every term finite; a non-finite sum (an overflow of finite
    terms included) falls back to the element-wise test, so the answer is always
    that of ``torch.isfinite(g).all()``, without its full-size boolean tensor.
    """
    return bool(torch.isfinite(g.sum())) or bool(torch.isfinite(g).all())


def _nonfinite_sites(guide, params) -> list[str]:
    """Names of the guide sites (or parameters) whose gradient is not finite."""
    bad = []
    sites = getattr(guide, "sites", None) or {}
    for name, p in params.items():
        g = p.grad
        if g is None or _all_finite(g):
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
    """One guarded SVI step; returns ``(loss, ok)``. On a NaN/inf loss or gradient it raises
    :class:`NonFiniteError` naming the site(s) (``on_nonfinite="raise"``) or skips the update.

    An exception of the model or the guide (e.g. torch's validation of a NaN
    input) comes back naming ``step``, as a :class:`NonFiniteError` when the
    inputs hold NaN or infinite values. Nothing is updated then either.

    :param optim: a ``pyro.optim.PyroOptim`` (e.g. ``pyro.optim.Adam({"lr": 1e-3})``).
    :param elbo: a ``pyro.infer.ELBO`` instance (e.g. ``TraceMeanField_ELBO()``).
    :param on_nonfinite: ``"raise"`` or ``"skip"``.
    :param step: the step number used in error messages.

    Usage::

        loss, ok = svi_step(model, guide, default_optim(1e-3), MeanFieldELBO(), xb, yb, step=10)
    """
    _check_optim_elbo(optim, elbo)
    check_choice("on_nonfinite", on_nonfinite, ("raise", "skip"))
    step = check_int("step", step, low=0)
    return _svi_step(model, guide, optim, elbo, args, kwargs, on_nonfinite, step)


def _check_optim_elbo(optim, elbo) -> None:
    check_type("optim", optim, pyro.optim.PyroOptim, 'a pyro.optim.PyroOptim such as pyro.optim.Adam({"lr": 1e-3})')
    check_type("elbo", elbo, ELBO, "a pyro.infer.ELBO instance such as TraceMeanField_ELBO()")


def _nonfinite_inputs(args, kwargs) -> list[str]:
    """Which floating-point tensor inputs of a step hold NaN or infinite values, with the rows."""
    found = []
    for where, value in [(f"args[{i}]", v) for i, v in enumerate(args)] + [(k, v) for k, v in kwargs.items()]:
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) and value.numel():
            finite = torch.isfinite(value.detach())
            if not bool(finite.all()):
                rows = (~finite.reshape(len(value), -1).all(1)).nonzero().reshape(-1) if value.dim() else None
                shown = "" if rows is None else f" in batch row(s) {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}"
                found.append(f"{where} holds {int((~finite).sum())} NaN/inf value(s){shown}")
    return found


def _step_error(err: Exception, step: int, args, kwargs) -> Exception:
    """The exception to raise for ``err``, raised by the model or guide at ``step``: one that names the step."""
    bad = _nonfinite_inputs(args, kwargs)
    if bad:
        text = str(err) if len(str(err)) <= 300 else str(err)[:297] + "..."
        return NonFiniteError(
            f"step {step}: the model or guide failed on a minibatch with non-finite inputs ({'; '.join(bad)}); "
            f"remove or fix those examples in the data. It raised {type(err).__name__}: {text}"
        )
    if type(err) in (ValueError, TypeError, RuntimeError, AssertionError, AttributeError, IndexError, ZeroDivisionError,
                     NotImplementedError, FloatingPointError, NonFiniteError):
        return type(err)(f"step {step}: the model or guide raised {type(err).__name__}: {err}")
    err.add_note(f"raised by the model or guide at SVI step {step}")
    return err


def _svi_step(model, guide, optim, elbo, args, kwargs, on_nonfinite, step, reduce=None, on_model_error=None):
    """:func:`svi_step`; ``reduce(params, loss) -> loss`` (data-parallel runs) replaces each
    parameter's gradient by the average over ranks and returns the global loss, between
    ``loss_and_grads`` and the NaN guard, so every rank takes the same decision.
    ``on_model_error()`` is called (nothing updated yet) before an exception of the
    model or guide is re-raised naming the step."""
    capture = poutine.trace(param_only=True)
    try:
        with capture:
            loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised, naming the step
        trace = getattr(capture, "trace", None)
        zero_grads({site["value"].unconstrained() for site in trace.nodes.values()} if trace is not None else set())
        if on_model_error is not None:
            on_model_error()
        new = _step_error(err, step, args, kwargs)
        if new is err:
            raise
        raise new from err
    params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    if reduce is not None:
        loss = reduce(params, loss)
    loss_ok = math.isfinite(loss)
    bad = [] if not loss_ok else _nonfinite_sites(guide, params)
    if not loss_ok or bad:
        zero_grads(set(params.values()))
        what = "the loss" if not loss_ok else f"the gradient of site(s) {', '.join(bad)}"
        if on_nonfinite == "raise":
            inputs = _nonfinite_inputs(args, kwargs)
            hint = f"; the minibatch has non-finite inputs: {'; '.join(inputs)}" if inputs else ""
            raise NonFiniteError(f"step {step}: {what} is not finite (loss = {loss}){hint}")
        return loss, False
    optim(set(params.values()))
    zero_grads(set(params.values()))
    return loss, True


def _weight_names(net: PyroModule) -> list[str]:
    """The names of ``net``'s weight sites and deterministic parameters, module by module."""
    names = []
    for module_name, module in net.named_modules():
        own = [k for k, p in module._parameters.items() if p is not None]
        own += [k for k in getattr(module, "_pyro_samples", {}) if k not in own]
        names += [f"{module_name}.{k}" if module_name else k for k in own]
    return names


def _compiled_run_net(model: BayesianClassifier, forward: Callable, x: torch.Tensor) -> torch.Tensor:
    """The network's output on ``x``: every weight read through the model (so each site and parameter
    is recorded as in the module's own forward), then ``forward(weights, buffers, x)``."""
    with model.shape_errors(x):
        weights = {name: functools.reduce(getattr, name.split("."), model.net) for name in _weight_names(model.net)}
        return model.net_output(forward(weights, dict(model.net.named_buffers()), x))


def compile_network_(model: BayesianClassifier, *, backend: str = "inductor", **options) -> BayesianClassifier:
    """Make ``model`` evaluate its network through ``torch.compile`` (in place; returns ``model``).

    The model first reads every weight (the same sample sites and parameters as
    its own forward, so the ELBO, the guide and the optimizer see the same
    sites), then calls the compiled functional forward of the network with them.
    Only the network is compiled; Pyro's trace machinery runs as before. The
    gradients equal the uncompiled ones to float rounding (``aot_eager``: the
    same operators, bitwise on the CPU; ``inductor``: fused kernels, within about
    5e-8 on LeNet-5's gradients). Networks with BatchNorm are refused (their statistics would not
    update in the compiled graph).

    :param backend: a ``torch.compile`` backend: ``"inductor"`` (needs a C++ compiler on the CPU, Triton
        on a GPU) or ``"aot_eager"`` (no code generation).
    :param options: further keyword arguments of ``torch.compile`` (``mode="reduce-overhead"`` on a GPU
        adds CUDA graphs).

    Usage::

        compile_network_(model, backend="inductor")
        fit_svi(model, guide, train, num_epochs=1)
    """
    check_type("model", model, BayesianClassifier, "a pyro_bq BayesianClassifier")
    check_type("backend", backend, str, 'a torch.compile backend name such as "inductor" or "aot_eager"')
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.net.modules()):
        raise ValueError("compile_network_ takes networks without BatchNorm: pass a network without it, or train "
                         "this one uncompiled")
    template = copy.deepcopy(model._template).train()

    def forward(weights, buffers, x):
        return torch.func.functional_call(template, {**weights, **buffers}, (x,))

    compiled = torch.compile(forward, backend=backend, **options)
    object.__setattr__(model, "_run_net", functools.partial(_compiled_run_net, model, compiled))
    return model


def _unshadow_params(*modules) -> None:
    """Make Pyro's global param store hold these modules' own parameters.

    A :class:`~pyro.nn.PyroModule` registers each ``nn.Parameter`` (its own and
    those of plain ``nn.Module`` children) in the global param store under its
    full name. An entry of the same name left there by an earlier module (an
    earlier model or guide in this process, without ``pyro.clear_param_store()``
    in between) shadows it: the module computes with its own tensor, but the
    param trace, hence the optimizer, gets the old one, so the module would not
    train. Such stale entries are removed; the module registers its own tensor
    at its next use. (Constrained ``PyroParam`` values are left alone: Pyro
    deliberately takes those from the store.)
    """
    store = pyro.get_param_store()
    for module in modules:
        if not isinstance(module, PyroModule):
            continue
        for sub in module.modules():
            prefix = getattr(sub, "_pyro_name", None)
            if not isinstance(sub, PyroModule) or prefix is None or (sub is not module and not prefix):
                continue
            pyro_params = getattr(sub, "_pyro_params", {})
            owned = [
                (_make_name(prefix, name), param)
                for name, param in sub._parameters.items()
                if param is not None and not (name.endswith("_unconstrained") and name[: -len("_unconstrained")] in pyro_params)
            ]
            for child_name, child in sub._modules.items():
                if child is not None and not isinstance(child, PyroModule):
                    owner = _make_name(prefix, child_name)
                    owned += [(param_with_module_name(owner, name), param) for name, param in child.named_parameters()]
            for fullname, param in owned:
                if fullname in store and store._params.get(fullname) is not param:
                    del store[fullname]


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of ``t`` (on the CPU), for a checksum."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _data_fingerprint(data) -> dict:
    """Size, shapes, dtypes and a cheap checksum of ``data`` (any object with tensors ``.x`` and ``.y``),
    as stored in a checkpoint.

    The checksum covers every byte of ``y`` (in order), the bytes of up to 256
    evenly spaced rows of ``x``, and the wrap-around sum of all of ``x``'s bytes
    read as 64-bit words: one pass over ``x`` on its own device, no copy of it.
    """
    x, y = data.x.detach(), data.y.detach()
    n = x.shape[0]
    k = min(n, _FINGERPRINT_ROWS)
    rows = torch.arange(k) * (n - 1) // max(k - 1, 1)
    crc = zlib.crc32(_bytes(x[rows.to(x.device)]), zlib.crc32(_bytes(y)))
    flat = x.contiguous().reshape(-1).view(torch.uint8)
    whole = flat.numel() // 8 * 8
    try:
        words = flat[:whole].view(torch.int64)
    except RuntimeError:  # a storage offset that is not a multiple of 8 bytes
        words = flat[:whole].clone().view(torch.int64)
    total = (int(words.sum()) + int(flat[whole:].sum(dtype=torch.int64))) % 2**64
    return {
        "size": n,
        "x": [str(x.dtype).replace("torch.", ""), *x.shape[1:]],
        "y": [str(y.dtype).replace("torch.", ""), *y.shape[1:]],
        "checksum": f"{crc:08x}-{total:016x}",
    }


def _describe_data(fp: dict) -> str:
    return f"{fp.get('size')} examples, x {fp.get('x')}, y {fp.get('y')}, checksum {fp.get('checksum')}"


def _check_settings(saved, settings: dict, where: str) -> None:
    """Refuse to resume from a checkpoint written with another seed, batch_size, train_mode or dataset."""
    if saved is None:  # written by an older pyro_bq: nothing to compare
        return
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {where} has malformed 'settings'; delete it or choose another checkpoint_dir")
    advice = ("; resume with the same settings, or pass another checkpoint_dir (or resume=False to start over "
              "and overwrite it)")
    for key, what in (("seed", "another data order"), ("batch_size", "another data order"),
                      ("train_mode", "with BatchNorm in another mode")):
        if key in saved and saved[key] != settings[key]:
            raise ValueError(
                f"checkpoint {where} was written with {key}={saved[key]!r}, but this run has {key}={settings[key]!r}: "
                f"resuming would continue {what}{advice}"
            )
    if "data" in saved and saved["data"] != settings["data"]:
        raise ValueError(
            f"checkpoint {where} was written for other data ({_describe_data(saved['data'])}) than this run's data "
            f"({_describe_data(settings['data'])}){advice}"
        )


def _misfits(what: str, current: dict, saved) -> list[str]:
    """How the saved state dict ``saved`` does not fit ``current`` (keys and tensor shapes)."""
    if not isinstance(saved, dict):
        return [f"{what} state is a {type(saved).__name__}, not a state dict"]
    out = []
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        out.append(f"{what} has {missing[:5]}{' ...' if len(missing) > 5 else ''}, which the checkpoint lacks")
    if unexpected:
        out.append(f"the checkpoint's {what} has {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, unknown here")
    for key, value in current.items():
        old = saved.get(key)
        if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor) and old.shape != value.shape:
            out.append(f"{what}[{key!r}] has shape {tuple(old.shape)} in the checkpoint but {tuple(value.shape)} here")
    return out


def _restore(model, guide, optim, state, where: str) -> None:
    """Load model, guide and optimizer state, or raise a ValueError naming the checkpoint ``where``."""
    advice = ("it was written for another model or guide (architecture); resume with the same ones, or pass another "
              "checkpoint_dir (or resume=False to start over and overwrite it)")
    lacking = [k for k in ("step", "model", "guide", "optim", "rng", "losses", "skipped") if k not in state]
    if lacking:
        raise ValueError(f"checkpoint {where} is not a fit_svi checkpoint (it lacks {lacking}); "
                         "move it away or choose another checkpoint_dir")
    problems = _misfits("the guide", guide.state_dict(), state["guide"])
    if isinstance(model, torch.nn.Module):
        problems += _misfits("the model", model.state_dict(), state["model"])
    if problems:
        raise ValueError(f"checkpoint {where} does not fit this run: {'; '.join(problems[:6])}; {advice}")
    try:
        if isinstance(model, torch.nn.Module):
            model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
        optim.set_state(state["optim"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {where} does not fit this run ({type(err).__name__}: {err}); {advice}") from err


def _num_classes(model) -> Optional[int]:
    """The classes of a :class:`~pyro_bq.models.BayesianClassifier` (its network's last ``nn.Linear``), else None."""
    if not isinstance(model, BayesianClassifier):
        return None
    last = [m for m in model.net.modules() if isinstance(m, torch.nn.Linear)]
    return last[-1].out_features if last else None


def _total_steps(batches: Batches, num_epochs: Optional[int], num_steps: Optional[int]) -> int:
    if num_steps is not None:
        return check_int("num_steps", num_steps, low=1)
    if num_epochs is None:
        raise ValueError("give num_epochs or num_steps")
    num_epochs = check_int("num_epochs", num_epochs, low=1)
    if batches.num_batches is None:
        raise ValueError(f"num_epochs needs the number of batches per epoch, but the data (a "
                         f"{type(batches.data).__name__}) has no len(); pass num_steps instead")
    return num_epochs * batches.num_batches


def _fingerprint(batches: Batches) -> dict:
    """What a checkpoint records of the data: :func:`_data_fingerprint` of an in-memory dataset, else its
    kind, size and batches per epoch."""
    if batches.in_memory:
        return _data_fingerprint(batches.data)
    return {"size": batches.dataset_size, "x": type(batches.data).__name__, "y": None,
            "checksum": f"batches/epoch={batches.num_batches}"}


def _check_model_size(model, batches: Batches, dataset_size: Optional[int]) -> None:
    """The model's ``dataset_size`` scales the likelihood; an explicit ``dataset_size=`` must agree with it."""
    own = getattr(model, "dataset_size", None)
    if dataset_size is not None and own is not None and own != batches.dataset_size:
        raise ValueError(f"dataset_size={batches.dataset_size} but the model was built with dataset_size={own}; "
                         "pass the number of training examples to both")
    if own is None:
        batches.require_size("fit_svi")


@dataclass
class _Run:
    """One :func:`fit_svi` run: its arguments (checked here), counters and result."""

    model: object
    guide: object
    optim: pyro.optim.PyroOptim
    elbo: ELBO
    data: Batches
    batch_size: int
    seed: int
    on_nonfinite: str
    folder: Optional[Path]
    distributed: Optional[bool]
    callback: Optional[Callable[[int, float], None]] = None
    step_hook: Optional[Callable[[], None]] = None
    train_mode: bool = True  # the modules' mode during the steps (BatchNorm: batch or running statistics)
    settings: Optional[dict] = None  # what a checkpoint records, and a resume must match
    result: FitResult = field(default_factory=FitResult)
    step: int = 0
    before: Optional[dict] = None  # the RNG states before the current step: those of the last good state
    model_failed: bool = False
    position: tuple = (0, 0)  # (epoch, batch within the epoch) of the next step
    strategy: SingleProcess = field(init=False)

    def __post_init__(self) -> None:
        check_choice("on_nonfinite", self.on_nonfinite, ("raise", "skip"))
        self.seed = check_int("seed", self.seed, low=0, high=MAX_SEED)
        if self.callback is not None:
            check_callable("callback", self.callback, "a callable callback(step, loss) or None")
        if self.step_hook is not None:
            check_callable("step_hook", self.step_hook, "a callable step_hook() or None")
        _check_optim_elbo(self.optim, self.elbo)
        self.strategy = resolve(self.distributed)
        sampler = getattr(self.data.data, "sampler", None)
        if self.strategy.distributed and isinstance(sampler, torch.utils.data.DistributedSampler):
            raise ValueError("in a data-parallel run every rank passes the same full DataLoader (no "
                             "DistributedSampler): fit_svi cuts each global batch into the ranks' shards itself")

    def start(self, total: int, checkpoint_every: int, resume: bool) -> None:
        """Fix the settings a checkpoint records, make the folder (rank 0), check that every rank has the same;
        seed, create the guide's parameters, resume from the folder's latest checkpoint, share rank 0's state."""
        if self.folder is not None or self.strategy.distributed:  # the data's fingerprint only when needed
            self.settings = {"seed": self.seed, "batch_size": self.batch_size, "train_mode": self.train_mode,
                             "data": _fingerprint(self.data)}
        self.strategy.agree(
            {"seed": self.seed, "batch_size": self.batch_size, "num_steps": total, "checkpoint_every": checkpoint_every,
             "resume": resume, "on_nonfinite": self.on_nonfinite, "data": (self.settings or {}).get("data")},
            functools.partial(writable_folder, "checkpoint_dir", self.folder) if self.folder is not None else None,
        )
        seed_everything(rank_seed(self.seed, self.strategy.rank))
        x0, y0 = self.data.first()
        with module_mode(self.model, False):  # a shape trace: BatchNorm statistics stay as they are
            if hasattr(self.guide, "setup"):
                self.guide.setup(x0, y0)
            else:
                self.guide(x0, y0)
        _unshadow_params(self.model, self.guide)
        if self.folder is not None and resume:
            self.resume(total)
        self.strategy.share_modules(self.model, self.guide)

    def resume(self, total: int) -> None:
        """Load the latest valid checkpoint (rank 0's, on every rank) into the model, guide, optimizer and counters;
        refuse one past ``total`` steps."""
        shared = self.strategy.share_checkpoint(self.strategy.main_only(latest_checkpoint, self.folder), self.folder)
        if shared is None:
            return
        state, where, name = shared
        _check_settings(state.get("settings"), self.settings, where)
        if int(state["step"]) > total:
            raise ValueError(
                f"checkpoint {where} is at step {int(state['step'])}, past this run's total of {total} steps "
                f"(num_steps, or num_epochs times the batches per epoch): resuming would return a guide trained "
                f"longer than asked. Pass num_steps >= {int(state['step'])} to continue it, another checkpoint_dir, "
                "or resume=False to start over and overwrite it")
        _restore(self.model, self.guide, self.optim, state, where)
        self.step = int(state["step"])
        per_epoch = self.data.num_batches
        self.position = (tuple(int(v) for v in state["position"]) if "position" in state
                         else divmod(self.step, per_epoch) if per_epoch else (0, 0))
        self.strategy.restore_rng(state, self.seed, self.step)
        self.result.losses = list(state["losses"])
        self.result.skipped_steps = list(state["skipped"])
        self.result.resumed_from = name

    def save(self, at: int, rng: Optional[dict] = None) -> None:
        """Checkpoint the state after ``at`` steps; ``rng``: the RNG states of then (default: now)."""
        if self.folder is None:
            return
        rng = rng if rng is not None else rng_state()
        extra = self.strategy.rng_record(rng, at)
        self.strategy.write(lambda: replace_checkpoint(self.folder, at, self._state(at, rng, extra)),
                            f"the checkpoint of step {at}")

    def _state(self, at: int, rng: dict, extra: dict) -> dict:
        return {
            "step": at,
            "model": self.model.state_dict() if isinstance(self.model, torch.nn.Module) else {},
            "guide": self.guide.state_dict(),
            "optim": self.optim.get_state(),
            "rng": rng,
            "losses": list(self.result.losses),
            "skipped": list(self.result.skipped_steps),
            "settings": self.settings,
            "position": list(self.position),
            **extra,
        }

    def _on_model_error(self) -> None:
        self.model_failed = True
        self.strategy.save_after_local_error(functools.partial(self.save, self.step, self.before))

    def guarded_step(self, xb: torch.Tensor, yb: torch.Tensor, weight: float, n_global: int) -> tuple[float, bool]:
        """One guarded step on this rank's shard; returns the global batch's loss and whether it was applied."""
        reduce = functools.partial(self.strategy.average, weight=weight, step=self.step)
        if self.folder is not None:
            self.before = rng_state()
        try:
            loss, ok = _svi_step(self.model, self.guide, self.optim, self.elbo, (xb, yb), {}, self.on_nonfinite,
                                 self.step, reduce, self._on_model_error)
        except NonFiniteError:
            if not self.model_failed:  # the guard's decision (the same on every rank)
                self.save(self.step, self.before)
            raise
        if not ok:
            self.result.skipped_steps.append(self.step)
        else:
            if self.step_hook is not None:
                self.step_hook()
            self.result.losses.append(loss / n_global)
        self.step += 1
        self.position = (self.position[0], self.position[1] + 1)
        return loss, ok

    def train(self, total: int, checkpoint_every: int, progress: bool) -> FitResult:
        """Step until ``total`` steps are done, checkpointing every ``checkpoint_every`` and at the end."""
        bar = self.strategy.main_only(tqdm, total=total, initial=self.step, desc="SVI", dynamic_ncols=True,
                                      leave=False) if progress else None
        try:
            # train_mode: BatchNorm normalizes with batch statistics and updates the running ones;
            # eval mode: BatchNorm is the fixed affine map of its running statistics
            with module_mode(self.model, self.train_mode):
                self._loop(total, checkpoint_every, bar)
        finally:
            if bar is not None:
                bar.close()
        self.result.steps = self.step
        return self.result

    def _loop(self, total: int, checkpoint_every: int, bar) -> None:
        """Step, report and checkpoint until ``total`` steps are done."""
        running = None
        while self.step < total:
            for xb, yb, weight, n_global in self._epoch():
                loss, ok = self.guarded_step(xb, yb, weight, n_global)
                if ok:
                    running = loss if running is None else 0.95 * running + 0.05 * loss
                if bar is not None:
                    bar.update(1)
                    if running is not None:
                        bar.set_postfix(elbo=f"{-running:.4g}")
                if self.callback is not None:
                    self.callback(self.step, loss)
                if self.step % checkpoint_every == 0 or self.step == total:
                    self.save(self.step)
                if self.step >= total:
                    break

    def _epoch(self):
        """This rank's shards of the rest of the current epoch's batches; the position moves on with each,
        and to the next epoch at its end. A malformed batch saves the last good state, then raises naming the step."""
        epoch, offset = self.position
        batches = self.data.epoch(epoch, self.seed, skip=offset)
        got = False
        while True:
            try:
                item = next(batches, None)
            except BatchError as err:
                self.save(self.step)
                raise type(err)(f"step {self.step}: {err}") from err
            if item is None:
                break
            index, xb, yb = item
            got = True
            self.position = (epoch, index)
            yield self.strategy.shard(xb, yb)
        if not got and offset == 0:
            raise ValueError(f"the data yielded no batch in epoch {epoch}; it must give at least one (x, y) batch "
                             "on every pass")
        self.position = (epoch + 1, 0)


def fit_svi(
    model, guide, data, *, num_epochs: Optional[int] = 1, num_steps: Optional[int] = None, batch_size: int = 128,
    optim: Optional[pyro.optim.PyroOptim] = None, lr: float = 1e-3, elbo: Optional[ELBO] = None, seed: int = 0,
    checkpoint_dir: Optional[os.PathLike] = None, checkpoint_every: int = 100, resume: bool = True,
    on_nonfinite: str = "raise", progress: bool = True, callback: Optional[Callable[[int, float], None]] = None,
    step_hook: Optional[Callable[[], None]] = None, distributed: Optional[bool] = None,
    dataset_size: Optional[int] = None, device=None, train_mode: bool = True,
) -> FitResult:
    """Train ``guide`` for ``model`` with SVI on ``data``.

    :param data: an :class:`~pyro_bq.data.InMemoryDataset` (any object with tensors
        ``.x``, ``.y`` and ``epoch_order(epoch, seed)``), a ``torch.utils.data.DataLoader``,
        or any re-iterable of ``(x, y)`` batches (:func:`~pyro_bq.inference.batches.as_batches`
        says how each is ordered, resumed and checked). Every batch is checked first:
        a malformed one (row shape, NaN/inf, labels outside ``[0, num_classes)``) saves
        the last good state, then raises :class:`~pyro_bq.inference.batches.BatchError`
        naming the step, the epoch and the batch index.
    :param num_epochs: passes over ``data`` (ignored when ``num_steps`` is set; data
        without ``len()`` needs ``num_steps``).
    :param num_steps: total optimizer steps, across epochs.
    :param batch_size: examples per optimizer step of an in-memory dataset (a DataLoader
        keeps its own); in a data-parallel run the *global* batch, split across the ranks.
    :param dataset_size: the number of training examples when ``data`` cannot tell
        (``len(loader.dataset)`` otherwise); it must agree with the model's ``dataset_size``,
        which scales the likelihood.
    :param device: where training runs (``"auto"``, ``"cpu"``, ``"cuda"``, a ``torch.device``);
        default: where the model's parameters are. The model is moved there (in place)
        and every batch follows (``non_blocking`` from pinned memory).
    :param optim: a Pyro optimizer; default :func:`default_optim` ``(lr)`` (Adam, fused kernel).
    :param elbo: default :class:`~pyro_bq.inference.elbo.MeanFieldELBO` (``TraceMeanField_ELBO``
        without the log-densities its loss never reads; same loss and gradients).
    :param seed: data order and weight noise, an int in ``[0, 2**32 - 1]``.
    :param train_mode: the modules' mode in the steps: ``True``, BatchNorm uses and updates batch statistics;
        ``False``, it is the fixed map of its running statistics (e.g. a pretrained net's).
    :param checkpoint_dir: where ``ckpt-{step}.bq`` files go; with ``resume`` the
        run continues from the latest valid one there. A checkpoint records
        ``seed``, ``batch_size``, ``train_mode`` and a fingerprint of ``data`` (size, shapes,
        dtypes, a cheap checksum); resuming with other ones, or with a model or
        guide whose parameters do not fit, raises ``ValueError`` naming the file.
    :param resume: continue from the latest checkpoint (``True``/``False``).
    :param progress: show a progress bar (``True``/``False``).
    :param on_nonfinite: ``"raise"`` (save the last good state, then raise
        :class:`NonFiniteError` naming the site(s) and step) or ``"skip"``. An
        exception of the model or guide during a step (e.g. torch's validation
        of a NaN input) also saves the last good state first (one process), and
        comes back naming the step (a :class:`NonFiniteError` when the
        minibatch holds NaN/inf values).
    :param callback: called as ``callback(step, loss)`` after every step (on
        every rank; in a data-parallel run ``loss`` is the global batch's loss).
    :param step_hook: called after every optimizer step (e.g. to re-apply masks).
    :param distributed: ``None`` (default): data-parallel over ``torch.distributed``
        when a process group of more than one rank exists or ``torchrun``'s
        environment describes one; ``False``: one process; ``True``: require a
        group. Every rank passes the same full ``data`` (a DataLoader without a
        ``DistributedSampler``) and arguments; a step
        equals one process's step on the global batch; a checkpoint resumes with
        any number of ranks (see :mod:`pyro_bq.inference.distributed`).

    Usage::

        result = fit_svi(model, guide, load_mnist(train=True), num_epochs=5, lr=1e-3)
        # the same line, launched with: torchrun --standalone --nproc_per_node 4 train.py
    """
    batch_size = check_int("batch_size", batch_size, low=1)
    device = module_device(model) if device is None else resolve_device(device)
    if isinstance(model, torch.nn.Module) and not same_device(module_device(model, default=str(device)), device):
        model.to(device)
    batches = as_batches(data, batch_size=batch_size, dataset_size=dataset_size, device=device,
                         num_classes=_num_classes(model))
    _check_model_size(model, batches, dataset_size)
    total = _total_steps(batches, num_epochs, num_steps)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, low=1)
    folder = check_path("checkpoint_dir", checkpoint_dir) if checkpoint_dir is not None else None
    resume, progress = check_bool("resume", resume), check_bool("progress", progress)
    optim = optim if optim is not None else default_optim(lr)
    elbo = elbo if elbo is not None else MeanFieldELBO()
    run = _Run(model, guide, optim, elbo, batches, batch_size, seed, on_nonfinite, folder, distributed,
               callback=callback, step_hook=step_hook, train_mode=check_bool("train_mode", train_mode))
    run.start(total, checkpoint_every, resume)
    return run.train(total, checkpoint_every, progress)
