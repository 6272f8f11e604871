"""load_torchvision on tiny files in each official on-disk format, written here: CIFAR-10/100's pickled
batches, SVHN's .mat (with scipy), the IDX files of MNIST, Fashion-MNIST and KMNIST (plain and .gz); plus
torchvision's FakeData. Each one goes through a DataLoader into fit_svi. No download."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from torch.utils.data import DataLoader
from torchvision import transforms as T

from pyro_bq import IIDNormal
from pyro_bq.data import DataNotFoundError, load_fashion_mnist, load_torchvision
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import fit_svi
from pyro_bq.models import MLP, BayesianClassifier

N = 12


@pytest.fixture
def any_md5(monkeypatch):
    """torchvision checks the MD5 sums of the official files; the tiny files written here only need to exist."""
    exists = lambda path, md5=None: __import__("os").path.isfile(path)  # noqa: E731
    monkeypatch.setattr(tvd.cifar, "check_integrity", exists)
    monkeypatch.setattr(tvd.svhn, "check_integrity", exists)


def _pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def _cifar(root, hundred: bool, rng):
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir()
    label_key, classes = ("fine_labels", 100) if hundred else ("labels", 10)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        _pickle(folder / name, {"data": rng.integers(0, 256, (N, 3072), dtype=np.uint8),
                                label_key: rng.integers(0, classes, N).tolist()})
    meta_key = "fine_label_names" if hundred else "label_names"
    _pickle(folder / ("meta" if hundred else "batches.meta"), {meta_key: [f"c{i}" for i in range(classes)]})
    return classes


def _idx(path, array, magic, gz):
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def _mnist_family(root, name, rng, gz):
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (N, 28, 28)), 0x803, gz)
        _idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (N,)), 0x801, gz)
    return 10


def _fits(dataset, classes, shape):
    x, y = dataset[0]
    assert isinstance(x, torch.Tensor) and tuple(x.shape) == shape and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < classes
    loader = DataLoader(dataset, batch_size=5, shuffle=True)
    torch.manual_seed(0)
    model = BayesianClassifier(MLP((int(np.prod(shape)), 4, classes)), IIDNormal(1.0), dataset_size=len(dataset))
    result = fit_svi(model, AutoMeanFieldNormal(model), loader, num_epochs=1, progress=False)
    assert result.steps == -(-len(dataset) // 5) and all(np.isfinite(result.losses))


@pytest.mark.parametrize("name, hundred", [("CIFAR10", False), ("CIFAR-100", True)])
def test_cifar_pickled_batches(tmp_path, any_md5, name, hundred):
    classes = _cifar(tmp_path, hundred, np.random.default_rng(0))
    train = load_torchvision(name, tmp_path, train=True)
    test = load_torchvision(name, tmp_path, train=False)
    assert len(train) == (N if hundred else 5 * N) and len(test) == N
    _fits(train, classes, (3, 32, 32))


def test_svhn_mat_files(tmp_path, any_md5):
    scipy_io = pytest.importorskip("scipy.io", reason="SVHN's .mat files are read with scipy")
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, N), dtype=np.uint8),
                                                           "y": rng.integers(1, 11, (N, 1)).astype(np.uint8)})
    test = load_torchvision("SVHN", tmp_path, train=False)
    assert len(test) == N
    assert {y for _, y in test} <= set(range(10))  # SVHN's label 10 is the digit 0
    _fits(load_torchvision("SVHN", tmp_path, train=True), 10, (3, 32, 32))


@pytest.mark.parametrize("name, gz", [("MNIST", False), ("FashionMNIST", True), ("KMNIST", True)])
def test_the_mnist_family_idx_files_plain_or_gzipped(tmp_path, name, gz):
    classes = _mnist_family(tmp_path, name, np.random.default_rng(2), gz)
    _fits(load_torchvision(name, tmp_path, train=True), classes, (1, 28, 28))
    raw = load_torchvision(name, tmp_path, train=False, transform=T.PILToTensor())
    assert raw[0][0].dtype == torch.uint8


def test_the_default_preprocessing_of_real_fashion_mnist_is_load_fashion_mnists(data_root):
    ours = load_fashion_mnist(data_root, train=False, limit=50)
    theirs = load_torchvision("FashionMNIST", data_root, train=False)
    assert len(theirs) == 10000
    x = torch.stack([theirs[i][0] for i in range(50)])
    assert torch.allclose(x, ours.x, atol=1e-6)
    assert [theirs[i][1] for i in range(50)] == ours.y.tolist()


def test_fakedata_goes_through_a_dataloader_into_fit_svi():
    fake = tvd.FakeData(size=20, image_size=(1, 8, 8), num_classes=3, transform=T.ToTensor(), random_offset=0)
    _fits(fake, 3, (1, 8, 8))


def test_missing_files_and_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="CIFAR10 \\(train\\) not found"):
        load_torchvision("CIFAR10", tmp_path, train=True)
    with pytest.raises(DataNotFoundError, match="KMNIST"):
        load_torchvision("KMNIST", tmp_path, train=False)
    with pytest.raises(ValueError, match="name must be one of"):
        load_torchvision("ImageNet", tmp_path)
    with pytest.raises(TypeError, match="transform must be"):
        load_torchvision("MNIST", tmp_path, transform=3)
