"""bq_priors and the prior classes."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_bq import IIDNormal, LayerwiseNormal, PretrainedNormal, Prior, ScaleMixtureNormal, bq_priors
from pyro_bq.models import LeNet5, ResNet20

LENET_PARAMS = {
    "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
    "fc1.weight": (120, 400), "fc1.bias": (120,),
    "fc2.weight": (84, 120), "fc2.bias": (84,),
    "fc3.weight": (10, 84), "fc3.bias": (10,),
}


def sample_sites(module, x):
    trace = pyro.poutine.trace(module).get_trace(x)
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}


def test_lenet_gets_a_site_per_weight_and_bias_with_shape_event_dim_and_prior():
    net = LeNet5()
    bnn = bq_priors(net, IIDNormal(0.5))
    assert isinstance(bnn, PyroModule)
    sites = sample_sites(bnn, torch.randn(2, 1, 28, 28))
    assert set(sites) == set(LENET_PARAMS)
    for name, shape in LENET_PARAMS.items():
        fn = sites[name]["fn"]
        assert tuple(sites[name]["value"].shape) == shape
        assert fn.event_dim == len(shape) and tuple(fn.batch_shape) == ()
        base = fn.base_dist
        assert isinstance(base, dist.Normal)
        assert torch.all(base.loc == 0) and torch.all(base.scale == 0.5)


def test_input_net_is_untouched_and_result_is_a_new_object():
    net = LeNet5()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bnn = bq_priors(net, IIDNormal(1.0))
    sample_sites(bnn, torch.randn(2, 1, 28, 28))
    assert bnn is not net and not isinstance(net, PyroModule)
    assert set(dict(net.named_parameters())) == set(LENET_PARAMS)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_expose_predicate_and_name_list_select_parameters():
    net = LeNet5()
    only_fc = bq_priors(net, IIDNormal(1.0), expose=lambda m, p: m.startswith("fc") and p == "weight")
    assert set(sample_sites(only_fc, torch.randn(1, 1, 28, 28))) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    # the unselected ones stay ordinary parameters
    assert "conv1.weight" in dict(only_fc.named_parameters())
    listed = bq_priors(net, IIDNormal(1.0), expose={"conv1.weight", "fc3.bias"})
    assert set(sample_sites(listed, torch.randn(1, 1, 28, 28))) == {"conv1.weight", "fc3.bias"}


def test_batchnorm_stays_deterministic_in_resnet20():
    bnn = bq_priors(ResNet20(), IIDNormal(1.0))
    sites = sample_sites(bnn, torch.randn(2, 3, 32, 32))
    assert sites and not any(".bn" in n or "shortcut.1" in n for n in sites)
    bn_params = [n for n, _ in bnn.named_parameters() if "bn" in n]
    assert bn_params, "BatchNorm parameters must stay ordinary parameters"
    convs = [n for n, m in ResNet20().named_modules() if isinstance(m, nn.Conv2d)]
    assert {f"{c}.weight" for c in convs} <= set(sites)


def test_layerwise_normal_is_fan_in_scaled():
    bnn = bq_priors(LeNet5(), LayerwiseNormal(gain=2.0))
    sites = sample_sites(bnn, torch.randn(1, 1, 28, 28))
    assert torch.allclose(sites["fc1.weight"]["fn"].base_dist.scale, torch.tensor(2.0 / math.sqrt(400)))
    assert torch.allclose(sites["conv2.weight"]["fn"].base_dist.scale, torch.tensor(2.0 / math.sqrt(150)))
    assert torch.allclose(sites["conv2.bias"]["fn"].base_dist.scale, torch.tensor(2.0 / math.sqrt(150)))


def test_one_layerwise_prior_shared_by_two_nets_gives_each_its_own_fan_in():
    prior = LayerwiseNormal(gain=1.0)
    before = dict(vars(prior))
    first = bq_priors(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), prior)
    # module "0" is now a LayerNorm: its 1-D weight has no fan-in of a layer, so it counts its own 5 values
    second = bq_priors(nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 2)), prior,
                       expose={"0.weight", "1.weight", "1.bias"})
    a, b = sample_sites(first, torch.randn(1, 4)), sample_sites(second, torch.randn(1, 5))
    assert vars(prior) == before  # the prior keeps no state about the networks
    expected = [(a, "0.weight", 4), (a, "0.bias", 4), (a, "1.weight", 3), (a, "1.bias", 3),
                (b, "0.weight", 5), (b, "1.weight", 5), (b, "1.bias", 5)]
    for sites, name, fan_in in expected:
        assert torch.all(sites[name]["fn"].base_dist.scale == 1.0 / math.sqrt(fan_in)), name


def test_scale_mixture_log_density_matches_the_formula():
    prior = ScaleMixtureNormal(pi=0.25, sigma1=1.0, sigma2=0.1)
    bnn = bq_priors(nn.Linear(3, 2), prior)
    fn = sample_sites(bnn, torch.randn(1, 3))["weight"]["fn"]
    w = torch.tensor([[0.05, -0.3, 1.2], [0.0, 0.7, -0.01]])

    def normal_pdf(x, s):
        return torch.exp(-0.5 * (x / s) ** 2) / (s * math.sqrt(2 * math.pi))

    expected = torch.log(0.25 * normal_pdf(w, 1.0) + 0.75 * normal_pdf(w, 0.1)).sum()
    torch.testing.assert_close(fn.log_prob(w), expected)


def test_pretrained_normal_is_centred_at_the_trained_weights():
    trained = LeNet5()
    bnn = bq_priors(LeNet5(), PretrainedNormal(trained, scale=0.05))
    sites = sample_sites(bnn, torch.randn(1, 1, 28, 28))
    for name, param in trained.named_parameters():
        torch.testing.assert_close(sites[name]["fn"].base_dist.loc, param.detach())
        assert torch.all(sites[name]["fn"].base_dist.scale == 0.05)


def test_custom_prior_overrides_one_method_and_is_given_the_owning_layer():
    calls = []

    class Laplace(Prior):
        def distribution(self, module, module_name, param_name, param):
            calls.append((type(module), module_name, param_name, tuple(param.shape), tuple(module.weight.shape)))
            return dist.Laplace(torch.zeros_like(param), 0.1)

    sites = sample_sites(bq_priors(nn.Sequential(nn.Linear(4, 2)), Laplace()), torch.randn(1, 4))
    assert isinstance(sites["0.weight"]["fn"].base_dist, dist.Laplace)
    assert calls == [(nn.Linear, "0", "weight", (2, 4), (2, 4)), (nn.Linear, "0", "bias", (2,), (2, 4))]


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: bq_priors("not a net", IIDNormal(1.0)), TypeError, "net"),
        (lambda: bq_priors(LeNet5(), dist.Normal(0, 1)), TypeError, "prior"),
        (lambda: bq_priors(LeNet5(), IIDNormal(1.0), expose={"conv9.weight"}), ValueError, "expose"),
        (lambda: bq_priors(LeNet5(), IIDNormal(1.0), expose=lambda m, p: False), ValueError, "expose"),
        (lambda: bq_priors(LeNet5(), IIDNormal(1.0), expose=3), TypeError, "expose"),
        (lambda: IIDNormal(-1.0), ValueError, "scale"),
        (lambda: ScaleMixtureNormal(pi=1.5), ValueError, "pi"),
        (lambda: PretrainedNormal("x"), TypeError, "net"),
    ],
)
def test_bad_input_is_a_clear_error(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_pretrained_prior_of_another_architecture_is_refused():
    with pytest.raises(ValueError, match="shape|no parameter"):
        bq_priors(nn.Linear(3, 2), PretrainedNormal(nn.Linear(4, 2)))
