"""pyro_bq.recipes: pretraining with resume, the mean-field BNN from a pretrained net, the scale-aware Adam."""

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_bq import IIDNormal
from pyro_bq.data import InMemoryDataset
from pyro_bq.guides import AutoLogQuantNormal, AutoMeanFieldNormal
from pyro_bq.inference import MeanFieldELBO
from pyro_bq.models import MLP, BayesianClassifier, LeNet5
from pyro_bq.uncertainty import accuracy
from pyro_bq.recipes import fit_meanfield_bnn, load_meanfield_guide, pretrain, save_meanfield_guide, scale_aware_adam


def _mlp():
    return MLP((784, 6, 10))


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(3)
    return InMemoryDataset(torch.randn(40, 1, 28, 28, generator=gen), torch.randint(0, 10, (40,), generator=gen))


def _lrs(guide_cls, x, y, **kw):
    model = BayesianClassifier(_mlp(), IIDNormal(1.0), dataset_size=40)
    guide = guide_cls(model, **kw)
    optim = scale_aware_adam(1e-3, 5e-2)
    SVI(model, guide, optim, MeanFieldELBO() if guide_cls is AutoMeanFieldNormal else pyro.infer.Trace_ELBO()).step(x, y)
    store = pyro.get_param_store()
    return {store.param_name(p).rsplit(".", 1)[-1]: opt.param_groups[0]["lr"] for p, opt in optim.optim_objs.items()}


def test_scale_aware_adam_gives_the_scale_rate_to_scale_parameters_only(data):
    assert _lrs(AutoMeanFieldNormal, data.x[:4], data.y[:4]) == {"loc": 1e-3, "scale_raw": 5e-2}
    pyro.clear_param_store()
    assert _lrs(AutoLogQuantNormal, data.x[:4], data.y[:4], bits=4) == {"loc": 1e-3, "log2_scale": 5e-2}
    with pytest.raises(ValueError, match="scale_lr"):
        scale_aware_adam(1e-3, 0.0)


def test_pretrain_resumes_to_the_same_net_and_leaves_the_global_rng_alone(data, tmp_path):
    state = torch.get_rng_state()
    whole = pretrain(_mlp, data, epochs=2, batch_size=16, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert not whole.training
    path = tmp_path / "net.bq"
    pretrain(_mlp, data, epochs=1, batch_size=16, seed=5, checkpoint=path)
    resumed = pretrain(_mlp, data, epochs=2, batch_size=16, seed=5, checkpoint=path)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    untrained = pretrain(_mlp, data, epochs=0, seed=5)
    torch.manual_seed(5)
    for a, b in zip(untrained.state_dict().values(), _mlp().state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="make_net"):
        pretrain(_mlp(), data, epochs=1)


def test_fit_meanfield_bnn_starts_at_the_pretrained_weights_and_round_trips(data, tmp_path):
    net = pretrain(_mlp, data, epochs=1, batch_size=16, seed=1)
    model = BayesianClassifier(_mlp(), IIDNormal(1.0), dataset_size=len(data))
    guide, result = fit_meanfield_bnn(model, data, pretrained=net, num_epochs=1, batch_size=20, lr=1e-12,
                                      scale_lr=1e-12, init_scale=1e-3, progress=False)
    assert result.steps == 2
    start = {f"net.{k}": v for k, v in net.state_dict().items()}
    for name, value in guide.median().items():
        assert torch.allclose(value, start[name], atol=1e-6), name
    path = tmp_path / "bnn.bq"
    save_meanfield_guide(path, guide, key={"epochs": 1})
    again = load_meanfield_guide(path, model, data.x[:2], key={"epochs": 1})
    assert torch.equal(again.loc, guide.loc) and torch.equal(again.scale_raw, guide.scale_raw)
    assert load_meanfield_guide(path, model, data.x[:2], key={"epochs": 2}) is None
    assert load_meanfield_guide(tmp_path / "missing.bq", model, data.x[:2]) is None


def test_pretrain_with_bfloat16_autocast_trains_a_float32_net_on_real_mnist(mnist_small):
    train, test = mnist_small
    mixed = pretrain(LeNet5, train, epochs=3, lr=2e-3, seed=0, autocast=torch.bfloat16)
    full = pretrain(LeNet5, train, epochs=3, lr=2e-3, seed=0)
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    # bfloat16 products change the trajectory: the autocast was applied ...
    assert not all(torch.equal(a, b) for a, b in zip(mixed.parameters(), full.parameters()))
    with torch.no_grad():
        acc_mixed = accuracy(mixed(test.x).softmax(-1), test.y)
        acc_full = accuracy(full(test.x).softmax(-1), test.y)
    # ... and the net learns as well as in float32
    assert acc_mixed > 0.8 and abs(acc_mixed - acc_full) < 0.03, (acc_mixed, acc_full)
    with pytest.raises(ValueError, match="autocast=torch.float16"):
        pretrain(_mlp, train, epochs=1, autocast=torch.float16)
    with pytest.raises(TypeError, match="autocast"):
        pretrain(_mlp, train, epochs=1, autocast="bf16")
