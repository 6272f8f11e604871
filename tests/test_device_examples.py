"""Every example owned here takes --device; on a machine without a GPU --device cuda exits at once with one
line saying so (status 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("script", ["svi_mnist.py", "quantize_mnist.py", "train_distributed.py", "resnet_fashion.py"])
def test_device_cuda_without_a_gpu_is_one_clear_line(script):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), "--device", "cuda"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--device is 'cuda' but no GPU is available" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["svi_mnist.py", "quantize_mnist.py", "train_distributed.py", "resnet_fashion.py"])
def test_device_is_in_every_examples_help(script):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--device" in proc.stdout
