"""Extra out-of-distribution sets read from a folder.

Every entry of the folder is one set, named after the entry:

* ``NAME/t10k-images-idx3-ubyte.gz`` (or without ``.gz``): MNIST's IDX image
  format, with ``NAME/t10k-labels-idx1-ubyte(.gz)`` read when present;
* ``NAME.npz``: a uint8 array of shape ``(N, 28, 28)``, under the key ``x`` or
  as the only array in the file (``y`` is read as labels when present).

Images are preprocessed exactly like MNIST (:func:`pyro_bq.data.mnist.images_to_tensor`).
Sets without labels get the label ``-1`` for every image (an OOD set is scored
by its uncertainty, never by its labels). Other files in the folder are not
read (nor hidden entries); a folder without any set, or a set that cannot be read, is an error
naming the file and what is wrong.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .dataset import InMemoryDataset
from .mnist import IDX_IMAGES, IDX_LABELS, images_to_tensor, read_idx

__all__ = ["load_ood_dir", "load_ood_set", "IDX_IMAGE_FILE"]

#: The image file of an IDX set folder (``.gz`` or not).
IDX_IMAGE_FILE = "t10k-images-idx3-ubyte"
_IDX_LABEL_FILE = "t10k-labels-idx1-ubyte"

PathLike = Union[str, os.PathLike]


def _first(folder: Path, stem: str):
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    return None


def _check_images(path: Path, images) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{path}: the images must be a uint8 array of shape (N, 28, 28), got "
                         f"{getattr(images, 'dtype', '?')} of shape {getattr(images, 'shape', '?')}")
    if images.shape[0] == 0:
        raise ValueError(f"{path}: the set holds no images")
    return images


def _check_labels(path: Path, labels, n: int) -> torch.Tensor:
    if labels is None:
        return torch.full((n,), -1, dtype=torch.long)
    labels = np.asarray(labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: the labels must be {n} integers (one per image), got {labels.dtype} of shape {labels.shape}")
    return torch.from_numpy(labels.astype(np.int64))


def _read_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot be read as an .npz file of arrays ({err})") from err
    if "x" in arrays:
        images = arrays["x"]
    elif len(arrays) == 1:
        images = next(iter(arrays.values()))
    else:
        raise ValueError(f"{path}: holds arrays {sorted(arrays)}; it must hold the images under the key 'x' or "
                         "hold exactly one array")
    return images, arrays.get("y")


def load_ood_set(path: PathLike, *, normalize: bool = True) -> InMemoryDataset:
    """One OOD set: an IDX set folder or an ``.npz`` file (see the module docstring).

    Usage::

        kmnist = load_ood_set("ood/kmnist.npz")
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path).expanduser()
    if path.is_dir():
        img = _first(path, IDX_IMAGE_FILE)
        if img is None:
            raise ValueError(f"{path}: a set folder must hold {IDX_IMAGE_FILE}.gz (MNIST IDX images)")
        images = _check_images(img, read_idx(img, IDX_IMAGES))
        lbl = _first(path, _IDX_LABEL_FILE)
        labels = _check_labels(lbl, read_idx(lbl, IDX_LABELS), len(images)) if lbl else _check_labels(img, None, len(images))
        name = path.name
    elif path.suffix == ".npz" and path.is_file():
        images, labels = _read_npz(path)
        images = _check_images(path, images)
        labels = _check_labels(path, labels, len(images))
        name = path.stem
    else:
        raise ValueError(f"{path}: not an OOD set (a folder with {IDX_IMAGE_FILE}.gz or an .npz file)")
    return InMemoryDataset(images_to_tensor(images, normalize=normalize), labels, name=name)


def load_ood_dir(folder: PathLike, *, normalize: bool = True) -> dict[str, InMemoryDataset]:
    """Every OOD set in ``folder``: ``{name: dataset}``, sorted by name.

    :raises ValueError: ``folder`` is not a folder, holds no set, two entries share a
        name, or a set is malformed (the message names the file).

    Usage::

        extra = load_ood_dir("ood")      # {"kmnist": ..., "notmnist": ...}
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"ood folder {str(folder)!r} is not a folder; pass a folder of NAME/{IDX_IMAGE_FILE}.gz "
                         "or NAME.npz sets")
    sets = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not (entry.is_dir() or (entry.suffix == ".npz" and entry.is_file())):
            continue
        data = load_ood_set(entry, normalize=normalize)
        if data.name in sets:
            raise ValueError(f"{entry}: a second set named {data.name!r} in {folder}; rename one")
        sets[data.name] = data
    if not sets:
        raise ValueError(f"ood folder {str(folder)!r} holds no set (NAME/{IDX_IMAGE_FILE}.gz or NAME.npz)")
    return sets
