"""Files under attack or accident: links planted at temporary or final names, a full disk,
and crafted files whose headers ask for more memory than the file holds."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import arviz as az
import pytest
import torch
from guide_contract import float_guide

from pyro_bq.guides import quantize
from pyro_bq.io import (
    CorruptFileError,
    atomic_write,
    atomic_write_bytes,
    latest_checkpoint,
    load_checkpoint,
    load_packed,
    read_container,
    save_checkpoint,
    save_packed,
    write_container,
)
from pyro_bq.io.checkpoint import checkpoint_path, prune_checkpoints
from pyro_bq.io.container import FORMAT_VERSION, MAGIC
from pyro_bq.quant import JQ
from pyro_bq.study import runner
from pyro_bq.uncertainty import plot_reliability

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


class _Inputs:
    """The slice of a dataset the study's ArviZ writer reads: ``len``, ``.x`` and ``.y``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)


def _arviz_writer():
    """``write(path)``: the study's ArviZ export of a small guide; ``check(path)`` reads it back."""
    model, guide, x, y = float_guide(n=6)
    cfg = type("Cfg", (), {"arviz_limit": 6, "arviz_samples": 3, "seed": 0})()

    def write(path):
        runner._write_arviz(cfg, model, guide, {"mnist": _Inputs(x, y)}, path)

    def check(path):
        assert az.from_netcdf(str(path)).posterior.sizes["draw"] == 3

    return write, check


def _writers():
    """name -> (file name, write(path), check(path)) for every kind of file pyro_bq writes."""
    _, guide, _, _ = float_guide(n=4)
    qguide = quantize(guide, JQ(4))

    def check_ckpt(p):
        assert torch.equal(load_checkpoint(p)["v"], torch.arange(5.0))

    def fill(tmp):
        tmp.write_bytes(b"by callback")

    def holds(data):
        def check(path):
            assert path.read_bytes() == data
        return check

    return {
        "checkpoint": ("ckpt-1.bq", lambda p: save_checkpoint(p, {"v": torch.arange(5.0)}), check_ckpt),
        "container": ("c.bq", lambda p: write_container(p, "k", {"a": 1}, {}),
                      lambda p: read_container(p, "k")),
        "packed": ("g.bq", lambda p: save_packed(qguide, p), lambda p: read_container(p, "packed-guide")),
        "bytes": ("r.json", lambda p: atomic_write_bytes(p, [b"{}"]), holds(b"{}")),
        "callback": ("x.bin", lambda p: atomic_write(p, fill), holds(b"by callback")),
        "arviz": ("float.nc", *_arviz_writer()),
        "figure": ("rel.png", lambda p: plot_reliability(torch.softmax(torch.randn(20, 10), -1), torch.arange(20) % 10, p),
                   lambda p: p.read_bytes().startswith(b"\x89PNG") or pytest.fail(f"{p} is not a PNG")),
    }


WRITERS = ["checkpoint", "container", "packed", "bytes", "callback", "arviz", "figure"]


@pytest.mark.parametrize("which", WRITERS)
def test_links_planted_at_temporary_and_final_names_are_never_written_through(tmp_path, which):
    name, write, check = _writers()[which]
    folder = tmp_path / "out"
    folder.mkdir()
    victims = {}
    for label, planted in (("tmp", folder / f".{name}.tmp"), ("dest", folder / name)):
        victims[label] = tmp_path / f"victim-{label}"
        victims[label].write_bytes(b"precious " + label.encode())
        planted.symlink_to(victims[label])
    write(folder / name)
    write(folder / name)  # a second write replaces the file the first one made
    assert victims["tmp"].read_bytes() == b"precious tmp"
    assert victims["dest"].read_bytes() == b"precious dest"
    assert not (folder / name).is_symlink() and (folder / name).is_file()
    check(folder / name)
    assert sorted(p.name for p in folder.iterdir()) == sorted([name, f".{name}.tmp"])


def _disk_full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("which", WRITERS)
def test_a_full_disk_gives_a_clear_error_leaves_nothing_behind_and_a_rerun_works(tmp_path, which, monkeypatch):
    name, write, check = _writers()[which]
    target = tmp_path / name
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _disk_full)  # where a delayed allocation failure surfaces
        with pytest.raises(OSError) as info:
            write(target)
    assert info.value.errno == errno.ENOSPC
    assert str(target) in str(info.value) and "disk space" in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []
    write(target)
    check(target)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_write_error_inside_the_writer_removes_its_partial_file(tmp_path):
    def chunks():
        yield b"half a file"
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="could not write .*r.bin"):
        atomic_write_bytes(tmp_path / "r.bin", chunks())
    with pytest.raises(ValueError, match="not ours"):
        atomic_write(tmp_path / "x.nc", lambda tmp: (tmp.write_bytes(b"partial"), _raise(ValueError("not ours"))))
    assert list(tmp_path.iterdir()) == []


def _raise(err):
    raise err


_FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import errno, json, os, resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    import torch
    from test_hostile_files import _arviz_writer
    from pyro_bq.io import load_checkpoint, save_checkpoint
    folder = Path(sys.argv[1])
    write_nc, check_nc = _arviz_writer()
    writes = {"ckpt-1.bq": lambda p: save_checkpoint(p, {"v": torch.ones(100000)}), "float.nc": write_nc}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the kernel's write then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    out = {}
    for name, write in writes.items():
        try:
            write(folder / name)
            out[name] = None
        except OSError as err:
            out[name] = [err.errno, str(err)]
    out["left"] = sorted(os.listdir(folder))
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    for name, write in writes.items():
        write(folder / name)
    check_nc(folder / "float.nc")
    out["after"] = sorted(os.listdir(folder))
    print(json.dumps(out))
    """
)


def test_a_real_write_failure_of_the_kernel_is_reported_and_survived(tmp_path):
    """HDF5 used to crash the process (SIGSEGV) after a failed write; the files must fail cleanly."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT, str(tmp_path), str(TESTS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("ckpt-1.bq", "float.nc"):
        code, text = out[name]
        assert code == errno.EFBIG and str(tmp_path / name) in text, text
    assert out["left"] == []
    assert out["after"] == ["ckpt-1.bq", "float.nc"]


# -- crafted files -------------------------------------------------------------------------------
def _sealed(header: dict, payload: bytes = b"") -> bytes:
    """A container file built by hand: magic, version, header length, header, payload, SHA-256."""
    raw = json.dumps(header).encode()
    body = MAGIC + struct.pack("<IQ", FORMAT_VERSION, len(raw)) + raw + payload
    return body + hashlib.sha256(body).digest()


def _checkpoint(tensors: list, state=None, payload: bytes = b"") -> bytes:
    index, offset = [], 0
    for name, dtype, shape, nbytes in tensors:
        index.append({"name": name, "dtype": dtype, "shape": shape, "offset": offset, "nbytes": nbytes})
        offset += nbytes
    meta = {"state": state if state is not None else {"__dict__": []}}
    return _sealed({"kind": "checkpoint", "byteorder": "little", "meta": meta, "tensors": index}, payload)


def _crafted_checkpoints() -> dict[str, bytes]:
    """Checkpoints that must each be refused with CorruptFileError, without allocating what they declare."""
    many_dicts = b"[" + b"{}," * 3_000_000 + b"{}]"
    raw = b'{"kind":"checkpoint","meta":{"state":{"__dict__":[]},"pad":' + many_dicts + b'},"tensors":[]}'
    body = MAGIC + struct.pack("<IQ", FORMAT_VERSION, len(raw)) + raw
    return {
        "zero-size-2**63": _checkpoint([("t0", "float32", [0, 2**63], 0)], {"__tensor__": "t0"}),
        "zero-size-stride-overflow": _checkpoint([("t0", "float64", [0, 2**40, 2**30], 0)], {"__tensor__": "t0"}),
        "tensor-larger-than-payload": _checkpoint([("t0", "float32", [2**34], 2**36)], payload=b"\x00" * 64),
        "bfloat16-as-numpy": _checkpoint([("t0", "bfloat16", [2], 4)], {"__dict__": [["a", {"__ndarray__": "t0"}]]},
                                         b"\x00" * 4),
        "million-json-dicts": body + hashlib.sha256(body).digest(),
    }


def _crafted_packed(folder: Path) -> tuple[dict[str, bytes], Path]:
    """Packed files (edited headers of a real one, as bytes) that must be refused; and the real one's path."""
    _, guide, _, _ = float_guide(n=4)
    good = folder / "good.bq"
    save_packed(quantize(guide, JQ(4)), good)
    meta, tensors = read_container(good, "packed-guide")
    (folder / "edits").mkdir()
    files = {}
    for label, edit in (("input-2^26x2", lambda m: m.__setitem__("input", [[2**26, 2], "float32"])),
                        ("site-2^30x784", lambda m: m["sites"][0].__setitem__(1, [2**30, 784]))):
        edited = json.loads(json.dumps(meta))
        edit(edited)
        path = folder / "edits" / f"{label}.bq"
        write_container(path, "packed-guide", edited, tensors)
        files[label] = path.read_bytes()
    return files, good


_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from guide_contract import tiny_classifier
    from pyro_bq.io import CorruptFileError, load_checkpoint, load_packed
    folder = Path(sys.argv[1])
    model, _, _ = tiny_classifier()
    load_packed(folder / "good.bq", model)  # warm up: lazy imports and allocations count in the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {}
    for path in sorted(folder.glob("*.bq")):
        if path.name == "good.bq":
            continue
        load = load_packed if path.name.startswith("packed-") else load_checkpoint
        try:
            (load(path, model) if load is load_packed else load(path))
            result = "loaded"
        except CorruptFileError as err:
            result = "CorruptFileError: " + str(err)
        except Exception as err:
            result = type(err).__name__ + ": " + str(err)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        out[path.name] = [result, grown, path.stat().st_size]
    print(json.dumps(out))
    """
)


def test_crafted_headers_are_refused_without_allocating_what_they_declare(tmp_path):
    packed, _ = _crafted_packed(tmp_path)
    for label, raw in packed.items():
        (tmp_path / f"packed-{label}.bq").write_bytes(raw)
    for label, raw in _crafted_checkpoints().items():
        (tmp_path / f"ckpt-{label}.bq").write_bytes(raw)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), str(TESTS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == 7
    for name, (result, grown, size) in out.items():  # ru_maxrss only grows: each bound covers the files before
        assert result.startswith("CorruptFileError") and str(tmp_path / name) in result, (name, result)
        assert grown < size + 100 * 2**20, f"{name}: peak memory grew by {grown} bytes for a {size}-byte file"


def test_latest_and_prune_skip_crafted_checkpoints(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 3), {"step": 3})
    crafted = _crafted_checkpoints()
    for step, label in enumerate(sorted(crafted), start=10):
        checkpoint_path(tmp_path, step).write_bytes(crafted[label])
        with pytest.raises(CorruptFileError):
            load_checkpoint(checkpoint_path(tmp_path, step))
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 3)
    removed = prune_checkpoints(tmp_path, keep=1)
    assert len(removed) == len(crafted)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-3.bq"]


def test_a_large_input_stored_in_a_small_file_loads_with_an_explicit_input(tmp_path):
    """The bound on the header's example input is not a bound on the model: example_input= lifts it."""
    packed, good = _crafted_packed(tmp_path)
    path = tmp_path / "big-input.bq"
    path.write_bytes(packed["input-2^26x2"])
    model = float_guide(n=4)[0]
    with pytest.raises(CorruptFileError, match="example_input="):
        load_packed(path, model)
    x = torch.zeros(1, 1, 28, 28)
    loaded, reference = load_packed(path, model, example_input=x), load_packed(good, model)
    for site in reference.sites:
        for got, want in zip(loaded.get_loc_scale(site), reference.get_loc_scale(site)):
            assert torch.equal(got, want)
