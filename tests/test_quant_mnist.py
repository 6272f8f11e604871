"""Quantization on real MNIST: the example end to end (fast) and its accuracy and size thresholds (slow)."""

import importlib.util
import os
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quantize_mnist.py"


def _example():
    spec = importlib.util.spec_from_file_location("quantize_mnist_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_end_to_end_on_a_tiny_subset(data_root, tmp_path):
    example = _example()
    rows = example.main([
        "--data-root", str(data_root), "--train-limit", "300", "--test-limit", "100", "--epochs", "1",
        "--batch-size", "100", "--bits", "4", "2", "--policies", "vpq", "jq", "--qat-bits", "2", "--qat-epochs", "0.34",
        "--num-samples", "2", "--out-dir", str(tmp_path), "--table", str(tmp_path / "table.md"), "--quiet",
    ])
    names = [(r["policy"], r["bits"]) for r in rows]
    assert names == [("float", 32), ("VPQ", 4), ("JQ", 4), ("VPQ", 2), ("JQ", 2), ("JQ+QAT", 2)]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 100.0 and 0.0 <= r["auroc_mi"] <= 1.0 and r["nll"] > 0
        # the report's byte count matches the file on disk within 1%
        assert abs(r["report_bytes"] - r["packed_bytes"]) <= 0.01 * r["packed_bytes"]
    by = {(r["policy"], r["bits"]): r for r in rows}
    assert by[("float", 32)]["bits_per_param"] == 64.0
    assert by[("JQ", 2)]["bits_per_param"] < by[("JQ", 4)]["bits_per_param"] < 9.0
    assert by[("JQ", 4)]["packed_bytes"] * 7 <= by[("float", 32)]["packed_bytes"]
    table = (tmp_path / "table.md").read_text()
    assert "| JQ+QAT | 2 |" in table and "Command:" in table
    # the trained float guide is cached: a second run reuses it
    assert (tmp_path / "lenet_mfvi.bq").is_file()


@pytest.mark.slow
def test_accuracy_and_size_thresholds_on_full_mnist(data_root, tmp_path):
    """LeNet-5 BNN on all of MNIST: every threshold that ``check_thresholds`` of the example prints."""
    example = _example()
    out = Path(os.environ.get("PYRO_BQ_QUANT_OUT", tmp_path))
    rows = example.main([
        "--data-root", str(data_root), "--epochs", "4", "--num-samples", "16", "--test-limit", "5000",
        "--out-dir", str(out), "--quiet",
    ])
    by = {(r["policy"], r["bits"]): r for r in rows}
    base = by[("float", 32)]
    for bits in (8, 4):
        for policy in ("VPQ", "SPQ", "JQ"):
            r = by[(policy, bits)]
            assert base["accuracy"] - r["accuracy"] <= 0.3, (policy, bits, r["accuracy"], base["accuracy"])
            assert base["auroc_mi"] - r["auroc_mi"] <= 0.02, (policy, bits, r["auroc_mi"], base["auroc_mi"])
    best3 = max((by[("JQ", 3)], by[("JQ+QAT", 3)]), key=lambda r: r["accuracy"])
    assert base["accuracy"] - best3["accuracy"] <= 1.0
    assert base["auroc_mi"] - best3["auroc_mi"] <= 0.03
    assert by[("JQ+QAT", 2)]["accuracy"] >= 95.0
    assert by[("JQ", 4)]["packed_bytes"] * 7 <= base["packed_bytes"]
