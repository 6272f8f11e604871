"""Extra OOD sets from a folder: IDX set folders and .npz files, preprocessed like MNIST."""

import gzip
import struct

import numpy as np
import pytest
import torch

from pyro_bq.data import load_mnist
from pyro_bq.data.ood import load_ood_dir, load_ood_set


def _write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def test_both_formats_are_read_and_normalised_like_mnist(tmp_path, data_root):
    idx_images, npz_images = _images(7, 0), _images(5, 1)
    (tmp_path / "idxset").mkdir()
    _write_idx(tmp_path / "idxset" / "t10k-images-idx3-ubyte.gz", idx_images, 0x803)
    _write_idx(tmp_path / "idxset" / "t10k-labels-idx1-ubyte.gz", np.arange(7), 0x801)
    np.savez(tmp_path / "npzset.npz", npz_images)          # the only array, under numpy's default key
    np.savez(tmp_path / "keyed.npz", x=idx_images[:3], other=np.zeros(2))
    (tmp_path / "notes.txt").write_text("not a set")
    sets = load_ood_dir(tmp_path)
    assert list(sets) == ["idxset", "keyed", "npzset"]
    assert sets["idxset"].x.shape == (7, 1, 28, 28) and sets["npzset"].x.shape == (5, 1, 28, 28)
    assert torch.equal(sets["idxset"].y, torch.arange(7)) and bool((sets["npzset"].y == -1).all())
    expected = (torch.from_numpy(npz_images).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(sets["npzset"].x[:, 0], expected)
    assert torch.equal(sets["keyed"].x, sets["idxset"].x[:3])
    # the same preprocessing as the MNIST loader: MNIST's own test file read as an OOD set
    mnist = load_mnist(data_root, train=False)
    (tmp_path / "m").mkdir()
    _write_idx(tmp_path / "m" / "t10k-images-idx3-ubyte.gz",
               np.round(((mnist.x[:4, 0] * 0.3081 + 0.1307) * 255).numpy()).astype(np.uint8), 0x803)
    assert torch.allclose(load_ood_set(tmp_path / "m").x, mnist.x[:4], atol=1e-5)


@pytest.mark.parametrize("make, words", [
    (lambda p: np.savez(p / "bad.npz", x=np.zeros((3, 28, 28), np.float32)), ["bad.npz", "uint8"]),
    (lambda p: np.savez(p / "bad.npz", x=np.zeros((3, 27, 28), np.uint8)), ["bad.npz", "(N, 28, 28)"]),
    (lambda p: np.savez(p / "bad.npz", a=np.zeros((3, 28, 28), np.uint8), b=np.zeros(3)), ["bad.npz", "'x'"]),
    (lambda p: (p / "bad.npz").write_bytes(b"not a zip"), ["bad.npz", "npz"]),
    (lambda p: np.savez(p / "bad.npz", x=np.zeros((3, 28, 28), np.uint8), y=np.zeros(2, np.int64)), ["bad.npz", "labels"]),
    (lambda p: (p / "bad").mkdir(), ["bad", "t10k-images-idx3-ubyte.gz"]),
])
def test_malformed_sets_name_the_file_and_the_fault(tmp_path, make, words):
    make(tmp_path)
    with pytest.raises(ValueError) as err:
        load_ood_dir(tmp_path)
    for w in words:
        assert w in str(err.value)


def test_truncated_and_wrong_idx_files(tmp_path):
    (tmp_path / "cut").mkdir()
    path = tmp_path / "cut" / "t10k-images-idx3-ubyte.gz"
    _write_idx(path, _images(4, 2), 0x803)
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-30]))
    with pytest.raises(ValueError, match="truncated") as err:
        load_ood_dir(tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(err.value)
    _write_idx(path, np.arange(4), 0x801)  # a label file where images belong
    with pytest.raises(ValueError, match="magic"):
        load_ood_dir(tmp_path)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no set"):
        load_ood_dir(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        load_ood_dir(tmp_path / "missing")
