"""The folded multi-sample pass (grouped convolutions, stacked Linear weights) against vmap."""

import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import prediction
from pyro_bq.inference.folded import FoldedNet, NotFoldable
from pyro_bq.inference.prediction import batched_forward
from pyro_bq.models import MLP, BayesianClassifier, BayesianRegressor, LeNet5, ResNet20


class _Odd(nn.Module):
    """A net with an operation the folded pass does not handle (a mean over features)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(x - x.mean(-1, keepdim=True))


class _Mixed(nn.Module):
    """Conv on the shared input, a deterministic (not sampled) layer, dropout, tanh, a residual sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = self.drop(h + F.relu(self.conv2(h)))
        return self.head(F.avg_pool2d(h, 2).flatten(1))


def _vmap(model, draws, x):
    return batched_forward(model, draws, x, strategy="vmap")


def _foldable(model, draws, x):
    return prediction._folded_net(model, model.functional_net(draws, x)[0]) is not None


CASES = {
    "mlp": (lambda: MLP((784, 16, 16, 10)), (9, 1, 28, 28)),
    "lenet": (LeNet5, (9, 1, 28, 28)),
    "resnet20": (ResNet20, (3, 3, 32, 32)),
    "mixed": (_Mixed, (5, 2, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_folded_pass_equals_vmap(name):
    make, shape = CASES[name]
    pyro.clear_param_store()
    torch.manual_seed(0)
    net = make()
    expose = (lambda m, p: m != "conv2") if name == "mixed" else None  # conv2 stays deterministic
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=100, expose=expose)
    model.net.eval()
    x = torch.randn(shape)
    guide = AutoMeanFieldNormal(model, init_scale=0.1)
    guide(x[:2])
    draws = guide.sample_latents(4)
    assert _foldable(model, draws, x)
    with torch.no_grad():
        folded = batched_forward(model, draws, x, strategy="folded")
        ref = _vmap(model, draws, x)
        others = {k: batched_forward(model, draws, x, strategy=k) for k in ("loop", "auto")}
    assert folded.shape == ref.shape == (4, shape[0], ref.shape[-1])
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)
    for out in others.values():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the samples really differ (the folded layout does not mix them up)
    assert not torch.allclose(folded[0], folded[1])
    # one sample alone gives that sample's row
    one = batched_forward(model, {k: v[2:3] for k, v in draws.items()}, x)
    torch.testing.assert_close(one[0], folded[2], rtol=1e-5, atol=1e-5)


def test_unsupported_networks_fall_back_to_vmap_with_the_same_result():
    with pytest.raises(NotFoldable, match="method"):
        FoldedNet(_Odd())
    pyro.clear_param_store()
    model = BayesianClassifier(_Odd(), IIDNormal(1.0), dataset_size=10)
    x = torch.randn(6, 12)
    guide = AutoMeanFieldNormal(model, init_scale=0.1)
    guide(x)
    draws = guide.sample_latents(3)
    assert not _foldable(model, draws, x)
    manual = torch.stack([F.linear(x - x.mean(-1, keepdim=True), draws["net.fc.weight"][s], draws["net.fc.bias"][s])
                          for s in range(3)])
    for strategy in ("auto", "vmap", "loop"):
        torch.testing.assert_close(batched_forward(model, draws, x, strategy=strategy), manual, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="strategy='folded'.*does not handle"):
        batched_forward(model, draws, x, strategy="folded")
    with pytest.raises(ValueError, match="strategy must be one of"):
        batched_forward(model, draws, x, strategy="fast")


#: name: (input shape, network) of the runs of "auto" compared across processes
AUTO_CASES = {"mlp": ((5, 1, 28, 28), lambda: MLP((784, 8, 10))), "lenet": ((4, 1, 28, 28), LeNet5)}


def _auto_run(x_shape, net):
    """A fresh model, its draws and inputs (the same every call), and the "auto" output on them."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = BayesianClassifier(net(), IIDNormal(1.0), dataset_size=10)
    guide = AutoMeanFieldNormal(model, init_scale=0.1)
    x = torch.randn(x_shape)
    guide(x)
    draws = guide.sample_latents(3)
    with torch.no_grad():
        return model, draws, x, batched_forward(model, draws, x)


@pytest.mark.parametrize("durations", [(1.0, 0.1, 0.1, 1.0), (0.1, 1.0, 1.0, 0.1)], ids=["loop-slow", "folded-slow"])
def test_auto_strategy_is_a_rule_not_a_timing(durations, monkeypatch):
    """However long each strategy seems to take, "auto" picks the same one and gives the same bits."""
    clock = [0.0]
    ticks = iter([d for d in durations for d in (0.0, d)])

    def fake_perf_counter():
        clock[0] += next(ticks, 1.0)
        return clock[0]

    _, _, _, reference = _auto_run(*AUTO_CASES["mlp"])
    monkeypatch.setattr("time.perf_counter", fake_perf_counter)
    model, draws, x, out = _auto_run(*AUTO_CASES["mlp"])
    monkeypatch.undo()
    assert torch.equal(out, reference)
    assert prediction.auto_strategy(model, draws, x) == "folded"
    with torch.no_grad():
        assert torch.equal(out, batched_forward(model, draws, x, strategy="folded"))
        assert torch.equal(out, batched_forward(model, draws, x))  # and on every later call


def test_auto_strategy_follows_the_network():
    model, draws, x, _ = _auto_run(*AUTO_CASES["mlp"])
    assert prediction.auto_strategy(model, draws, x) == "folded"
    assert prediction.auto_strategy(model, {k: v[:1] for k, v in draws.items()}, x) == "loop"
    pyro.clear_param_store()
    model = BayesianClassifier(_Odd(), IIDNormal(1.0), dataset_size=10)
    guide = AutoMeanFieldNormal(model, init_scale=0.1)
    x = torch.randn(6, 12)
    guide(x)
    assert prediction.auto_strategy(model, guide.sample_latents(3), x) == "vmap"


def test_auto_strategy_runs_convolutions_on_cpu_as_a_loop():
    model, draws, x, out = _auto_run(*AUTO_CASES["lenet"])
    assert prediction.auto_strategy(model, draws, x) == "loop"
    with torch.no_grad():
        assert torch.equal(out, batched_forward(model, draws, x, strategy="loop"))


_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads({threads})
from test_folded import AUTO_CASES, _auto_run
from pyro_bq.inference import prediction
model, draws, x, out = _auto_run(*AUTO_CASES[{case!r}])
print(prediction.auto_strategy(model, draws, x), out.numpy().tobytes().hex())
"""


@pytest.mark.parametrize("case", sorted(AUTO_CASES))
def test_auto_strategy_and_its_results_are_the_same_in_another_process(case):
    model, draws, x, out = _auto_run(*AUTO_CASES[case])
    code = _CHILD.format(tests=str(Path(__file__).resolve().parent), threads=torch.get_num_threads(), case=case)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    strategy, bits = child.stdout.split()
    assert strategy == prediction.auto_strategy(model, draws, x) == {"mlp": "folded", "lenet": "loop"}[case]
    assert bits == out.numpy().tobytes().hex()


def test_regressor_outputs_through_the_folded_pass():
    pyro.clear_param_store()
    model = BayesianRegressor(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), IIDNormal(1.0), 50, noise=0.1)
    x = torch.randn(7, 3)
    guide = AutoMeanFieldNormal(model, init_scale=0.2)
    guide(x, torch.randn(7))
    draws = guide.sample_latents(5)
    assert _foldable(model, draws, x)
    out = batched_forward(model, draws, x)
    assert out.shape == (5, 7)
    torch.testing.assert_close(out, _vmap(model, draws, x), rtol=1e-5, atol=1e-5)


def test_inputs_the_network_cannot_take_give_a_clear_error():
    pyro.clear_param_store()
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=10)
    guide = AutoMeanFieldNormal(model)
    guide(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="x has shape"):
        batched_forward(model, guide.sample_latents(2), torch.randn(2, 3, 28, 28))


def test_auto_strategy_runs_large_folded_passes_on_cpu_as_a_loop():
    """A foldable MLP whose folded activations would not fit the cache bound runs one pass per draw on
    CPU, with the loop's results; the same network on few inputs still folds."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = BayesianClassifier(MLP((784, 64, 10)), IIDNormal(1.0), dataset_size=10)
    guide = AutoMeanFieldNormal(model, init_scale=0.1)
    few, many = torch.randn(2, 1, 28, 28), torch.randn(1200, 1, 28, 28)
    guide(few)
    draws = guide.sample_latents(4)
    assert 4 * len(many) * prediction.activation_bytes_per_sample(model.functional_net(draws, few)[0], few[:1]) \
        > prediction.FOLD_CPU_MAX_BYTES
    assert prediction.auto_strategy(model, draws, few) == "folded"
    assert prediction.auto_strategy(model, draws, many) == "loop"
    with torch.no_grad():
        out = batched_forward(model, draws, many)
        assert torch.equal(out, batched_forward(model, draws, many, strategy="loop"))
        torch.testing.assert_close(out, batched_forward(model, draws, many, strategy="folded"), rtol=1e-5, atol=1e-5)
