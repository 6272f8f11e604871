"""MNIST and Fashion-MNIST from disk."""

import gzip
import os
import shutil

import pytest
import torch

from pyro_bq.data import DataNotFoundError, InMemoryDataset, load_fashion_mnist, load_mnist, resolve_root


def test_mnist_test_set_loads_from_the_shared_read_only_folder(data_root):
    data = load_mnist(data_root, train=False)
    assert data.x.shape == (10000, 1, 28, 28) and data.x.dtype == torch.float32
    assert data.y.shape == (10000,) and data.y.dtype == torch.int64
    assert set(data.y.unique().tolist()) == set(range(10))
    # normalised with (0.1307, 0.3081): near zero mean and unit std over the set
    assert abs(data.x.mean().item()) < 0.02 and abs(data.x.std().item() - 1.0) < 0.02
    raw = load_mnist(data_root, train=False, normalize=False, limit=5)
    assert raw.x.min() >= 0 and raw.x.max() <= 1 and len(raw) == 5


def test_fashion_mnist_is_a_different_set_with_the_same_preprocessing(data_root):
    fashion = load_fashion_mnist(data_root, train=False, limit=1000)
    mnist = load_mnist(data_root, train=False, limit=1000)
    assert fashion.x.shape == mnist.x.shape
    assert torch.bincount(load_fashion_mnist(data_root, train=False).y).tolist() == [1000] * 10
    assert not torch.equal(fashion.x, mnist.x)


def test_training_set_has_60000_examples(data_root):
    train = load_mnist(data_root, train=True)
    assert len(train) == 60000


def test_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_BQ_DATA", str(tmp_path / "env"))
    assert resolve_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_root() == tmp_path / "env"
    monkeypatch.delenv("PYRO_BQ_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_root() == tmp_path / "cache" / "pyro_bq" / "data"


def test_environment_variable_is_used_when_no_root_is_given(data_root, monkeypatch):
    monkeypatch.setenv("PYRO_BQ_DATA", str(data_root))
    assert len(load_mnist(train=False, limit=10)) == 10


def test_decompressed_files_load_too(data_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(data_root / "MNIST" / "raw" / f"{stem}.gz") as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    a = load_mnist(tmp_path, train=False, limit=100)
    b = load_mnist(data_root, train=False, limit=100)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_missing_dataset_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_mnist(tmp_path, train=True)
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "PYRO_BQ_DATA" in message and "download=True" in message


def test_damaged_file_is_a_clear_error(data_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(data_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", raw)
    data = gzip.open(data_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_mnist(tmp_path, train=False)


def test_minibatches_are_seeded_and_cover_the_data():
    data = InMemoryDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10))
    first = [y.tolist() for _, y in data.batches(3, shuffle=True, seed=1, epoch=0)]
    again = [y.tolist() for _, y in data.batches(3, shuffle=True, seed=1, epoch=0)]
    other = [y.tolist() for _, y in data.batches(3, shuffle=True, seed=1, epoch=1)]
    assert first == again and first != other
    assert sorted(sum(first, [])) == list(range(10)) and [len(b) for b in first] == [3, 3, 3, 1]
    assert [len(y) for _, y in data.batches(3, drop_last=True)] == [3, 3, 3]


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda r: load_mnist(r, train="yes"), TypeError, "train"),
        (lambda r: load_mnist(r, limit=0), ValueError, "limit"),
        (lambda r: load_mnist(123), TypeError, "root"),
        (lambda r: InMemoryDataset(torch.zeros(3, 1), torch.zeros(2)), ValueError, "rows"),
        (lambda r: list(InMemoryDataset(torch.zeros(3, 1), torch.zeros(3)).batches(0)), ValueError, "batch_size"),
    ],
)
def test_bad_arguments_are_clear_errors(data_root, call, exc, words):
    with pytest.raises(exc, match=words):
        call(data_root)
