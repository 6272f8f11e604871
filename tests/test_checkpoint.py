"""Checkpoints: exact round trips, RNG states, atomic writes, picking the latest valid file."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_bq.io import CorruptFileError, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pyro_bq.io.checkpoint import checkpoint_path, list_checkpoints, prune_checkpoints
from pyro_bq.io.container import atomic_write_bytes


def same(a, b) -> bool:
    """Exact structural equality: types, dtypes, shapes, values (NaN == NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(torch.equal(torch.view_as_real(a) if a.is_complex() else a, torch.view_as_real(b) if b.is_complex() else b)) or bool(
                (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
            )
        return bool(torch.equal(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def test_round_trip_keeps_every_type_dtype_shape_and_value_exactly(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "step": 17,
        "epoch": np.int64(2),
        "lr": 1e-3,
        "nan": float("nan"),
        "inf": float("-inf"),
        "flag": True,
        "name": "r\u00e9sum\u00e9",
        "none": None,
        "tuple": (1, (2.5, "x"), [None]),
        3: {"int keys": "stay ints"},
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.zeros(0, 5),
        "view": base.t()[1:],  # non-contiguous
        "bf16": torch.randn(4).to(torch.bfloat16),
        "half": torch.randn(2, 2).half(),
        "complex": torch.randn(3, dtype=torch.complex64),
        "ints": [torch.tensor([-(2**63), 2**63 - 1]), torch.tensor([-128, 127], dtype=torch.int8)],
        "bool": torch.tensor([True, False, True]),
        "array": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "farray": np.array([np.nan, 1.5]),
        "grad": torch.randn(3, requires_grad=True),
    }
    save_checkpoint(tmp_path / "c.bq", state)
    loaded = load_checkpoint(tmp_path / "c.bq")
    expected = dict(state, epoch=2, grad=state["grad"].detach(), view=state["view"].contiguous())
    assert same(loaded, expected)
    assert isinstance(loaded["tuple"], tuple) and isinstance(loaded["tuple"][2], list)
    assert 3 in loaded and "3" not in loaded
    # the guard itself must be able to fail
    assert not same(loaded, dict(expected, step=18))
    assert not same(loaded["tuple"], list(loaded["tuple"]))


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.floats(allow_nan=True), st.text(max_size=8)
)
tensor_leaf = st.builds(
    lambda shape, dtype, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(dtype),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.int16, torch.uint8, torch.bool]),
    st.integers(0, 2**31),
)
states = st.recursive(
    st.one_of(json_leaf, tensor_leaf),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-5, 5)), children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=st.dictionaries(st.text(max_size=6), states, max_size=5))
def test_any_nested_state_round_trips_exactly(tmp_path, state):
    save_checkpoint(tmp_path / "h.bq", state)
    assert same(load_checkpoint(tmp_path / "h.bq"), state)


def test_rng_states_survive_a_checkpoint_and_reproduce_the_same_draws(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    torch.randn(3), np.random.randn(3), random.random()
    np.random.standard_normal()  # leave a cached Gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "rng.bq", {"rng": rng_state()})
    expected = (torch.randn(5), np.random.randn(5), [random.random() for _ in range(5)], random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "rng.bq")["rng"])
    got = (torch.randn(5), np.random.randn(5), [random.random() for _ in range(5)], random.gauss(0, 1))
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2:] == got[2:]


@pytest.mark.parametrize(
    "bad, exc, words",
    [
        (None, TypeError, "state must be"),
        ({"torch": torch.get_rng_state()}, ValueError, "lacks"),
        ({"torch": torch.zeros(3), "numpy": np.random.get_state(), "python": random.getstate()}, ValueError, "state['torch']"),
        ({"torch": torch.get_rng_state(), "numpy": ("MT19937", [1, 2]), "python": random.getstate()}, ValueError, "state['numpy']"),
        ({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": (3, (1, 2), None)}, ValueError, "state['python']"),
    ],
)
def test_set_rng_state_rejects_bad_states_and_changes_nothing(bad, exc, words):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    before = rng_state()
    with pytest.raises(exc) as info:
        set_rng_state(bad)
    assert words in str(info.value)
    after = rng_state()
    assert torch.equal(before["torch"], after["torch"])
    assert np.array_equal(before["numpy"][1], after["numpy"][1]) and before["python"] == after["python"]


def test_unstorable_values_are_refused_with_their_place_in_the_state(tmp_path):
    with pytest.raises(TypeError, match=r"state\['a'\]\[1\]: cannot store a object"):
        save_checkpoint(tmp_path / "x.bq", {"a": [1, object()]})
    with pytest.raises(TypeError, match=r"state\['k'\]: dict keys must be str or int"):
        save_checkpoint(tmp_path / "x.bq", {"k": {(1, 2): 3}})
    with pytest.raises(TypeError, match=r"state\['s'\].*sparse"):
        save_checkpoint(tmp_path / "x.bq", {"s": torch.eye(2).to_sparse()})
    with pytest.raises(TypeError, match=r"state\['o'\].*object"):
        save_checkpoint(tmp_path / "x.bq", {"o": np.array([object()])})
    with pytest.raises(TypeError, match="state must be a dict"):
        save_checkpoint(tmp_path / "x.bq", [1, 2])
    with pytest.raises(ValueError, match="does not exist"):
        save_checkpoint(tmp_path / "nope" / "x.bq", {})
    assert not (tmp_path / "x.bq").exists()


def test_fit_svi_checkpoints_hold_model_guide_optimizer_counter_and_rng(mnist_small, tmp_path):
    from pyro_bq import IIDNormal
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.inference import fit_svi
    from pyro_bq.models import MLP, BayesianClassifier

    train = mnist_small[0].subset(200)
    model = BayesianClassifier(MLP((784, 8, 10)), IIDNormal(1.0), dataset_size=len(train))
    guide = AutoMeanFieldNormal(model)
    fit_svi(model, guide, train, num_steps=6, batch_size=50, checkpoint_dir=tmp_path, checkpoint_every=4, progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6]  # older ones pruned after the new one is safe
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 6 and len(state["losses"]) == 6
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert torch.equal(state["guide"]["loc"], guide.loc.detach())
    adam = next(iter(state["optim"].values()))
    assert int(adam["state"][0]["step"]) == 6  # Adam's step counter and moments are in there
    assert set(adam["state"][0]) >= {"exp_avg", "exp_avg_sq"}


def test_file_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "p.bq", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "p.bq").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "ckpt-1.bq"
    save_checkpoint(target, {"v": torch.ones(3)})
    before = target.read_bytes()

    def chunks():
        yield b"partial bytes"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, chunks())
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1.bq"]


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time, torch
    from pyro_bq.io import save_checkpoint
    real_fsync = os.fsync
    def stuck(fd):
        open(sys.argv[2], "w").close()  # tell the parent the bytes are written, not yet renamed
        time.sleep(600)
    os.fsync = stuck
    save_checkpoint(sys.argv[1], {"v": torch.full((100000,), 2.0)})
    """
)


def test_sigkill_during_a_write_leaves_the_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "ckpt-5.bq"
    save_checkpoint(target, {"v": torch.ones(3)})
    ready = tmp_path / "ready"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), str(ready)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed writer should have left its temporary file"
    assert torch.equal(load_checkpoint(target)["v"], torch.ones(3))
    assert latest_checkpoint(tmp_path) == target
    # the next write of that file removes what the dead writer left
    save_checkpoint(target, {"v": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-5.bq", "ready"]


def test_latest_checkpoint_skips_damaged_newer_files(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (3, 10, 20):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    raw = (tmp_path / "ckpt-20.bq").read_bytes()
    (tmp_path / "ckpt-20.bq").write_bytes(raw[:-5])  # truncated newest
    (tmp_path / "ckpt-100.bq").write_bytes(b"\x80\x04garbage")  # not even a container
    (tmp_path / "other-50.bq").write_bytes(raw)  # another prefix
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-10.bq"
    assert latest_checkpoint(tmp_path, prefix="other") == tmp_path / "other-50.bq"
    removed = prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == ["ckpt-100.bq", "ckpt-20.bq", "ckpt-3.bq"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-10.bq", "other-50.bq"]


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda d: checkpoint_path(d, -1), ValueError, "step"),
        (lambda d: checkpoint_path(d, 1.5), TypeError, "step"),
        (lambda d: checkpoint_path(d, 1, prefix="../x"), ValueError, "prefix"),
        (lambda d: latest_checkpoint(d, prefix=3), TypeError, "prefix"),
        (lambda d: latest_checkpoint(42), TypeError, "folder"),
        (lambda d: prune_checkpoints(d, keep=0), ValueError, "keep"),
        (lambda d: load_checkpoint(None), TypeError, "path"),
        (lambda d: load_checkpoint(d / "absent.bq"), FileNotFoundError, "absent.bq"),
        (lambda d: save_checkpoint(d, {}), ValueError, "is a folder"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, call, exc, words):
    with pytest.raises(exc, match=words.replace(".", r"\.")):
        call(tmp_path)


def test_a_checkpoint_is_not_accepted_as_another_kind_of_file(tmp_path):
    from pyro_bq.io import read_container

    save_checkpoint(tmp_path / "c.bq", {"a": 1})
    with pytest.raises(CorruptFileError, match="expected a 'packed-guide'"):
        read_container(tmp_path / "c.bq", "packed-guide")


# -- resuming with settings that do not match the checkpoint -------------------------------------


def _fit(train, folder, *, hidden=8, **kw):
    from pyro_bq import IIDNormal
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.inference import fit_svi
    from pyro_bq.models import MLP, BayesianClassifier

    torch.manual_seed(0)
    model = BayesianClassifier(MLP((784, hidden, 10)), IIDNormal(1.0), dataset_size=len(train))
    args = dict(num_steps=4, batch_size=50, checkpoint_dir=folder, checkpoint_every=2, progress=False)
    args.update(kw)
    return fit_svi(model, AutoMeanFieldNormal(model), train, **args)


def test_resuming_another_architecture_names_the_checkpoint(mnist_small, tmp_path):
    train = mnist_small[0].subset(200)
    _fit(train, tmp_path, hidden=8, num_steps=2)
    with pytest.raises(ValueError, match="ckpt-2.bq"):
        _fit(train, tmp_path, hidden=9)


def test_resuming_with_other_settings_is_refused(mnist_small, tmp_path):
    train = mnist_small[0].subset(200)
    _fit(train, tmp_path, num_steps=2)
    with pytest.raises(ValueError, match="batch_size"):
        _fit(train, tmp_path, batch_size=40)
