"""The host-side shortcuts of the SVI step change no number: the guard's finite test gives the
element-wise answer, and the guarded step trains exactly (bitwise) as stock ``SVI.step``."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import MeanFieldELBO, default_optim, svi_step
from pyro_bq.inference.train import _all_finite
from pyro_bq.models import MLP, BayesianClassifier, LeNet5

MAX = "max"  # the largest finite value of the dtype under test


@pytest.mark.parametrize("values, expected", [
    ([1.0, -2.0, 3.0], True),
    ([MAX, MAX, MAX], True),  # finite terms whose sum overflows
    ([-1.0, MAX, MAX], True),
    ([1.0, float("nan")], False),
    ([float("inf"), 0.0], False),
    ([float("inf"), float("-inf")], False),  # a NaN sum
    ([float("-inf")], False),
    ([], True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_the_one_pass_finite_test_gives_the_elementwise_answer(values, expected, dtype):
    big = torch.finfo(dtype).max
    g = torch.tensor([big if v == MAX else v for v in values], dtype=dtype)
    assert bool(torch.isfinite(g).all()) is expected
    assert _all_finite(g) is expected


def _trained(net_fn, step_fn, steps=4, seed=3):
    """Losses and final parameters of ``steps`` steps of ``step_fn`` from a fresh model and guide."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = BayesianClassifier(net_fn(), IIDNormal(1.0), dataset_size=500)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    guide = AutoMeanFieldNormal(model).setup(x, y)
    optim, elbo = default_optim(1e-2), MeanFieldELBO()
    pyro.set_rng_seed(seed)
    losses = [step_fn(model, guide, optim, elbo, x, y) for _ in range(steps)]
    return losses, {k: v.detach().clone() for k, v in guide.state_dict().items()}


def _guarded(model, guide, optim, elbo, x, y):
    loss, ok = svi_step(model, guide, optim, elbo, x, y)
    assert ok
    return loss


def _stock(model, guide, optim, elbo, x, y):
    return SVI(model, guide, optim, elbo).step(x, y)


@pytest.mark.parametrize("net_fn", [lambda: MLP((784, 16, 10)), LeNet5], ids=["mlp", "lenet"])
def test_the_guarded_step_trains_bitwise_as_stock_svi_step(net_fn):
    losses, params = _trained(net_fn, _guarded)
    stock_losses, stock_params = _trained(net_fn, _stock)
    assert losses == stock_losses
    assert params.keys() == stock_params.keys()
    for k in params:
        assert torch.equal(params[k], stock_params[k]), k
    assert len(set(losses)) > 1  # the steps moved the guide
