"""Local reparameterization and Flipout handlers: unbiasedness, variance, marginals, fallbacks.

Statistical tests use fixed seeds; tolerances are stated next to each check
(in standard errors of the Monte Carlo estimates).
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference.reparam import Flipout, Handled, LocalReparameterization, gaussian_tag
from pyro_bq.models import BayesianClassifier, BayesianRegressor


def _small(net=None, n=48, d=12, scale=0.3, seed=0, classes=4, x_shape=None):
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    net = net if net is not None else nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, classes))
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=500)
    x = torch.randn((n, d) if x_shape is None else (n,) + tuple(x_shape))
    y = torch.randint(0, classes, (n,))
    guide = AutoMeanFieldNormal(model, init_scale=scale)
    guide(x, y)
    return model, guide, x, y


def _tiny_convnet():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3))


def _logits(model, guide, x, handler=None, y=None):
    """One joint draw of the model's logits (guide sampled, model replayed)."""
    def run():
        tr = pyro.poutine.trace(guide).get_trace(x)
        return pyro.poutine.replay(model, trace=tr)(x)

    if handler is None:
        return run()
    with handler:
        return run()


@pytest.mark.parametrize(
    "handler_cls, elbo_cls",
    [(LocalReparameterization, Trace_ELBO), (LocalReparameterization, TraceMeanField_ELBO), (Flipout, Trace_ELBO)],
)
def test_elbo_has_the_same_mean_as_weight_sampling(elbo_cls, handler_cls):
    model, guide, x, y = _small(scale=0.4)
    elbo = elbo_cls()
    draws = 300
    with torch.no_grad():
        plain = torch.tensor([elbo.loss(model, guide, x, y) for _ in range(draws)], dtype=torch.float64)
        with handler_cls():
            other = torch.tensor([elbo.loss(model, guide, x, y) for _ in range(draws)], dtype=torch.float64)
    se = math.sqrt(plain.var() / draws + other.var() / draws)
    # unbiased: the means agree within 4 standard errors of their difference
    assert abs(plain.mean() - other.mean()) < 4 * se, (plain.mean(), other.mean(), se)
    # and the handler really changed the estimator (its spread differs)
    assert not torch.allclose(plain.std(), other.std(), rtol=0.02)


def _grad_draws(model, guide, x, y, handler, draws, elbo):
    grads = []
    for _ in range(draws):
        guide.zero_grad()
        if handler is None:
            loss = elbo.differentiable_loss(model, guide, x, y)
        else:
            with handler:
                loss = elbo.differentiable_loss(model, guide, x, y)
        loss.backward()
        grads.append(torch.cat([guide.loc.grad.clone(), guide.scale_raw.grad.clone()]))
    return torch.stack(grads)


def test_local_reparameterization_lowers_gradient_variance():
    model, guide, x, y = _small(n=96, scale=0.3)
    elbo = TraceMeanField_ELBO()
    plain = _grad_draws(model, guide, x, y, None, 80, elbo)
    lr = _grad_draws(model, guide, x, y, LocalReparameterization(), 80, elbo)
    flip = _grad_draws(model, guide, x, y, Flipout(), 80, elbo)
    # same expected gradient (each coordinate's mean within 5 SE, on average over coordinates)
    se = (plain.var(0) / len(plain) + lr.var(0) / len(lr)).sqrt().clamp_min(1e-12)
    z = ((plain.mean(0) - lr.mean(0)) / se).abs()
    assert z.mean() < 1.5, z.mean()
    # total gradient variance at least 2x lower with local reparameterization
    # (measured: about 0.15 for local reparameterization and 0.3 for Flipout)
    ratio = lr.var(0).sum() / plain.var(0).sum()
    assert ratio < 0.5, ratio
    assert flip.var(0).sum() / plain.var(0).sum() < 0.8


def _marginals(model, guide, x, handler, draws):
    with torch.no_grad():
        return torch.stack([_logits(model, guide, x, handler) for _ in range(draws)])


@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize("handler_cls", [LocalReparameterization, Flipout])
def test_marginal_output_distribution_matches_weight_sampling(handler_cls, net):
    if net == "conv":
        model, guide, x, y = _small(_tiny_convnet(), n=6, scale=0.3, classes=3, x_shape=(1, 5, 5))
    else:
        model, guide, x, y = _small(n=6, scale=0.3)
    draws = 400
    plain = _marginals(model, guide, x, None, draws)
    other = _marginals(model, guide, x, handler_cls(), draws)
    # per-example, per-logit mean within 4.5 SE; standard deviations: each within 22%
    # (the SE of a ratio of two sds from 400 draws is about 5%, more for heavy tails)
    # and on average over all outputs within 6%
    se = (plain.var(0) / draws + other.var(0) / draws).sqrt()
    assert ((plain.mean(0) - other.mean(0)).abs() < 4.5 * se).all()
    torch.testing.assert_close(other.std(0), plain.std(0), rtol=0.22, atol=0)
    assert abs((other.std(0) / plain.std(0)).mean() - 1) < 0.06
    # two-sample Kolmogorov-Smirnov statistic of every logit below the 1% critical value
    crit = 1.63 * math.sqrt(2 / draws)
    for idx in [(0, 0), (3, 1), (5, 2)]:
        a, b = plain[(slice(None),) + idx].sort().values, other[(slice(None),) + idx].sort().values
        grid = torch.cat([a, b])
        cdf_a = torch.searchsorted(a, grid, right=True) / draws
        cdf_b = torch.searchsorted(b, grid, right=True) / draws
        assert (cdf_a - cdf_b).abs().max() < crit


@pytest.mark.parametrize("handler_cls", [LocalReparameterization, Flipout])
def test_noise_is_independent_across_examples(handler_cls):
    # A single linear layer and two identical inputs: weight sampling gives both
    # the same output; the handlers give them independent noise.
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    model = BayesianRegressor(nn.Linear(5, 1), IIDNormal(1.0), dataset_size=10, noise=1.0)
    guide = AutoMeanFieldNormal(model, init_scale=0.5)
    x = torch.randn(1, 5).expand(2, 5).contiguous()
    guide(x, torch.zeros(2))
    with torch.no_grad():
        plain = torch.stack([_logits(model, guide, x) for _ in range(400)])
        other = torch.stack([_logits(model, guide, x, handler_cls()) for _ in range(400)])
    assert torch.equal(plain[:, 0], plain[:, 1])
    corr = torch.corrcoef(other.T)[0, 1]
    if handler_cls is LocalReparameterization:
        # exactly independent: |corr| < 4 / sqrt(400) = 0.2
        assert abs(corr) < 0.2, corr
    else:
        # Flipout: pseudo-independent, correlation far from weight sampling's 1
        assert corr < 0.8, corr
    # the analytic marginal under local reparameterization: mean x.mu + b, var x^2.sigma^2 + sigma_b^2
    if handler_cls is LocalReparameterization:
        loc_w, scale_w = guide.get_loc_scale("net.weight")
        loc_b, scale_b = guide.get_loc_scale("net.bias")
        mean = (x[0] @ loc_w.T + loc_b).detach()
        sd = (x[0].square() @ scale_w.square().T + scale_b.square()).sqrt().detach()
        se = sd / math.sqrt(400)
        assert (other.mean(0) - mean).abs().max() < 4.5 * se.max()
        torch.testing.assert_close(other.std(0), sd.expand(2), rtol=0.1, atol=0)


class _LaplaceGuide(AutoMeanFieldNormal):
    """A guide whose samples are not Gaussian."""

    def get_posterior(self, name):
        loc, scale = self.get_loc_scale(name)
        return dist.Laplace(loc, scale).to_event(self.sites[name].event_dim)


@pytest.mark.parametrize("handler_cls", [LocalReparameterization, Flipout])
def test_non_gaussian_guide_falls_back_to_weight_sampling(handler_cls):
    model, _, x, y = _small()
    guide = _LaplaceGuide(model, init_scale=0.3)
    guide(x, y)
    pyro.set_rng_seed(5)
    plain = _logits(model, guide, x)
    pyro.set_rng_seed(5)
    with pytest.warns(UserWarning, match="not a plain Normal"):
        fallback = _logits(model, guide, x, handler_cls())
    torch.testing.assert_close(fallback, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="strict"):
        _logits(model, guide, x, handler_cls(strict=True))


def test_unsupported_layer_types_use_the_sampled_weight():
    net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 10, 3))
    model, guide, x, y = _small(net, n=5, classes=3, x_shape=(1, 12))
    handler = LocalReparameterization(layers=("conv2d",))  # Linear off, Conv1d unsupported
    pyro.set_rng_seed(2)
    plain = _logits(model, guide, x)
    pyro.set_rng_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = _logits(model, guide, x, handler)
    torch.testing.assert_close(other, plain, rtol=0, atol=0)


def test_layers_choice_limits_the_reparameterized_types():
    model, guide, x, y = _small(_tiny_convnet(), n=4, classes=3, x_shape=(1, 5, 5))
    pyro.set_rng_seed(4)
    plain = _logits(model, guide, x)
    pyro.set_rng_seed(4)
    conv_only = _logits(model, guide, x, LocalReparameterization(layers=("conv2d",)))
    assert not torch.allclose(conv_only, plain)


def test_guide_outside_the_handler_means_weight_sampling():
    # Only the model is wrapped: its weights are replayed from an untagged guide
    # trace, so the layers use the sampled weights (never the prior's moments).
    model, guide, x, y = _small()
    lr = LocalReparameterization()
    pyro.set_rng_seed(6)
    tr = pyro.poutine.trace(guide).get_trace(x)
    plain = pyro.poutine.replay(model, trace=tr)(x)
    wrapped = pyro.poutine.replay(lr(model), trace=tr)(x)
    torch.testing.assert_close(wrapped, plain, rtol=0, atol=0)


def test_shared_layer_raises():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    model, guide, x, y = _small(Twice(), n=4, d=6, classes=6)
    with pytest.raises(ValueError, match="used twice"):
        _logits(model, guide, x, LocalReparameterization())


def test_arguments_are_validated_and_patch_is_restored():
    with pytest.raises(TypeError, match="layers"):
        LocalReparameterization(layers="linear")
    with pytest.raises(ValueError, match="layers"):
        Flipout(layers=("conv1d",))
    with pytest.raises(TypeError, match="strict"):
        Flipout(strict=1)
    with pytest.raises(TypeError, match="handler"):
        Handled(lambda: None, object())
    original = nn.Linear.forward
    with pytest.raises(RuntimeError, match="boom"):
        with LocalReparameterization():
            assert nn.Linear.forward is not original
            raise RuntimeError("boom")
    assert nn.Linear.forward is original


def test_samples_are_tagged_only_under_the_handler():
    model, guide, x, y = _small()
    tr = pyro.poutine.trace(guide).get_trace(x)
    assert all(gaussian_tag(s["value"]) is None for s in tr.nodes.values() if s["type"] == "sample")
    with LocalReparameterization():
        tr = pyro.poutine.trace(guide).get_trace(x)
    tag = gaussian_tag(tr.nodes["net.0.weight"]["value"])
    loc, scale = guide.get_loc_scale("net.0.weight")
    torch.testing.assert_close(tag.loc, loc)
    torch.testing.assert_close(tag.scale, scale)
