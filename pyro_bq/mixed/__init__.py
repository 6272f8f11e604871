"""Mixed precision from uncertainty: per-layer and per-parameter bit allocators.

An allocator turns a trained posterior into a :class:`BitAllocation`, a dict
``{site_name: bits}`` (an int per site, or an integer tensor of the site's
shape) that also carries its own grid for the means (``site_quantizers``,
quantizers of :mod:`pyro_bq.quant`). It becomes a policy through a plain
constructor call.

* :func:`quantile_inform` -- Quantile Inform (QIU / QINU grids);
* :func:`random_bits` -- Random Bits;
* :func:`smol` -- SMOL-style precision learning (per parameter, or per layer: SMOL-L);
* reporting: :func:`bits_table`, :func:`plot_bits`, :func:`evaluate_allocation`,
  :func:`accuracy_at_means`.

Every allocation reports ``code_bits`` (the weights' own codes) and
``storage_bits`` (everything a packed file needs to decode the quantized
means), and whether it was ``"trained"`` on data or is ``"data-free"``.

Usage::

    from pyro_bq.guides import quantize
    from pyro_bq.mixed import quantile_inform
    from pyro_bq.quant import VPQ

    alloc = quantile_inform(guide, 3.2)                      # QIU, {site: int}
    qguide = quantize(guide, VPQ(8, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers))
    qguide = quantize(guide, VPQ(8, site_bits=alloc))        # or the policy's own grid, at the same widths
"""

from .informativeness import (
    BitAllocation,
    decode_metadata_bits,
    informativeness,
    layer_groups,
    layer_informativeness,
    mean_bits,
    normalized_informativeness,
    posterior_params,
)
from .quantile_inform import quantile_inform, quantize_means
from .random_bits import random_bits
from .report import accuracy_at_means, bits_table, evaluate_allocation, evaluate_float, plot_bits, results_table
from .smol import bits_from_s, noise_amplitude, s_from_bits, smol, smol_penalty, with_locs

__all__ = [
    "BitAllocation",
    "decode_metadata_bits",
    "layer_groups",
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
    "with_locs",
    "bits_table",
    "plot_bits",
    "evaluate_allocation",
    "evaluate_float",
    "results_table",
    "accuracy_at_means",
]
