"""Guides (installed as ``pyro_bq.guides``).

Every guide is an :class:`~pyro.infer.autoguide.AutoGuide` that subclasses
:class:`AutoGaussianSites` and overrides one method, ``get_loc_scale(site)``:

* :class:`AutoMeanFieldNormal` -- a Normal per weight, started from a pretrained net;
* :class:`AutoPWFN` -- probabilistic weight fixing (sigma from the distance to powers of two);
* :class:`AutoLogQuantNormal` -- scales kept on a base-2 log grid during training;
* :class:`QuantizedGuide` -- what :func:`quantize` returns for a policy (VPQ, SPQ, JQ).
"""

from .base import AutoGaussianSites, SiteInfo
from .logquant import AutoLogQuantNormal
from .meanfield import AutoMeanFieldNormal, init_to_pretrained, softplus_inverse
from .pwfn import AutoPWFN, pwfn_sigma_init
from .quantized import PackedNormalBase, QuantizedGuide, QuantizedNormal, calibrate_site, copy_guide, quantize
from .quantized import DETERMINISTIC_THRESHOLD, DeterministicDrawsWarning, deterministic_sites, varying_fraction

__all__ = [
    "AutoGaussianSites",
    "SiteInfo",
    "AutoMeanFieldNormal",
    "AutoPWFN",
    "AutoLogQuantNormal",
    "QuantizedGuide",
    "QuantizedNormal",
    "PackedNormalBase",
    "copy_guide",
    "quantize",
    "calibrate_site",
    "varying_fraction",
    "deterministic_sites",
    "DeterministicDrawsWarning",
    "DETERMINISTIC_THRESHOLD",
    "pwfn_sigma_init",
    "init_to_pretrained",
    "softplus_inverse",
]
