"""Quantization at tensor level: grid kernels, quantizers, codebooks, policies and activation fake-quantization.

:mod:`~pyro_bq.quant.grids` holds the grid kernels every quantizer builds on;
a :class:`Quantizer` calibrates (returning a copy) and applies; a
:class:`Policy` says which quantizer each quantity of each Pyro site gets.
Quantizing a guide is :func:`pyro_bq.guides.quantize`; packed files and their
size are :mod:`pyro_bq.io`.

Usage::

    from pyro_bq.guides import quantize
    from pyro_bq.io import memory_report
    from pyro_bq.quant import JQ

    qguide = quantize(guide, JQ(4, skip=["net.conv1.weight"]))   # a new guide; `guide` is untouched
    print(memory_report(qguide).bits_per_param)
"""

from .activation import (FakeQuantActivation, UncalibratedActivationError, calibrate_activations_, check_calibrated,
                         quantize_activations)
from .codebook import pow2_codebook, pow2_family
from .grids import MAX_BITS, check_bits, nearest_code, nearest_code_index, ste
from .lloyd_max import gaussian_levels, gaussian_quantile_levels, lloyd_max_median
from .policies import (
    JQ,
    QUANTITIES,
    SPQ,
    VPQ,
    FloatPolicy,
    Policy,
    SiteQuantizers,
    default_loc_quantizer,
    default_sample_quantizer,
    end_site_bits,
    end_sites,
    make_policy,
)
from .quantizers import (
    CodebookQuantizer,
    GaussianLloydQuantizer,
    IntervalQuantizer,
    Log2Quantizer,
    Quantizer,
    SignedGridQuantizer,
    UniformQuantizer,
    packed_types,
    quantizer_class,
    register_quantizer,
)

__all__ = [
    # grid kernels
    "MAX_BITS",
    "check_bits",
    "ste",
    "nearest_code",
    "nearest_code_index",
    "pow2_codebook",
    "pow2_family",
    "gaussian_levels",
    "gaussian_quantile_levels",
    "lloyd_max_median",
    # quantizers
    "Quantizer",
    "register_quantizer",
    "quantizer_class",
    "packed_types",
    "UniformQuantizer",
    "IntervalQuantizer",
    "Log2Quantizer",
    "CodebookQuantizer",
    "GaussianLloydQuantizer",
    "SignedGridQuantizer",
    # policies
    "Policy",
    "VPQ",
    "SPQ",
    "JQ",
    "FloatPolicy",
    "SiteQuantizers",
    "QUANTITIES",
    "make_policy",
    "end_sites",
    "end_site_bits",
    "default_loc_quantizer",
    "default_sample_quantizer",
    # activations
    "FakeQuantActivation",
    "quantize_activations",
    "calibrate_activations_",
    "check_calibrated",
    "UncalibratedActivationError",
]
