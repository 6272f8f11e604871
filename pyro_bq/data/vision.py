"""torchvision's image classification sets as torch Datasets of ``(x, y)`` pairs that every pyro_bq entry point takes.

:func:`load_torchvision` reads CIFAR-10, CIFAR-100 and SVHN through torchvision's
own classes (their official on-disk formats: CIFAR's pickled batches, SVHN's
``.mat`` files; torchvision checks their MD5 sums), and MNIST, Fashion-MNIST and
KMNIST through pyro_bq's IDX reader (:mod:`pyro_bq.data.mnist`, which also reads
the ``.gz`` files in place, so a read-only data folder works). Wrap the result in
a ``torch.utils.data.DataLoader`` (workers, pinning, augmentation) and pass that
to :func:`~pyro_bq.inference.fit_svi`, the recipes or prediction.

Default preprocessing (``transform=None``): ``ToTensor`` then per-channel
normalization with the dataset's usual mean and standard deviation; the
MNIST family all use MNIST's (0.1307, 0.3081), as :func:`~pyro_bq.data.load_mnist`
does, so an out-of-distribution set goes through the same preprocessing as the
training set. A ``transform`` replaces it and receives a PIL image, as in torchvision.

Usage::

    train = load_torchvision("CIFAR10", "data", train=True)
    loader = DataLoader(train, batch_size=128, shuffle=True, num_workers=2, pin_memory=True)
    fit_svi(model, guide, loader, num_epochs=10, device="auto")
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image
from torchvision import transforms as T

from pyro_bq._validation import check_bool, check_callable, check_choice

from .mnist import MNIST_MEAN, MNIST_STD, DataNotFoundError, read_idx_pair, resolve_root

__all__ = ["load_torchvision", "IdxImages", "TORCHVISION_SETS"]

#: per-channel (mean, std) of each set's training images, the default normalization
_STATS = {
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "SVHN": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "MNIST": ((MNIST_MEAN,), (MNIST_STD,)),
    "FashionMNIST": ((MNIST_MEAN,), (MNIST_STD,)),
    "KMNIST": ((MNIST_MEAN,), (MNIST_STD,)),
}
#: the names :func:`load_torchvision` takes
TORCHVISION_SETS = tuple(_STATS)
_ALIASES = {"CIFAR-10": "CIFAR10", "CIFAR-100": "CIFAR100", "FASHION-MNIST": "FashionMNIST",
            "FASHIONMNIST": "FashionMNIST", "FASHION_MNIST": "FashionMNIST"}


class IdxImages(torch.utils.data.Dataset):
    """MNIST-family images held as uint8 ``(N, H, W)`` with labels ``(N,)``; item ``i`` is
    ``(transform(PIL image), label)``, as torchvision's MNIST gives.

    Usage::

        data = IdxImages(images, labels, T.ToTensor())
        x, y = data[0]
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, name: str = "images"):
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8))
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform, self.name = transform, name

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i].numpy())), int(self.targets[i])

    def __repr__(self) -> str:
        return f"IdxImages({self.name!r}, n={len(self)})"


def _canonical(name) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str such as 'CIFAR10', got {type(name).__name__}")
    key = _ALIASES.get(name.upper(), name)
    upper = {k.upper(): k for k in TORCHVISION_SETS}
    return check_choice("name", upper.get(key.upper(), key), TORCHVISION_SETS)


def load_torchvision(name: str, root=None, train: bool = True, transform: Optional[Callable] = None,
                     download: bool = False) -> torch.utils.data.Dataset:
    """One of torchvision's sets (``"CIFAR10"``, ``"CIFAR100"``, ``"SVHN"``, ``"MNIST"``,
    ``"FashionMNIST"``, ``"KMNIST"``) as a Dataset of ``(image tensor, int label)``.

    :param root: data root (see :func:`~pyro_bq.data.resolve_root`); torchvision's layout
        below it (``ROOT/cifar-10-batches-py/``, ``ROOT/cifar-100-python/``,
        ``ROOT/train_32x32.mat``, ``ROOT/MNIST/raw/``, ...).
    :param train: the training split (SVHN: ``"train"``), else the test split.
    :param transform: applied to each PIL image; default ``ToTensor`` plus normalization.
    :param download: let torchvision fetch missing files into ``root`` (needs a network).
    :raises DataNotFoundError: naming what was looked for, when the files are missing.

    Usage::

        test = load_torchvision("SVHN", "data", train=False)
        x, y = test[0]           # (3, 32, 32) float, int
    """
    name = _canonical(name)
    train, download = check_bool("train", train), check_bool("download", download)
    if transform is None:
        transform = T.Compose([T.ToTensor(), T.Normalize(*_STATS[name])])
    else:
        check_callable("transform", transform, "a callable applied to each PIL image, or None")
    base = resolve_root(root)
    if name in ("MNIST", "FashionMNIST", "KMNIST"):
        images, labels = read_idx_pair(name, base, train, download, any_count=True)
        return IdxImages(images, labels, transform, name=f"{name}-{'train' if train else 'test'}")
    try:
        if name == "SVHN":
            return tvd.SVHN(str(base), split="train" if train else "test", transform=transform, download=download)
        return getattr(tvd, name)(str(base), train=train, transform=transform, download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise DataNotFoundError(
            f"{name} ({'train' if train else 'test'}) not found or corrupted under {base} ({err}). Put torchvision's "
            "files there (e.g. ROOT/cifar-10-batches-py/, ROOT/train_32x32.mat), set PYRO_BQ_DATA, or use "
            "download=True when online.") from err
