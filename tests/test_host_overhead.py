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
from pyro_bq.inference.train import _all_finite, compile_network_
from pyro_bq.models import MLP, BayesianClassifier, LeNet5, ResNet20

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


def _one_step(compile_backend, expose=None, steps=3):
    """Losses of ``steps`` steps and the gradients of the last (guide and deterministic parameters)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=500, expose=expose)
    if compile_backend is not None:
        compile_network_(model, backend=compile_backend)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    guide = AutoMeanFieldNormal(model).setup(x, y)
    optim, elbo = default_optim(1e-2), MeanFieldELBO()
    pyro.set_rng_seed(3)
    losses = [svi_step(model, guide, optim, elbo, x, y)[0] for _ in range(steps - 1)]
    losses.append(elbo.loss_and_grads(model, guide, x, y))
    grads = {f"guide.{k}": p.grad.clone() for k, p in guide.named_parameters()}
    grads.update({f"net.{k}": p.grad.clone() for k, p in model.net.named_parameters()})
    return losses, grads


@pytest.mark.parametrize("expose", [None, lambda module, param: param == "weight"], ids=["all", "weights-only"])
def test_a_compiled_network_gives_the_uncompiled_losses_and_gradients(expose):
    losses, grads = _one_step(None, expose)
    compiled_losses, compiled_grads = _one_step("aot_eager", expose)
    assert grads.keys() == compiled_grads.keys()
    assert any(k.startswith("net.") for k in grads) is (expose is not None)  # deterministic biases are trained too
    torch.testing.assert_close(compiled_losses, losses, rtol=1e-6, atol=0)
    for k in grads:
        assert grads[k].abs().sum() > 0, k
        torch.testing.assert_close(compiled_grads[k], grads[k], rtol=1e-5, atol=1e-6, msg=k)


def test_compile_network_refuses_batchnorm_and_wrong_arguments():
    model = BayesianClassifier(ResNet20(blocks_per_stage=1), IIDNormal(1.0), dataset_size=10)
    with pytest.raises(ValueError, match="BatchNorm"):
        compile_network_(model)
    with pytest.raises(TypeError, match="model"):
        compile_network_(LeNet5())


def test_the_host_overhead_benchmark_runs_and_prints_every_row(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
    spec = importlib.util.spec_from_file_location("host_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = torch.get_num_threads()
    try:
        module.main(["--nets", "lenet", "--reps", "1", "--warmup", "0", "--profile-steps", "1"])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    for row in ("plain", "naive", "bq-before", "bq", "(a)", "(b)", "bq-before/bq"):
        assert row in out
