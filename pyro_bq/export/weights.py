"""Weights in an ONNX graph as the quantized codes plus their calibration, and their draws.

A quantized ``loc`` or ``scale`` is stored as its integer codes (two per byte
up to 4 bits, ``uint8`` up to 8 bits, ``uint16`` above) and decoded by graph ops that repeat the
quantizer's own decode rule, so the graph's values equal pyro_bq's bit for bit:

* uniform-grid quantizers (uniform, interval, signed): ``(codes - zp) * step``
  (:func:`pyro_bq.quant.grids.uniform_decode`, written as ``Sub``/``Mul``
  because ``zp`` may be a non-integer and ``DequantizeLinear`` wants an integer);
* log2 quantizers: ``2 ** (codes + low)`` (``Pow``);
* codebook quantizers: ``Gather(codebook, codes) * alpha``.

A weight draw is ``loc + eps * scale`` with ``eps`` of shape ``(S, P)`` (``P``
the guide's number of weights, sites in the guide's order); a quantized sample
(SPQ, JQ) goes through the sample quantizer's rounding rule as graph ops
(:func:`~pyro_bq.export.graph.round_to_grid`). Only round to nearest has a
graph form: a sample quantizer that rounds stochastically is refused with a
``ValueError`` naming the site (:func:`check_exportable_rounding`).

Readings of the paper
---------------------
The papers quantize samples with a straight-through estimator during
training; at deployment only the forward value matters, which is the grid
value, so the graph holds the rounding alone.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from onnx import TensorProto

from pyro_bq.guides.quantized import QuantizedGuide
from pyro_bq.quant.policies import SiteQuantizers
from pyro_bq.quant.quantizers import CodebookQuantizer, Log2Quantizer, Quantizer

from .graph import GraphWriter, round_to_grid

__all__ = ["guide_parts", "site_value", "site_draws", "weights_from_eps", "check_exportable_rounding"]


def guide_parts(guide) -> tuple[object, dict]:
    """``(float base guide, {site: SiteQuantizers})`` of a quantized or float guide.

    Usage::

        base, quantizers = guide_parts(quantize(guide, JQ(4)))
    """
    if isinstance(guide, QuantizedGuide):
        return guide.base, guide.quantizers
    return guide, {}


def _uniform_grid(q: Quantizer):
    """``(step, zp, qmax)`` of a uniform-grid quantizer (float32, on the CPU), or ``None``."""
    grid = getattr(q, "_grid", None)
    return grid(torch.float32, torch.device("cpu")) if grid is not None else None


def check_exportable_rounding(site: str, sq: Optional[SiteQuantizers]) -> None:
    """ValueError naming ``site`` if its sample quantizer rounds draws other than to nearest.

    A graph fed with the Gaussian noise ``eps`` would also need one uniform number per weight
    and draw to repeat stochastic rounding, which pyro_bq draws from torch's generator; the
    export does not emulate that stream, so it refuses such a guide rather than round differently.

    Usage::

        check_exportable_rounding("net.fc1.weight", qguide.quantizers["net.fc1.weight"])
    """
    rounding = getattr(getattr(sq, "sample", None), "rounding", "nearest")
    if rounding != "nearest":
        raise ValueError(f"site {site!r} sample: rounding={rounding!r} has no ONNX form (only round to nearest "
                         "is exported); quantize with rounding='nearest' to export, or predict in pyro_bq")


def _codes_const(g: GraphWriter, name: str, q: Quantizer, value: torch.Tensor) -> str:
    """The codes of ``value`` as a float graph tensor of its shape, stored two per byte when they fit
    in 4 bits (unpacked by ``BitShift``/``Sub``), else as ``uint8`` or ``uint16``."""
    codes = q.encode(value.detach().float().cpu()).numpy()
    if int(codes.max(initial=0)) >= 16:
        dtype = np.uint8 if int(codes.max(initial=0)) < 256 else np.uint16
        return g.op("Cast", g.const(f"{name}.codes", codes.astype(dtype)), to=TensorProto.FLOAT)
    flat = codes.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = g.const(f"{name}.codes", flat[0::2] | (flat[1::2] << 4))
    four = g.const("four", np.asarray(4, np.uint8))
    high = g.op("BitShift", packed, four, direction="RIGHT")
    low = g.op("Sub", packed, g.op("BitShift", high, four, direction="LEFT"))
    axis = g.ints("axis", [1])
    pairs = g.op("Concat", g.op("Unsqueeze", low, axis), g.op("Unsqueeze", high, axis), axis=1)
    flat_t = g.op("Slice", g.op("Reshape", pairs, g.ints("shape", [-1])), g.ints("start", [0]),
                  g.ints("end", [codes.size]), g.ints("axis", [0]))
    return g.op("Cast", g.op("Reshape", flat_t, g.ints("shape", list(codes.shape))), to=TensorProto.FLOAT)


def site_value(g: GraphWriter, site: str, quantity: str, q: Optional[Quantizer], value: torch.Tensor) -> str:
    """The graph tensor of ``value`` (a site's loc or scale): float, or codes decoded as ``q`` decodes them.

    :raises ValueError: naming the site for a quantizer that has no graph form.

    Usage::

        loc = site_value(g, "net.fc1.weight", "loc", sq.loc, base_loc)
    """
    name = f"{site}.{quantity}"
    if q is None:
        return g.const(name, value.detach().float().cpu())
    if isinstance(q.bits, torch.Tensor) and not hasattr(q, "_grid"):
        raise ValueError(f"site {site!r} {quantity}: per-element bits are exported only for uniform-grid quantizers")
    grid = _uniform_grid(q)
    if grid is not None:
        step, zp, _ = grid
        codes = _codes_const(g, name, q, value)
        return g.op("Mul", g.op("Sub", codes, g.const(f"{name}.zp", zp)), g.const(f"{name}.step", step))
    if isinstance(q, Log2Quantizer):
        low, _ = q.window()
        codes = _codes_const(g, name, q, value)
        return g.op("Pow", g.floats("two", 2.0), g.op("Add", codes, g.const(f"{name}.low", low.float())))
    if isinstance(q, CodebookQuantizer):
        codes = g.const(f"{name}.codes", q.encode(value.detach().float().cpu()).numpy().astype(np.int64))
        state = q.state()
        table = g.const(f"{name}.codebook", state["codebook"].float())
        return g.op("Mul", g.op("Gather", table, codes), g.const(f"{name}.alpha", state["alpha"].float()))
    raise ValueError(f"site {site!r} {quantity}: a {type(q).__name__} has no ONNX form; exportable: uniform, "
                     "interval, signed (uniform grids), log2 and codebook quantizers")


def site_draws(g: GraphWriter, site: str, info, sq: SiteQuantizers, loc: torch.Tensor, scale: torch.Tensor,
               eps: str, num_samples: int) -> str:
    """The graph tensor ``(S, *shape)`` of a site's weight draws from the noise ``eps`` ``(S, P)``.

    Usage::

        w = site_draws(g, name, guide.sites[name], sq, loc, scale, "eps", 32)
    """
    loc_t = site_value(g, site, "loc", sq.loc, loc)
    scale_t = site_value(g, site, "scale", sq.scale, scale)
    part = g.op("Slice", eps, g.ints("start", [info.offset]), g.ints("end", [info.offset + info.numel]),
                g.ints("axis", [1]))
    part = g.op("Reshape", part, g.ints("shape", [num_samples, *info.shape]))
    w = g.op("Add", loc_t, g.op("Mul", part, scale_t))
    if sq.sample is None:
        return w
    check_exportable_rounding(site, sq)
    grid = _uniform_grid(sq.sample)
    if grid is None:
        raise ValueError(f"site {site!r} sample: a {type(sq.sample).__name__} sample quantizer has no ONNX form; "
                         "exportable: uniform-grid quantizers")
    step, zp, qmax = grid
    return round_to_grid(g, w, g.const(f"{site}.sample_step", step), g.const(f"{site}.sample_zp", zp),
                         g.const(f"{site}.sample_qmax", qmax))


@torch.no_grad()
def weights_from_eps(guide, eps: torch.Tensor) -> dict[str, torch.Tensor]:
    """pyro_bq's weight draws ``{site: (S, *shape)}`` for the standard-normal noise ``eps`` ``(S, P)``:
    ``loc + eps * scale`` from the guide, through the site's sample quantizer: what an exported graph
    fed with the same ``eps`` computes. A stochastically rounding sample quantizer raises ValueError
    (:func:`check_exportable_rounding`).

    Usage::

        eps = torch.randn(32, sum(i.numel for i in qguide.sites.values()))
        logits = predictive_logits(model, x=x, samples=weights_from_eps(qguide, eps))
    """
    total = sum(info.numel for info in guide.sites.values())
    if not isinstance(eps, torch.Tensor) or eps.dim() != 2 or eps.shape[1] != total:
        raise ValueError(f"eps must be a tensor of shape (S, {total}) (one standard-normal value per weight), "
                         f"got {tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__}")
    _, quantizers = guide_parts(guide)
    out = {}
    for name, info in guide.sites.items():
        loc, scale = guide.get_loc_scale(name)
        part = eps[:, info.offset: info.offset + info.numel].reshape(-1, *info.shape).to(loc.dtype)
        w = loc + part * scale
        sq = quantizers.get(name)
        check_exportable_rounding(name, sq)
        out[name] = sq.sample.quantize(w) if sq is not None and sq.sample is not None else w
    return out
