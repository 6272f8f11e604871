"""examples/svi_mnist.py: a tiny run in the default suite, the full run marked slow."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "svi_mnist.py"


def _load():
    spec = importlib.util.spec_from_file_location("svi_mnist_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _check_outputs(out: Path, record: dict):
    for name in ("metrics.json", "uncertainty.png", "reliability.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(record["accuracy"])
    for key in ("accuracy", "ece", "auroc_mi"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert 0.0 <= saved["brier"] <= 2.0
    for key in ("aleatoric_in", "epistemic_in", "aleatoric_out", "epistemic_out"):
        assert 0.0 <= saved[key] <= math.log(10) + 1e-6, key
    assert saved["nll"] > 0 and math.isfinite(saved["nll"])
    return saved


def test_tiny_run_writes_metrics_and_plots(data_root, tmp_path):
    example = _load()
    args = example.build_parser().parse_args(
        ["--net", "mlp", "--num-epochs", "1", "--batch-size", "50", "--lr", "3e-3", "--num-samples", "4",
         "--train-limit", "500", "--test-limit", "200", "--data-dir", str(data_root), "--out-dir", str(tmp_path),
         "--threads", "1", "--no-progress"]
    )
    record = example.main(args)
    saved = _check_outputs(tmp_path, record)
    assert saved["net"] == "mlp" and saved["train_size"] == 500 and saved["test_size"] == 200
    assert saved["neg_elbo_per_train_example"] > 0
    assert saved["accuracy"] > 0.3  # 10 SVI steps on 500 images; chance is 0.1


def test_parser_rejects_unknown_net():
    example = _load()
    with pytest.raises(SystemExit):
        example.build_parser().parse_args(["--net", "resnet"])


@pytest.mark.slow
def test_default_run_reaches_98_5_percent_accuracy_and_separates_fashion(data_root, tmp_path):
    example = _load()
    record = example.main(
        example.build_parser().parse_args(["--data-dir", str(data_root), "--out-dir", str(tmp_path), "--threads", "1", "--no-progress"])
    )
    _check_outputs(tmp_path, record)
    assert record["accuracy"] >= 0.985
    assert record["epistemic_out"] > record["epistemic_in"]
    assert record["auroc_mi"] >= 0.92
