"""The benchmark scripts stay runnable: every harness row builds and takes one step (no timing here)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_harness", BENCH / "harness.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("net", ["mlp", "lenet"])
def test_every_training_row_takes_a_step(harness, net):
    rows = harness.train_rows(net)
    assert {"det", "bbb-w", "bbb-lr", "pyro-naive", "bq", "bq-lr", "bq-flipout"} <= set(rows)
    for name, make in rows.items():
        step = make()
        step()  # one real SVI / training step; raises if a row is broken


def test_default_optimizer_is_adam_with_the_fused_kernel_where_available():
    import torch

    from pyro_bq.inference import default_optim
    from pyro_bq.inference.train import _FUSED_ADAM

    optim = default_optim(1e-3)
    assert optim.pt_optim_constructor is torch.optim.Adam
    assert optim.pt_optim_args.get("fused", False) is _FUSED_ADAM
    with pytest.raises(ValueError, match="lr"):
        default_optim(0.0)


def test_default_optimizer_frees_gradients_and_takes_the_same_steps_as_pyro_adam():
    import pyro
    import torch
    from pyro.infer import SVI

    from pyro_bq import IIDNormal
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.inference import MeanFieldELBO, default_optim
    from pyro_bq.inference.train import _FUSED_ADAM
    from pyro_bq.models import MLP, BayesianClassifier

    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    runs = []
    for optim in (default_optim(1e-2), pyro.optim.Adam({"lr": 1e-2, "fused": _FUSED_ADAM})):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = BayesianClassifier(MLP((784, 6, 10)), IIDNormal(1.0), dataset_size=80)
        guide = AutoMeanFieldNormal(model, init_scale=0.05)
        svi = SVI(model, guide, optim, MeanFieldELBO())
        pyro.set_rng_seed(1)
        losses = [svi.step(x, y) for _ in range(3)]
        runs.append((losses, guide.loc.detach().clone(), guide.loc.grad))
    (la, loc_a, grad_a), (lb, loc_b, grad_b) = runs
    assert la == lb and torch.equal(loc_a, loc_b)
    assert grad_a is None  # freed once applied
    assert grad_b is not None and not grad_b.any()  # stock: zero-filled
