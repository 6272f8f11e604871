"""`quantize` on networks with parameters that carry no prior: BatchNorm, ResNet-20, an `expose=` subset.

Such parameters make the model's intermediate values non-leaf tensors in the
guide's prototype trace; the copy `quantize` makes must still work, and the
quantized guide must save, load and predict like any other.
"""

import copy

import pyro
import pytest
import torch
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO
from torch import nn

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal, copy_guide, quantize
from pyro_bq.inference.prediction import predict_batched
from pyro_bq.io import load_packed, save_packed
from pyro_bq.models import BayesianClassifier, LeNet5, ResNet20
from pyro_bq.quant import JQ, SPQ, VPQ


class _BatchNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class _DeterministicLSTM(nn.Module):
    """An LSTM and a ConvTranspose (no priors by default) before a Bayesian Linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.up = nn.ConvTranspose1d(1, 2, 3)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.lstm(x)[0][:, -1:]
        return self.fc(self.up(h).flatten(1))


# name: (network, input shape, expose)
NETS = {
    "resnet20": (lambda: ResNet20(num_classes=10, in_channels=1, blocks_per_stage=1), (4, 1, 8, 8), None),
    "batchnorm": (_BatchNormMLP, (6, 12), None),
    "expose-subset": (LeNet5, (4, 1, 28, 28), {"fc3.weight", "fc3.bias"}),
    "lstm-convtranspose": (_DeterministicLSTM, (5, 7, 4), None),
}
POLICIES = {"vpq": lambda: VPQ(4), "spq": lambda: SPQ(4), "jq": lambda: JQ(4)}


def _trained(name):
    """A model and a guide after one SVI step: the network's deterministic parameters then require grad."""
    make, shape, expose = NETS[name]
    torch.manual_seed(0)
    model = BayesianClassifier(make(), IIDNormal(1.0), dataset_size=100, expose=expose)
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    x = torch.randn(shape)
    y = torch.randint(0, 3, (shape[0],))
    SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO()).step(x, y)
    return model, guide, x


@pytest.mark.parametrize("net", sorted(NETS))
def test_the_prototype_trace_holds_non_leaf_tensors(net):
    """The case being tested really arises: a plain deepcopy of the guide fails."""
    _, guide, _ = _trained(net)
    model_ref = guide._model
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(guide)
    guide._model = model_ref
    twin = copy_guide(guide)
    assert twin.prototype_trace is guide.prototype_trace  # read-only state is shared
    assert all(a is not b for a, b in zip(twin.parameters(), guide.parameters()))  # the parameters are copies
    for a, b in zip(twin.parameters(), guide.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("net", sorted(NETS))
def test_quantize_save_load_and_predict(net, policy, tmp_path):
    model, guide, x = _trained(net)
    before = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    qguide = quantize(guide, POLICIES[policy]())
    for k, v in guide.state_dict().items():  # the float guide is left as it was
        assert torch.equal(v, before[k])
    assert any(not sq.is_float for sq in qguide.quantizers.values())

    path = tmp_path / f"{net}-{policy}.bq"
    save_packed(qguide, path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_packed(path, model)
    for k, v in model.state_dict().items():  # loading traces the model without touching e.g. BatchNorm statistics
        assert torch.equal(v, state[k]), k
    for site in guide.sites:  # the same quantized distribution, value for value
        for a, b in zip(qguide.get_loc_scale(site), loaded.get_loc_scale(site)):
            assert torch.equal(a, b)

    pyro.set_rng_seed(3)
    ours = predict_batched(model, qguide, x, num_samples=4)
    pyro.set_rng_seed(3)
    theirs = predict_batched(model, loaded, x, num_samples=4)
    assert ours.shape == (4, x.shape[0], ours.shape[-1]) and torch.isfinite(ours).all()
    assert torch.equal(ours, theirs)

    model.eval()  # BatchNorm on its running statistics, as in predict_batched
    pyro.set_rng_seed(5)
    ours = Predictive(model, guide=qguide, num_samples=3, return_sites=["logits"])(x)["logits"]
    pyro.set_rng_seed(5)
    theirs = Predictive(model, guide=loaded, num_samples=3, return_sites=["logits"])(x)["logits"]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("net", ["resnet20", "batchnorm", "expose-subset"])
def test_loading_into_a_model_with_other_deterministic_state_is_refused(net, tmp_path):
    """The packed file holds the guide, not BatchNorm statistics or layers without a prior: a model whose
    deterministic state differs would predict something else, so load_packed says so instead."""
    model, guide, x = _trained(net)
    path = tmp_path / "g.bq"
    save_packed(quantize(guide, JQ(4)), path)
    load_packed(path, model)  # the model it was saved with
    other = copy.deepcopy(model)
    with torch.no_grad():
        tensor = next(t for t in other.state_dict().values() if t.is_floating_point())
        tensor.add_(0.5)
    with pytest.raises(ValueError, match="deterministic state"):
        load_packed(path, other)
