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
