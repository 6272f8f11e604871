"""A pickle-free, checksummed, versioned file container for tensors plus JSON.

Layout::

    MAGIC (8 bytes) | format version (uint32 LE) | header length (uint64 LE)
    | header (UTF-8 JSON) | tensor payload | SHA-256 of all preceding bytes (32 bytes)

The header holds the file's ``kind`` (e.g. ``"checkpoint"``, ``"packed-guide"``),
free JSON ``meta`` and an index of tensors (name, dtype, shape, offset, nbytes),
in payload order. Tensor bytes are little-endian.

Reading never runs code: the header is JSON and tensors are raw bytes, so
nothing in a file can make the reader import or call anything. Every check
(magic, version, checksum, header structure, every index entry) happens before
a tensor is built, and each failure raises :class:`CorruptFileError` with the
file's path and the problem; a pickle or a ``torch.save`` file is recognised
and refused by name.

Writing is atomic: a temporary file in the target's folder, fsync, rename,
then fsync of the folder. A crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

__all__ = [
    "FORMAT_VERSION", "CorruptFileError", "write_container", "read_container", "atomic_write_bytes",
    "writable_folder", "SUPPORTED_DTYPES"
]

MAGIC = b"PYROBQ\x00\x1a"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
_DIGEST = 32

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
for _name in ("uint16", "uint32", "uint64"):  # torch >= 2.3
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _DTYPES[_name] = getattr(torch, _name)
_NAMES = {v: k for k, v in _DTYPES.items()}

#: Names of the tensor dtypes a container can hold.
SUPPORTED_DTYPES = tuple(_DTYPES)


class CorruptFileError(ValueError):
    """A pyro_bq file is truncated, corrupted, of another kind, from a newer
    version, or not a pyro_bq file at all (e.g. a pickle)."""


def _check_path(name: str, value: Any) -> Path:
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise ValueError(f"{name} must be a non-empty file path without NUL characters, got {text!r}")
    return Path(text)


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str (e.g. 'checkpoint' or 'packed-guide'), got {type(kind).__name__}")
    if not kind or len(kind) > 200:
        raise ValueError(f"kind must be a non-empty str of at most 200 characters, got {kind!r}")
    return kind


def atomic_write_bytes(path: os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` (bytes-like objects) to ``path`` atomically.

    The bytes go to a temporary file in the same folder, which is flushed,
    fsynced and renamed over ``path``; the folder is then fsynced so the
    rename survives a power cut. On any error the temporary file is removed
    and an existing ``path`` is left as it was. The new file gets the usual
    permissions (``0o666`` minus the umask).

    :raises ValueError: if the folder does not exist or ``path`` is a folder.
    """
    path = _check_path("path", path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"path {str(path)!r}: the folder {str(folder)!r} does not exist; create it first")
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; give a file name")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def writable_folder(name: str, path: os.PathLike) -> Path:
    """``path`` as a folder that exists (created with its parents if need be) and is writable.

    :raises ValueError: naming the argument ``name`` when it cannot be created or written to.

    Usage::

        folder = writable_folder("checkpoint_dir", "runs/a")
    """
    path = _check_path(name, path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{name} {str(path)!r} cannot be created ({err}); choose a writable folder") from err
    if not os.access(path, os.W_OK):
        raise ValueError(f"{name} {str(path)!r} is not writable; choose a writable folder")
    return path


def _tensor_bytes(name: str, tensor: Any) -> tuple[str, list[int], bytes]:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"tensors[{name!r}] has layout {tensor.layout}; only dense (strided) tensors can be stored")
    if tensor.device.type == "meta":
        raise ValueError(f"tensors[{name!r}] is on the meta device and holds no data")
    if tensor.dtype not in _NAMES:
        raise TypeError(
            f"tensors[{name!r}] has unsupported dtype {tensor.dtype}; supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    t = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    if t.numel() == 0:
        raw = b""
    else:
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return _NAMES[t.dtype], list(t.shape), raw


def write_container(path: os.PathLike, kind: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int:
    """Write ``tensors`` and JSON ``meta`` to ``path`` atomically; returns the file size in bytes.

    :param path: the file to write (its folder must exist).
    :param kind: what the file holds, checked again by :func:`read_container`.
    :param meta: a dict with str keys and JSON values (dicts with str keys,
        lists, str, numbers, bools, ``None``; tuples are read back as lists).
    :param tensors: a dict of name -> dense tensor of a dtype in :data:`SUPPORTED_DTYPES`.
    :raises TypeError: for a value of the wrong type.
    :raises ValueError: for an unusable path or a meta-device tensor.
    """
    path = _check_path("path", path)
    kind = _check_kind(kind)
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict of JSON values, got {type(meta).__name__}")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    index, payload, offset = [], [], 0
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: every name must be a str, got {type(name).__name__} ({name!r})")
        dtype, shape, raw = _tensor_bytes(name, tensor)
        index.append({"name": name, "dtype": dtype, "shape": shape, "offset": offset, "nbytes": len(raw)})
        payload.append(raw)
        offset += len(raw)
    _check_json_keys(meta, "meta")
    try:
        header = json.dumps(
            {"kind": kind, "byteorder": "little", "meta": dict(meta), "tensors": index}, separators=(",", ":")
        ).encode()
    except (TypeError, ValueError) as err:
        raise TypeError(f"meta must hold only JSON values (dict with str keys, list, str, number, bool, None): {err}") from err
    except RecursionError as err:
        raise ValueError("meta is nested too deeply to be stored") from err
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise NotImplementedError("pyro_bq containers are little-endian; writing on a big-endian host is not supported")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header))
    digest = hashlib.sha256()
    for chunk in (prefix, header, *payload):
        digest.update(chunk)
    atomic_write_bytes(path, (prefix, header, *payload, digest.digest()))
    return _PREFIX.size + len(header) + offset + _DIGEST


def _check_json_keys(node: Any, where: str, depth: int = 0) -> None:
    """JSON would silently turn int keys into str: refuse any non-str key instead."""
    if depth > 500:
        raise ValueError(f"{where} is nested too deeply to be stored")
    if isinstance(node, Mapping):
        for k, v in node.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be str (JSON), got {type(k).__name__} ({k!r})")
            _check_json_keys(v, f"{where}[{k!r}]", depth + 1)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_json_keys(v, f"{where}[{i}]", depth + 1)


def _foreign_format(buf: bytes) -> str:
    """A guess at what a non-pyro_bq file is, for the error message."""
    if buf[:1] == b"\x80" and len(buf) > 1 and 2 <= buf[1] <= 5:
        return "it is a Python pickle; pyro_bq never loads pickles"
    if buf[:4] == b"PK\x03\x04":
        return "it is a zip archive (e.g. a torch.save file, which holds a pickle); pyro_bq never loads pickles"
    if buf[:1] in (b"(", b"]", b"}", b"c") and b"." in buf[-2:]:
        return "it looks like a protocol-0 pickle; pyro_bq never loads pickles"
    return "bad magic bytes"


def _bad(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: {what}")


def _check_entry(path: Path, i: int, entry: Any, expected_offset: int, payload_len: int, seen: set) -> tuple:
    if not isinstance(entry, dict):
        raise _bad(path, f"tensor index entry {i} is not an object")
    name, dtype_name, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
    lo, n = entry.get("offset"), entry.get("nbytes")
    if not isinstance(name, str) or name in seen:
        raise _bad(path, f"tensor index entry {i} has a missing or repeated name")
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 64:
        raise _bad(path, f"tensor {name!r} has a bad shape {shape!r}")
    if type(lo) is not int or type(n) is not int:
        raise _bad(path, f"tensor {name!r} has a bad offset or size")
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if lo != expected_offset or n != numel * itemsize or lo + n > payload_len:
        raise _bad(
            path,
            f"tensor {name!r} has a bad index entry (offset {lo}, {n} bytes for shape {shape} of {dtype_name}, "
            f"payload of {payload_len} bytes)",
        )
    return name, dtype, shape, lo, n


def read_container(path: os.PathLike, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a file written by :func:`write_container`; returns ``(meta, tensors)``.

    Checks, in this order, with a :class:`CorruptFileError` naming ``path``
    and the problem at the first failure: the magic bytes (a pickle or
    ``torch.save`` file is named as such and refused), the format version,
    the SHA-256 checksum, the JSON header, the ``kind`` and every tensor
    index entry. No code from the file is ever run.

    :raises FileNotFoundError: if ``path`` is not a file.
    :raises CorruptFileError: (a ``ValueError``) for any bad content.
    """
    path = _check_path("path", path)
    kind = _check_kind(kind)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    buf = path.read_bytes()
    if len(buf) < _PREFIX.size + _DIGEST:
        if buf[: len(MAGIC)] != MAGIC[: len(buf)] or not buf:
            raise _bad(path, f"not a pyro_bq file ({_foreign_format(buf) if buf else 'the file is empty'})")
        raise _bad(path, f"file is truncated ({len(buf)} bytes)")
    magic, version, header_len = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise _bad(path, f"not a pyro_bq file ({_foreign_format(buf)})")
    checksum_ok = hashlib.sha256(memoryview(buf)[:-_DIGEST]).digest() == buf[-_DIGEST:]
    if version > FORMAT_VERSION:
        raise _bad(
            path,
            f"format version {version} is newer than this pyro_bq reads (up to {FORMAT_VERSION}); upgrade pyro_bq"
            + ("" if checksum_ok else " (or the file is corrupted: its checksum does not match either)"),
        )
    if version < 1:
        raise _bad(path, f"unknown format version {version} (the file is corrupted)")
    if not checksum_ok:
        raise _bad(path, "checksum mismatch: the file is truncated or corrupted")
    start = _PREFIX.size
    if start + header_len > len(buf) - _DIGEST:
        raise _bad(path, "header length is past the end of the file")
    try:
        header = json.loads(buf[start : start + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _bad(path, f"header is not valid JSON ({type(err).__name__})") from err
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list) or not isinstance(header.get("meta"), dict):
        raise _bad(path, "header lacks its 'kind', 'meta' or 'tensors' fields")
    if header.get("kind") != kind:
        raise _bad(path, f"holds a {header.get('kind')!r}, expected a {kind!r}")
    if header.get("byteorder", "little") != "little":
        raise _bad(path, f"unsupported byte order {header.get('byteorder')!r}")
    data = memoryview(buf)[start + header_len : len(buf) - _DIGEST]
    entries, offset, seen = [], 0, set()
    for i, entry in enumerate(header["tensors"]):
        checked = _check_entry(path, i, entry, offset, len(data), seen)
        seen.add(checked[0])
        offset += checked[4]
        entries.append(checked)
    if offset != len(data):
        raise _bad(path, f"payload has {len(data)} bytes but the index accounts for {offset}")
    tensors = {}
    for name, dtype, shape, lo, n in entries:
        if n == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(bytearray(data[lo : lo + n]), dtype=dtype).reshape(shape)
        if dtype is torch.bool and bool((t.view(torch.uint8) > 1).any()):
            raise _bad(path, f"tensor {name!r} holds bytes that are not booleans")
        tensors[name] = t
    return header["meta"], tensors
