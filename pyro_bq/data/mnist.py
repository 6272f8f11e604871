"""MNIST and Fashion-MNIST as in-memory tensors.

The IDX files are decoded once with numpy (no per-item PIL work) and
normalised with MNIST's mean and std (0.1307, 0.3081), Fashion-MNIST too, so
that an out-of-distribution set goes through the same preprocessing.

Root directory resolution: the ``root`` argument, then the environment
variable ``PYRO_BQ_DATA``, then ``~/.cache/pyro_bq/data``. The folder uses
torchvision's layout, ``ROOT/MNIST/raw/train-images-idx3-ubyte(.gz)``; a
read-only folder works (the ``.gz`` files are read directly).
``download=True`` hands over to torchvision, which fetches the files into a
writable ROOT.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torchvision.datasets as tvd

from pyro_bq._validation import check_bool, check_int

from .dataset import InMemoryDataset

__all__ = ["resolve_root", "load_mnist", "load_fashion_mnist", "MNIST_MEAN", "MNIST_STD", "DataNotFoundError",
           "images_to_tensor", "read_idx", "IDX_IMAGES", "IDX_LABELS"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: IDX magic numbers of image (N, rows, cols) and label (N,) files.
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801
_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
_TORCHVISION = {"MNIST": "MNIST", "FashionMNIST": "FashionMNIST", "KMNIST": "KMNIST"}


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are not where pyro_bq looked."""


def resolve_root(root: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The data root: ``root``, else ``$PYRO_BQ_DATA``, else ``~/.cache/pyro_bq/data``."""
    if root is not None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
        return Path(root).expanduser()
    env = os.environ.get("PYRO_BQ_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pyro_bq" / "data"


def _read_idx(path: Path, magic: int, expected_count: Optional[int]) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            buf = fh.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read {path}: {err}; the file is damaged, delete it and provide it again") from err
    if len(buf) < 8 or int(np.frombuffer(buf[:4], dtype=">u4")[0]) != magic:
        raise ValueError(f"{path} is not an IDX file (bad magic number); provide the original MNIST-format file")
    ndim = magic & 0xFF
    if len(buf) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header is shorter than {4 + 4 * ndim} bytes")
    dims = np.frombuffer(buf[4 : 4 + 4 * ndim], dtype=">u4").astype(int)
    if expected_count is not None and dims[0] != expected_count:
        raise ValueError(f"{path} holds {dims[0]} items, expected {expected_count}")
    data = np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: {data.size} bytes of data for shape {tuple(dims)}")
    return data.reshape(tuple(dims))


def images_to_tensor(images: np.ndarray, *, normalize: bool = True) -> torch.Tensor:
    """uint8 images ``(N, 28, 28)`` as a float tensor ``(N, 1, 28, 28)`` in [0, 1],
    with MNIST's normalisation when ``normalize``: the one preprocessing of every MNIST-like set.

    Usage::

        x = images_to_tensor(np.zeros((5, 28, 28), np.uint8))
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be a uint8 array of shape (N, 28, 28), got {getattr(images, 'dtype', type(images).__name__)} "
                         f"of shape {getattr(images, 'shape', '?')}")
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
    if check_bool("normalize", normalize):
        x.sub_(MNIST_MEAN).div_(MNIST_STD)
    return x


def read_idx(path, magic: int) -> np.ndarray:
    """The array of an IDX file (``.gz`` or not) with type code ``magic``
    (``0x803``: images, ``0x801``: labels), any number of items.

    :raises ValueError: the file cannot be read, is not IDX of that kind, or is truncated; the message names the file.
    """
    return _read_idx(Path(path), magic, None)


def _find(raw: Path, stem: str) -> Optional[Path]:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx_pair(name: str, root, train: bool, download: bool, *, any_count: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images ``(N, H, W)`` and labels ``(N,)`` of an MNIST-family dataset in torchvision's layout,
    ``ROOT/name/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

    :param any_count: accept files of any length (otherwise the official 60,000 / 10,000).
    """
    train = check_bool("train", train)
    download = check_bool("download", download)
    base = resolve_root(root)
    raw = base / name / "raw"
    img_stem, lbl_stem, count = _FILES[train]
    img_path, lbl_path = _find(raw, img_stem), _find(raw, lbl_stem)
    if (img_path is None or lbl_path is None) and download:
        getattr(tvd, _TORCHVISION[name])(str(base), train=train, download=True)
        img_path, lbl_path = _find(raw, img_stem), _find(raw, lbl_stem)
    if img_path is None or lbl_path is None:
        raise DataNotFoundError(
            f"{name} ({'train' if train else 'test'}) not found: looked for {raw / img_stem}[.gz] and "
            f"{raw / lbl_stem}[.gz]. Pass root=<folder with {name}/raw/>, set PYRO_BQ_DATA, "
            "or use download=True when online."
        )
    images = _read_idx(img_path, 0x00000803, None if any_count else count)
    labels = _read_idx(lbl_path, 0x00000801, None if any_count else count)
    if len(images) != len(labels):
        raise ValueError(f"{img_path} holds {len(images)} images but {lbl_path} {len(labels)} labels; provide a "
                         "matching pair of files")
    return images, labels


def _load(name: str, root, train: bool, download: bool, normalize: bool, limit: Optional[int]) -> InMemoryDataset:
    normalize = check_bool("normalize", normalize)
    if limit is not None:
        limit = check_int("limit", limit, low=1)
    images, labels = read_idx_pair(name, root, train, download)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = images_to_tensor(images, normalize=normalize)
    y = torch.from_numpy(labels.astype(np.int64))
    return InMemoryDataset(x, y, name=f"{name}-{'train' if train else 'test'}")


def load_mnist(root=None, train: bool = True, *, download: bool = False, normalize: bool = True, limit: Optional[int] = None) -> InMemoryDataset:
    """MNIST as an :class:`InMemoryDataset` of ``x`` (N, 1, 28, 28) float and ``y`` (N,) long.

    :param root: data root (see :func:`resolve_root`).
    :param train: the 60,000 training images, or the 10,000 test images.
    :param download: let torchvision download missing files into ``root``.
    :param normalize: apply ``(x - 0.1307) / 0.3081``; otherwise pixels are in [0, 1].
    :param limit: keep only the first ``limit`` examples.
    """
    return _load("MNIST", root, train, download, normalize, limit)


def load_fashion_mnist(root=None, train: bool = True, *, download: bool = False, normalize: bool = True, limit: Optional[int] = None) -> InMemoryDataset:
    """Fashion-MNIST, preprocessed exactly like :func:`load_mnist`."""
    return _load("FashionMNIST", root, train, download, normalize, limit)
