"""Datasets as in-memory tensors."""

from .dataset import InMemoryDataset
from .mnist import DataNotFoundError, MNIST_MEAN, MNIST_STD, load_fashion_mnist, load_mnist, resolve_root

__all__ = [
    "InMemoryDataset",
    "DataNotFoundError",
    "load_mnist",
    "load_fashion_mnist",
    "resolve_root",
    "MNIST_MEAN",
    "MNIST_STD",
]
