"""Train (or load from a cache) the LeNet-5 BNN on MNIST that the mixed-precision
example, benchmark and slow tests share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pyro
import torch
import torch.nn.functional as F

from pyro_bq._validation import check_int, check_positive

__all__ = ["default_cache", "train_lenet5_bnn", "load_or_train_lenet5_bnn"]


def default_cache() -> Path:
    """``~/.cache/pyro_bq/mixed/lenet5_mnist_bnn.bq`` (honours ``$XDG_CACHE_HOME``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pyro_bq" / "mixed" / "lenet5_mnist_bnn.bq"


def _build(dataset_size: int):
    from pyro_bq.models import BayesianClassifier, LeNet5
    from pyro_bq.priors import IIDNormal

    net = LeNet5()
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=dataset_size)
    return net, model


def train_lenet5_bnn(
    train,
    *,
    pretrain_epochs: int = 2,
    svi_epochs: int = 3,
    lr: float = 1e-3,
    init_scale: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
):
    """Pretrain a deterministic LeNet-5 with Adam, then fit a mean-field BNN started
    from it with :func:`~pyro_bq.inference.fit_svi`. Returns ``(model, guide)``."""
    from pyro_bq.guides import AutoMeanFieldNormal, init_to_pretrained
    from pyro_bq.inference import fit_svi, seed_everything

    pretrain_epochs = check_int("pretrain_epochs", pretrain_epochs, low=0)
    svi_epochs = check_int("svi_epochs", svi_epochs, low=1)
    check_positive("lr", lr)
    from pyro_bq.models import LeNet5

    seed_everything(seed)
    net = LeNet5()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for epoch in range(pretrain_epochs):
        for xb, yb in train.batches(batch_size, shuffle=True, seed=seed, epoch=epoch):
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    from pyro_bq.models import BayesianClassifier
    from pyro_bq.priors import IIDNormal

    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=len(train))
    guide = AutoMeanFieldNormal(model, init_loc_fn=init_to_pretrained(net), init_scale=init_scale)
    fit_svi(model, guide, train, num_epochs=svi_epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    return model, guide


def load_or_train_lenet5_bnn(
    data_root,
    path: Optional[os.PathLike] = None,
    *,
    train_limit: Optional[int] = None,
    retrain: bool = False,
    **train_kwargs,
):
    """Load the cached LeNet-5 BNN from ``path`` or train it on MNIST and save it there.

    The cache file stores the guide's state and the training settings; a file
    written with other settings is not reused. Returns ``(model, guide, info)``.
    """
    from pyro_bq.data import load_mnist
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.io import load_checkpoint, save_checkpoint

    path = Path(path) if path is not None else default_cache()
    train = load_mnist(data_root, train=True, limit=train_limit)
    settings = {"train_size": len(train), **{k: v for k, v in sorted(train_kwargs.items()) if k != "progress"}}
    if path.exists() and not retrain:
        state = load_checkpoint(path)
        if state.get("settings") == settings:
            pyro.clear_param_store()
            _, model = _build(len(train))
            guide = AutoMeanFieldNormal(model)
            guide.setup(train.x[:2], train.y[:2])
            guide.load_state_dict(state["guide"])
            return model, guide, {"path": str(path), "trained": False, "settings": settings}
    pyro.clear_param_store()
    model, guide = train_lenet5_bnn(train, **train_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"guide": guide.state_dict(), "settings": settings})
    return model, guide, {"path": str(path), "trained": True, "settings": settings}
