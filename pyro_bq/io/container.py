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

Writing is atomic (:func:`atomic_write`, which every file pyro_bq writes goes
through): a temporary file with an unpredictable name in a private folder next to
the target, fsync, rename, then fsync of the folder. A crash mid-write leaves the
previous file intact; a failed write leaves no temporary file and names the target.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

__all__ = [
    "FORMAT_VERSION", "CorruptFileError", "write_container", "read_container", "atomic_write", "atomic_write_bytes",
    "writable_folder", "SUPPORTED_DTYPES"
]

MAGIC = b"PYROBQ\x00\x1a"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
_DIGEST = 32
#: bytes of Python objects a JSON header may cost to parse beyond four times its length
#: (a bound, from its brackets and separators, checked before parsing)
_HEADER_ALLOWANCE = 2**26
#: upper bounds of the parsed size of what each JSON token opens (a dict, a list, a value)
_TOKEN_BYTES = ((b"{", 232), (b"[", 72), (b",", 56), (b":", 56))
#: open temporary files without following a link, where the platform can
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
#: the largest product of a tensor's dimensions (zeros counted as one) a header may give
_MAX_EXTENT = 2**48

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


def atomic_write(path: os.PathLike, fill: Callable[[Path], Any]) -> None:
    """Create ``path`` atomically: ``fill(tmp)`` writes the new content to the file ``tmp``.

    ``tmp`` is an empty regular file with an unpredictable name and the suffix of ``path``
    (``tempfile.mkstemp``, ``O_EXCL``) inside a private folder (mode ``0o700``, ``tempfile.mkdtemp``) in the
    folder of ``path``, so no link planted by anyone else can be followed. After
    ``fill`` returns, ``tmp`` is checked to be a regular file, fsynced, given the usual
    permissions (``0o666`` minus the umask) and renamed over ``path`` with
    ``os.replace``; the folder is then fsynced so the rename survives a power cut.
    A ``path`` that is a symbolic link is replaced by the file, never written through.
    On any error the temporary file and folder are removed and an existing ``path``
    is left as it was; leftovers of writers that were killed (on this host) are
    removed by the next write of the same file.

    :param fill: a callable taking the temporary path (e.g. ``lambda tmp: ds.to_netcdf(tmp)``).
    :raises ValueError: if the folder of ``path`` does not exist or ``path`` is a folder.
    :raises OSError: naming ``path`` when it cannot be written (disk full, permissions, ...).

    Usage::

        atomic_write("run/float.nc", lambda tmp: idata.to_netcdf(str(tmp), engine="h5netcdf"))
    """
    path = _check_path("path", path)
    if not callable(fill):
        raise TypeError(f"fill must be a callable that writes the file it is given, got {type(fill).__name__}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"path {str(path)!r}: the folder {str(folder)!r} does not exist; create it first")
    if path.is_dir() and not path.is_symlink():
        raise ValueError(f"path {str(path)!r} is a folder; give a file name")
    prefix = _temp_prefix(path.name)
    _remove_stale_temps(folder, prefix)
    private = None
    try:
        private = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=folder))
        fd, tmp = tempfile.mkstemp(prefix="new.", suffix=path.suffix[:20], dir=private)
        os.close(fd)
        fill(Path(tmp))
        _seal(Path(tmp))
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    _fsync_folder(folder)


def atomic_write_bytes(path: os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` (bytes-like objects) to ``path`` atomically (see :func:`atomic_write`).

    :raises ValueError: if the folder does not exist or ``path`` is a folder.
    :raises OSError: naming ``path`` when it cannot be written; nothing is left behind.

    Usage::

        atomic_write_bytes("run/results.json", [json.dumps(record).encode()])
    """

    def fill(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | _NOFOLLOW)
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)

    atomic_write(path, fill)


def _temp_prefix(name: str) -> str:
    """``.{name}.{host}-{pid}.``: whose temporary folder it is (a short name keeps under NAME_MAX)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40]
    return f".{name[:100]}.{host}-{os.getpid()}."


def _remove_stale_temps(folder: Path, prefix: str) -> None:
    """Remove this file's temporary folders left in ``folder`` by writers on this host that have died."""
    mine = prefix.rsplit("-", 1)[0] + "-"
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(mine) and e.name.endswith(".tmp")]
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(mine):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            owner = entry.stat(follow_symlinks=False).st_uid
            if entry.is_dir(follow_symlinks=False) and owner == getattr(os, "getuid", lambda: owner)():
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _seal(tmp: Path) -> None:
    """Check that ``tmp`` is still a regular file, fsync it and give it the umask's permissions."""
    fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"the temporary file {tmp} is no longer a regular file")
        os.fsync(fd)
        umask = os.umask(0)
        os.umask(umask)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~umask)
        else:  # pragma: no cover - Windows
            os.chmod(tmp, 0o666 & ~umask)
    finally:
        os.close(fd)


def _write_error(path: Path, err: OSError) -> OSError:
    """An OSError (same errno, so the same subclass) naming ``path`` and saying what to do."""
    reason = err.strerror or str(err) or type(err).__name__
    hint = "free some disk space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the cause"
    text = f"could not write {path}: {reason}; it was left as it was and no temporary file remains; {hint} and run again"
    return OSError(err.errno, text) if err.errno else OSError(text)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows it)."""
    try:
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
    if math.prod(max(d, 1) for d in shape) > _MAX_EXTENT:
        raise _bad(path, f"tensor {name!r} has an impossible shape {shape} (a size-0 tensor whose strides would overflow)")
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
    raw_header = buf[start : start + header_len]
    cost = sum(raw_header.count(token) * size for token, size in _TOKEN_BYTES)
    if cost > _HEADER_ALLOWANCE + 4 * header_len:
        raise _bad(path, f"header of {header_len} bytes would take up to {cost} bytes to parse: "
                         "far more JSON values than a pyro_bq file holds")
    try:
        header = json.loads(raw_header.decode("utf-8"))
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
        try:
            if n == 0:
                t = torch.empty(shape, dtype=dtype)
            else:
                t = torch.frombuffer(bytearray(data[lo : lo + n]), dtype=dtype).reshape(shape)
        except (RuntimeError, TypeError, ValueError, OverflowError) as err:  # a guard: the entry was checked
            raise _bad(path, f"tensor {name!r} of shape {shape} cannot be built ({err})") from None
        if dtype is torch.bool and bool((t.view(torch.uint8) > 1).any()):
            raise _bad(path, f"tensor {name!r} holds bytes that are not booleans")
        tensors[name] = t
    return header["meta"], tensors
