"""Checkpoints of a training run: model, guide, optimizer, counters and RNG states.

One format for every run (SVI, PWFN rounds, the study): a pickle-free
:mod:`pyro_bq.io.container` file of kind ``"checkpoint"``. Any nested state of
dicts (str or int keys), lists, tuples, tensors, numpy arrays, numbers,
strings and ``None`` is stored: tensors and arrays as raw bytes, the rest as
JSON. Loading gives back the same structure (tuples stay tuples, int keys stay
ints, arrays stay arrays) and never runs code from the file.

A run that checkpoints every N steps (``fit_svi``, the PWFN rounds) keeps one
``{prefix}-{step}.bq`` file in a folder (:func:`~pyro_bq.io.container.writable_folder`):
:func:`replace_checkpoint` writes the newest state at :func:`checkpoint_path`
and deletes the others, and the run resumes from :func:`latest_checkpoint`,
the newest file that passes every integrity check.

Usage::

    folder = writable_folder("checkpoint_dir", "runs/a")
    ckpt = latest_checkpoint(folder)
    state = load_checkpoint(ckpt) if ckpt else None
    ...
    replace_checkpoint(folder, step, {"step": step, "guide": guide.state_dict(), "rng": rng_state()})
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pyro_bq._validation import resolve_device

from .container import SUPPORTED_DTYPES, CorruptFileError, _check_path, read_container, write_container

__all__ = [
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "replace_checkpoint", "checkpoint_path",
    "list_checkpoints", "prune_checkpoints", "rng_state", "set_rng_state", "flatten_state", "unflatten_state"
]

_KIND = "checkpoint"
_MAX_DEPTH = 200
_SUPPORTED = frozenset(getattr(torch, n) for n in SUPPORTED_DTYPES)
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


def flatten_state(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON tree with tensor references and the tensors.

    :raises TypeError: naming the place in the state (e.g. ``state['optim'][0]``)
        of a value that cannot be stored.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, where, depth):
        if depth > _MAX_DEPTH:
            raise ValueError(f"{where}: the state is nested more than {_MAX_DEPTH} levels deep")
        if isinstance(node, torch.Tensor):
            if node.dtype not in _SUPPORTED or node.layout != torch.strided or node.device.type == "meta":
                raise TypeError(
                    f"{where}: cannot store a {node.layout} tensor of dtype {node.dtype} on {node.device}; "
                    f"supported: dense tensors with data, of dtype {', '.join(SUPPORTED_DTYPES)}"
                )
            key = f"t{len(tensors)}"
            tensors[key] = node
            return {"__tensor__": key}
        if isinstance(node, np.ndarray):
            if node.dtype.kind not in "biufc" or node.dtype.byteorder == ">":
                raise TypeError(f"{where}: numpy arrays of dtype {node.dtype} cannot be stored")
            key = f"t{len(tensors)}"
            try:
                tensors[key] = torch.from_numpy(np.ascontiguousarray(node))
                if tensors[key].dtype not in _SUPPORTED:
                    raise TypeError("unsupported dtype")
            except TypeError as err:
                raise TypeError(f"{where}: numpy arrays of dtype {node.dtype} cannot be stored ({err})") from err
            return {"__ndarray__": key}
        if isinstance(node, dict):
            out = []
            for k, v in node.items():
                if not isinstance(k, (str, int)):
                    raise TypeError(f"{where}: dict keys must be str or int, got {type(k).__name__} ({k!r})")
                out.append([k, walk(v, f"{where}[{k!r}]", depth + 1)])
            return {"__dict__": out}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, (np.integer, np.floating, np.bool_)):
            return node.item()
        raise TypeError(
            f"{where}: cannot store a {type(node).__name__}; a checkpoint holds dicts, lists, tuples, "
            "tensors, numpy arrays, numbers, str and None"
        )

    return walk(tree, "state", 0), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`.

    :raises CorruptFileError: if the tree is malformed or refers to a missing tensor.
    """

    def walk(node, depth):
        if depth > _MAX_DEPTH + 2:
            raise CorruptFileError("checkpoint: the state tree is nested too deeply")
        if isinstance(node, dict):
            if len(node) != 1:
                raise CorruptFileError("checkpoint: unknown node in state tree")
            (tag, value), = node.items()
            if tag in ("__tensor__", "__ndarray__"):
                if not isinstance(value, str) or value not in tensors:
                    raise CorruptFileError(f"checkpoint: the state refers to a missing tensor {value!r}")
                if tag == "__tensor__":
                    return tensors[value]
                try:
                    return tensors[value].numpy()
                except (TypeError, RuntimeError) as err:
                    raise CorruptFileError(f"checkpoint: tensor {value!r} cannot be a numpy array ({err})") from None
            if tag == "__tuple__" and isinstance(value, list):
                return tuple(walk(v, depth + 1) for v in value)
            if tag == "__dict__" and isinstance(value, list):
                out = {}
                for pair in value:
                    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))):
                        raise CorruptFileError("checkpoint: malformed dict entry in state tree")
                    out[pair[0]] = walk(pair[1], depth + 1)
                return out
            raise CorruptFileError("checkpoint: unknown node in state tree")
        if isinstance(node, list):
            return [walk(v, depth + 1) for v in node]
        return node

    return walk(tree, 0)


def rng_state() -> dict:
    """The current torch, numpy and Python RNG states (and CUDA's, when CUDA is in use).

    The result can be stored in a checkpoint and restored with :func:`set_rng_state`.
    """
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (possibly after a checkpoint round trip).

    :raises TypeError: if ``state`` is not such a dict.
    :raises ValueError: if one of its parts is malformed; no RNG is changed then.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be the dict returned by rng_state(), got {type(state).__name__}")
    missing = [k for k in ("torch", "numpy", "python") if k not in state]
    if missing:
        raise ValueError(f"state lacks the RNG state(s) {missing}; expected keys 'torch', 'numpy', 'python'")
    t = state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError("state['torch'] must be a uint8 vector from torch.get_rng_state()")
    try:
        np_state = state["numpy"]
        np_state = (str(np_state[0]), np.asarray(np_state[1], dtype=np.uint32), *(int(v) if i < 2 else float(v) for i, v in enumerate(np_state[2:])))
        py = state["python"]
        py_state = (int(py[0]), tuple(int(v) for v in py[1]), None if py[2] is None else float(py[2]))
        # validate both before changing anything
        np.random.RandomState().set_state(np_state)
        random.Random().setstate(py_state)
    except (TypeError, ValueError, IndexError, KeyError) as err:
        raise ValueError(f"state['numpy'] or state['python'] is not a valid RNG state: {err}") from err
    torch.set_rng_state(t)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: os.PathLike, state: dict) -> int:
    """Atomically write ``state`` (nested dict of tensors and plain values) to ``path``.

    Returns the file size. The file holds no pickle; it carries the format
    version and a SHA-256 checksum. A crash during the write leaves any
    previous file at ``path`` intact.

    :raises TypeError: if ``state`` is not a dict or holds a value that cannot
        be stored (the message says where).
    :raises ValueError: if the folder of ``path`` does not exist.
    """
    path = _check_path("path", path)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    tree, tensors = flatten_state(state)
    return write_container(path, _KIND, {"state": tree}, tensors)


def load_checkpoint(path: os.PathLike, *, map_location=None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Verifies the format version, the checksum and the structure first; never
    unpickles anything.

    :param map_location: the device the tensors are put on (``"cpu"``, ``"cuda"``,
        ``"auto"``, a ``torch.device``); ``None``: the CPU. A checkpoint written on
        any device loads onto any other (:func:`set_rng_state` takes RNG states
        from any device back to where torch wants them).

    Usage::

        state = load_checkpoint("runs/ckpt-100.bq", map_location="cuda")

    :raises FileNotFoundError: if ``path`` is not a file.
    :raises CorruptFileError: (a ``ValueError``) naming the file and the problem
        if it is truncated, corrupted, from a newer pyro_bq, not a checkpoint,
        or not a pyro_bq file (e.g. a pickle or a ``torch.save`` file).
    """
    path = _check_path("path", path)
    device = None if map_location is None else resolve_device(map_location, name="map_location")
    meta, tensors = read_container(path, _KIND)
    if device is not None and device.type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    if "state" not in meta:
        raise CorruptFileError(f"{path}: checkpoint has no 'state'")
    try:
        state = unflatten_state(meta["state"], tensors)
    except CorruptFileError as err:
        raise CorruptFileError(f"{path}: {err}") from None
    if not isinstance(state, dict):
        raise CorruptFileError(f"{path}: checkpoint state is not a dict")
    return state


def _check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"prefix must be 1-100 characters from letters, digits, '_', '.' and '-' (no path separators), got {prefix!r}"
        )
    return prefix


def checkpoint_path(folder: os.PathLike, step: int, prefix: str = "ckpt") -> Path:
    """The file name ``folder/{prefix}-{step}.bq`` used for the checkpoint after ``step``."""
    folder = _check_path("folder", folder)
    prefix = _check_prefix(prefix)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return folder / f"{prefix}-{int(step)}.bq"


def list_checkpoints(folder: os.PathLike, prefix: str = "ckpt") -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``{prefix}-{step}.bq`` in ``folder``, newest first (not verified)."""
    folder = _check_path("folder", folder)
    prefix = _check_prefix(prefix)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.bq$")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return sorted(found, key=lambda item: item[0], reverse=True)


def latest_checkpoint(folder: os.PathLike, prefix: str = "ckpt") -> Optional[Path]:
    """The newest *valid* checkpoint ``{prefix}-{step}.bq`` in ``folder`` (or None).

    Files that fail any integrity check (truncated, corrupted, newer version,
    not a checkpoint) are skipped, so a run falls back to the one before.
    """
    for _, candidate in list_checkpoints(folder, prefix):
        try:
            load_checkpoint(candidate)
            return candidate
        except (CorruptFileError, OSError):
            continue
    return None


def prune_checkpoints(folder: os.PathLike, prefix: str = "ckpt", keep: int = 1) -> list[Path]:
    """Delete all but the ``keep`` newest *valid* checkpoints; returns the removed paths.

    Invalid files newer than the newest valid one are removed too; older
    invalid files are removed with the old valid ones.
    """
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int, got {type(keep).__name__}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    kept, removed = 0, []
    for _, candidate in list_checkpoints(folder, prefix):
        if kept < keep:
            try:
                load_checkpoint(candidate)
                kept += 1
                continue
            except (CorruptFileError, OSError):
                pass
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def replace_checkpoint(folder: os.PathLike, step: int, state: dict, prefix: str = "ckpt") -> Path:
    """Save ``state`` as the checkpoint after ``step`` in ``folder`` (:func:`checkpoint_path`, returned),
    then delete the folder's other ``{prefix}-{step}.bq`` files, older or stale newer ones.

    Usage::

        replace_checkpoint(folder, step, {"step": step, "guide": guide.state_dict(), "rng": rng_state()})
    """
    path = checkpoint_path(folder, step, prefix)
    save_checkpoint(path, state)
    for _, old in list_checkpoints(folder, prefix):
        if old != path:
            old.unlink(missing_ok=True)
    return path

