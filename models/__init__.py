"""Bayesian models and reference networks (installed as ``pyro_bq.models``)."""

from .bayesian import BayesianClassifier, BayesianModel, BayesianRegressor
from .nets import MLP, LeNet5, ResNet20, resnet20

__all__ = [
    "BayesianModel",
    "BayesianClassifier",
    "BayesianRegressor",
    "MLP",
    "LeNet5",
    "ResNet20",
    "resnet20",
]
