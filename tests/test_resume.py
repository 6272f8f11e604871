"""Kill a real-MNIST SVI run with SIGKILL, resume it, and get the uninterrupted result exactly.

Each run is a subprocess (tests/_resume_worker.py) with one thread on CPU;
there fit_svi is deterministic, so the resumed run must end *bit for bit* in
the state of an uninterrupted run with the same seed: guide, model,
optimizer, RNG states, step counter and the whole loss history.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_bq.io import latest_checkpoint, load_checkpoint
from pyro_bq.io.checkpoint import list_checkpoints

WORKER = Path(__file__).with_name("_resume_worker.py")
REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def _cmd(data_root, folder: Path, *extra):
    return [
        sys.executable, str(WORKER), "--data", str(data_root), "--ckpt", str(folder / "ckpt"),
        "--out", str(folder / "final.bq"), *map(str, extra),
    ]


def _run(data_root, folder: Path, *extra, timeout=120):
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(_cmd(data_root, folder, *extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_same(a, b, where="state"):
    """Exact equality of two nested states (tensors bit for bit, NaNs equal)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The uninterrupted run: 40 steps, checkpoints every 7."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    _run(data_root, folder)
    final = load_checkpoint(folder / "final.bq")
    assert final["resumed_from"] is None and final["steps"] == 40
    return final, load_checkpoint(latest_checkpoint(folder / "ckpt"))


def _wait_for(path: Path, proc: subprocess.Popen, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "worker never reached the pause point"
        time.sleep(0.05)


def _kill_at(data_root, folder: Path, marker: str, *extra):
    """Run the worker with ``extra`` until it writes ``marker``, then SIGKILL it."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(_cmd(data_root, folder, *extra), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(folder / marker, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_then_resume_ends_exactly_like_an_uninterrupted_run(data_root, tmp_path, reference):
    ref_final, ref_ckpt = reference
    folder = tmp_path / "killed"
    # pause after step 25: checkpoints 7, 14, 21 exist; steps 22-25 are lost work
    _kill_at(data_root, folder, "paused-25", "--pause-at", 25)
    assert not (folder / "final.bq").exists()
    steps_on_disk = [s for s, _ in list_checkpoints(folder / "ckpt")]
    assert steps_on_disk == [21], steps_on_disk  # at most the work since step 21 is lost
    assert load_checkpoint(folder / "ckpt" / "ckpt-21.bq")["step"] == 21

    _run(data_root, folder)  # same command, no pause: resumes from ckpt-21
    final = load_checkpoint(folder / "final.bq")
    assert final["resumed_from"].endswith("ckpt-21.bq")
    _assert_same(final["guide"], ref_final["guide"], "guide")
    _assert_same(final["model"], ref_final["model"], "model")
    _assert_same(final["losses"], ref_final["losses"], "losses")
    # the last checkpoint holds optimizer state, RNG states and counters: all identical
    _assert_same(load_checkpoint(latest_checkpoint(folder / "ckpt")), ref_ckpt, "checkpoint")


@pytest.mark.slow
def test_the_comparison_detects_a_different_run(data_root, tmp_path, reference):
    """Guard for the test above: another seed must not compare equal."""
    ref_final, _ = reference
    _run(data_root, tmp_path, "--seed", 4)
    other = load_checkpoint(tmp_path / "final.bq")
    with pytest.raises(AssertionError):
        _assert_same(other["guide"], ref_final["guide"], "guide")


@pytest.mark.slow
def test_repeated_kills_at_random_moments_still_end_exactly_like_the_reference(data_root, tmp_path, reference):
    """SIGKILL at random moments while training (between or during checkpoint writes), resume each time."""
    ref_final, ref_ckpt = reference
    rng = random.Random(1234)
    kills = 0
    while True:
        before = list_checkpoints(tmp_path / "ckpt")
        proc = subprocess.Popen(_cmd(data_root, tmp_path, "--slow", 0.01), cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if kills < 3:
                # wait until this process has written a new checkpoint, then kill at a random moment
                deadline = time.monotonic() + 120
                while proc.poll() is None and list_checkpoints(tmp_path / "ckpt") == before:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.15))
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    kills += 1
                    ckpt = latest_checkpoint(tmp_path / "ckpt")
                    assert ckpt is not None
                    assert load_checkpoint(ckpt)["step"] > (before[0][0] if before else 0)
                    continue
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
        break
    assert kills >= 1
    final = load_checkpoint(tmp_path / "final.bq")
    _assert_same(final["guide"], ref_final["guide"], "guide")
    _assert_same(final["losses"], ref_final["losses"], "losses")
    _assert_same(load_checkpoint(latest_checkpoint(tmp_path / "ckpt")), ref_ckpt, "checkpoint")


# -- PWFN driver (pyro_bq.pwfn.PWFN): rounds of fit_svi + clustering -------------------------------

PWFN_ARGS = ("--pwfn", "--steps", 8, "--every", 3)


@pytest.fixture(scope="module")
def pwfn_reference(data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pwfn-uninterrupted")
    _run(data_root, folder, *PWFN_ARGS)
    final = load_checkpoint(folder / "final.bq")
    assert final["resumed_from"] is None and len(final["rounds"]) == 3
    return final


def test_pwfn_killed_mid_round_resumes_to_exactly_the_uninterrupted_result(data_root, tmp_path, pwfn_reference):
    folder = tmp_path / "pwfn"
    # pause at step 5 of round 2: round 1 is checkpointed (pwfn-1.bq), round 2 has fit_svi's ckpt-3
    _kill_at(data_root, folder, "paused-2-5", *PWFN_ARGS, "--pause-round", 2, "--pause-at", 5)
    assert [p.name for p in sorted((folder / "ckpt").glob("pwfn-*.bq"))] == ["pwfn-1.bq"]
    assert [s for s, _ in list_checkpoints(folder / "ckpt" / "round-2")] == [3]
    _run(data_root, folder, *PWFN_ARGS)
    final = load_checkpoint(folder / "final.bq")
    assert final["resumed_from"].endswith("pwfn-1.bq")
    _assert_same(final["guide"], pwfn_reference["guide"], "guide")
    _assert_same(final["median"], pwfn_reference["median"], "median")
    _assert_same(final["rounds"], pwfn_reference["rounds"], "rounds")
    _assert_same(final["final"], pwfn_reference["final"], "final")


@pytest.mark.slow
def test_pwfn_killed_between_clustering_and_its_checkpoint_resumes_exactly(data_root, tmp_path, pwfn_reference):
    folder = tmp_path / "pwfn"
    _kill_at(data_root, folder, "paused-after-2", *PWFN_ARGS, "--pause-after-round", 2)
    assert [p.name for p in (folder / "ckpt").glob("pwfn-*.bq")] == ["pwfn-1.bq"]
    _run(data_root, folder, *PWFN_ARGS)
    final = load_checkpoint(folder / "final.bq")
    _assert_same(final["guide"], pwfn_reference["guide"], "guide")
    _assert_same(final["final"], pwfn_reference["final"], "final")
