"""Mixed precision from uncertainty: per-layer and per-parameter bit allocators.

An allocator turns a trained posterior into a :class:`BitAllocation`, a dict
``{site_name: bits}`` (an int per site, or an integer tensor of the site's
shape) that any :mod:`pyro_bq.quant` policy takes as ``site_bits``;
:func:`allocation_policy` also brings the allocator's own grid along.

* :func:`quantile_inform` -- Quantile Inform (QIU / QINU grids);
* :func:`random_bits` -- Random Bits;
* :func:`smol` -- SMOL-style precision learning (per parameter, or per layer: SMOL-L);
* reporting: :func:`bits_table`, :func:`plot_bits`, :func:`evaluate_allocation`.

Usage::

    from pyro_bq.mixed import quantile_inform, random_bits, allocation_policy
    from pyro_bq.quant import quantize, VPQ

    alloc = quantile_inform(guide, 3.2)                      # QIU, {site: int}
    qguide = quantize(guide, allocation_policy(alloc))       # with the QIU grid
    qguide = quantize(guide, VPQ(8, site_bits=alloc))        # or any policy's own grid
"""

from .informativeness import (
    BitAllocation,
    informativeness,
    layer_informativeness,
    mean_bits,
    normalized_informativeness,
    posterior_params,
)
from .lloyd_max import (
    expected_abs_error,
    gaussian_quantile_levels,
    lloyd_max_median,
    median_condition_residual,
    quantize_to_levels,
    quantize_uniform,
)
from .quantile_inform import quantile_inform, quantize_means
from .quantizers import (
    GaussianLloydQuantizer,
    IntervalQuantizer,
    PercentileIntervalQuantizer,
    SignedGridQuantizer,
    allocation_policy,
)
from .random_bits import random_bits
from .report import bits_table, evaluate_allocation, evaluate_float, plot_bits, results_table
from .smol import bits_from_s, noise_amplitude, s_from_bits, signed_quantize, smol, smol_penalty, with_locs

__all__ = [
    "BitAllocation",
    "informativeness",
    "layer_informativeness",
    "normalized_informativeness",
    "posterior_params",
    "mean_bits",
    "quantile_inform",
    "quantize_means",
    "random_bits",
    "smol",
    "smol_penalty",
    "noise_amplitude",
    "s_from_bits",
    "bits_from_s",
    "signed_quantize",
    "with_locs",
    "gaussian_quantile_levels",
    "lloyd_max_median",
    "median_condition_residual",
    "expected_abs_error",
    "quantize_to_levels",
    "quantize_uniform",
    "GaussianLloydQuantizer",
    "IntervalQuantizer",
    "PercentileIntervalQuantizer",
    "SignedGridQuantizer",
    "allocation_policy",
    "bits_table",
    "plot_bits",
    "evaluate_allocation",
    "evaluate_float",
    "results_table",
]
