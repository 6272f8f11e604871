"""--device on the study and the examples of the mixed-precision, ONNX and PWFN tracks: without a GPU,
--device cuda exits at once with one line saying so (status 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_bq.study import StudyConfig
from pyro_bq.study.cli import main as study_main

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["mixed_precision_mnist.py", "deploy_onnx.py", "pwfn_mnist.py"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


@NO_GPU
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_device_cuda_without_a_gpu_is_one_clear_line(script):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), "--device", "cuda"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--device is 'cuda' but no GPU is available" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_device_is_in_the_examples_help(script):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--device" in proc.stdout


@NO_GPU
def test_study_device_cuda_without_a_gpu_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        study_main(["--out-dir", str(tmp_path / "o"), "--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no GPU is available" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        study_main(["--out-dir", str(tmp_path / "o"), "--device", "tpu"])
    assert "--device" in capsys.readouterr().err


@NO_GPU
def test_study_device_on_the_cpu_keeps_the_fingerprints(tmp_path):
    auto, cpu = StudyConfig(out_dir=str(tmp_path), device="auto"), StudyConfig(out_dir=str(tmp_path), device="cpu")
    assert auto.torch_device.type == "cpu" and auto.to_dict()["device"] == "auto"
    assert auto.train_fingerprint() == cpu.train_fingerprint() and auto.eval_fingerprint() == cpu.eval_fingerprint()
    with pytest.raises(ValueError, match="no GPU"):
        StudyConfig(out_dir=str(tmp_path), device="cuda")
