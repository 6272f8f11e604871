"""Lossless coding of integer code streams: :func:`encode`, :func:`decode`, :func:`empirical_entropy_bits`.

A *code stream* is a 1-D sequence of non-negative integers below ``num_symbols``
(the loc codes of one site, its precision map, the codebook indices of a point
network). :func:`encode` turns it into bytes plus a small JSON-able header, and
:func:`decode` reads it back exactly. The codecs:

* ``"ans"`` (default): asymmetric numeral systems with the ``constriction``
  package (``pip install pyro-bq[export]``), a stack coder over a categorical
  model built from the stream's own symbol counts. The header holds the model:
  the symbols that occur (run-length coded as gaps) and their counts, so an
  alphabet of ``2**16`` symbols of which a few occur costs a few numbers. The
  coder spends about the stream's empirical entropy (plus 32 bits of coder
  state and a fraction of a bit per symbol for the quantized probabilities).
  A stream too short to pay for its model (a bias of ten values) is stored at
  its fixed width instead (header codec ``"fixed"``), so ``"ans"`` never costs
  more than the fixed width plus a few bytes.
* ``"lzma"``, ``"zlib"``: the fixed-width little-endian integers (1 or 2 bytes
  each) through the standard library's compressors; a fallback where
  ``constriction`` is not installed. They are generic byte compressors, so
  they land above the entropy on short streams.
* ``"raw"``: the fixed-width integers, uncompressed.

The model is rebuilt on decoding from the integer counts in the header by the
same computation, so encoder and decoder agree on every probability bit for bit.

Usage::

    data, header = encode(torch.tensor([0, 3, 3, 1]), 4)
    codes = decode(data, header)              # tensor([0, 3, 3, 1])
"""

from __future__ import annotations

import json
import lzma
import zlib
from typing import Union

import numpy as np
import torch

try:  # an optional dependency (the "export" extra)
    import constriction
except ImportError:  # pragma: no cover - depends on the install
    constriction = None

from .container import CorruptFileError

__all__ = ["CODECS", "encode", "decode", "empirical_entropy_bits", "model_bits", "available_codecs"]

#: the codec names :func:`encode` accepts
CODECS = ("ans", "lzma", "zlib", "raw")
#: the largest alphabet a stream may use
MAX_SYMBOLS = 2**24


def available_codecs() -> tuple[str, ...]:
    """The codecs this install can use (``"ans"`` needs ``constriction``).

    Usage::

        codec = "ans" if "ans" in available_codecs() else "lzma"
    """
    return CODECS if constriction is not None else tuple(c for c in CODECS if c != "ans")


def _as_codes(codes, num_symbols: int) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        codes = codes.detach().cpu().numpy()
    if not isinstance(codes, np.ndarray) or codes.dtype == np.bool_ or not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"codes must be an integer torch tensor or numpy array, got {type(codes).__name__}")
    flat = codes.reshape(-1).astype(np.int64, copy=False)  # read only: no copy of int64 codes
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= num_symbols):
        raise ValueError(f"codes must lie in [0, num_symbols) = [0, {num_symbols}); got values in "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    return flat


def _check_num_symbols(num_symbols) -> int:
    if not isinstance(num_symbols, int) or isinstance(num_symbols, bool) or not 1 <= num_symbols <= MAX_SYMBOLS:
        raise ValueError(f"num_symbols must be an int from 1 to {MAX_SYMBOLS}, got {num_symbols!r}")
    return num_symbols


def empirical_entropy_bits(codes, num_symbols: int) -> float:
    """The empirical (zeroth-order) entropy of ``codes`` in bits, times their count: what an ideal
    coder with the stream's own symbol frequencies spends, without its model.

    Usage::

        empirical_entropy_bits(torch.tensor([0, 0, 1, 1]), 2)   # 4.0
    """
    flat = _as_codes(codes, _check_num_symbols(num_symbols))
    if not flat.size:
        return 0.0
    counts = np.bincount(flat)
    counts = counts[counts > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / flat.size)).sum())


def _fixed_width(num_symbols: int) -> np.dtype:
    return np.dtype("<u1") if num_symbols <= 256 else np.dtype("<u2") if num_symbols <= 2**16 else np.dtype("<u4")


def _probabilities(counts: np.ndarray) -> np.ndarray:
    """The categorical model of the ANS coder: the counts normalized in float64 (deterministic)."""
    return counts.astype(np.float64) / float(counts.sum())


def encode(codes, num_symbols: int, codec: str = "ans") -> tuple[bytes, dict]:
    """Code the integers ``codes`` (each in ``[0, num_symbols)``) losslessly.

    :param codes: an integer tensor or numpy array (any shape; read flat).
    :param num_symbols: the alphabet size, e.g. ``2**bits`` or a codebook's length.
    :param codec: one of :data:`CODECS`.
    :returns: ``(data, header)``: the bytes and a JSON-able dict that :func:`decode` needs
        (codec, count, alphabet and, for ``"ans"``, the model).
    :raises ValueError: for codes outside the alphabet or an unknown codec.
    :raises ImportError: for ``"ans"`` without ``constriction`` installed.

    Usage::

        data, header = encode(codes, 16)             # 4-bit codes
        data, header = encode(codes, 16, "lzma")     # the standard-library fallback
    """
    num_symbols = _check_num_symbols(num_symbols)
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(map(repr, CODECS))}; got {codec!r}")
    flat = _as_codes(codes, num_symbols)
    header = {"codec": codec, "n": int(flat.size), "k": num_symbols}
    if codec != "ans":
        raw = flat.astype(_fixed_width(num_symbols)).tobytes()
        data = lzma.compress(raw, preset=9) if codec == "lzma" else zlib.compress(raw, 9) if codec == "zlib" else raw
        return data, header
    if constriction is None:
        raise ImportError("codec='ans' needs the constriction package: pip install pyro-bq[export] "
                          "(or pass codec='lzma', which needs only the standard library)")
    if not flat.size:
        return b"", {**header, "gaps": [], "counts": []}
    symbols, index, counts = np.unique(flat, return_inverse=True, return_counts=True)
    gaps = np.diff(symbols, prepend=-1) - 1  # the symbols that occur, as the gaps between them
    header.update(gaps=gaps.tolist(), counts=counts.tolist())
    if symbols.size == 1:  # one symbol: the header says everything
        return b"", header
    model = constriction.stream.model.Categorical(_probabilities(counts), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(index.astype(np.int32), model)
    data = coder.get_compressed().astype("<u4").tobytes()
    width = max(1, (num_symbols - 1).bit_length())
    if 8 * len(data) + model_bits(header) >= width * flat.size + 64:  # a short stream: its model costs more
        return _pack(flat, width), {"codec": "fixed", "n": int(flat.size), "k": num_symbols}
    return data, header


def _pack(flat: np.ndarray, width: int) -> bytes:
    """The codes at ``width`` bits each, LSB first (the fixed-width form a short stream falls back to)."""
    bits = (flat[:, None] >> np.arange(width, dtype=np.int64)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _unpack(buf: bytes, n: int, k: int) -> np.ndarray:
    width = max(1, (k - 1).bit_length())
    if len(buf) != -(-n * width // 8):
        raise CorruptFileError(f"code stream (fixed): {len(buf)} bytes for {n} codes of {width} bits")
    bits = np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[: n * width].reshape(n, width)
    out = (bits.astype(np.int64) << np.arange(width, dtype=np.int64)).sum(axis=1)
    if out.size and int(out.max()) >= k:
        raise CorruptFileError(f"code stream (fixed): a code is past the alphabet of {k}")
    return out


def _check_header(header) -> tuple[str, int, int]:
    if not isinstance(header, dict):
        raise CorruptFileError(f"a code stream header must be a dict, got {type(header).__name__}")
    codec, n, k = header.get("codec"), header.get("n"), header.get("k")
    if codec not in CODECS and codec != "fixed":
        raise CorruptFileError(f"code stream header: unknown codec {codec!r}; known: {', '.join(CODECS)}, fixed")
    for key, value in (("n", n), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CorruptFileError(f"code stream header: {key!r} must be an int >= 0, got {value!r}")
    if not 1 <= k <= MAX_SYMBOLS:
        raise CorruptFileError(f"code stream header: alphabet size {k} out of [1, {MAX_SYMBOLS}]")
    return codec, n, k


def _ans_model(header: dict, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    gaps, counts = header.get("gaps"), header.get("counts")
    ok = (isinstance(gaps, list) and isinstance(counts, list) and len(gaps) == len(counts)
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in gaps)
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in counts))
    if not ok:
        raise CorruptFileError("code stream header: 'gaps' and 'counts' must be lists of equal length of ints "
                               "(gaps >= 0, counts >= 1)")
    symbols = np.cumsum(np.asarray(gaps, np.int64) + 1) - 1
    if symbols.size and int(symbols[-1]) >= k or sum(counts) != n:
        raise CorruptFileError(f"code stream header: the model (symbols up to {int(symbols[-1]) if symbols.size else -1}, "
                               f"counts summing to {sum(counts)}) does not fit {n} codes below {k}")
    return symbols, np.asarray(counts, np.int64)


def decode(data: Union[bytes, bytearray, memoryview, np.ndarray], header: dict) -> torch.Tensor:
    """The codes (a 1-D ``torch.int64`` tensor) that :func:`encode` turned into ``data`` and ``header``.

    :raises CorruptFileError: for a header that is not one :func:`encode` writes, or data that
        does not decode to the header's count.

    Usage::

        codes = decode(*encode(codes, 16))
    """
    codec, n, k = _check_header(header)
    buf = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if codec == "fixed":
        return torch.from_numpy(_unpack(buf, n, k))
    if codec != "ans":
        try:
            raw = lzma.decompress(buf) if codec == "lzma" else zlib.decompress(buf) if codec == "zlib" else buf
        except (lzma.LZMAError, zlib.error) as err:
            raise CorruptFileError(f"code stream ({codec}): cannot decompress ({err})") from None
        width = _fixed_width(k)
        if len(raw) != n * width.itemsize:
            raise CorruptFileError(f"code stream ({codec}): {len(raw)} bytes for {n} codes of {width.itemsize} bytes")
        out = np.frombuffer(raw, width).astype(np.int64)
        if out.size and int(out.max()) >= k:
            raise CorruptFileError(f"code stream ({codec}): a code is past the alphabet of {k}")
        return torch.from_numpy(out)
    if constriction is None:
        raise ImportError("this code stream is ANS-coded: reading it needs the constriction package "
                          "(pip install pyro-bq[export])")
    symbols, counts = _ans_model(header, n, k)
    if symbols.size <= 1:
        if buf:
            raise CorruptFileError("code stream (ans): data after a one-symbol stream")
        return torch.full((n,), int(symbols[0]) if symbols.size else 0, dtype=torch.int64)
    if len(buf) % 4:
        raise CorruptFileError(f"code stream (ans): {len(buf)} bytes is not a whole number of 32-bit words")
    model = constriction.stream.model.Categorical(_probabilities(counts), perfect=False)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(buf, "<u4").astype(np.uint32))
    try:
        index = coder.decode(model, n)
    except Exception as err:  # constriction raises its own error types for exhausted data
        raise CorruptFileError(f"code stream (ans): cannot decode {n} codes ({err})") from None
    if not coder.is_empty():
        raise CorruptFileError("code stream (ans): data left over after the header's count of codes")
    return torch.from_numpy(symbols[index.astype(np.int64)])


def model_bits(header: dict) -> int:
    """Bits the header of one stream takes as compact JSON (the model's cost in a file).

    Usage::

        total = 8 * len(data) + model_bits(header)
    """
    return 8 * len(json.dumps(header, separators=(",", ":")).encode())
