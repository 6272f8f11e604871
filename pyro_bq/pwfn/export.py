"""Lossless packed export of a fixed PWFN guide.

After the last round every weight's mean lies on the guide's codebook and its
scale is the spread of the group it was fixed with, so both take few distinct
values. :func:`codebook_policy` stores each as an index into a table of those
values (:class:`~pyro_bq.quant.CodebookQuantizer` with ``range="fixed"``):
:func:`~pyro_bq.guides.quantize` then gives a guide with exactly the same loc
and scale, and :func:`~pyro_bq.io.save_packed` and
:func:`~pyro_bq.io.memory_report` see ``ceil(log2 K)`` bits per mean plus
the tables.
"""

from __future__ import annotations

import math

import torch

from pyro_bq._validation import check_type
from pyro_bq.guides.pwfn import AutoPWFN
from pyro_bq.quant.policies import VPQ
from pyro_bq.quant.quantizers import CodebookQuantizer

__all__ = ["codebook_policy"]

_MAX_VALUES = 2**16


def _table(values: torch.Tensor, what: str) -> torch.Tensor:
    table = torch.unique(values.detach().float().reshape(-1))
    if table.numel() > _MAX_VALUES:
        raise ValueError(f"the guide's {what} take {table.numel()} distinct values, more than a 16-bit index can "
                         "address; finish the PWFN schedule (p_T = 1) before exporting")
    if table.numel() == 1:  # a codebook needs two entries
        table = torch.cat([table, table + table.abs().clamp_min(1.0)])
    return table


def codebook_policy(guide):
    """A VPQ policy that stores a fixed :class:`~pyro_bq.guides.AutoPWFN` guide exactly.

    :param guide: an ``AutoPWFN`` guide with every weight fixed (``fraction_fixed == 1``).
    :raises TypeError: if ``guide`` is not an ``AutoPWFN``.
    :raises ValueError: if some weights are still free.

    Usage::

        qguide = quantize(guide, codebook_policy(guide))   # same loc and scale, packed as indices
        save_packed(qguide, "lenet-pwfn.bq")
    """
    check_type("guide", guide, AutoPWFN, "an AutoPWFN guide")
    guide._require_setup()
    if guide.fraction_fixed < 1.0:
        raise ValueError(f"guide has {guide.fraction_fixed:.1%} of its weights fixed; codebook_policy needs all of "
                         "them on the codebook (run the PWFN schedule to p_T = 1)")
    with torch.no_grad():
        loc, scale = guide.flat_loc_scale()
        locs, scales = _table(loc, "means"), _table(scale, "scales")
    loc_bits = max(1, math.ceil(math.log2(locs.numel())))
    scale_bits = max(1, math.ceil(math.log2(scales.numel())))
    return VPQ(
        max(loc_bits, scale_bits),
        loc_bits=loc_bits,
        scale_bits=scale_bits,
        loc_quantizer=CodebookQuantizer(loc_bits, codebook=locs, range="fixed"),
        scale_quantizer=CodebookQuantizer(scale_bits, codebook=scales, range="fixed"),
    )
