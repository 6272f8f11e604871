"""Integrity of pyro_bq files: no pickle ever runs, and any damage gives a clear error.

Files covered: the raw container, checkpoints (and fit_svi's resume) and, when
pyro_bq.io provides them, packed quantized files.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_bq.io import FORMAT_VERSION, CorruptFileError, latest_checkpoint, load_checkpoint, read_container, save_checkpoint, write_container
from pyro_bq.io.container import MAGIC

HYP = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class _Payload:
    """Unpickling this object creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickle_files(folder: Path, marker: Path) -> dict[str, Path]:
    files = {}
    for proto in (0, 2, 4, 5):
        files[f"pickle-{proto}"] = folder / f"p{proto}.bq"
        files[f"pickle-{proto}"].write_bytes(pickle.dumps({"step": 3, "x": _Payload(marker)}, protocol=proto))
    files["torch.save"] = folder / "t.bq"
    torch.save({"step": 3, "x": _Payload(marker), "w": torch.ones(2)}, files["torch.save"])
    files["torch.save-legacy"] = folder / "legacy.bq"
    torch.save({"x": _Payload(marker)}, files["torch.save-legacy"], _use_new_zipfile_serialization=False)
    # a pickle behind our magic bytes and a valid checksum: still never unpickled
    body = MAGIC + struct.pack("<IQ", FORMAT_VERSION, 0) + pickle.dumps(_Payload(marker))
    files["pickle-behind-magic"] = folder / "m.bq"
    files["pickle-behind-magic"].write_bytes(body + hashlib.sha256(body).digest())
    return files


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """Guard: the crafted files are live, so the refusal tests below mean something."""
    marker = tmp_path / "ran"
    files = _pickle_files(tmp_path, marker)
    pickle.loads(files["pickle-4"].read_bytes())
    assert marker.exists()
    marker.unlink()
    torch.load(files["torch.save"], weights_only=False)
    assert marker.exists()


def test_pickles_and_torch_save_files_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    for label, path in _pickle_files(tmp_path, marker).items():
        for reader in (load_checkpoint, lambda p: read_container(p, "checkpoint")):
            with pytest.raises(CorruptFileError) as info:
                reader(path)
            message = str(info.value)
            assert str(path) in message, (label, message)
            if label.startswith("pickle-") and label != "pickle-behind-magic" or label.startswith("torch.save"):
                assert "pickle" in message, (label, message)
        assert not marker.exists(), f"{label}: the payload ran"


def test_fit_svi_never_resumes_from_a_planted_pickle(mnist_small, tmp_path):
    from pyro_bq import IIDNormal
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.inference import fit_svi
    from pyro_bq.models import MLP, BayesianClassifier

    marker = tmp_path / "ran"
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"step": 1, "x": _Payload(marker)}, folder / "ckpt-999.bq")
    (folder / "ckpt-998.bq").write_bytes(pickle.dumps(_Payload(marker)))
    train = mnist_small[0].subset(100)
    model = BayesianClassifier(MLP((784, 4, 10)), IIDNormal(1.0), dataset_size=len(train))
    result = fit_svi(model, AutoMeanFieldNormal(model), train, num_steps=2, batch_size=50,
                     checkpoint_dir=folder, checkpoint_every=1, progress=False)
    assert result.resumed_from is None and result.steps == 2
    assert not marker.exists()
    assert latest_checkpoint(folder) == folder / "ckpt-2.bq"


def test_a_pickle_stored_as_data_stays_inert_bytes(tmp_path):
    marker = tmp_path / "ran"
    blob = pickle.dumps(_Payload(marker))
    write_container(tmp_path / "c.bq", "blob", {"note": blob.decode("latin-1")},
                    {"bytes": torch.tensor(list(blob), dtype=torch.uint8)})
    meta, tensors = read_container(tmp_path / "c.bq", "blob")
    assert bytes(tensors["bytes"].tolist()) == blob and meta["note"].encode("latin-1") == blob
    assert not marker.exists()


# -- damaged files ------------------------------------------------------------------------------


def _small_checkpoint(path: Path) -> bytes:
    save_checkpoint(path, {"step": 4, "w": torch.arange(6.0).reshape(2, 3), "b": (True, None), "rng": torch.arange(5, dtype=torch.uint8)})
    return path.read_bytes()


def _expect_clear_error(path: Path, load) -> CorruptFileError:
    try:
        load(path)
    except CorruptFileError as err:
        assert str(path) in str(err)
        return err
    except Exception as err:  # noqa: BLE001 - any other type is the failure we look for
        raise AssertionError(f"{type(err).__name__} instead of CorruptFileError: {err}") from err
    raise AssertionError("damaged file loaded silently")


def test_every_truncation_and_every_single_byte_flip_of_a_checkpoint_is_caught(tmp_path):
    good = _small_checkpoint(tmp_path / "good.bq")
    bad = tmp_path / "bad.bq"
    messages = set()
    for n in range(len(good)):
        bad.write_bytes(good[:n])
        messages.add(str(_expect_clear_error(bad, load_checkpoint)).split(": ", 1)[1][:30])
    for i in range(len(good)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(good)
            damaged[i] ^= mask
            bad.write_bytes(bytes(damaged))
            messages.add(str(_expect_clear_error(bad, load_checkpoint)).split(": ", 1)[1][:30])
    bad.write_bytes(good + b"\x00")
    _expect_clear_error(bad, load_checkpoint)
    assert any("checksum" in m for m in messages) and any("truncated" in m for m in messages)


def test_a_newer_format_version_is_named_as_such(tmp_path):
    good = bytearray(_small_checkpoint(tmp_path / "c.bq"))
    struct.pack_into("<I", good, len(MAGIC), FORMAT_VERSION + 1)
    body = bytes(good[:-32])
    (tmp_path / "new.bq").write_bytes(body + hashlib.sha256(body).digest())
    err = _expect_clear_error(tmp_path / "new.bq", load_checkpoint)
    assert f"format version {FORMAT_VERSION + 1} is newer" in str(err) and "upgrade pyro_bq" in str(err)
    assert "corrupted" not in str(err)


def _reseal(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def _with_header(header) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return _reseal(MAGIC + struct.pack("<IQ", FORMAT_VERSION, len(raw)) + raw + b"\x00" * 8)


@pytest.mark.parametrize(
    "header, words",
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
        ([1, 2], "lacks"),
        ({"kind": "checkpoint", "meta": {}, "tensors": {}}, "lacks"),
        ({"kind": "checkpoint", "meta": [], "tensors": []}, "lacks"),
        ({"kind": "other", "meta": {}, "tensors": []}, "expected a 'checkpoint'"),
        ({"kind": "checkpoint", "meta": {"state": {}}, "tensors": []}, "payload has 8 bytes"),
        ({"kind": "checkpoint", "meta": {}, "tensors": [{"name": "a", "dtype": "float64", "shape": [1], "offset": 0, "nbytes": 8}]}, "no 'state'"),
        ({"kind": "checkpoint", "meta": {}, "tensors": ["x"]}, "not an object"),
        ({"kind": "checkpoint", "meta": {}, "tensors": [{"name": "a", "dtype": "object", "shape": [1], "offset": 0, "nbytes": 8}]}, "unknown dtype"),
        ({"kind": "checkpoint", "meta": {}, "tensors": [{"name": "a", "dtype": "float32", "shape": [-2, -1], "offset": 0, "nbytes": 8}]}, "bad shape"),
        ({"kind": "checkpoint", "meta": {}, "tensors": [{"name": "a", "dtype": "float32", "shape": [3], "offset": 0, "nbytes": 8}]}, "bad index entry"),
        ({"kind": "checkpoint", "meta": {}, "tensors": [{"name": "a", "dtype": "float32", "shape": [2], "offset": -8, "nbytes": 8}]}, "bad index entry"),
        ({"kind": "checkpoint", "meta": {}, "tensors": [{"name": "a", "dtype": "float32", "shape": [2], "offset": 0.0, "nbytes": 8}]}, "bad offset"),
        ({"kind": "checkpoint", "meta": {}, "tensors": [{"name": "a", "dtype": "float32", "shape": [2**40, 2**40], "offset": 0, "nbytes": 8}]}, "bad index entry"),
        ({"kind": "checkpoint", "meta": {}, "tensors": [{"name": "a", "dtype": "float32", "shape": [1], "offset": 0, "nbytes": 4}] * 2}, "repeated name"),
        ({"kind": "checkpoint", "meta": {"state": {"__tensor__": "a"}}, "tensors": [{"name": "a", "dtype": "float32", "shape": [0, 2**63], "offset": 0, "nbytes": 0}]}, "impossible shape"),
        ({"kind": "checkpoint", "meta": {"state": {"__tensor__": "a"}}, "tensors": [{"name": "a", "dtype": "float64", "shape": [0, 2**40, 2**30], "offset": 0, "nbytes": 0}]}, "impossible shape"),
        ({"kind": "checkpoint", "meta": {"state": {"__ndarray__": "a"}}, "tensors": [{"name": "a", "dtype": "bfloat16", "shape": [4], "offset": 0, "nbytes": 8}]}, "cannot be a numpy array"),
        ({"kind": "checkpoint", "meta": {"pad": [{}] * 400000}, "tensors": []}, "to parse"),
        ({"kind": "checkpoint", "meta": {}, "tensors": [{"name": "a", "dtype": "bool", "shape": [8], "offset": 0, "nbytes": 8}]}, "no 'state'"),
        ({"kind": "checkpoint", "meta": {"state": {"__tensor__": "zz"}}, "tensors": [{"name": "a", "dtype": "uint8", "shape": [8], "offset": 0, "nbytes": 8}]}, "missing tensor"),
        ({"kind": "checkpoint", "meta": {"state": {"__dict__": [[1]]}}, "tensors": [{"name": "a", "dtype": "uint8", "shape": [8], "offset": 0, "nbytes": 8}]}, "malformed"),
        ({"kind": "checkpoint", "meta": {"state": {"a": 1, "b": 2}}, "tensors": [{"name": "a", "dtype": "uint8", "shape": [8], "offset": 0, "nbytes": 8}]}, "unknown node"),
        ({"kind": "checkpoint", "meta": {"state": [1]}, "tensors": [{"name": "a", "dtype": "uint8", "shape": [8], "offset": 0, "nbytes": 8}]}, "not a dict"),
    ],
)
def test_a_well_sealed_but_malformed_file_is_refused_clearly(tmp_path, header, words):
    """A file crafted with a valid checksum cannot crash the reader deep inside numpy/torch/json."""
    path = tmp_path / "crafted.bq"
    path.write_bytes(_with_header(header))
    err = _expect_clear_error(path, load_checkpoint)
    assert words in str(err), str(err)


def test_bool_tensor_bytes_are_validated(tmp_path):
    header = {"kind": "checkpoint", "meta": {"state": {"__dict__": []}},
              "tensors": [{"name": "a", "dtype": "bool", "shape": [8], "offset": 0, "nbytes": 8}]}
    raw = json.dumps(header).encode()
    path = tmp_path / "b.bq"
    path.write_bytes(_reseal(MAGIC + struct.pack("<IQ", FORMAT_VERSION, len(raw)) + raw + b"\x00" * 7 + b"\x07"))
    assert "not booleans" in str(_expect_clear_error(path, load_checkpoint))


@HYP
@given(data=st.data())
def test_random_damage_to_a_real_training_checkpoint_is_always_caught(tmp_path, data, svi_checkpoint):
    good = svi_checkpoint.read_bytes()
    kind = data.draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "splice"]))
    buf = bytearray(good)
    if kind == "truncate":
        buf = buf[: data.draw(st.integers(0, len(good) - 1))]
    elif kind == "flip":  # 1-4 distinct bytes, each changed
        for at in data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=4, unique=True)):
            buf[at] ^= data.draw(st.integers(1, 255))
    elif kind == "overwrite":
        at = data.draw(st.integers(0, len(good) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=64))
        if good[at : at + len(chunk)] == chunk[: len(good) - at]:
            chunk = bytes(b ^ 0xFF for b in chunk)
        buf[at : at + len(chunk)] = chunk
        buf = buf[: max(len(good), at + len(chunk))]
    elif kind == "insert":
        at = data.draw(st.integers(0, len(good)))
        buf[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    else:  # zero a page in the middle, as a failed disk sector would
        at = data.draw(st.integers(0, len(good) - 1))
        n = data.draw(st.integers(1, 4096))
        if any(buf[at : at + n]):
            buf[at : at + n] = bytes(len(buf[at : at + n]))
        else:
            buf = buf[:at]
    path = tmp_path / "damaged.bq"
    path.write_bytes(bytes(buf))
    _expect_clear_error(path, load_checkpoint)


@pytest.fixture(scope="module")
def svi_checkpoint(tmp_path_factory, mnist_small):
    from pyro_bq import IIDNormal
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.inference import fit_svi
    from pyro_bq.models import MLP, BayesianClassifier

    folder = tmp_path_factory.mktemp("svi")
    train = mnist_small[0].subset(100)
    model = BayesianClassifier(MLP((784, 6, 10)), IIDNormal(1.0), dataset_size=len(train))
    fit_svi(model, AutoMeanFieldNormal(model), train, num_steps=3, batch_size=50,
            checkpoint_dir=folder, checkpoint_every=3, progress=False)
    return latest_checkpoint(folder)


@HYP
@given(header=st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5)),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.sampled_from(
        ["kind", "meta", "tensors", "state", "name", "dtype", "shape", "offset", "nbytes", "__tensor__", "__dict__", "__tuple__", "__ndarray__"]),
        c, max_size=5)),
    max_leaves=25,
), payload=st.binary(max_size=40))
def test_random_headers_with_valid_checksums_never_crash_the_reader(tmp_path, header, payload):
    if isinstance(header, dict) and "kind" in header:
        header["kind"] = "checkpoint"
    raw = json.dumps(header).encode()
    path = tmp_path / "crafted.bq"
    path.write_bytes(_reseal(MAGIC + struct.pack("<IQ", FORMAT_VERSION, len(raw)) + raw + payload))
    try:
        state = load_checkpoint(path)
    except CorruptFileError as err:
        assert str(path) in str(err)
    else:
        assert isinstance(state, dict)  # a well-formed file was crafted by chance: it must load as a dict


# -- packed quantized files (pyro_bq.io) ------------------------------------------------------------


def _packed_file(folder: Path, policy: str) -> tuple[Path, object]:
    from pyro_bq import IIDNormal
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.models import MLP, BayesianClassifier
    from pyro_bq.guides import quantize
    from pyro_bq.io import save_packed
    from pyro_bq.quant import JQ, SPQ, VPQ

    torch.manual_seed(0)
    model = BayesianClassifier(MLP((784, 3, 10)), IIDNormal(1.0), dataset_size=100)
    guide = AutoMeanFieldNormal(model).setup(torch.zeros(2, 1, 28, 28))
    qguide = quantize(guide, {"JQ": JQ(4), "VPQ": VPQ(3), "SPQ": SPQ(2)}[policy])
    path = folder / f"{policy}.bq"
    save_packed(qguide, path)
    return path, model


@pytest.mark.parametrize("policy", ["JQ", "VPQ"])
def test_every_truncation_and_byte_flip_of_a_packed_file_is_caught(tmp_path, policy):
    from pyro_bq.io import load_packed

    path, model = _packed_file(tmp_path, policy)
    good = path.read_bytes()
    load_packed(path, model)  # guard: the intact file loads
    bad = tmp_path / "bad.bq"
    for n in range(0, len(good), max(1, len(good) // 400)):
        bad.write_bytes(good[:n])
        _expect_clear_error(bad, lambda p: load_packed(p, model))
    for i in range(len(good)):
        damaged = bytearray(good)
        damaged[i] ^= 0x10 if i % 2 else 0xFF
        bad.write_bytes(bytes(damaged))
        _expect_clear_error(bad, lambda p: load_packed(p, model))


@HYP
@given(data=st.data())
def test_random_damage_to_a_packed_file_is_always_caught(tmp_path, data, packed):
    from pyro_bq.io import load_packed

    path, model = packed
    good = path.read_bytes()
    buf = bytearray(good)
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(good) - 1))]
    else:
        for at in data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=3, unique=True)):
            buf[at] ^= data.draw(st.integers(1, 255))
    bad = tmp_path / "damaged.bq"
    bad.write_bytes(bytes(buf))
    _expect_clear_error(bad, lambda p: load_packed(p, model))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return _packed_file(tmp_path_factory.mktemp("packed"), "SPQ")


def test_load_packed_refuses_pickles_and_torch_save_files(tmp_path, packed):
    from pyro_bq.io import load_packed

    _, model = packed
    marker = tmp_path / "ran"
    for label, path in _pickle_files(tmp_path, marker).items():
        with pytest.raises(CorruptFileError) as info:
            load_packed(path, model)
        assert str(path) in str(info.value)
    assert not marker.exists()


def test_a_checkpoint_is_not_loaded_as_a_packed_file(tmp_path, packed):
    from pyro_bq.io import load_packed

    _, model = packed
    save_checkpoint(tmp_path / "c.bq", {"step": 1})
    with pytest.raises(CorruptFileError, match="expected a 'packed-guide'"):
        load_packed(tmp_path / "c.bq", model)


@pytest.mark.filterwarnings("ignore")
@settings(HYP, max_examples=150, derandomize=True, database=None)
@given(edit=st.data())
def test_packed_files_with_valid_checksums_but_edited_headers_give_clear_errors(tmp_path, packed, edit):
    """A re-sealed file whose JSON meta was edited must never crash load_packed deep inside numpy/torch."""
    from header_edits import check_edited_header_is_refused_clearly, header_leaves, read_meta

    path, model = packed
    meta, tensors = read_meta(path)
    trail = edit.draw(st.sampled_from([t for t in header_leaves(meta) if t]))
    replacement = edit.draw(st.one_of(st.none(), st.integers(-3, 10**6), st.floats(), st.text(max_size=3), st.just([]), st.just({})))
    check_edited_header_is_refused_clearly(meta, tensors, trail, replacement, tmp_path / "edited.bq", model)
