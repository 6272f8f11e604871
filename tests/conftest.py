import os
from pathlib import Path

import pyro
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _fresh_pyro():
    """Each test starts with an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real MNIST-family files (``$PYRO_BQ_DATA`` or ``../shared/data``)."""
    root = Path(os.environ.get("PYRO_BQ_DATA", SHARED_DATA))
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"real MNIST data not found under {root}; set PYRO_BQ_DATA")
    return root


@pytest.fixture(scope="session")
def mnist_small(data_root):
    """2,000 real MNIST training images and 1,000 test images."""
    from pyro_bq.data import load_mnist

    return load_mnist(data_root, train=True, limit=2000), load_mnist(data_root, train=False, limit=1000)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for the tests of a module (``pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on a machine without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
