"""Training recipes: a deterministic pretraining, a mean-field BNN started from it, and Adam with a scale rate.

The study, the PWFN and mixed-precision examples and the benchmarks all build
their Bayesian network the same way: :func:`pretrain` a deterministic network,
then :func:`fit_meanfield_bnn` fits an
:class:`~pyro_bq.guides.AutoMeanFieldNormal` guide whose means start at the
pretrained weights. What differs between them (the prior, the learning rates,
the seeds) is an argument here.

The recipes take what :func:`~pyro_bq.inference.fit_svi` takes: an in-memory dataset
(:class:`pyro_bq.data.InMemoryDataset`), a ``torch.utils.data.DataLoader`` or any
re-iterable of ``(x, y)`` batches (:func:`~pyro_bq.inference.batches.as_batches`), and a
``device=``; they do not import :mod:`pyro_bq.data`.

Usage::

    net = pretrain(LeNet5, train, epochs=1, seed=0)
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train))
    guide, result = fit_meanfield_bnn(model, train, pretrained=net, num_epochs=1, scale_lr=1e-2)
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import pyro.optim
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pyro_bq._validation import check_bool, check_callable, check_int, check_module, check_positive, resolve_device
from pyro_bq.guides import AutoMeanFieldNormal, init_to_pretrained
from pyro_bq.inference import FitResult, fit_svi
from pyro_bq.inference.batches import as_batches, module_device
from pyro_bq.io import load_checkpoint, save_checkpoint

__all__ = ["pretrain", "fit_meanfield_bnn", "scale_aware_adam", "load_meanfield_guide", "save_meanfield_guide"]


def scale_aware_adam(lr: float = 1e-3, scale_lr: Optional[float] = None) -> pyro.optim.PyroOptim:
    """Pyro's Adam with learning rate ``lr``, and ``scale_lr`` for the parameters that hold posterior scales.

    A parameter holds scales when the last dotted part of its name contains
    ``"scale"``: ``scale_raw`` of :class:`~pyro_bq.guides.AutoMeanFieldNormal`
    and :class:`~pyro_bq.guides.AutoPWFN`, ``log2_scale`` of
    :class:`~pyro_bq.guides.AutoLogQuantNormal`, ``scale`` of
    :class:`~pyro_bq.guides.QuantizedNormal`; never a ``loc``. Scales usually
    want a larger rate than means: they start tiny (``init_scale``) and must
    grow by orders of magnitude.

    :param lr: learning rate of every other parameter (the means).
    :param scale_lr: learning rate of the scale parameters; ``None``: ``lr``.

    Usage::

        fit_svi(model, guide, train, optim=scale_aware_adam(1e-3, 1e-2))
    """
    lr = check_positive("lr", lr)
    scale_lr = lr if scale_lr is None else check_positive("scale_lr", scale_lr)
    return pyro.optim.Adam(lambda name: {"lr": scale_lr if "scale" in name.rsplit(".", 1)[-1] else lr})


def pretrain(
    make_net: Callable[[], nn.Module],
    data,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    data_seed: Optional[int] = None,
    checkpoint: Optional[os.PathLike] = None,
    progress: bool = False,
    device=None,
    autocast: Optional[torch.dtype] = None,
) -> nn.Module:
    """A deterministic network trained with Adam on the cross entropy of ``data``; returned in eval mode.

    :param make_net: builds the untrained network; it is called with torch's RNG
        seeded by ``seed`` (the global RNG is left as it was), so a seed gives one
        initialisation.
    :param data: an in-memory dataset (shuffled by ``epoch_order(epoch, data_seed)``), a DataLoader
        (re-seeded per epoch from ``(data_seed, epoch)``) or a re-iterable of ``(x, y)`` batches.
    :param epochs: passes over ``data`` (0: the untrained network).
    :param data_seed: seed of the minibatch order (default ``seed``).
    :param checkpoint: a file that holds the network and the optimizer after each
        epoch; a later call with the same file resumes after its last finished epoch.
    :param progress: show a progress bar.
    :param device: where to train (``"auto"``, ``"cpu"``, ``"cuda"``, a ``torch.device``); default:
        where ``make_net()`` put the network's parameters. The network is returned there.
    :param autocast: ``torch.bfloat16``: mixed precision, the forward pass and loss under
        ``torch.autocast`` on the training device (convolutions and matrix products in bfloat16,
        BatchNorm and the loss in float32); the weights, their gradients and Adam stay float32.
        Several times faster where the hardware has bfloat16 units (CPUs with AMX or AVX-512 BF16,
        recent GPUs). Default ``None``: float32 throughout.

    Usage::

        net = pretrain(LeNet5, train, epochs=2, lr=2e-3, checkpoint="runs/lenet.bq")
        net = pretrain(LeNet5, train, epochs=2, autocast=torch.bfloat16)  # mixed precision
    """
    if isinstance(make_net, nn.Module):
        raise TypeError("make_net must build the network (e.g. the class LeNet5), not be a network instance")
    check_callable("make_net", make_net, "a callable that returns an nn.Module")
    epochs = check_int("epochs", epochs, low=0)
    batch_size = check_int("batch_size", batch_size, low=1)
    seed = check_int("seed", seed, low=0)
    data_seed = seed if data_seed is None else check_int("data_seed", data_seed, low=0)
    _check_autocast(autocast)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = check_module("make_net()", make_net())
    device = module_device(net) if device is None else resolve_device(device)
    net.to(device)
    batches = as_batches(data, batch_size=batch_size, device=device)
    opt = torch.optim.Adam(net.parameters(), lr=check_positive("lr", lr))
    start = 0
    if checkpoint is not None and os.path.isfile(checkpoint):
        state = load_checkpoint(checkpoint, map_location=device)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optim"])
        start = int(state["epoch"])
    per_epoch = batches.num_batches
    bar = tqdm(total=None if per_epoch is None else epochs * per_epoch,
               initial=0 if per_epoch is None else min(start, epochs) * per_epoch, desc="pretrain",
               disable=not check_bool("progress", progress), dynamic_ncols=True)
    net.train()
    for epoch in range(start, epochs):
        for _, xb, yb in batches.epoch(epoch, data_seed):
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"net": net.state_dict(), "optim": opt.state_dict(), "epoch": epoch + 1})
    bar.close()
    return net.eval()


def _check_autocast(autocast) -> None:
    if autocast is None or autocast is torch.bfloat16:
        return
    if autocast is torch.float16:
        raise ValueError("autocast=torch.float16 needs gradient scaling, which pretrain does not do; "
                         "use autocast=torch.bfloat16 or None")
    raise TypeError(f"autocast must be torch.bfloat16 or None, got {autocast!r}")


def fit_meanfield_bnn(
    model,
    data,
    *,
    pretrained: Optional[nn.Module] = None,
    init_scale: float = 1e-3,
    lr: float = 1e-3,
    scale_lr: Optional[float] = None,
    **fit_kwargs,
) -> tuple[AutoMeanFieldNormal, FitResult]:
    """Fit a mean-field Normal guide for ``model`` on ``data`` with :func:`~pyro_bq.inference.fit_svi`.

    :param model: the Bayesian network, e.g. a
        :class:`~pyro_bq.models.BayesianClassifier`; its prior is the caller's choice.
    :param pretrained: a network of the same architecture whose weights are the
        guide's initial means (:func:`~pyro_bq.guides.init_to_pretrained`);
        ``None``: the model's own initial weights.
    :param init_scale: the initial posterior standard deviation of every weight.
    :param lr: learning rate of the means (of every parameter when ``scale_lr`` is ``None``).
    :param scale_lr: learning rate of the scales with :func:`scale_aware_adam`;
        ``None``: ``fit_svi``'s default optimizer with ``lr``.
    :param fit_kwargs: passed on to ``fit_svi`` (``num_epochs``, ``batch_size``, ``seed``, ``device``, ``dataset_size``,
        ``checkpoint_dir``, ``progress``, ``callback``, ...).
    :returns: ``(guide, fit_result)``.

    Usage::

        model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train))
        guide, _ = fit_meanfield_bnn(model, train, pretrained=net, num_epochs=3, progress=False)
    """
    init = init_to_pretrained(pretrained) if pretrained is not None else None
    guide = AutoMeanFieldNormal(model, init_loc_fn=init, init_scale=init_scale)
    optim = None if scale_lr is None else scale_aware_adam(lr, scale_lr)
    return guide, fit_svi(model, guide, data, optim=optim, lr=lr, **fit_kwargs)


def save_meanfield_guide(path: os.PathLike, guide: AutoMeanFieldNormal, *, key=None) -> None:
    """Save ``guide``'s state to ``path`` (a pickle-free checkpoint) with ``key``, the settings it was fitted with.

    Usage::

        save_meanfield_guide("bnn.bq", guide, key={"epochs": 3, "seed": 0})
    """
    save_checkpoint(path, {"guide": guide.state_dict(), "key": key})


def load_meanfield_guide(path: os.PathLike, model, x: torch.Tensor, *, key=None) -> Optional[AutoMeanFieldNormal]:
    """The guide :func:`save_meanfield_guide` wrote to ``path`` for ``model``, or ``None`` if there is no such file.

    :param x: a few example inputs of ``model`` (they set up the guide's sites).
    :param key: when given, a file saved with another key gives ``None`` as well.

    Usage::

        guide = load_meanfield_guide("bnn.bq", model, train.x[:2], key={"epochs": 3, "seed": 0})
    """
    if not os.path.isfile(path):
        return None
    state = load_checkpoint(path)
    if key is not None and state.get("key") != key:
        return None
    guide = AutoMeanFieldNormal(model)
    guide.setup(x)
    guide.load_state_dict(state["guide"])
    return guide
