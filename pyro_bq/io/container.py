"""A pickle-free, checksummed, versioned file container for tensors plus JSON.

Layout::

    MAGIC (8 bytes) | format version (uint32 LE) | header length (uint64 LE)
    | header (UTF-8 JSON) | tensor payload | SHA-256 of all preceding bytes (32 bytes)

The header holds the file's ``kind`` (e.g. ``"checkpoint"``, ``"packed-guide"``),
free JSON ``meta`` and an index of tensors (name, dtype, shape, offset, nbytes).
Reading never runs code: the header is JSON and tensors are raw bytes.
Writing is atomic: a temporary file in the target's folder, fsync, rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["FORMAT_VERSION", "CorruptFileError", "write_container", "read_container", "atomic_write_bytes"]

MAGIC = b"PYROBQ\x00\x1a"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
_DIGEST = 32

_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CorruptFileError(ValueError):
    """A pyro_bq file is truncated, corrupted, of another kind, or from a newer version."""


def atomic_write_bytes(path: os.PathLike, chunks) -> None:
    """Write ``chunks`` (bytes-like objects) to ``path`` atomically."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"path {str(path)!r}: the folder {str(folder)!r} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
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


def write_container(path: os.PathLike, kind: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> int:
    """Write ``tensors`` and JSON ``meta`` to ``path``; returns the file size in bytes."""
    index, payload, offset = [], [], 0
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        t = tensor.detach().cpu().contiguous()
        if t.dtype not in _NAMES:
            raise TypeError(f"tensors[{name!r}] has unsupported dtype {t.dtype}")
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        index.append({"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": offset, "nbytes": len(raw)})
        payload.append(raw)
        offset += len(raw)
    header = json.dumps({"kind": kind, "meta": meta, "tensors": index}, separators=(",", ":")).encode()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header))
    digest = hashlib.sha256()
    for chunk in (prefix, header, *payload):
        digest.update(chunk)
    atomic_write_bytes(path, (prefix, header, *payload, digest.digest()))
    return _PREFIX.size + len(header) + offset + _DIGEST


def read_container(path: os.PathLike, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a file written by :func:`write_container`; checks magic, version, checksum and kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    buf = path.read_bytes()
    if len(buf) < _PREFIX.size + _DIGEST:
        raise CorruptFileError(f"{path}: file is truncated ({len(buf)} bytes) or not a pyro_bq file")
    magic, version, header_len = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptFileError(f"{path}: not a pyro_bq file (bad magic bytes; pickles and other formats are refused)")
    if version > FORMAT_VERSION:
        raise CorruptFileError(
            f"{path}: written by a newer pyro_bq (format version {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade pyro_bq"
        )
    if hashlib.sha256(memoryview(buf)[:-_DIGEST]).digest() != buf[-_DIGEST:]:
        raise CorruptFileError(f"{path}: checksum mismatch: the file is truncated or corrupted")
    start = _PREFIX.size
    if start + header_len > len(buf) - _DIGEST:
        raise CorruptFileError(f"{path}: header length is past the end of the file")
    try:
        header = json.loads(buf[start : start + header_len].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path}: header is not valid JSON ({err})") from err
    if header.get("kind") != kind:
        raise CorruptFileError(f"{path}: holds a {header.get('kind')!r}, expected a {kind!r}")
    data = memoryview(buf)[start + header_len : len(buf) - _DIGEST]
    tensors = {}
    for entry in header["tensors"]:
        dtype = _DTYPES.get(entry["dtype"])
        lo, n = entry["offset"], entry["nbytes"]
        if dtype is None or lo < 0 or lo + n > len(data):
            raise CorruptFileError(f"{path}: tensor {entry['name']!r} has a bad index entry")
        arr = np.frombuffer(data[lo : lo + n], dtype=np.uint8).copy()
        t = torch.from_numpy(arr).view(dtype) if n else torch.empty(0, dtype=dtype)
        numel = int(np.prod(entry["shape"])) if entry["shape"] else 1
        if t.numel() != numel:
            raise CorruptFileError(f"{path}: tensor {entry['name']!r} has {t.numel()} values for shape {entry['shape']}")
        tensors[entry["name"]] = t.reshape(entry["shape"])
    return header["meta"], tensors
