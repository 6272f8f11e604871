"""Export of a fixed PWFN guide: the Bayesian (mu, sigma) network and the point network.

After the last round every weight's mean lies on the guide's codebook and its
scale is the spread of the group it was fixed with, so both take few distinct
values.

* :func:`codebook_policy` stores each as an index into a table of those
  values (:class:`~pyro_bq.quant.CodebookQuantizer` with ``range="fixed"``):
  :func:`~pyro_bq.guides.quantize` then gives a guide with exactly the same
  loc and scale (in the guide's own dtype), and
  :func:`~pyro_bq.io.save_packed` and :func:`~pyro_bq.io.memory_report` see
  ``ceil(log2 K)`` bits per mean plus an index per scale plus the tables.
* :func:`save_point_network` writes what the paper deploys: the median
  network (every weight at its centre), as one ``ceil(log2 K)``-bit codebook
  index per weight (:func:`~pyro_bq.io.pack_bits`), the ``K``-entry codebook
  (in the narrowest float type that holds it exactly; read back in the
  guide's dtype) and a small header (site names and shapes), through
  :func:`~pyro_bq.io.write_container` (atomic, checksummed, pickle-free).
  :func:`load_point_network` reads it back as ``{site: tensor}``.
  :func:`point_network_bits_per_param` gives the whole file's size in bits
  per weight.

Readings of the paper:

* The paper reports entropy and unique counts, not a file format; the point
  network here is the smallest fixed-width encoding of its single codebook
  (no entropy coding), so its bits per weight are ``ceil(log2 K)`` plus the
  codebook and header, divided over the weights.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

from pyro_bq._validation import check_type
from pyro_bq.guides.pwfn import AutoPWFN
from pyro_bq.io.codec import CODECS
from pyro_bq.io.codec import decode as decode_codes
from pyro_bq.io.codec import encode as encode_codes
from pyro_bq.io.container import CorruptFileError, read_container, write_container
from pyro_bq.io.packed import pack_bits, unpack_bits
from pyro_bq.quant.policies import VPQ
from pyro_bq.quant.quantizers import CodebookQuantizer

__all__ = ["codebook_policy", "save_point_network", "load_point_network", "point_network_bits_per_param"]

POINT_KIND = "pwfn-point-network"
_FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

_MAX_VALUES = 2**16


def _table(values: torch.Tensor, what: str) -> torch.Tensor:
    table = torch.unique(values.detach().reshape(-1))
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


def _fixed_guide(guide) -> None:
    check_type("guide", guide, AutoPWFN, "an AutoPWFN guide")
    guide._require_setup()
    if guide.fraction_fixed < 1.0:
        raise ValueError(f"guide has {guide.fraction_fixed:.1%} of its weights fixed; the point network needs all "
                         "of them on the codebook (run the PWFN schedule to p_T = 1)")


def save_point_network(guide, path: os.PathLike, *, codec: Optional[str] = None) -> int:
    """Write the median network of a fully fixed guide as codebook indices; returns the file size in bytes.

    With ``codec=None`` each index takes ``ceil(log2 K)`` bits for a codebook of ``K``
    values. With a codec of :mod:`pyro_bq.io.codec` (``"ans"``: about the indices'
    empirical entropy, the weight-space entropy of the paper) the index stream is
    entropy-coded and its model (the codebook values' counts) goes into the header.

    :param guide: an :class:`~pyro_bq.guides.AutoPWFN` with every weight fixed.
    :param path: the file to write (atomically; its folder must exist).
    :param codec: ``None`` (fixed width) or one of :data:`pyro_bq.io.codec.CODECS`.
    :raises TypeError: if ``guide`` is not an ``AutoPWFN``.
    :raises ValueError: if some weights are still free, the codebook holds more than ``2**16``
        values, or ``codec`` is unknown.

    Usage::

        nbytes = save_point_network(guide, "lenet-pwfn-point.bq")
        nbytes = save_point_network(guide, "lenet-pwfn-point-ans.bq", codec="ans")
        weights = load_point_network("lenet-pwfn-point.bq")   # {site: tensor}, == guide.median()
    """
    if codec is not None and codec not in CODECS:
        raise ValueError(f"codec must be None or one of {', '.join(map(repr, CODECS))}; got {codec!r}")
    _fixed_guide(guide)
    with torch.no_grad():
        loc, _ = guide.flat_loc_scale()
        codebook, idx = torch.unique(loc.detach(), return_inverse=True)
    if codebook.numel() > _MAX_VALUES:
        raise ValueError(f"the guide's means take {codebook.numel()} distinct values, more than a 16-bit index can "
                         "address")
    bits = max(1, math.ceil(math.log2(codebook.numel())))
    sites = [[name, list(guide._check_site(name).shape)] for name in guide.sites]
    meta = {"bits": bits, "dtype": str(codebook.dtype).replace("torch.", ""), "sites": sites}
    if codec is None:
        packed = torch.from_numpy(pack_bits(idx.cpu().numpy().astype(np.int64), bits))
    else:
        data, meta["codec"] = encode_codes(idx.cpu(), codebook.numel(), codec)
        packed = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
    return write_container(path, POINT_KIND, meta, {"codebook": _narrowest(codebook.cpu()), "idx": packed})


def _narrowest(codebook: torch.Tensor) -> torch.Tensor:
    """The codebook in the narrowest float dtype that holds every entry exactly (float16, float32, or as is)."""
    for dtype in (torch.float16, torch.float32):
        if dtype.itemsize < codebook.element_size():
            narrow = codebook.to(dtype)
            if torch.equal(narrow.to(codebook.dtype), codebook):
                return narrow
    return codebook


def _bad(path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{os.fspath(path)!r} is not a valid PWFN point network: {what}")


def load_point_network(path: os.PathLike) -> dict:
    """Read a file of :func:`save_point_network`: ``{site name: weight tensor}`` in model order.

    :raises CorruptFileError: (a ``ValueError``) for a damaged file, another kind of file, or an
        inconsistent header.

    Usage::

        weights = load_point_network("lenet-pwfn-point.bq")
    """
    meta, tensors = read_container(path, POINT_KIND)
    codebook, packed = tensors.get("codebook"), tensors.get("idx")
    bits, dtype, sites = meta.get("bits"), _FLOATS.get(meta.get("dtype")), meta.get("sites")
    if codebook is None or packed is None or packed.dtype != torch.uint8 or codebook.dim() != 1:
        raise _bad(path, "it needs a 1-D 'codebook' and a uint8 'idx' tensor")
    if not (isinstance(bits, int) and 1 <= bits <= 16 and dtype is not None and isinstance(sites, list)
            and codebook.is_floating_point()):
        raise _bad(path, "header fields bits/dtype/sites are missing or out of range")
    codebook = codebook.to(dtype)
    shapes = []
    for entry in sites:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], list) and all(isinstance(d, int) and d >= 0 for d in entry[1])):
            raise _bad(path, f"site entry {entry!r} is not [name, shape]")
        shapes.append((entry[0], entry[1], math.prod(entry[1])))
    n = sum(c for _, _, c in shapes)
    idx = _point_indices(path, meta, packed, n, bits)
    if n and int(idx.max()) >= codebook.numel():
        raise _bad(path, f"an index points past the {codebook.numel()}-entry codebook")
    flat = codebook[idx]
    out, offset = {}, 0
    for name, shape, count in shapes:
        out[name] = flat[offset:offset + count].reshape(shape)
        offset += count
    return out


def _point_indices(path, meta: dict, packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The ``n`` codebook indices of a point-network file, fixed-width or entropy-coded."""
    if "codec" in meta:
        idx = decode_codes(packed.numpy(), meta["codec"])
        if idx.numel() != n:
            raise _bad(path, f"the site shapes hold {n} weights, the coded index stream {idx.numel()}")
        return idx
    if packed.numel() != -(-n * bits // 8):
        raise _bad(path, f"the site shapes hold {n} weights, which need {-(-n * bits // 8)} bytes of "
                         f"{bits}-bit indices, the file holds {packed.numel()}")
    return torch.from_numpy(unpack_bits(packed.numpy(), n, bits))


def point_network_bits_per_param(path: os.PathLike, num_params: int) -> float:
    """All bytes of the file at ``path`` times 8, over ``num_params`` weights.

    Usage::

        point_network_bits_per_param("lenet-pwfn-point.bq", guide.num_params)
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 1:
        raise ValueError(f"num_params must be a positive int, got {num_params!r}")
    return os.path.getsize(path) * 8 / num_params
