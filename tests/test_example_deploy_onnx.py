"""examples/deploy_onnx.py with tiny settings: the graphs run in a process without pyro, pyro_bq or torch."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deploy_onnx.py"


def _load():
    spec = importlib.util.spec_from_file_location("deploy_onnx_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_tiny_deploy_run(tmp_path, capsys):
    example = _load()
    args = example.parse_args(["--num-steps", "3", "--pretrain-epochs", "1", "--train-limit", "256",
                               "--test-limit", "48", "--num-samples", "3", "--out-dir", str(tmp_path)])
    record = example.main(args)
    assert record["forbidden_imports"] == []
    rows = record["rows"]
    assert set(rows) == {"pyro_bq", "onnx (graph noise)", "pyro_bq (eps)", "onnx (eps)"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["auroc_mi"] <= 1.0
    # the same draws through pyro_bq and through onnxruntime give the same predictions
    assert rows["onnx (eps)"]["accuracy"] == pytest.approx(rows["pyro_bq (eps)"]["accuracy"], abs=1 / 48 + 1e-9)
    assert record["sizes"]["bq_ans"] < record["sizes"]["bq"]
    assert (tmp_path / "lenet-jq4.onnx").stat().st_size == record["sizes"]["onnx"]
    assert "onnxruntime process imported none" in capsys.readouterr().out


def test_runner_refuses_a_process_that_imports_torch(tmp_path, monkeypatch):
    example = _load()
    monkeypatch.setattr(example, "RUNNER", "import json, sys, torch\n"
                        "print(json.dumps({'forbidden_imports': sorted(m for m in sys.modules if m == 'torch')}))")
    with pytest.raises(RuntimeError, match="imported.*torch"):
        example.run_standalone(tmp_path)


def test_bad_options_are_refused():
    example = _load()
    with pytest.raises(SystemExit):
        example.parse_args(["--num-samples", "0"])
