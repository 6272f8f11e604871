"""MeanFieldELBO: the same loss and gradients as stock TraceMeanField_ELBO, with fewer evaluations."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from pyro_bq import IIDNormal, LayerwiseNormal, Prior, ScaleMixtureNormal
from pyro_bq.guides import AutoMeanFieldNormal, quantize
from pyro_bq.inference import MeanFieldELBO
from pyro_bq.inference.elbo import _analytic_pair
from pyro_bq.models import MLP, BayesianClassifier, BayesianRegressor, LeNet5
from pyro_bq.quant import JQ, SPQ


class _Laplace(Prior):
    """A prior without a closed-form KL against a Normal guide (sampled KL estimate)."""

    def distribution(self, module, module_name, param_name, param):
        return dist.Laplace(torch.zeros_like(param), 0.5)


def _setup(prior, net="mlp"):
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = BayesianClassifier(MLP((784, 12, 10)) if net == "mlp" else LeNet5(), prior, dataset_size=500)
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    guide(x, y)
    return model, guide, x, y


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("prior", [IIDNormal(1.0), LayerwiseNormal(), ScaleMixtureNormal(0.5, 1.0, 0.01), _Laplace()],
                         ids=["iid", "layerwise", "scale-mixture", "laplace"])
@pytest.mark.parametrize("which", ["meanfield", "spq4", "jq2"])
def test_same_loss_and_gradients_as_stock_trace_mean_field_elbo(prior, which, validation):
    model, guide, x, y = _setup(prior)
    g = guide if which == "meanfield" else quantize(guide, SPQ(4) if which == "spq4" else JQ(2))
    params = [guide.loc, guide.scale_raw]
    with pyro.validation_enabled(validation):
        pyro.set_rng_seed(3)
        a = TraceMeanField_ELBO().differentiable_loss(model, g, x, y)
        ga = torch.autograd.grad(a, params, allow_unused=True)
        pyro.set_rng_seed(3)
        b = MeanFieldELBO().differentiable_loss(model, g, x, y)
        gb = torch.autograd.grad(b, params, allow_unused=True)
    # the flat KL adds the same terms in another order: equal up to float rounding
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0.0)
    for u, v in zip(ga, gb):
        assert (u is None and v is None) or torch.equal(u, v)


def test_it_skips_the_unused_log_densities_and_keeps_the_needed_ones():
    model, guide, x, y = _setup(IIDNormal(1.0))
    elbo = MeanFieldELBO()
    model_trace, guide_trace = elbo._get_trace(model, guide, (x, y), {})
    weights = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    assert weights and all(_analytic_pair(guide_trace.nodes[n]["fn"], model_trace.nodes[n]["fn"]) for n in weights)
    assert all("log_prob" not in model_trace.nodes[n] for n in weights)  # KL replaces them
    assert "log_prob_sum" in model_trace.nodes["obs"]  # the likelihood is evaluated
    stock_model, _ = TraceMeanField_ELBO()._get_trace(model, guide, (x, y), {})
    assert all("log_prob" in stock_model.nodes[n] for n in weights)
    # a prior without a closed form keeps its densities
    model, guide, x, y = _setup(_Laplace())
    model_trace, guide_trace = MeanFieldELBO()._get_trace(model, guide, (x, y), {})
    assert all("log_prob_sum" in model_trace.nodes[n] for n in guide.sites)
    assert all("log_prob" in guide_trace.nodes[n] for n in guide.sites)


def test_training_with_it_matches_stock_svi_step_for_step():
    runs = []
    for elbo in (TraceMeanField_ELBO(), MeanFieldELBO()):
        model, guide, x, y = _setup(IIDNormal(1.0), net="lenet")
        pyro.set_rng_seed(0)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
        losses = [svi.step(x, y) for _ in range(4)]
        runs.append((losses, guide.loc.detach().clone()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)  # float rounding of the summed KL
    assert torch.equal(runs[0][1], runs[1][1])  # the same gradients, hence the same steps


def test_regressor_with_learned_noise():
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = BayesianRegressor(torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)),
                              IIDNormal(1.0), 50, noise="learned")
    guide = AutoMeanFieldNormal(model, init_scale=0.1)
    x, y = torch.randn(10, 3), torch.randn(10)
    guide(x, y)
    pyro.set_rng_seed(1)
    a = TraceMeanField_ELBO().differentiable_loss(model, guide, x, y)
    pyro.set_rng_seed(1)
    b = MeanFieldELBO().differentiable_loss(model, guide, x, y)
    assert torch.equal(a, b)
