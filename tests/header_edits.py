"""Shared helpers for tests that edit the JSON header of a packed file and re-seal it."""

import json

from pyro_bq.io import CorruptFileError, load_packed
from pyro_bq.io.container import read_container, write_container


def header_leaves(node, trail=()):
    """Every path (list of keys / indices) into a JSON-like tree, inner nodes included."""
    out = [list(trail)]
    if isinstance(node, dict):
        for k, v in node.items():
            out += header_leaves(v, trail + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += header_leaves(v, trail + (i,))
    return out


def read_meta(path):
    """``(meta, tensors)`` of a packed file, the meta as a fresh JSON copy."""
    meta, tensors = read_container(path, "packed-guide")
    return json.loads(json.dumps(meta)), tensors


def check_edited_header_is_refused_clearly(meta, tensors, trail, replacement, crafted, model):
    """Write ``meta`` with ``meta[trail] = replacement`` (re-sealed) to ``crafted`` and load it:
    it must load or fail with CorruptFileError/ValueError naming the file or the site, nothing else."""
    node = meta
    for key in trail[:-1]:
        node = node[key]
    node[trail[-1]] = replacement
    write_container(crafted, "packed-guide", meta, tensors)
    try:
        load_packed(crafted, model)
    except (CorruptFileError, ValueError) as err:
        assert str(crafted) in str(err) or "site" in str(err), str(err)
    except Exception as err:  # noqa: BLE001 - any other type is a finding
        raise AssertionError(f"editing meta{trail} to {replacement!r}: {type(err).__name__}: {err}") from err
