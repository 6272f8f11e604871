"""The study folder under a careless user: two studies on one folder, an interrupted re-run with
other settings, a replaced checkpoint, a killed and resumed study, and the thread count."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from guide_contract import tiny_classifier
from test_study import TINY

from pyro_bq.data.ambiguous import AmbiguousConfig, _cache_paths
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.io import load_checkpoint, save_checkpoint
from pyro_bq.quant import FakeQuantActivation, quantize_activations
from pyro_bq.study import StudyConfig
from pyro_bq.study import runner as study_runner
from pyro_bq.study.cli import main as study_main
from pyro_bq.study.config import file_sha256

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """An uninterrupted tiny study (it trains its guide): its folder."""
    out = tmp_path_factory.mktemp("reference")
    assert study_main(["--data-dir", str(data_root), "--out-dir", str(out), *TINY]) == 0
    return out


def _quick(reference, data_root, out, *extra, checkpoint=None):
    """The tiny study on the reference's data cache and trained guide: rows float, jq4 and jq4+act8."""
    guide = checkpoint or next((reference / "train").glob("*/guide.bq"))
    args = [*TINY, "--policies", "jq", "--cache-dir", str(reference / "cache"), "--checkpoint", str(guide), *extra]
    return study_main(["--data-dir", str(data_root), "--out-dir", str(out), *args])


def _snapshot(folder: Path) -> dict:
    """Every file of ``folder`` but the lock file, with its time and contents."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".study.lock"}


def _skipped(caplog) -> str:
    """The names the last run logged as finished and skipped ('' when none)."""
    lines = [r.getMessage() for r in caplog.records if "finished configuration(s) skipped" in r.getMessage()]
    return lines[-1].split("skipped: ", 1)[1] if lines else ""


# -- two studies on one folder ------------------------------------------------------------------------
_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_study_on_a_locked_folder_stops_at_once_and_writes_nothing(reference, data_root, capsys):
    before = _snapshot(reference)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(reference / ".study.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        args = ["--data-dir", str(data_root), "--out-dir", str(reference), *TINY, "--num-samples", "5"]
        assert study_main(args) == 1
        err = capsys.readouterr().err
        assert f"is in use by PID {holder.pid}" in err and "--out-dir" in err and "Traceback" not in err
        assert _snapshot(reference) == before  # the running study's files are untouched
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the lock is free again once its holder is gone
    assert study_main(["--data-dir", str(data_root), "--out-dir", str(reference), *TINY]) == 0


_HELD_STUDY = """
import pathlib, sys, time
from pyro_bq.study import cli, runner
release, build = pathlib.Path(sys.argv[1]), runner.ROW_BUILDERS["jq"]

def held(ctx, spec):  # the first quantized row waits until the test lets it go
    while not release.exists():
        time.sleep(0.02)
    return build(ctx, spec)

runner.ROW_BUILDERS["jq"] = held
sys.exit(cli.main(sys.argv[2:]))
"""


def test_two_studies_started_together_one_runs_the_other_is_refused(reference, data_root, tmp_path):
    out = tmp_path / "shared"
    guide = next((reference / "train").glob("*/guide.bq"))
    args = ["--data-dir", str(data_root), "--out-dir", str(out), *TINY,
            "--policies", "jq", "--cache-dir", str(reference / "cache"), "--checkpoint", str(guide), "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    release = tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", _HELD_STUDY, str(release), *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = out / ".study.lock"
    while first.poll() is None and not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.01)
    try:
        second = subprocess.run([sys.executable, "-m", "pyro_bq.study", *args[:-1], "--num-samples", "5", "-q"],
                                env=env, capture_output=True, text=True)
    finally:
        release.touch()
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert second.returncode == 1
    assert f"is in use by PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["float", "jq4", "jq4+act8"]
    assert json.loads((out / "study_config.json").read_text())["config"]["num_samples"] == 4


# -- interrupted re-run with other settings -------------------------------------------------------------
def test_an_interrupted_rerun_with_other_settings_leaves_no_row_counted_as_finished(
        reference, data_root, tmp_path, monkeypatch, caplog):
    assert _quick(reference, data_root, tmp_path, "--act-policies", "") == 0
    scores = tmp_path / "configs" / "float.scores.bq"
    first_scores = scores.read_bytes()
    first_row = json.loads((tmp_path / "configs" / "float.json").read_text())["row"]

    def interrupted(*args, **kwargs):  # the run stops between the row's scores and its ArviZ file
        raise KeyboardInterrupt

    monkeypatch.setattr(study_runner, "to_arviz", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _quick(reference, data_root, tmp_path, "--act-policies", "", "--num-samples", "5")
    assert scores.read_bytes() != first_scores  # float's scores now come from the other settings
    monkeypatch.undo()

    caplog.set_level("INFO", logger="pyro_bq.study")
    assert _quick(reference, data_root, tmp_path, "--act-policies", "") == 0
    assert _skipped(caplog) == "jq4"  # float was evaluated again
    record = json.loads((tmp_path / "configs" / "float.json").read_text())
    assert record["files"]["float.scores.bq"] == file_sha256("scores", scores)
    assert record["files"]["float.nc"] == file_sha256("nc", tmp_path / "configs" / "float.nc")
    assert record["row"]["accuracy"] == first_row["accuracy"]


# -- replaced checkpoint ----------------------------------------------------------------------------------
def test_a_replaced_checkpoint_is_detected(reference, data_root, tmp_path, caplog):
    checkpoint = tmp_path / "guide.bq"
    shutil.copyfile(next((reference / "train").glob("*/guide.bq")), checkpoint)
    out = tmp_path / "out"
    assert _quick(reference, data_root, out, "--act-policies", "", checkpoint=checkpoint) == 0
    before = json.loads((out / "results.json").read_text())["rows"]

    state = load_checkpoint(checkpoint)
    changed = [k for k, v in state["guide"].items() if torch.is_tensor(v) and v.is_floating_point() and "loc" in k]
    assert changed
    state["guide"] = {k: (-v if k in changed else v) for k, v in state["guide"].items()}
    save_checkpoint(checkpoint, state)  # the same path, other contents

    caplog.set_level("INFO", logger="pyro_bq.study")
    assert _quick(reference, data_root, out, "--act-policies", "", checkpoint=checkpoint) == 0
    assert _skipped(caplog) == ""
    after = json.loads((out / "results.json").read_text())["rows"]
    assert [r["nll"] for r in after] != [r["nll"] for r in before]


# -- same seed, same results ----------------------------------------------------------------------------
def test_two_runs_with_one_seed_give_identical_results(reference, data_root, tmp_path):
    args = ["--data-dir", str(data_root), "--out-dir", str(tmp_path), *TINY, "--cache-dir", str(reference / "cache")]
    assert study_main(args) == 0
    assert (tmp_path / "results.csv").read_text() == (reference / "results.csv").read_text()


def test_rows_recomputed_on_a_resume_equal_the_uninterrupted_ones(reference, data_root, tmp_path):
    """The resumed run loads its guide instead of training it, and skips the rows before: no other draws."""
    out = tmp_path / "resumed"
    shutil.copytree(reference, out)
    for name in ("jq4+act8", "logquant4"):
        (out / "configs" / f"{name}.json").unlink()
    assert study_main(["--data-dir", str(data_root), "--out-dir", str(out), *TINY]) == 0
    assert (out / "results.csv").read_text() == (reference / "results.csv").read_text()


def test_the_thread_count_is_part_of_the_fingerprints():
    one, two = StudyConfig(threads=1), StudyConfig(threads=2)
    assert one.train_fingerprint() != two.train_fingerprint()
    assert one.eval_fingerprint() != two.eval_fingerprint()
    saved = torch.get_num_threads()
    try:
        paths = []
        for n in (1, 2):
            torch.set_num_threads(n)
            assert StudyConfig().train_fingerprint() == StudyConfig(threads=n).train_fingerprint()
            paths.append(_cache_paths(Path("cache"), AmbiguousConfig()))
    finally:
        torch.set_num_threads(saved)
    assert paths[0][0] != paths[1][0]


def test_the_checkpoint_is_fingerprinted_by_its_contents(tmp_path):
    a, b = tmp_path / "a.bq", tmp_path / "b.bq"
    a.write_bytes(b"one guide")
    b.write_bytes(b"one guide")
    assert StudyConfig(checkpoint=a).train_fingerprint() == StudyConfig(checkpoint=b).train_fingerprint()
    b.write_bytes(b"another guide")
    assert StudyConfig(checkpoint=a).train_fingerprint() != StudyConfig(checkpoint=b).train_fingerprint()


def test_activation_calibration_draws_from_its_seed_not_the_global_generator():
    model, x, y = tiny_classifier("lenet")
    guide = AutoMeanFieldNormal(model, init_scale=0.5)
    guide(x, y)

    def ranges(global_seed, seed):
        torch.manual_seed(global_seed)
        qm = quantize_activations(model, 8, guide=guide, data=x, num_samples=3, seed=seed)
        act = next(m for m in qm.net.modules() if isinstance(m, FakeQuantActivation))
        return torch.cat([act.lo, act.hi])

    a, b, c = ranges(1, 7), ranges(2, 7), ranges(1, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- killed and resumed ---------------------------------------------------------------------------------
def _kill_after(cmd, env, rows_dir: Path, finished: int) -> None:
    """Start the study and SIGKILL it once ``finished`` rows are recorded (or let it end first)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and len(list(rows_dir.glob("*.json"))) < finished:
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_killed_and_resumed_equals_uninterrupted_for_every_row(data_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def command(out):
        return [sys.executable, "-m", "pyro_bq.study", "--data-dir", str(data_root), "--out-dir", str(out), *TINY,
                "--act-policies", "jq,logquant", "-q"]  # logquant4+act8 builds the shared guide after a resume

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(command(whole), env=env, check=True, stdout=subprocess.DEVNULL)
    for finished in (1, 2, 3, 4, 5):
        _kill_after(command(killed), env, killed / "configs", finished)
    subprocess.run(command(killed), env=env, check=True, stdout=subprocess.DEVNULL)
    assert (killed / "results.csv").read_text() == (whole / "results.csv").read_text()
