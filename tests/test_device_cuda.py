"""The GPU checks: training, prediction, quantize and a packed round trip, a pinned DataLoader run, checkpoints
loaded onto the GPU. Marked ``cuda``: skipped where torch sees no GPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal, quantize
from pyro_bq.inference import fit_svi, predict_batched
from pyro_bq.io import load_checkpoint, load_packed, save_checkpoint, save_packed
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.quant import JQ
from pyro_bq.recipes import pretrain

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _trained(train, data=None, device=CUDA):
    torch.manual_seed(0)
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train))
    guide = AutoMeanFieldNormal(model, init_scale=1e-2)
    result = fit_svi(model, guide, train if data is None else data, num_epochs=1, batch_size=100, lr=3e-3,
                     device=device, progress=False)
    return model, guide, result


def test_training_on_the_gpu_moves_model_guide_and_batches(mnist_small):
    model, guide, result = _trained(mnist_small[0].subset(500))
    assert result.steps == 5 and all(l == l for l in result.losses)
    assert all(p.device.type == "cuda" for p in guide.parameters())
    assert all(b.device.type == "cuda" for b in model.buffers())


def test_prediction_on_the_gpu_agrees_with_the_cpu_for_the_same_draws(mnist_small):
    train, test = mnist_small[0].subset(500), mnist_small[1]
    model, guide, _ = _trained(train)
    draws = guide.sample_latents(4)
    gpu = predict_batched(model, None, test.x[:200].pin_memory(), samples=draws)
    assert gpu.device.type == "cuda"
    model.cpu()
    cpu = predict_batched(model, None, test.x[:200], samples={k: v.cpu() for k, v in draws.items()}, device="cpu")
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3)


def test_quantize_and_a_packed_round_trip_on_the_gpu(mnist_small, tmp_path):
    train, test = mnist_small[0].subset(500), mnist_small[1]
    model, guide, _ = _trained(train)
    q = quantize(guide, JQ(4))
    save_packed(q, tmp_path / "q.bqp")
    loaded = load_packed(tmp_path / "q.bqp", model, example_input=test.x[:2].to(CUDA))
    torch.manual_seed(3)
    a = predict_batched(model, q, test.x[:100].to(CUDA), num_samples=4)
    torch.manual_seed(3)
    b = predict_batched(model, loaded, test.x[:100].to(CUDA), num_samples=4)
    assert torch.allclose(a, b.to(a.device), atol=1e-4)


def test_a_pinned_shuffling_dataloader_run_on_the_gpu_equals_the_in_memory_run(mnist_small):
    train = mnist_small[0].subset(500)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=100, shuffle=True, pin_memory=True)
    _, guide_a, a = _trained(train, loader)
    _, guide_b, b = _trained(train)
    assert a.steps == b.steps == 5
    assert torch.allclose(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-4)


def test_pretraining_and_checkpoints_on_the_gpu(mnist_small, tmp_path):
    train = mnist_small[0].subset(500)
    net = pretrain(LeNet5, train, epochs=1, device="cuda")
    assert next(net.parameters()).device.type == "cuda"
    save_checkpoint(tmp_path / "n.bq", {"net": net.state_dict()})
    assert all(v.device.type == "cuda" for v in load_checkpoint(tmp_path / "n.bq", map_location="cuda")["net"].values())
    assert all(v.device.type == "cpu" for v in load_checkpoint(tmp_path / "n.bq")["net"].values())
