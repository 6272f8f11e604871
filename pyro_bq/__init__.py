"""pyro_bq: Bayesian quantization of neural networks with Pyro.

Write a network, put priors on its weights with :func:`bq_priors` (or wrap it
in :class:`pyro_bq.models.BayesianClassifier`), train a guide from
:mod:`pyro_bq.guides` with stock Pyro SVI, then quantize and analyse it.
"""

from .priors import IIDNormal, LayerwiseNormal, PretrainedNormal, Prior, ScaleMixtureNormal, bq_priors

__version__ = "0.1.0"

__all__ = [
    "bq_priors",
    "Prior",
    "IIDNormal",
    "LayerwiseNormal",
    "ScaleMixtureNormal",
    "PretrainedNormal",
    "__version__",
]
