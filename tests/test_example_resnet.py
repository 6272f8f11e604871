"""examples/resnet_fashion.py with small settings on real Fashion-MNIST and MNIST: every row of the table,
finite figures, bits per weight in the right order."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("resnet_fashion", REPO / "examples" / "resnet_fashion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--train-limit", "128", "--test-limit", "64", "--blocks", "1", "--pretrain-epochs", "1",
         "--svi-epochs", "1", "--num-samples", "2", "--pwfn-steps", "2", "--pwfn-schedule", "1.0", "--rb-steps", "3",
         "--batch-size", "64", "--no-progress", "--device", "cpu"]


def test_the_small_run_fills_every_row(data_root):
    out = _example().main(["--data-dir", str(data_root), "--pretrain-autocast", "bf16", *SMALL])
    methods = [r["method"] for r in out["rows"]]
    assert methods == ["float (mean-field)", "JQ4 (ends 8, mse range)", "JQ3 (ends 8, mse range)", "Random Bits (JQ, target 4)", "PWFN"]
    for row in out["rows"]:
        for key in ("accuracy", "nll", "ece", "auroc_mi", "bits_per_param"):
            assert math.isfinite(row[key]), (row["method"], key)
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["auroc_mi"] <= 1
    bits = {r["method"]: r["bits_per_param"] for r in out["rows"]}
    assert bits["JQ3 (ends 8, mse range)"] < bits["JQ4 (ends 8, mse range)"] < bits["float (mean-field)"]
    assert "| JQ4 (ends 8, mse range) |" in out["table"]


def test_ends_bits_and_jq_range_choose_the_jq_grids_and_a_bad_value_is_refused(data_root, capsys):
    example = _example()
    args = ["--data-dir", str(data_root), *SMALL, "--skip", "pwfn", "rb"]
    ends = {r["method"]: r for r in example.main(args)["rows"]}
    every = {r["method"]: r for r in example.main([*args, "--ends-bits", "none", "--jq-range", "auto"])["rows"]}
    assert list(every) == ["float (mean-field)", "JQ4", "JQ3"]
    # the stem and the classifier at 8 bits cost storage: both JQ rows store more with ends at 8
    for bits in (4, 3):
        assert every[f"JQ{bits}"]["bits_per_param"] < ends[f"JQ{bits} (ends 8, mse range)"]["bits_per_param"]
    # the float guide is the same in both runs (same seed); the JQ grids differ, and so do the predictions
    assert every["float (mean-field)"]["nll"] == ends["float (mean-field)"]["nll"]
    assert every["JQ4"]["nll"] != ends["JQ4 (ends 8, mse range)"]["nll"]
    for bad in ("0", "17", "eight"):
        with pytest.raises(SystemExit) as err:
            example.main(["--ends-bits", bad])
        assert err.value.code == 2
        assert "--ends-bits" in capsys.readouterr().err
