"""Bayesian models: minibatch scaling, analytic KL, batched prediction, errors."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive, TraceMeanField_ELBO
from torch import nn
from torch.func import functional_call

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal, init_to_pretrained
from pyro_bq.inference import batched_forward
from pyro_bq.models import MLP, BayesianClassifier, BayesianRegressor, LeNet5, ResNet20


def test_reference_networks_have_the_documented_shapes():
    assert MLP().sizes == (784, 400, 400, 10)
    assert MLP()(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert LeNet5()(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in LeNet5().parameters()) == 61706
    r20 = ResNet20()
    assert r20(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in r20.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 3x3 convs plus the final linear layer


def test_minibatch_likelihood_is_scaled_to_the_dataset_size():
    model = BayesianClassifier(MLP((784, 8, 10)), IIDNormal(1.0), dataset_size=1000)
    x, y = torch.randn(10, 784), torch.randint(0, 10, (10,))
    trace = poutine.trace(model).get_trace(x, y)
    trace.compute_log_prob()
    obs = trace.nodes["obs"]
    assert obs["scale"] == pytest.approx(100.0)
    logits = trace.nodes["logits"]["value"]
    expected = torch.distributions.Categorical(logits=logits).log_prob(y).sum()
    torch.testing.assert_close(obs["log_prob_sum"], 100.0 * expected)  # log_prob_sum includes the scale


def test_meanfield_kl_is_analytic():
    """With the likelihood blocked the ELBO is -KL: closed form, the same every evaluation."""
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=100)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    guide = AutoMeanFieldNormal(model, init_scale=0.1)
    guide(x, y)
    prior_only = poutine.block(model, hide=["obs"])
    elbo = TraceMeanField_ELBO()
    values = {elbo.loss(prior_only, guide, x, y) for _ in range(5)}
    assert len(values) == 1
    # and it equals the sum of per-weight Normal KLs
    kl = 0.0
    for name in guide.sites:
        loc, scale = guide.get_loc_scale(name)
        q = torch.distributions.Normal(loc, scale)
        p = torch.distributions.Normal(torch.zeros_like(loc), torch.ones_like(loc))
        kl += torch.distributions.kl_divergence(q, p).sum().item()
    assert values.pop() == pytest.approx(kl, rel=1e-5)
    # the guide has exactly one Normal site per weight (no auxiliary or Delta sites)
    trace = poutine.trace(guide).get_trace(x, y)
    samples = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert samples == model.weight_sites


def test_batched_forward_matches_one_conditioned_forward_per_sample():
    model = BayesianClassifier(ResNet20(in_channels=1), IIDNormal(1.0), dataset_size=100)
    x = torch.randn(3, 1, 28, 28)
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    guide(x)
    model.eval()
    samples = guide.sample_latents(4)
    batched = batched_forward(model, samples, x)
    for s in range(4):
        conditioned = poutine.condition(model, data={k: v[s] for k, v in samples.items()})
        torch.testing.assert_close(batched[s], conditioned(x), rtol=1e-4, atol=1e-5)


def test_functional_net_is_the_network_as_a_function_of_its_weights():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    model = BayesianRegressor(net, IIDNormal(1.0), dataset_size=10, noise=0.1, expose=lambda m, p: m != "2")
    x = torch.randn(5, 3)
    draws = {k: torch.randn((2,) + v.shape) for k, v in model.initial_params().items()}
    template, sampled, shared = model.functional_net(draws, x)
    assert sorted(sampled) == ["0.bias", "0.weight"] and sorted(shared) == ["2.bias", "2.weight"]
    out = functional_call(template, {**shared, **{k: v[1] for k, v in sampled.items()}}, (x,))
    trace = poutine.trace(poutine.condition(model, data={k: v[1] for k, v in draws.items()})).get_trace(x)
    torch.testing.assert_close(model.net_output(out), trace.nodes[model.output_site]["value"])
    assert model.net_output(out).shape == (5,) and model.net_output(out[None], sample_dims=1).shape == (1, 5)
    with pytest.raises(ValueError, match="samples lacks"):
        model.functional_net({"net.0.weight": draws["net.0.weight"]}, x)
    with pytest.raises(TypeError, match="x"):
        model.functional_net(draws, x.long())


def test_regressor_with_learned_noise_trains_the_noise():
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    y = x @ torch.tensor([1.0, -1.0]) + 0.1 * torch.randn(64)
    model = BayesianRegressor(nn.Linear(2, 1), IIDNormal(1.0), dataset_size=64, noise="learned")
    guide = AutoMeanFieldNormal(model, init_scale=0.01)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(300):
        svi.step(x, y)
    assert model.noise_scale().item() < 0.3
    pred = Predictive(model, guide=guide, num_samples=8, return_sites=["loc"])(x)["loc"]
    assert pred.shape == (8, 64)
    assert batched_forward(model, guide.sample_latents(8), x).shape == (8, 64)


def test_init_to_pretrained_starts_the_locs_at_the_trained_weights():
    trained = LeNet5()
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=10)
    guide = AutoMeanFieldNormal(model, init_loc_fn=init_to_pretrained(trained), init_scale=1e-3)
    guide(torch.randn(2, 1, 28, 28))
    median = guide.median()
    for name, param in trained.named_parameters():
        torch.testing.assert_close(median[f"net.{name}"], param.detach())
    assert guide.started_from_pretrained


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: BayesianClassifier(42, IIDNormal(1.0), 10), TypeError, "net"),
        (lambda: BayesianClassifier(LeNet5(), "normal", 10), TypeError, "prior"),
        (lambda: BayesianClassifier(LeNet5(), IIDNormal(1.0), 0), ValueError, "dataset_size"),
        (lambda: BayesianClassifier(LeNet5(), IIDNormal(1.0), 2.5), TypeError, "dataset_size"),
        (lambda: BayesianRegressor(nn.Linear(2, 1), IIDNormal(1.0), 10, noise=-1.0), ValueError, "noise"),
        (lambda: BayesianRegressor(nn.Linear(2, 1), IIDNormal(1.0), 10, noise="big"), ValueError, "noise"),
        (lambda: AutoMeanFieldNormal(lambda: None, init_scale=0.0), ValueError, "init_scale"),
        (lambda: init_to_pretrained("net"), TypeError, "net"),
    ],
)
def test_bad_construction_is_a_clear_error(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.parametrize(
    "x, y, exc, words",
    [
        (torch.randn(4, 1, 20, 20), None, ValueError, "x has shape"),
        (torch.randn(4), None, ValueError, "x must have shape"),
        (torch.zeros(4, 1, 28, 28, dtype=torch.long), None, TypeError, "x must be a floating"),
        (torch.randn(4, 1, 28, 28), torch.zeros(3, dtype=torch.long), ValueError, "y has 3 rows"),
        (torch.randn(4, 1, 28, 28), torch.zeros(4), TypeError, "y must hold integer"),
        ([[0.0]], None, TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_inputs_to_the_model_are_clear_errors(x, y, exc, words):
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=10)
    with pytest.raises(exc, match=words):
        model(x, y)


def test_unknown_site_and_premature_use_of_the_guide_are_clear_errors():
    model = BayesianClassifier(MLP((784, 4, 10)), IIDNormal(1.0), dataset_size=10)
    guide = AutoMeanFieldNormal(model)
    with pytest.raises(RuntimeError, match="call it once"):
        guide.sample_latents(2)
    guide(torch.randn(2, 784))
    with pytest.raises(ValueError, match="unknown site"):
        guide.get_loc_scale("net.9.weight")
    with pytest.raises(ValueError, match="num_samples"):
        guide.sample_latents(0)
    with pytest.raises(ValueError, match="quantiles"):
        guide.quantiles([0.0, 1.5])
