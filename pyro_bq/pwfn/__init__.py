"""Probabilistic weight fixing networks (PWFN): Gaussian weights started from a
pretrained net, a sigma regulariser, and iterative clustering onto (additive)
powers of two.

Usage::

    from pyro_bq.guides import init_to_pretrained
    from pyro_bq.pwfn import PWFN, AutoPWFN

    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    result = PWFN(model, guide, train, test_data=test, num_epochs=1).run()
    quantized = guide.median()          # every weight on a codebook value
    PWFN(model, guide, train, test_data=test, preset="paper").run()   # the paper's training setup

Readings of the paper: each module states where it departs from the paper's
text or the authors' code (github.com/wanderingweights/PWFN):
:mod:`~pyro_bq.guides.pwfn` (initial scales), :mod:`.regularizer` (Eq. 3 and
its weight), :mod:`.clustering` (Algorithm 1, the two level rules),
:mod:`.driver` (schedule, optimizer, presets), :mod:`.optim` (SGD on
sigma itself), :mod:`.metrics` and
:mod:`.export` (the point-network file).
"""

from pyro_bq.guides.pwfn import AutoPWFN, pwfn_sigma_init, quantile, relative_pow2_distances

from .clustering import ClusterConfig, ClusterLevel, ClusterResult, cluster_guide_, prefix_within_tau, pwfn_cluster
from .driver import DEFAULT_SCHEDULE, PAPER_SCHEDULE, PRESETS, PWFN, PWFNResult, check_schedule
from .export import codebook_policy, load_point_network, point_network_bits_per_param, save_point_network
from .metrics import (
    cluster_movement, compression_stats, ensemble_accuracy, fl_bias_excluded_sites, per_site_stats, unique_values,
    weight_entropy,
)
from .optim import SigmaSGD
from .regularizer import DEFAULT_ALPHA, DEFAULT_S, PWFNObjective, sigma_regularizer

__all__ = [
    "AutoPWFN",
    "check_schedule",
    "cluster_movement",
    "load_point_network",
    "PAPER_SCHEDULE",
    "per_site_stats",
    "point_network_bits_per_param",
    "PRESETS",
    "save_point_network",
    "cluster_guide_",
    "ClusterConfig",
    "ClusterLevel",
    "ClusterResult",
    "codebook_policy",
    "compression_stats",
    "DEFAULT_ALPHA",
    "DEFAULT_S",
    "DEFAULT_SCHEDULE",
    "ensemble_accuracy",
    "fl_bias_excluded_sites",
    "prefix_within_tau",
    "PWFN",
    "pwfn_cluster",
    "pwfn_sigma_init",
    "PWFNObjective",
    "PWFNResult",
    "quantile",
    "relative_pow2_distances",
    "sigma_regularizer",
    "SigmaSGD",
    "unique_values",
    "weight_entropy",
]
