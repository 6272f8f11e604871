"""examples/resnet_fashion.py with small settings on real Fashion-MNIST and MNIST: every row of the table,
finite figures, bits per weight in the right order."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("resnet_fashion", REPO / "examples" / "resnet_fashion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_small_run_fills_every_row(data_root):
    out = _example().main(["--data-dir", str(data_root), "--train-limit", "128", "--test-limit", "64", "--blocks", "1",
                           "--pretrain-epochs", "1", "--pretrain-autocast", "bf16", "--svi-epochs", "1", "--num-samples", "2", "--pwfn-steps", "2",
                           "--pwfn-schedule", "1.0", "--rb-steps", "3", "--batch-size", "64", "--no-progress",
                           "--device", "cpu"])
    methods = [r["method"] for r in out["rows"]]
    assert methods == ["float (mean-field)", "JQ4", "JQ3", "Random Bits (JQ, target 4)", "PWFN"]
    for row in out["rows"]:
        for key in ("accuracy", "nll", "ece", "auroc_mi", "bits_per_param"):
            assert math.isfinite(row[key]), (row["method"], key)
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["auroc_mi"] <= 1
    bits = {r["method"]: r["bits_per_param"] for r in out["rows"]}
    assert bits["JQ3"] < bits["JQ4"] < bits["float (mean-field)"]
    assert "| JQ4 |" in out["table"]
