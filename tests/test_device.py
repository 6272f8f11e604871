"""Devices: resolve_device, device= through fit_svi, prediction, checkpoints and recipes; on a machine
without a GPU "cuda" fails early with a ValueError that says so."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_bq import IIDNormal
from pyro_bq._validation import resolve_device
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import fit_svi, predict_batched, predict_looped
from pyro_bq.inference.distributed import default_backend
from pyro_bq.io import load_checkpoint, save_checkpoint
from pyro_bq.models import MLP, BayesianClassifier
from pyro_bq.recipes import pretrain

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def test_resolve_device_auto_cpu_and_torch_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must name a device"):
        resolve_device("gpu0")
    with pytest.raises(TypeError, match="device must be a torch.device or a str"):
        resolve_device(0.5)


@no_gpu
@pytest.mark.parametrize("value", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_a_gpu_is_a_clear_valueerror(value):
    with pytest.raises(ValueError, match="no GPU is available|CUDA is not available"):
        resolve_device(value)


@no_gpu
def test_every_entry_point_refuses_cuda_without_a_gpu_before_touching_torch(mnist_small, tmp_path):
    train = mnist_small[0].subset(64)
    model = BayesianClassifier(MLP((784, 8, 10)), IIDNormal(1.0), dataset_size=64)
    guide = AutoMeanFieldNormal(model)
    with pytest.raises(ValueError, match="no GPU is available"):
        fit_svi(model, guide, train, num_steps=1, device="cuda", progress=False)
    with pytest.raises(ValueError, match="no GPU is available"):
        pretrain(lambda: MLP((784, 8, 10)), train, epochs=1, device="cuda")
    save_checkpoint(tmp_path / "c.bq", {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="map_location is 'cuda' but no GPU"):
        load_checkpoint(tmp_path / "c.bq", map_location="cuda")
    fit_svi(model, guide, train, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="no GPU is available"):
        predict_batched(model, guide, train.x[:4], num_samples=2, device="cuda")


def test_device_cpu_runs_everything_and_checkpoints_load_anywhere(mnist_small, tmp_path):
    train = mnist_small[0].subset(128)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=True, pin_memory=False)
    model = BayesianClassifier(MLP((784, 8, 10)), IIDNormal(1.0), dataset_size=128)
    guide = AutoMeanFieldNormal(model)
    result = fit_svi(model, guide, loader, num_epochs=1, device="auto" if not torch.cuda.is_available() else "cpu",
                     progress=False)
    assert result.steps == 2
    torch.manual_seed(0)
    fast = predict_batched(model, guide, train.x[:8], num_samples=3, device="cpu")
    torch.manual_seed(0)
    slow = predict_looped(model, guide, train.x[:8], num_samples=3, device=torch.device("cpu"))
    assert fast.device.type == "cpu" and torch.allclose(fast, slow, atol=1e-5)
    save_checkpoint(tmp_path / "g.bq", {"guide": guide.state_dict()})
    state = load_checkpoint(tmp_path / "g.bq", map_location="cpu")
    assert all(v.device.type == "cpu" for v in state["guide"].values())


def test_data_parallel_picks_gloo_on_cpu_and_nccl_with_gpus(monkeypatch):
    monkeypatch.delenv("PYRO_BQ_DIST_BACKEND", raising=False)
    assert default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    assert default_backend() == "nccl"
