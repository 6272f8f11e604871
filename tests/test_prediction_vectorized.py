"""Vectorized prediction against looped Predictive: same seed, same result."""

import pyro
import pytest
import torch
from torch import nn

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import prediction
from pyro_bq.inference.prediction import activation_bytes_per_sample, predict_batched, predict_looped
from pyro_bq.models import MLP, BayesianClassifier, BayesianRegressor, LeNet5


def _setup(net_name):
    pyro.clear_param_store()
    torch.manual_seed(0)
    net = MLP((784, 32, 10)) if net_name == "mlp" else LeNet5()
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=100)
    guide = AutoMeanFieldNormal(model, init_scale=0.1)
    x = torch.randn(20, 1, 28, 28)
    guide(x)
    return model, guide, x


@pytest.mark.parametrize("net_name", ["mlp", "lenet"])
def test_vectorized_equals_looped_predictive_under_the_same_seed(net_name):
    model, guide, x = _setup(net_name)
    pyro.set_rng_seed(7)
    fast = predict_batched(model, guide, x, num_samples=6)
    pyro.set_rng_seed(7)
    slow = predict_looped(model, guide, x, num_samples=6)
    assert fast.shape == slow.shape == (6, 20, 10)
    # float32 rounding of batched vs single matmuls/convolutions only
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    # and different seeds give different predictions
    pyro.set_rng_seed(8)
    assert not torch.allclose(predict_batched(model, guide, x, num_samples=6), fast)


def test_chunking_over_samples_and_inputs_gives_the_same_result():
    model, guide, x = _setup("lenet")
    samples = guide.sample_latents(5)
    whole = predict_batched(model, guide, x, samples=samples)
    by_two = predict_batched(model, guide, x, samples=samples, chunk_size=2)
    per_sample = activation_bytes_per_sample(model.functional_net(samples, x)[0], x)
    tiny = predict_batched(model, guide, x, samples=samples, max_bytes=per_sample // 3)
    batches = predict_batched(model, guide, x, samples=samples, batch_size=7, chunk_size=3)
    for out in (by_two, tiny, batches):
        torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)


def test_the_byte_budget_sets_the_samples_and_inputs_of_each_pass(monkeypatch):
    model, guide, x = _setup("mlp")
    samples = guide.sample_latents(6)
    per_input = activation_bytes_per_sample(model.functional_net(samples, x)[0], x[:1])
    calls = []

    def counting(model, part, xb):
        calls.append((next(iter(part.values())).shape[0], xb.shape[0]))
        return original(model, part, xb)

    original = prediction.batched_forward
    monkeypatch.setattr(prediction, "batched_forward", counting)
    predict_batched(model, guide, x, samples=samples, batch_size=5, max_bytes=per_input * 5 * 4)
    assert calls == [(4, 5)] * 4 + [(2, 5)] * 4  # 4 samples of 5 inputs fit; 20 inputs in batches of 5
    calls.clear()
    predict_batched(model, guide, x, samples=samples, max_bytes=per_input * 8)
    assert calls == [(1, 8), (1, 8), (1, 4)] * 6  # one sample on all 20 inputs does not fit: 8 at a time


def test_activation_bytes_counts_layer_outputs():
    model, guide, x = _setup("mlp")
    # flatten (784) + linear (32) + relu (32) + linear (10) + the Sequential's output (10), + input
    expected = 20 * (784 + 32 + 32 + 10 + 10) * 4 + x.numel() * 4
    assert activation_bytes_per_sample(model.functional_net(guide.sample_latents(1), x)[0], x) == expected
    assert activation_bytes_per_sample(MLP((784, 32, 10)), x) == expected  # any network, on any device


def test_vectorized_samples_have_the_guide_distribution():
    model, guide, x = _setup("mlp")
    pyro.set_rng_seed(1)
    draws = guide.sample_latents(4000)["net.1.weight"]
    loc, scale = guide.get_loc_scale("net.1.weight")
    # every one of the 25,088 weights: mean and sd within 6 standard errors (a false alarm
    # somewhere has probability about 5e-5; 5 SE would give one in 60 runs)
    assert ((draws.mean(0) - loc).abs() < 6 * scale / 4000**0.5).all()
    torch.testing.assert_close(draws.std(0), scale.detach(), rtol=6 / (2 * 4000) ** 0.5, atol=0)
    trace_draw = pyro.poutine.trace(guide).get_trace(x).nodes["net.1.weight"]["value"]
    assert trace_draw.shape == draws.shape[1:]


def test_regressor_prediction():
    pyro.clear_param_store()
    model = BayesianRegressor(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), IIDNormal(1.0), 50, noise=0.1)
    guide = AutoMeanFieldNormal(model, init_scale=0.2)
    x = torch.randn(7, 3)
    guide(x, torch.randn(7))
    pyro.set_rng_seed(3)
    fast = predict_batched(model, guide, x, num_samples=4)
    pyro.set_rng_seed(3)
    slow = predict_looped(model, guide, x, num_samples=4)
    assert fast.shape == (4, 7)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_arguments_are_validated():
    model, guide, x = _setup("mlp")
    with pytest.raises(TypeError, match="model"):
        predict_batched(object(), guide, x)
    with pytest.raises(TypeError, match="guide"):
        predict_batched(model, object(), x)
    with pytest.raises(TypeError, match="x"):
        predict_batched(model, guide, x.long())
    with pytest.raises(ValueError, match="num_samples"):
        predict_batched(model, guide, x, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        predict_batched(model, guide, x, chunk_size=0)
    with pytest.raises(ValueError, match="samples"):
        bad = guide.sample_latents(3)
        bad["net.1.bias"] = bad["net.1.bias"][:2]
        predict_batched(model, guide, x, samples=bad)
