"""SIGKILL a fit_svi run that trains from a shuffling DataLoader, resume it, and get the uninterrupted result
bit for bit (subprocess workers of tests/_resume_worker.py with ``--loader``, one thread on CPU).

The kill comes in epoch 2 and the latest checkpoint is in epoch 1 (12 batches per epoch), so the resumed
run must find the right batch of the right epoch in the loader's (seed, epoch) order.
"""

from __future__ import annotations

import pytest

from pyro_bq.io import latest_checkpoint, load_checkpoint
from pyro_bq.io.checkpoint import list_checkpoints
from test_resume import _assert_same, _kill_at, _run

pytestmark = pytest.mark.slow


def test_a_sigkilled_dataloader_run_resumes_to_exactly_the_uninterrupted_run(data_root, tmp_path):
    _run(data_root, tmp_path / "whole", "--loader")
    reference = load_checkpoint(tmp_path / "whole" / "final.bq")
    folder = tmp_path / "killed"
    _kill_at(data_root, folder, "paused-25", "--loader", "--pause-at", 25)
    assert [s for s, _ in list_checkpoints(folder / "ckpt")] == [21]
    assert load_checkpoint(folder / "ckpt" / "ckpt-21.bq")["position"] == [1, 9]
    _run(data_root, folder, "--loader")
    final = load_checkpoint(folder / "final.bq")
    assert final["resumed_from"].endswith("ckpt-21.bq")
    for key in ("guide", "model", "losses"):
        _assert_same(final[key], reference[key], key)
    _assert_same(load_checkpoint(latest_checkpoint(folder / "ckpt")),
                 load_checkpoint(latest_checkpoint(tmp_path / "whole" / "ckpt")), "checkpoint")


def test_the_dataloader_run_differs_from_the_in_memory_run_only_where_it_should(data_root, tmp_path):
    """Guard: the same seed through an InMemoryDataset gives the same run (same order, same noise)."""
    _run(data_root, tmp_path / "loader", "--loader")
    _run(data_root, tmp_path / "memory")
    a, b = load_checkpoint(tmp_path / "loader" / "final.bq"), load_checkpoint(tmp_path / "memory" / "final.bq")
    _assert_same(a["losses"], b["losses"], "losses")
