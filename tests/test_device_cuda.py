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


# -- any data, any device: clustering, allocators, evaluation, calibration, packed files ------------------
def test_pwfn_clustering_on_the_gpu_fixes_what_the_cpu_fixes():
    import copy

    from factories_pwfn import _make

    from pyro_bq.pwfn import ClusterConfig, cluster_guide_

    _, cpu_guide, _, _ = _make("lenet")
    gpu_guide = copy.deepcopy(cpu_guide).to(CUDA)
    a = cluster_guide_(cpu_guide, 0.5, ClusterConfig(b=6, tau=1.0))
    b = cluster_guide_(gpu_guide, 0.5, ClusterConfig(b=6, tau=1.0))
    assert gpu_guide.fixed.device.type == "cuda"
    assert torch.equal(cpu_guide.fixed, gpu_guide.fixed.cpu())
    assert torch.allclose(cpu_guide.codebook(), gpu_guide.codebook().cpu())
    assert len(a.groups) == len(b.groups)


def test_allocators_on_a_gpu_posterior_equal_the_cpu_ones(mnist_small):
    from pyro_bq.mixed import quantile_inform, random_bits, smol

    train = mnist_small[0].subset(500)
    model, guide, _ = _trained(train)
    post = {n: tuple(t.detach() for t in guide.get_loc_scale(n)) for n in guide.sites}
    post_cpu = {n: (l.cpu(), s.cpu()) for n, (l, s) in post.items()}
    assert quantile_inform(post, 4.0).site_bits == quantile_inform(post_cpu, 4.0).site_bits
    rb_gpu, rb_cpu = random_bits(post, 4.0, num_steps=20), random_bits(post_cpu, 4.0, num_steps=20)
    assert rb_gpu.site_bits == rb_cpu.site_bits
    alloc, tuned = smol(model, guide, DataLoader(TensorDataset(train.x, train.y), batch_size=100, pin_memory=True),
                        precision_steps=3, finetune_steps=2, device="cuda")
    assert all(p.device.type == "cuda" for p in tuned.parameters()) and 1 <= alloc.mean_bits <= 8


def test_evaluate_with_a_dataloader_on_the_gpu_equals_the_cpu(mnist_small):
    import pyro_bq.uncertainty as U

    train, test = mnist_small[0].subset(500), mnist_small[1].subset(300)
    model, guide, _ = _trained(train)
    loader = DataLoader(TensorDataset(test.x, test.y), batch_size=128, pin_memory=True)
    gpu = U.evaluate(model, guide, loader, test.x[:100], num_samples=4, seed=0, device="cuda")
    idata = U.to_arviz(model, guide, loader, None, num_samples=3, device="cuda")
    assert idata.log_likelihood["obs"].shape == (1, 3, len(test))
    model.cpu(), guide.cpu()
    cpu = U.evaluate(model, guide, test, test.x[:100], num_samples=4, seed=0, device="cpu")
    assert abs(gpu["accuracy"] - cpu["accuracy"]) <= 2 / len(test)
    assert gpu["nll"] == pytest.approx(cpu["nll"], rel=1e-3, abs=1e-3)


def test_activation_calibration_and_load_packed_map_location_on_the_gpu(mnist_small, tmp_path):
    from pyro_bq.quant import quantize_activations

    train, test = mnist_small[0].subset(500), mnist_small[1]
    model, guide, _ = _trained(train)
    loader = DataLoader(TensorDataset(train.x[:200], train.y[:200]), batch_size=50)
    qm = quantize_activations(model, 4, guide=guide, data=loader, num_samples=2, device="cuda")
    assert all(b.device.type == "cuda" for b in qm.buffers())
    q = quantize(guide, JQ(4))
    model.cpu(), q.cpu()
    save_packed(q, tmp_path / "q.bqp")
    on_gpu = load_packed(tmp_path / "q.bqp", model.to(CUDA), map_location="cuda")
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())
    model.cpu()
    on_cpu = load_packed(tmp_path / "q.bqp", model, map_location="cpu")
    for name in q.sites:
        assert torch.equal(on_gpu.get_loc_scale(name)[0].cpu(), on_cpu.get_loc_scale(name)[0])
