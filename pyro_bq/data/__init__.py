"""Datasets as in-memory tensors."""

from .dataset import InMemoryDataset
from .ambiguous import AmbiguousConfig, generate_ambiguous_mnist, load_ambiguous_mnist, load_original_ambiguous_mnist
from .dirty import DirtyMNIST, dirty_mnist_test_sets
from .mnist import DataNotFoundError, MNIST_MEAN, MNIST_STD, load_fashion_mnist, load_mnist, resolve_root
from .vision import TORCHVISION_SETS, IdxImages, load_torchvision

__all__ = [
    "InMemoryDataset",
    "DataNotFoundError",
    "load_mnist",
    "load_fashion_mnist",
    "load_torchvision",
    "TORCHVISION_SETS",
    "IdxImages",
    "resolve_root",
    "MNIST_MEAN",
    "MNIST_STD",
    "AmbiguousConfig",
    "generate_ambiguous_mnist",
    "load_ambiguous_mnist",
    "load_original_ambiguous_mnist",
    "DirtyMNIST",
    "dirty_mnist_test_sets",
]
