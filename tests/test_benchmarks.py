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


def test_row_selection_puts_the_baseline_first_and_rejects_unknown_rows(harness):
    rows = harness.pred_rows("mlp")
    chosen = harness.select(rows, "bq batched,det x32", "det x32")
    assert list(chosen) == ["det x32", "bq batched"]
    assert harness.select(rows, None, "det x32") is rows
    with pytest.raises(ValueError, match="unknown rows"):
        harness.select(rows, "bq batched,no-such-row", "det x32")


def test_memory_only_prints_each_rows_peak_and_its_ratio_to_the_baseline(harness, capsys):
    harness.main(["--nets", "mlp", "--skip-train", "--memory-only", "--pred-rows", "bq batched", "--threads", "1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| det x32") or ln.startswith("| bq")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["det x32", "bq batched"]
    peaks = [float(ln.split("|")[2]) for ln in lines]
    assert all(p == p for p in peaks)  # not NaN: each fresh subprocess ran and reported its peak
    assert lines[0].split("|")[3].strip() == "1.00"


def test_bayesian_torch_rows_train_and_predict_a_resnet20_with_batchnorm(harness):
    pytest.importorskip("bayesian_torch")
    import torch

    assert {"bt", "bt-flipout"} <= set(harness.train_rows("resnet20"))
    net = harness.bt_net("resnet20")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    x, _ = harness.data(4, 0, "resnet20")
    with torch.no_grad():
        a, b = net.eval()(x), net(x)
    assert a.shape == (4, 10) and not torch.equal(a, b)  # each pass samples its own weights
    for name in ("bt", "bt-flipout"):
        harness.train_rows("resnet20")[name]()()


def test_isolated_rows_each_run_in_a_fresh_process_and_report_a_ratio(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_profile_cpu_rows", BENCH / "profile_cpu_rows.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        med = module.main(["--net", "lenet", "--rows", "det,bq", "--reps", "1", "--isolated", "--calls", "1",
                           "--warmup", "1"])
    finally:
        sys.path.remove(str(BENCH))
    out = capsys.readouterr().out
    assert "a fresh process per row and round" in out
    rows = [ln.split("|")[1].strip() for ln in out.splitlines() if ln.startswith("| det") or ln.startswith("| bq")]
    assert rows == ["det", "bq"] and set(med) == {"det", "bq"}
    assert all(v > 0 for v in med.values())  # each child ran a step and reported its CPU time
    with pytest.raises(ValueError, match="unknown rows"):
        module.main(["--net", "lenet", "--rows", "det,nope", "--isolated"])


def test_autocast_pretrain_times_both_precisions_and_rejects_an_unknown_net(capsys):
    spec = importlib.util.spec_from_file_location("autocast_pretrain", BENCH / "autocast_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--nets", "lenet", "--batch", "8", "--reps", "1", "--threads", "1"])
    assert set(out["lenet"]) == {"float32", "bfloat16"} and all(v > 0 for v in out["lenet"].values())
    assert "x float32" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown net"):
        module.main(["--nets", "vgg"])
