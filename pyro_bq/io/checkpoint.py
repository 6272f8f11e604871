"""Checkpoints of a training run: model, guide, optimizer, counters and RNG states.

One format for every run (SVI, PWFN rounds, the study): a pickle-free
:mod:`pyro_bq.io.container` file of kind ``"checkpoint"``. Any nested state of
dicts, lists, tuples, tensors, numbers, strings and ``None`` is stored: tensors
as raw bytes, the rest as JSON.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .container import CorruptFileError, read_container, write_container

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "rng_state",
    "set_rng_state",
    "flatten_state",
    "unflatten_state",
]

_KIND = "checkpoint"


def flatten_state(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON tree with tensor references and the tensors."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node):
        if isinstance(node, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = node
            return {"__tensor__": key}
        if isinstance(node, np.ndarray):
            key = f"t{len(tensors)}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(node))
            return {"__ndarray__": key}
        if isinstance(node, dict):
            if not all(isinstance(k, (str, int)) for k in node):
                raise TypeError("checkpoint state: dict keys must be str or int")
            return {"__dict__": [[k, walk(v)] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v) for v in node]}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, (np.integer, np.floating)):
            return node.item()
        raise TypeError(f"checkpoint state: cannot store a {type(node).__name__}")

    return walk(tree), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""

    def walk(node):
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__ndarray__" in node:
                return tensors[node["__ndarray__"]].numpy()
            if "__tuple__" in node:
                return tuple(walk(v) for v in node["__tuple__"])
            if "__dict__" in node:
                return {k: walk(v) for k, v in node["__dict__"]}
            raise CorruptFileError("checkpoint: unknown node in state tree")
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(tree)


def rng_state() -> dict:
    """The current torch, numpy and Python RNG states."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(path: os.PathLike, state: dict) -> int:
    """Atomically write ``state`` (nested dict of tensors and plain values) to ``path``.

    Returns the file size. The file holds no pickle.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    tree, tensors = flatten_state(state)
    return write_container(path, _KIND, {"state": tree}, tensors)


def load_checkpoint(path: os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (verifies version and checksum)."""
    meta, tensors = read_container(path, _KIND)
    return unflatten_state(meta["state"], tensors)


def latest_checkpoint(folder: os.PathLike, prefix: str = "ckpt") -> Optional[Path]:
    """The newest *valid* checkpoint ``{prefix}-{step}.bq`` in ``folder`` (or None)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.bq$")
    found = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))), reverse=True
    )
    for _, candidate in found:
        try:
            read_container(candidate, _KIND)
            return candidate
        except (CorruptFileError, OSError):
            continue
    return None
