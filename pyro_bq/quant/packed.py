"""Bit-packed export of (quantized) guides: :func:`save_packed` and :func:`load_packed`.

The file is a :mod:`pyro_bq.io.container` of kind ``"packed-guide"`` (no
pickle; magic, version and SHA-256 checked on reading) with four tensors:

* ``codes`` (uint8): the integer codes of every quantized ``loc`` and
  ``scale``, each site's codes bit-packed (LSB first) at their bit width and
  padded to a whole byte;
* ``f32`` (float32): every float quantity (unquantized ``loc``/``scale``)
  and the quantizers' float calibration data (ranges, codebook scales and
  codebooks);
* ``i16`` (int16): the exponent windows of log2 quantizers;
* ``bitmap`` (uint8): per-element bit widths (4 bits each) where a site uses
  a bits tensor.

The JSON header lists the sites (name, shape, event dim) and, per quantity, the
index of its quantizer configuration and its bits. The shapes of calibration
tensors follow from the configuration, so the header stays small.
Packing and unpacking are vectorized (numpy bit operations).
"""

from __future__ import annotations

import json
import os
from typing import Optional, Union

import numpy as np
import torch

from pyro_bq.io.container import CorruptFileError, read_container, write_container

from .policies import SiteQuantizers
from .quantizers import CodebookQuantizer, quantizer_from_state

__all__ = ["save_packed", "load_packed", "pack_bits", "unpack_bits", "encode_guide", "KIND"]

KIND = "packed-guide"
_VERSION = 1
_QUANTITIES = ("loc", "scale")


# -- vectorized bit packing -----------------------------------------------------------------
def pack_bits(codes: np.ndarray, bits: Union[int, np.ndarray]) -> np.ndarray:
    """Pack non-negative integer ``codes`` (1-D) at ``bits`` bits each (int, or an array of widths), LSB first.

    Returns a uint8 array of ``ceil(total_bits / 8)`` bytes.
    """
    codes = np.asarray(codes).reshape(-1)
    if isinstance(bits, (int, np.integer)):
        b = int(bits)
        if b == 8:
            return codes.astype(np.uint8)
        if b == 16:
            return codes.astype("<u2").view(np.uint8)
        if 8 % b == 0:
            per = 8 // b
            c = codes.astype(np.uint8)
            pad = (-c.size) % per
            if pad:
                c = np.concatenate([c, np.zeros(pad, np.uint8)])
            c = c.reshape(-1, per)
            out = np.zeros(c.shape[0], np.uint8)
            for j in range(per):  # loop over bit slots of a byte (<= 8), not over elements
                out |= c[:, j] << np.uint8(j * b)
            return out
        mat = (codes.astype(np.uint16)[:, None] >> np.arange(b, dtype=np.uint16)) & np.uint16(1)
        return np.packbits(mat.astype(np.uint8).reshape(-1), bitorder="little")
    widths = np.asarray(bits).reshape(-1).astype(np.int64)
    if widths.size != codes.size:
        raise ValueError(f"bits has {widths.size} entries for {codes.size} codes")
    maxb = int(widths.max()) if widths.size else 1
    mat = (codes.astype(np.uint32)[:, None] >> np.arange(maxb, dtype=np.uint32)) & np.uint32(1)
    keep = np.arange(maxb)[None, :] < widths[:, None]
    return np.packbits(mat.astype(np.uint8)[keep], bitorder="little")


def unpack_bits(buf: np.ndarray, count: int, bits: Union[int, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes (int64) from the bytes ``buf``."""
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    if isinstance(bits, (int, np.integer)):
        b = int(bits)
        need = -(-count * b // 8)
        if buf.size < need:
            raise CorruptFileError(f"packed codes: need {need} bytes, found {buf.size}")
        if b == 8:
            return buf[:count].astype(np.int64)
        if b == 16:
            return buf[: 2 * count].copy().view("<u2").astype(np.int64)
        if 8 % b == 0:
            per = 8 // b
            mask = np.uint8((1 << b) - 1)
            out = np.stack([(buf[:need] >> np.uint8(j * b)) & mask for j in range(per)], axis=1)
            return out.reshape(-1)[:count].astype(np.int64)
        flat = np.unpackbits(buf[:need], bitorder="little")[: count * b].reshape(count, b).astype(np.int64)
        return (flat << np.arange(b, dtype=np.int64)).sum(axis=1)
    widths = np.asarray(bits).reshape(-1).astype(np.int64)
    total = int(widths.sum())
    need = -(-total // 8)
    if buf.size < need:
        raise CorruptFileError(f"packed codes: need {need} bytes, found {buf.size}")
    flat = np.unpackbits(buf[:need], bitorder="little")[:total].astype(np.int64)
    maxb = int(widths.max()) if widths.size else 1
    start = np.cumsum(widths) - widths
    idx = start[:, None] + np.arange(maxb)[None, :]
    keep = np.arange(maxb)[None, :] < widths[:, None]
    vals = np.where(keep, flat[np.minimum(idx, max(total - 1, 0))], 0)
    return (vals << np.arange(maxb, dtype=np.int64)).sum(axis=1)


def _nbytes(numel: int, bits) -> int:
    total = numel * bits if isinstance(bits, int) else int(bits.sum())
    return -(-total // 8)


# -- layout helpers ----------------------------------------------------------------------------
def _range_shape(cfg: dict, shape) -> list[int]:
    ndim = len(shape)
    rs = [1] * ndim
    if cfg.get("per_channel") and ndim >= 2:
        d = cfg.get("channel_dim", 0) % ndim
        rs[d] = int(shape[d])
    return rs


def _state_layout(cfg: dict, shape, k: Optional[int] = None) -> list[tuple[str, str, list[int]]]:
    rs = _range_shape(cfg, shape)
    kind = cfg["type"]
    if kind == "uniform":
        return [("hi", "f32", rs)] if cfg["symmetric"] else [("lo", "f32", rs), ("hi", "f32", rs)]
    if kind == "log2":
        return [("top", "i16", rs)]
    if kind == "codebook":
        return [("alpha", "f32", rs), ("codebook", "f32", [int(k)])]
    raise CorruptFileError(f"unknown quantizer type {kind!r} in packed file")


def _guide_parts(guide):
    """(base guide giving float loc/scale, {site: SiteQuantizers})."""
    from pyro_bq.guides.base import AutoGaussianSites
    from pyro_bq.guides.quantized import QuantizedGuide

    if isinstance(guide, QuantizedGuide):
        return guide.base, guide.quantizers
    if isinstance(guide, AutoGaussianSites):
        if hasattr(guide, "scale_quantizer"):  # a log-quantized guide: its scales are codes already
            guide._require_setup()
            return guide, {name: SiteQuantizers(scale=guide.scale_quantizer(name)) for name in guide.sites}
        return guide, {}
    raise TypeError(f"guide must be a QuantizedGuide or another pyro_bq AutoGaussianSites guide, got {type(guide).__name__}")


def _input_spec(guide) -> list:
    trace = guide.prototype_trace
    args = trace.nodes.get("_INPUT", {}).get("args", ()) if trace is not None else ()
    if not args or not isinstance(args[0], torch.Tensor):
        raise ValueError("cannot find the example input of the guide's prototype trace; set the guide up with x first")
    x = args[0]
    return [list(x.shape[1:]), str(x.dtype).replace("torch.", "")]


def build_meta(guide) -> dict:
    """The JSON header of ``guide``'s packed file (cheap: no data is encoded)."""
    guide_base, quantizers = _guide_parts(guide)
    guide._require_setup()
    cfgs: list[str] = []
    sites = []
    for name, info in guide.sites.items():
        sq = quantizers.get(name) or SiteQuantizers()
        items = []
        for quantity in ("loc", "scale", "sample"):
            q = getattr(sq, quantity)
            if q is None:
                items.append(None)
                continue
            text = json.dumps(q.config(), sort_keys=True, separators=(",", ":"))
            if text not in cfgs:
                cfgs.append(text)
            item = [cfgs.index(text), q.bits if isinstance(q.bits, int) else -1]
            if isinstance(q, CodebookQuantizer):
                item.append(int(q.codebook.numel()))
            items.append(item)
        sites.append([name, list(info.shape), int(info.event_dim), *items])
    with torch.no_grad():
        fused = guide._fused_loc_scale() is not None
    return {"v": _VERSION, "input": _input_spec(guide), "fused": fused, "cfgs": [json.loads(c) for c in cfgs],
            "sites": sites}


def encode_guide(guide) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Encode ``guide`` into ``(meta, tensors, accounting)`` for :func:`write_container`.

    ``accounting`` maps each site to the bits it takes: ``code`` (packed
    codes), ``float`` (float32 quantities), ``metadata`` (calibration data),
    ``bitmap`` (per-element bit widths), and ``numel``.
    """
    base, quantizers = _guide_parts(guide)
    meta = build_meta(guide)
    codes, f32, i16, bitmap = [], [], [], []
    accounting = {}
    with torch.no_grad():
        for name, info in guide.sites.items():
            loc, scale = base.get_loc_scale(name)
            sq = quantizers.get(name) or SiteQuantizers()
            acc = {"numel": info.numel, "code": 0, "float": 0, "metadata": 0, "bitmap": 0}
            for quantity, value in (("loc", loc), ("scale", scale), ("sample", None)):
                q = getattr(sq, quantity)
                if q is None:
                    if value is not None:
                        f32.append(value.detach().reshape(-1).float().cpu().numpy())
                        acc["float"] += 32 * info.numel
                    continue
                bits = q.bits
                if isinstance(bits, torch.Tensor):
                    widths = bits.expand(info.shape).reshape(-1).cpu().numpy().astype(np.int64)
                    bitmap.append(pack_bits(widths - 1, 4))
                    acc["bitmap"] += 4 * info.numel
                else:
                    widths = bits
                if value is not None:
                    c = q.encode(value.detach()).reshape(-1).cpu().numpy()
                    packed = pack_bits(c, widths)
                    codes.append(packed)
                    acc["code"] += int(widths.sum()) if isinstance(widths, np.ndarray) else widths * info.numel
                state = q.state()
                for key, stream, shape in _state_layout(q.config(), info.shape,
                                                        q.codebook.numel() if isinstance(q, CodebookQuantizer) else None):
                    t = state[key]
                    if list(t.shape) != shape:
                        raise RuntimeError(f"internal: state {key!r} of site {name!r} has shape {list(t.shape)}, "
                                           f"layout says {shape}")
                    (f32 if stream == "f32" else i16).append(
                        t.detach().reshape(-1).cpu().numpy().astype(np.float32 if stream == "f32" else np.int16))
                acc["metadata"] += q.metadata_bits()
            accounting[name] = acc

    def cat(chunks, dtype):
        return torch.from_numpy(np.concatenate(chunks).astype(dtype, copy=False)) if chunks else torch.zeros(0, dtype=getattr(torch, np.dtype(dtype).name))

    tensors = {
        "codes": cat(codes, np.uint8),
        "f32": cat(f32, np.float32),
        "i16": cat(i16, np.int16),
        "bitmap": cat(bitmap, np.uint8),
    }
    return meta, tensors, accounting


def save_packed(guide, path: os.PathLike) -> int:
    """Write ``guide`` (a :class:`QuantizedGuide` or any float :class:`AutoGaussianSites` guide) bit-packed.

    Returns the file size in bytes. The file holds no pickle.

    Usage::

        nbytes = save_packed(quantize(guide, JQ(4)), "lenet-jq4.bq")
    """
    meta, tensors, _ = encode_guide(guide)
    return write_container(path, KIND, meta, tensors)


class _Reader:
    def __init__(self, path, tensors):
        self.path = path
        self.streams = {k: tensors[k] for k in ("codes", "f32", "i16", "bitmap")}
        self.pos = {k: 0 for k in self.streams}

    def take(self, stream, n):
        lo = self.pos[stream]
        t = self.streams[stream]
        if lo + n > t.numel():
            raise CorruptFileError(f"{self.path}: the {stream!r} data ends early (wants {lo + n} values, has {t.numel()})")
        self.pos[stream] = lo + n
        return t[lo : lo + n]

    def done(self):
        for k, t in self.streams.items():
            if self.pos[k] != t.numel():
                raise CorruptFileError(f"{self.path}: {t.numel() - self.pos[k]} unread values in {k!r}: "
                                       "the header does not match the data")


def load_packed(path: os.PathLike, model, *, example_input: Optional[torch.Tensor] = None):
    """Read a file written by :func:`save_packed` into a guide for ``model``.

    Returns a :class:`~pyro_bq.guides.quantized.QuantizedGuide` (or, for a file
    without quantized quantities, the same: every site float) whose
    predictions equal those of the saved guide under the same seed.

    :param model: the model the guide was trained for (its site names and shapes must match).
    :param example_input: input used to trace the model; default zeros of the stored input shape.
    :raises CorruptFileError: for a truncated, corrupted or foreign file.
    :raises ValueError: if the model's sites differ from the file's.

    Usage::

        qguide = load_packed("lenet-jq4.bq", model)
    """
    from pyro_bq.guides.quantized import PackedNormalBase, QuantizedGuide

    meta, tensors = read_container(path, KIND)
    try:
        version = meta["v"]
        if version > _VERSION:
            raise CorruptFileError(f"{path}: packed-guide version {version} is newer than this pyro_bq reads ({_VERSION})")
        cfgs, sites = meta["cfgs"], meta["sites"]
        in_shape, in_dtype = meta["input"]
        for key in ("codes", "f32", "i16", "bitmap"):
            if key not in tensors:
                raise CorruptFileError(f"{path}: missing tensor {key!r}")
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CorruptFileError):
            raise
        raise CorruptFileError(f"{path}: malformed packed-guide header ({err})") from err
    reader = _Reader(path, tensors)
    values, quantizers = {}, {}
    try:
        for entry in sites:
            name, shape, event_dim, items = entry[0], entry[1], entry[2], entry[3:]
            numel = int(np.prod(shape)) if shape else 1
            sq = SiteQuantizers()
            out = {}
            for quantity, item in zip(("loc", "scale", "sample"), items):
                if item is None:
                    if quantity != "sample":
                        out[quantity] = reader.take("f32", numel).reshape(shape).clone()
                    continue
                cfg = cfgs[item[0]]
                bits = item[1]
                if bits == -1:
                    nb = -(-numel * 4 // 8)
                    w = unpack_bits(reader.take("bitmap", nb).numpy(), numel, 4) + 1
                    widths = w
                    bits = torch.from_numpy(w).reshape(shape)
                else:
                    widths = int(bits)
                codes = None
                if quantity != "sample":
                    nb = _nbytes(numel, widths)
                    codes = torch.from_numpy(unpack_bits(reader.take("codes", nb).numpy(), numel, widths)).reshape(shape)
                state = {}
                for key, stream, sshape in _state_layout(cfg, shape, item[2] if len(item) > 2 else None):
                    n = int(np.prod(sshape)) if sshape else 1
                    state[key] = reader.take(stream, n).reshape(sshape).clone()
                q = quantizer_from_state(cfg, bits, state, shape)
                setattr(sq, quantity, q)
                if codes is not None:
                    out[quantity] = q.decode(codes)
            values[name] = (out["loc"], out["scale"])
            if not sq.is_float:
                quantizers[name] = sq
        reader.done()
    except (KeyError, IndexError, TypeError) as err:
        raise CorruptFileError(f"{path}: malformed packed-guide header ({type(err).__name__}: {err})") from err
    x = example_input if example_input is not None else torch.zeros([1, *in_shape], dtype=getattr(torch, in_dtype))
    base = PackedNormalBase(model, values)
    base.setup(x)
    stored = {e[0]: list(e[1]) for e in sites}
    found = {n: list(i.shape) for n, i in base.sites.items()}
    if stored != found:
        raise ValueError(f"the model's sites {found} differ from the file's sites {stored}")
    qguide = QuantizedGuide(base, quantizers, policy=None, copy=False)
    # draw the way the saved guide drew (one fused draw for all sites, or one per site)
    qguide.fused = bool(meta.get("fused", True))
    return qguide
