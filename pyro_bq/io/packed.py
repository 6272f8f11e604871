"""Bit-packed export of (quantized) guides: :func:`save_packed` and :func:`load_packed`.

The file is a :mod:`~pyro_bq.io.container` of kind ``"packed-guide"`` (no
pickle; magic, version and SHA-256 checked on reading) with four tensors:

* ``codes`` (uint8): the integer codes of every quantized ``loc`` and
  ``scale``, each site's codes bit-packed (LSB first) at their bit width and
  padded to a whole byte;
* ``f32`` (float32): every float quantity (unquantized ``loc``/``scale``)
  and the quantizers' float calibration data (ranges, codebook scales and
  codebooks);
* ``i16`` (int16): the exponent windows of log2 quantizers, and float64
  calibration values (e.g. the mixed-precision quantizers' intervals, means
  and scales), each stored bit-exact as four little-endian int16 words;
* ``bitmap`` (uint8): per-element bit widths (``bits - 1`` in 4 bits each)
  where a site uses a bits tensor.

The JSON header lists the sites (name, shape, event dim) and, per quantity, the
index of its quantizer configuration and its bits (and, for a codebook, its
length). The shapes of calibration tensors follow from the configuration, so
the header stays small. Packing and unpacking are vectorized (numpy bit operations).

Which quantizers a file can hold, and how, is declared by each quantizer
class (``packed_type``, ``packed_keys``, ``packed_layout``; see
:func:`pyro_bq.quant.register_quantizer`): the writer, the header
checks and the reader consult that registry, so a new quantizer class needs
no change here.

On reading, the header of a file that passed its checksum is still checked
entry by entry (types, shapes, dtypes, site names, bits, quantizer
configurations, stream lengths and padding): any problem is a
:class:`~pyro_bq.io.CorruptFileError` naming the file and the entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from typing import Optional, Union

import numpy as np
import torch

from pyro_bq._validation import check_callable, check_int, check_tensor, resolve_device
from pyro_bq.guides.base import AutoGaussianSites
from pyro_bq.guides.quantized import PackedNormalBase, QuantizedGuide
from pyro_bq.quant.grids import MAX_BITS, check_bits
from pyro_bq.quant.policies import SiteQuantizers
from pyro_bq.quant.quantizers import STATE_STREAMS, Quantizer, packed_types, quantizer_class, quantizer_from_state

from . import codec as codec_lib
from .codec import CODECS
from .container import CorruptFileError, read_container, write_container

__all__ = ["save_packed", "load_packed", "model_state_digest", "pack_bits", "unpack_bits", "encode_guide", "KIND"]

KIND = "packed-guide"
#: the newest format version this module reads and writes
_VERSION = 2
#: the version of files with fixed-width codes (what every reader since version 1 reads)
_FIXED_VERSION = 1
#: the version of files whose code streams are entropy-coded (version 1 files hold fixed-width codes)
_CODEC_VERSION = 2
_QUANTITIES = ("loc", "scale")


# -- vectorized bit packing -----------------------------------------------------------------
def _check_codes_array(name: str, value) -> np.ndarray:
    """A 1-D numpy array of integers (bools, floats, lists and tensors are refused)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a 1-D numpy array of non-negative integers, got {type(value).__name__}")
    if value.dtype == np.bool_ or not np.issubdtype(value.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
    if value.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {value.shape}; flatten it first (codes.reshape(-1))")
    return value


def _check_widths(bits, count: int) -> Union[int, np.ndarray]:
    """``bits`` as an int in ``[1, MAX_BITS]`` or a 1-D integer array of ``count`` such widths."""
    if isinstance(bits, np.ndarray):
        widths = _check_codes_array("bits", bits)
        if widths.size != count:
            raise ValueError(f"bits has {widths.size} entries for {count} codes; give one width per code or one int")
        if widths.size and (int(widths.min()) < 1 or int(widths.max()) > MAX_BITS):
            raise ValueError(f"bits must hold widths in [1, {MAX_BITS}], got values in "
                             f"[{int(widths.min())}, {int(widths.max())}]")
        return widths.astype(np.int64, copy=False)
    return check_bits("bits", bits)


def pack_bits(codes: np.ndarray, bits: Union[int, np.ndarray]) -> np.ndarray:
    """Pack non-negative integer ``codes`` (1-D) at ``bits`` bits each (int, or an array of widths), LSB first.

    :param codes: a 1-D numpy integer array; every code must fit in its width (``0 <= code < 2**bits``).
    :param bits: an int from 1 to 16, or a 1-D integer array of one such width per code.
    :returns: a uint8 array of ``ceil(total_bits / 8)`` bytes.
    :raises TypeError: for codes or bits of the wrong type (lists, floats, bools).
    :raises ValueError: for codes that do not fit, or widths out of range.
    """
    codes = _check_codes_array("codes", codes)
    widths = _check_widths(bits, codes.size)
    if codes.size:  # two vectorized passes: a code that does not fit would be packed as another code
        if int(codes.min()) < 0:
            raise ValueError(f"codes must be non-negative, got a minimum of {int(codes.min())}")
        if isinstance(widths, int):
            if int(codes.max()) >> widths:
                raise ValueError(f"codes must lie in [0, 2**bits) = [0, {2**widths}) at bits={widths}, "
                                 f"got a maximum of {int(codes.max())}")
        elif bool(((codes.astype(np.uint64) >> widths.astype(np.uint64)) != 0).any()):
            raise ValueError("codes must fit in their widths (0 <= code < 2**bits per code); some do not")
    if isinstance(widths, int):
        b = widths
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
    maxb = int(widths.max()) if widths.size else 1
    mat = (codes.astype(np.uint32)[:, None] >> np.arange(maxb, dtype=np.uint32)) & np.uint32(1)
    keep = np.arange(maxb)[None, :] < widths[:, None]
    return np.packbits(mat.astype(np.uint8)[keep], bitorder="little")


def unpack_bits(buf: np.ndarray, count: int, bits: Union[int, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes (int64) from the bytes ``buf``.

    :param buf: a 1-D numpy uint8 array (as :func:`pack_bits` returns).
    :param count: the number of codes to read (an int >= 0).
    :param bits: an int from 1 to 16, or a 1-D integer array of ``count`` widths.
    :raises TypeError: for a buffer that is not uint8, or count/bits of the wrong type.
    :raises ValueError: if ``buf`` is too short for ``count`` codes (a
        :class:`~pyro_bq.io.CorruptFileError`), or for widths out of range.
    """
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"buf must be a 1-D numpy uint8 array (what pack_bits returns), got {type(buf).__name__}")
    if buf.dtype != np.uint8:
        raise TypeError(f"buf must be a numpy uint8 array (what pack_bits returns), got dtype {buf.dtype}")
    if buf.ndim != 1:
        raise ValueError(f"buf must be 1-D, got shape {buf.shape}")
    count = check_int("count", count, low=0)
    widths = _check_widths(bits, count)
    if isinstance(widths, int):
        b = widths
        need = -(-count * b // 8)
        if buf.size < need:
            raise CorruptFileError(f"buf holds {buf.size} bytes but count={count} codes at {b} bits need {need}")
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
    total = int(widths.sum())
    need = -(-total // 8)
    if buf.size < need:
        raise CorruptFileError(f"buf holds {buf.size} bytes but the count={count} codes of the given widths need {need}")
    flat = np.unpackbits(buf[:need], bitorder="little")[:total].astype(np.int64)
    maxb = int(widths.max()) if widths.size else 1
    start = np.cumsum(widths) - widths
    idx = start[:, None] + np.arange(maxb)[None, :]
    keep = np.arange(maxb)[None, :] < widths[:, None]
    vals = np.where(keep, flat[np.minimum(idx, max(total - 1, 0))], 0)
    return (vals << np.arange(maxb, dtype=np.int64)).sum(axis=1)


# -- layout helpers ----------------------------------------------------------------------------
#: how each state stream of :data:`STATE_STREAMS` is stored: (file stream, file values per value)
_STATE_STORAGE = {"f32": ("f32", 1), "i16": ("i16", 1), "f64": ("i16", 4)}


def _registered(kind) -> Optional[type]:
    """The quantizer class registered for the packed type ``kind``, or ``None``."""
    try:
        return quantizer_class(kind)
    except ValueError:
        return None


def _state_layout(cfg: dict, shape, k: Optional[int] = None) -> list[tuple[str, str, list[int]]]:
    """The state tensors ``[(name, stream, shape)]`` of a quantizer configuration at a site of ``shape``,
    as the class registered for ``cfg["type"]`` declares them (``packed_layout``)."""
    cls = _registered(cfg["type"])
    if cls is None:
        raise CorruptFileError(f"unknown quantizer type {cfg['type']!r} in packed file; known: {_known_types()}")
    layout = cls.packed_layout(cfg, list(shape), k)
    for entry in layout:
        ok = (isinstance(entry, tuple) and len(entry) == 3 and isinstance(entry[0], str)
              and entry[1] in STATE_STREAMS and _is_shape(entry[2], low=0))
        if not ok:
            raise RuntimeError(f"{cls.__name__}.packed_layout returned {entry!r}; each entry must be "
                               f"(name, one of {sorted(STATE_STREAMS)}, [ints >= 0])")
    return layout


def _known_types() -> str:
    return ", ".join(map(repr, packed_types()))


def _packable(q: Quantizer, where: str) -> dict:
    """``q.config()``, after checking that ``q``'s class declares a packed format that matches it."""
    cls = type(q)
    kind = getattr(cls, "packed_type", None)
    if kind is None or _registered(kind) is None:
        raise TypeError(f"{where}: {cls.__name__} has no packed format; a quantizer class declares one with "
                        "packed_type, packed_keys and packed_layout (see pyro_bq.quant.register_quantizer)")
    cfg = q.config()
    want = {"type"} | set(_registered(kind).packed_keys)
    if cfg.get("type") != kind or set(cfg) != want:
        raise ValueError(f"{where}: {cls.__name__}.config() gives type {cfg.get('type')!r} and keys {sorted(cfg)}; "
                         f"its packed format (type {kind!r}) wants the keys {sorted(want)}")
    return cfg


def _guide_parts(guide):
    """(base guide giving float loc/scale, {site: SiteQuantizers})."""
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


def model_state_digest(model) -> Optional[str]:
    """SHA-256 (hex) of ``model``'s deterministic state, or ``None`` if it has none.

    The state is what the guide does not hold: the parameters without a prior
    and the buffers (e.g. BatchNorm's affine parameters and running statistics),
    by name, dtype, shape and bytes. A packed file records it, and
    :func:`load_packed` refuses a model whose state differs, since the guide
    alone would then predict something else.

    Usage::

        model_state_digest(model)  # None for a net whose every parameter has a prior
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else {}
    if not state:
        return None
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
            cfg = _packable(q, f"site {name!r} {quantity}")
            text = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
            if text not in cfgs:
                cfgs.append(text)
            item = [cfgs.index(text), q.bits if isinstance(q.bits, int) else -1]
            if type(q).packed_sized:
                item.append(int(q.packed_size()))
            items.append(item)
        sites.append([name, list(info.shape), int(info.event_dim), *items])
    with torch.no_grad():
        fused = guide.fused_loc_scale() is not None
    meta = {"v": _FIXED_VERSION, "input": _input_spec(guide), "fused": fused, "cfgs": [json.loads(c) for c in cfgs],
            "sites": sites}
    state = model_state_digest(guide.model)
    if state is not None:
        meta["state"] = state
    return meta


def encode_guide(guide, codec: Optional[str] = None) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Encode ``guide`` into ``(meta, tensors, accounting)`` for :func:`write_container`.

    ``accounting`` maps each site to the bits it takes: ``code`` (packed
    codes), ``float`` (float32 quantities), ``metadata`` (calibration data),
    ``bitmap`` (per-element bit widths), ``numel``, and for the code streams
    (codes and bit maps) ``entropy`` (their empirical entropy, bits) and
    ``actual`` (the bits the file spends on them: fixed-width, or with
    ``codec`` the coded bytes plus each stream's model in the header).
    """
    codec = _check_codec(codec)
    base, quantizers = _guide_parts(guide)
    meta = build_meta(guide)
    codes, f32, i16, bitmap = [], [], [], []
    streams = _CodeStreams(codec)
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
                    streams.add("bitmap", name, widths - 1, 16)
                    acc["bitmap"] += 4 * info.numel
                else:
                    widths = bits
                if value is not None:
                    c = q.encode(value.detach()).reshape(-1).cpu().numpy()
                    packed = pack_bits(c, widths)
                    codes.append(packed)
                    streams.add("codes", name, c, q.code_count() or 2 ** int(np.max(widths)))
                    acc["code"] += int(widths.sum()) if isinstance(widths, np.ndarray) else widths * info.numel
                state = q.state()
                for key, stream, shape in _state_layout(q.config(), info.shape, q.packed_size()):
                    t = state[key]
                    if list(t.shape) != shape:
                        raise RuntimeError(f"internal: state {key!r} of site {name!r} has shape {list(t.shape)}, "
                                           f"layout says {shape}")
                    flat = t.detach().reshape(-1).cpu().numpy()
                    if stream == "f32":
                        f32.append(flat.astype(np.float32))
                    elif stream == "i16":
                        i16.append(flat.astype(np.int16))
                    else:  # f64: bit-exact, as four little-endian int16 words per value
                        i16.append(np.ascontiguousarray(flat.astype("<f8")).view("<i2"))
                acc["metadata"] += q.metadata_bits()
            accounting[name] = acc

    def cat(chunks, dtype):
        return torch.from_numpy(np.concatenate(chunks).astype(dtype, copy=False)) if chunks else torch.zeros(0, dtype=getattr(torch, np.dtype(dtype).name))

    if codec is not None:  # the code streams entropy-coded, one model per stream in the header
        codes, bitmap = streams.coded("codes"), streams.coded("bitmap")
        meta["v"] = _CODEC_VERSION
        meta["codec"] = codec
        meta["streams"] = streams.headers
    streams.account(accounting)
    tensors = {
        "codes": cat(codes, np.uint8),
        "f32": cat(f32, np.float32),
        "i16": cat(i16, np.int16),
        "bitmap": cat(bitmap, np.uint8),
    }
    return meta, tensors, accounting


def _check_codec(codec) -> Optional[str]:
    if codec is not None and codec not in CODECS:
        raise ValueError(f"codec must be None (fixed-width codes) or one of {', '.join(map(repr, CODECS))}; "
                         f"got {codec!r}")
    return codec


class _CodeStreams:
    """The integer code streams of a guide in file order (per site: loc codes, scale codes, bit maps),
    with their empirical entropy and, given a codec, their coded bytes and stream headers."""

    def __init__(self, codec: Optional[str]):
        self.codec = codec
        self.chunks = {"codes": [], "bitmap": []}
        self.headers = {"codes": [], "bitmap": []}
        self.bits = {}  # site -> [entropy bits, coded bits]

    def add(self, stream: str, site: str, values: np.ndarray, num_symbols: int) -> None:
        acc = self.bits.setdefault(site, [0.0, 0])
        acc[0] += codec_lib.empirical_entropy_bits(values, num_symbols)
        if self.codec is None:
            return
        data, header = codec_lib.encode(values, num_symbols, self.codec)
        header["nbytes"] = len(data)
        self.chunks[stream].append(np.frombuffer(data, np.uint8))
        self.headers[stream].append(header)
        acc[1] += 8 * len(data) + codec_lib.model_bits(header)

    def coded(self, stream: str) -> list:
        return self.chunks[stream]

    def account(self, accounting: dict) -> None:
        for site, acc in accounting.items():
            entropy, coded = self.bits.get(site, (0.0, 0))
            acc["entropy"] = entropy
            acc["actual"] = coded if self.codec is not None else acc["code"] + acc["bitmap"]


def save_packed(guide, path: os.PathLike, *, codec: Optional[str] = None) -> int:
    """Write ``guide`` (a :class:`QuantizedGuide` or any float :class:`AutoGaussianSites` guide) bit-packed.

    Returns the file size in bytes. The file holds no pickle.

    :param codec: ``None`` (default): every code at its fixed bit width. One of
        :data:`pyro_bq.io.codec.CODECS` (``"ans"``, ``"lzma"``, ...): each code stream
        (a site's loc codes, scale codes, precision map, codebook indices) is coded
        losslessly with :func:`pyro_bq.io.codec.encode`, its model (symbol counts) in the
        header; :func:`load_packed` reads either kind and gives the same guide.

    Usage::

        nbytes = save_packed(quantize(guide, JQ(4)), "lenet-jq4.bq")
        nbytes = save_packed(quantize(guide, JQ(4)), "lenet-jq4-ans.bq", codec="ans")
    """
    meta, tensors, _ = encode_guide(guide, codec)
    return write_container(path, KIND, meta, tensors)


# -- reading ------------------------------------------------------------------------------------
#: dtype names the header may give for the example input
_INPUT_DTYPES = {name: getattr(torch, name) for name in
                 ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}
#: largest example input (elements) a header may ask :func:`load_packed` to build
_MAX_INPUT_NUMEL = 2**27
#: bytes of example input :func:`load_packed` builds from a header beyond the size of the file's data
_INPUT_ALLOWANCE = 2**24
#: the data streams and their dtypes
_STREAMS = {"codes": torch.uint8, "f32": torch.float32, "i16": torch.int16, "bitmap": torch.uint8}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value, low: int = 1) -> bool:
    return isinstance(value, list) and all(_is_int(d) and d >= low for d in value)


def _check_config(cfg: dict, cls: type) -> None:
    """Build a throw-away quantizer from ``cfg`` so its constructor checks every value."""
    cls.from_config(cfg, 8)


def _check_header(path, meta, tensors) -> tuple[bool, list, str, list, list]:
    """Validate the JSON header (and the stream dtypes) of a packed file that passed its checksum.

    Returns ``(fused, input_shape, input_dtype, cfgs, sites)``.

    :raises CorruptFileError: naming ``path`` and the first problem found.
    """

    def bad(what: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: malformed packed-guide header: {what}")

    if not isinstance(meta, dict):
        raise bad(f"the header must be a JSON object, got {type(meta).__name__}")
    for key in ("v", "input", "cfgs", "sites"):
        if key not in meta:
            raise bad(f"missing entry {key!r}")
    version = meta["v"]
    if not _is_int(version) or version < 1:
        raise bad(f"'v' must be a format version (an int >= 1), got {version!r}")
    if version > _VERSION:
        raise CorruptFileError(f"{path}: packed-guide version {version} is newer than this pyro_bq reads ({_VERSION}); "
                               "upgrade pyro_bq")
    fused = meta.get("fused", True)
    if not isinstance(fused, bool):
        raise bad(f"'fused' must be true or false, got {fused!r}")
    in_shape, in_dtype = _check_input(meta["input"], bad)
    state = meta.get("state")
    if state is not None and not (isinstance(state, str) and len(state) == 64
                                  and all(c in "0123456789abcdef" for c in state)):
        raise bad(f"'state' must be a SHA-256 hex digest, got {state!r}")
    for key, dtype in _STREAMS.items():
        t = tensors.get(key)
        if t is None:
            raise CorruptFileError(f"{path}: missing tensor {key!r}")
        if t.dtype != dtype or t.dim() != 1:
            raise CorruptFileError(f"{path}: tensor {key!r} must be a 1-D {str(dtype).replace('torch.', '')} tensor, "
                                   f"got dtype {str(t.dtype).replace('torch.', '')} and shape {list(t.shape)}")
    cfgs = meta["cfgs"]
    classes = _check_cfgs(cfgs, bad)
    sites = meta["sites"]
    if not isinstance(sites, list) or not sites:
        raise bad(f"'sites' must be a non-empty list, got {sites!r}")
    seen = set()
    for j, entry in enumerate(sites):
        _check_site(j, entry, seen, cfgs, classes, bad)
    return fused, in_shape, in_dtype, cfgs, sites


def _check_input(spec, bad) -> tuple[list, str]:
    """The header's example input ``[feature shape, dtype name]``."""
    if not isinstance(spec, list) or len(spec) != 2:
        raise bad(f"'input' must be [feature shape, dtype name], got {spec!r}")
    in_shape, in_dtype = spec
    if not _is_shape(in_shape):
        raise bad(f"'input' shape must be a list of ints >= 1, got {in_shape!r}")
    if math.prod(in_shape) > _MAX_INPUT_NUMEL:
        raise bad(f"'input' shape {in_shape} is implausibly large ({math.prod(in_shape)} elements)")
    if not isinstance(in_dtype, str) or in_dtype not in _INPUT_DTYPES:
        raise bad(f"'input' dtype must be one of {', '.join(_INPUT_DTYPES)}; got {in_dtype!r}")
    return in_shape, in_dtype


def _check_input_size(path, in_shape: list, in_dtype: str, tensors: dict) -> None:
    """Refuse a header whose example input is out of proportion to the file's data, before building it."""
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    nbytes = math.prod(in_shape) * torch.empty((), dtype=_INPUT_DTYPES[in_dtype]).element_size()
    if nbytes > _INPUT_ALLOWANCE + payload:
        raise CorruptFileError(
            f"{path}: the header's example input (shape {in_shape}, {in_dtype}: {nbytes} bytes) is out of proportion "
            f"to the file's {payload} bytes of data: the file is corrupt or crafted; if it is not, pass "
            "example_input= (one input of the model's shape)"
        )


def _upgrade_cfg(cfg):
    """A configuration of an earlier writer in today's form: the fixed-interval and the
    percentile-interval quantizers were two packed types with the same state (the interval),
    and uniform-grid configurations had no ``rounding`` (they rounded to nearest)."""
    if not isinstance(cfg, dict):
        return cfg
    if cfg.get("type") == "interval" and "percentiles" not in cfg:
        cfg = {**cfg, "percentiles": None}
    if cfg.get("type") == "percentile-interval" and set(cfg) == {"type", "low", "high"}:
        cfg = {"type": "interval", "percentiles": [cfg["low"], cfg["high"]]}
    cls = _registered(cfg.get("type"))
    if cls is not None and "rounding" in cls.packed_keys and "rounding" not in cfg:
        cfg = {**cfg, "rounding": "nearest"}
    return cfg


def _check_cfgs(cfgs, bad) -> list[type]:
    """The quantizer class of each configuration of the header (upgraded in place from an
    earlier writer's form), each checked by its constructor."""
    if not isinstance(cfgs, list):
        raise bad(f"'cfgs' must be a list of quantizer configurations, got {type(cfgs).__name__}")
    cfgs[:] = [_upgrade_cfg(cfg) for cfg in cfgs]
    classes = []
    for i, cfg in enumerate(cfgs):
        cls = _registered(cfg.get("type")) if isinstance(cfg, dict) else None
        if cls is None:
            raise bad(f"cfgs[{i}] must be a quantizer configuration whose 'type' is one of {_known_types()}; "
                      f"got {cfg!r}")
        want = {"type"} | set(cls.packed_keys)
        if set(cfg) != want:
            raise bad(f"cfgs[{i}] ({cfg['type']}) has the keys {sorted(cfg)}, expected {sorted(want)}")
        try:
            _check_config(cfg, cls)
        except (TypeError, ValueError) as err:
            raise bad(f"cfgs[{i}] ({cfg['type']}): {err}") from None
        classes.append(cls)
    return classes


def _check_site(j: int, entry, seen: set, cfgs: list, classes: list, bad) -> None:
    """One site entry ``[name, shape, event_dim, loc, scale, sample]`` of the header."""
    if not isinstance(entry, list) or len(entry) != 3 + len(("loc", "scale", "sample")):
        raise bad(f"sites[{j}] must be [name, shape, event_dim, loc, scale, sample], got {entry!r}")
    name, shape, event_dim = entry[:3]
    if not isinstance(name, str) or not name:
        raise bad(f"sites[{j}] name must be a non-empty str, got {name!r}")
    if name in seen:
        raise bad(f"site {name!r} is listed twice")
    seen.add(name)
    if not _is_shape(shape):
        raise bad(f"site {name!r}: the shape must be a list of ints >= 1, got {shape!r}")
    if not _is_int(event_dim) or not 0 <= event_dim <= len(shape):
        raise bad(f"site {name!r}: event_dim must be an int in [0, {len(shape)}], got {event_dim!r}")
    for quantity, item in zip(("loc", "scale", "sample"), entry[3:]):
        if item is None:
            continue
        where = f"site {name!r} {quantity}"
        if not isinstance(item, list) or len(item) not in (2, 3):
            raise bad(f"{where} must be null or [cfg index, bits(, codebook size)], got {item!r}")
        idx, bits = item[0], item[1]
        if not _is_int(idx) or not 0 <= idx < len(cfgs):
            raise bad(f"{where}: the cfg index must be an int in [0, {len(cfgs)}), got {idx!r}")
        if not _is_int(bits) or not (bits == -1 or 1 <= bits <= MAX_BITS):
            raise bad(f"{where}: bits must be an int from 1 to {MAX_BITS} (or -1 for a bit map), got {bits!r}")
        cls, kind = classes[idx], cfgs[idx]["type"]
        if cls.packed_sized != (len(item) == 3):
            need = "[cfg index, bits, size]" if cls.packed_sized else "[cfg index, bits]"
            raise bad(f"{where}: a {kind!r} quantizer needs {need} (a codebook quantizer stores its codebook "
                      f"size, others do not); got {item!r}")
        if bits == -1 and not cls._tensor_bits_ok:
            raise bad(f"{where}: a {kind!r} quantizer cannot use per-element bits (-1)")
        problem = cls.check_packed_size(bits, item[2]) if cls.packed_sized else None
        if problem:
            raise bad(f"{where}: {problem}")


def _decode_streams(path, meta: dict, tensors: dict) -> Optional[dict]:
    """``{"codes": [codes, ...], "bitmap": [...]}``: the entropy-coded streams of a file written with a
    codec, decoded in file order; ``None`` for a file of fixed-width codes."""
    codec = meta.get("codec")
    if codec is None:
        return None
    if codec not in CODECS or not isinstance(meta.get("streams"), dict):
        raise CorruptFileError(f"{path}: malformed packed-guide header: 'codec' must be one of {CODECS} with a "
                               f"'streams' table, got {codec!r}")
    out = {}
    for key in ("codes", "bitmap"):
        headers = meta["streams"].get(key)
        if not isinstance(headers, list):
            raise CorruptFileError(f"{path}: malformed packed-guide header: streams[{key!r}] must be a list")
        buf, pos, decoded = tensors[key].numpy(), 0, []
        for j, header in enumerate(headers):
            nbytes = header.get("nbytes") if isinstance(header, dict) else None
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0 or pos + nbytes > buf.size:
                raise CorruptFileError(f"{path}: streams[{key!r}][{j}]: 'nbytes' {nbytes!r} does not fit the "
                                       f"{buf.size} bytes of {key!r}")
            try:
                decoded.append(codec_lib.decode(buf[pos: pos + nbytes], header))
            except CorruptFileError as err:
                raise CorruptFileError(f"{path}: streams[{key!r}][{j}]: {err}") from None
            pos += nbytes
        if pos != buf.size:
            raise CorruptFileError(f"{path}: {buf.size - pos} bytes of {key!r} after its coded streams")
        out[key] = decoded
    return out


class _Reader:
    def __init__(self, path, tensors, decoded: Optional[dict] = None):
        self.path = path
        self.streams = {k: tensors[k] for k in _STREAMS}
        self.pos = {k: 0 for k in self.streams}
        self.decoded = decoded
        self.next = {"codes": 0, "bitmap": 0}

    def take(self, stream, n):
        lo = self.pos[stream]
        t = self.streams[stream]
        if lo + n > t.numel():
            raise CorruptFileError(f"{self.path}: the {stream!r} data ends early (wants {lo + n} values, has {t.numel()})")
        self.pos[stream] = lo + n
        return t[lo : lo + n]

    def take_packed(self, stream, count, widths):
        """``count`` codes of the given widths; the padding bits of the last byte must be zero."""
        if self.decoded is not None:
            return self._take_decoded(stream, count, widths)
        total = count * widths if isinstance(widths, int) else int(widths.sum())
        buf = self.take(stream, -(-total // 8)).numpy()
        if total % 8 and int(buf[-1]) >> (total % 8):
            raise CorruptFileError(f"{self.path}: the padding bits after {count} codes in {stream!r} are not zero: "
                                   "the header's bits do not match the data")
        return unpack_bits(buf, count, widths)

    def _take_decoded(self, stream, count, widths):
        """The next entropy-decoded stream of ``stream``, checked against ``count`` codes of ``widths`` bits."""
        j = self.next[stream]
        chunks = self.decoded[stream]
        if j >= len(chunks):
            raise CorruptFileError(f"{self.path}: the {stream!r} streams end early (wants stream {j + 1}, "
                                   f"has {len(chunks)})")
        self.next[stream] = j + 1
        codes = chunks[j].numpy()
        limit = 2 ** np.asarray(widths, dtype=np.int64)
        if codes.size != count or (codes.size and bool((codes >= limit).any())):
            raise CorruptFileError(f"{self.path}: {stream!r} stream {j} holds {codes.size} codes; the header "
                                   f"wants {count} codes that fit their bit widths")
        return codes

    def done(self):
        if self.decoded is not None:
            for k, chunks in self.decoded.items():
                if self.next[k] != len(chunks):
                    raise CorruptFileError(f"{self.path}: {len(chunks) - self.next[k]} unread {k!r} streams: "
                                           "the header does not match the data")
        for k, t in self.streams.items():
            if self.decoded is not None and k in self.decoded:
                continue
            if self.pos[k] != t.numel():
                raise CorruptFileError(f"{self.path}: {t.numel() - self.pos[k]} unread values in {k!r}: "
                                       "the header does not match the data")


def _decode_sites(path, cfgs: list, sites: list, tensors, decoded: Optional[dict] = None) -> tuple[dict, dict]:
    """``({site: (loc, scale)}, {site: SiteQuantizers})`` from a validated header and its streams
    (``decoded``: the code streams of a file written with a codec, see :func:`_decode_streams`)."""
    reader = _Reader(path, tensors, decoded)
    values, quantizers = {}, {}
    for entry in sites:
        name, shape, items = entry[0], entry[1], entry[3:]
        numel = math.prod(shape)
        sq = SiteQuantizers()
        out = {}
        for quantity, item in zip(("loc", "scale", "sample"), items):
            if item is None:
                if quantity != "sample":
                    out[quantity] = reader.take("f32", numel).reshape(shape).clone()
                continue
            cfg, bits = cfgs[item[0]], item[1]
            if bits == -1:
                w = reader.take_packed("bitmap", numel, 4) + 1
                widths = w
                bits = torch.from_numpy(w).reshape(shape)
            else:
                widths = bits
            codes = None
            if quantity != "sample":
                codes = torch.from_numpy(reader.take_packed("codes", numel, widths)).reshape(shape)
            state = {}
            for key, stream, sshape in _state_layout(cfg, shape, item[2] if len(item) > 2 else None):
                where, per = _STATE_STORAGE[stream]
                raw = reader.take(where, per * math.prod(sshape))
                if stream == "f64":
                    raw = torch.from_numpy(raw.numpy().astype("<i2").view("<f8").astype(np.float64))
                state[key] = raw.reshape(sshape).clone()
            try:
                q = quantizer_from_state(cfg, bits, state, shape)
            except (TypeError, ValueError) as err:
                raise CorruptFileError(f"{path}: site {name!r} {quantity}: the header's quantizer does not fit "
                                       f"the data ({err})") from None
            setattr(sq, quantity, q)
            if codes is not None:
                limit = q.code_count()
                if limit is not None and codes.numel() and int(codes.max()) >= limit:
                    raise CorruptFileError(f"{path}: site {name!r} {quantity}: code {int(codes.max())} is past the "
                                           f"end of its codebook of {limit} values")
                out[quantity] = q.decode(codes)
        values[name] = (out["loc"], out["scale"])
        if not sq.is_float:
            quantizers[name] = sq
    reader.done()
    return values, quantizers


@contextlib.contextmanager
def _eval_mode(model):
    """Run the block with ``model`` (an ``nn.Module``) in eval mode, then restore each submodule's mode:
    tracing the model must not update its BatchNorm statistics, and works on one example."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _model_sites(model, x: torch.Tensor, what: str) -> dict[str, tuple[list, int]]:
    """``{site: (shape, event_dim)}`` of ``model``'s latent sites, traced on ``x`` (``what`` says where it came from)."""
    probe = AutoGaussianSites(model)  # its set-up only records the sites
    try:
        with _eval_mode(model):
            probe.setup(x)
    except (TypeError, ValueError, RuntimeError) as err:
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(f"load_packed: tracing the model on {what} failed: {err}") from err
    return {n: (list(i.shape), int(i.event_dim)) for n, i in probe.sites.items()}


def _check_model_state(path, stored: Optional[str], model) -> None:
    """Raise if ``model``'s deterministic state is not the one the file was saved with."""
    if model_state_digest(model) != stored:
        what = "has none" if stored is None else f"has SHA-256 {stored[:12]}..."
        raise ValueError(
            f"{path}: the model's deterministic state (parameters without a prior, buffers such as BatchNorm "
            f"statistics) differs from the one the guide was saved with (the file {what}); load the trained "
            "model's state_dict into the model first, or pass the model the guide was trained with")


def _model_device(model, default: torch.device) -> torch.device:
    """Where ``model``'s first parameter or buffer is (``default`` for a model with none)."""
    if isinstance(model, torch.nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            return t.device
    return default


def load_packed(path: os.PathLike, model, *, example_input: Optional[torch.Tensor] = None, map_location=None):
    """Read a file written by :func:`save_packed` into a guide for ``model``.

    Returns a :class:`~pyro_bq.guides.quantized.QuantizedGuide` (or, for a file
    without quantized quantities, the same: every site float) whose
    predictions equal those of the saved guide under the same seed.

    :param model: the model the guide was trained for (its site names and shapes must match).
    :param example_input: a tensor ``(N, ...)`` used to trace the model; default
        zeros of the input shape and dtype stored in the file.
    :param map_location: the device of the guide's parameters (``"auto"``, ``"cpu"``, ``"cuda"``, a
        ``torch.device``); default where ``model``'s parameters and buffers are (the CPU for a model
        with none). The model is traced where it is; quantizers decode on the device of their input.
    :raises CorruptFileError: for a truncated, corrupted or foreign file, or
        a header that is not a valid packed-guide header (checked entry by entry).
    :raises TypeError: if ``model`` is not callable or ``example_input`` is not a tensor.
    :raises ValueError: if the model cannot be traced on the input, its sites differ from the file's,
        or its deterministic state (e.g. BatchNorm statistics) differs from the saved model's.

    Usage::

        qguide = load_packed("lenet-jq4.bq", model)
        qguide = load_packed("lenet-jq4.bq", model.to("cuda"), map_location="cuda")
    """
    check_callable("model", model, "a Pyro model (e.g. the BayesianClassifier the guide was trained for)")
    if example_input is not None:
        check_tensor("example_input", example_input)
        if example_input.dim() < 1 or example_input.shape[0] < 1:
            raise ValueError(f"example_input must have shape (N, ...) with N >= 1, got {tuple(example_input.shape)}")
    meta, tensors = read_container(path, KIND)
    fused, in_shape, in_dtype, cfgs, sites = _check_header(path, meta, tensors)
    if example_input is None:
        _check_input_size(path, in_shape, in_dtype, tensors)
    try:
        values, quantizers = _decode_sites(path, cfgs, sites, tensors, _decode_streams(path, meta, tensors))
    except (KeyError, IndexError, TypeError, RuntimeError) as err:  # a guard: the header was checked above
        raise CorruptFileError(f"{path}: malformed packed-guide header ({type(err).__name__}: {err})") from err
    if example_input is not None:
        x, what = example_input, f"example_input of shape {tuple(example_input.shape)}"
    else:
        x = torch.zeros([1, *in_shape], dtype=_INPUT_DTYPES[in_dtype])
        what = f"the example input stored in {path} (shape {[1, *in_shape]}, dtype {in_dtype}); pass example_input="
    device = None if map_location is None else resolve_device(map_location, name="map_location")
    where = _model_device(model, device or torch.device("cpu"))
    x, device = x.to(where), device or where
    values = {name: (loc.to(device), scale.to(device)) for name, (loc, scale) in values.items()}
    found = _model_sites(model, x, what)
    stored = {e[0]: (list(e[1]), e[2]) for e in sites}
    if stored != found:
        raise ValueError(f"{path}: the model's sites {{name: (shape, event_dim)}} {found} differ from the file's "
                         f"sites {stored}; pass the model the guide was trained for")
    _check_model_state(path, meta.get("state"), model)
    base = PackedNormalBase(model, values)
    with _eval_mode(model):
        base.setup(x)
    qguide = QuantizedGuide(base, quantizers, policy=None, copy=False)
    # draw the way the saved guide drew (one fused draw for all sites, or one per site)
    qguide.fused = fused
    return qguide
