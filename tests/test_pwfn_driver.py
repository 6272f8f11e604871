"""The PWFN driver and example on real MNIST (small subsets; the full run is marked slow)."""

import importlib.util
import math
import os
import pathlib
import sys

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro_bq import IIDNormal
from pyro_bq.guides import init_to_pretrained
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.pwfn import PWFN, AutoPWFN, ClusterConfig

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "pwfn_mnist.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("pwfn_mnist_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pretrained_lenet(train, epochs=1, seed=0):
    torch.manual_seed(seed)
    net = LeNet5()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for epoch in range(epochs):
        for xb, yb in train.batches(100, shuffle=True, seed=seed, epoch=epoch):
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
    return net.eval()


def _setup(train, net):
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=len(train))
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    return model, guide


@pytest.fixture(scope="module")
def lenet_small(mnist_small):
    train, test = mnist_small
    return _pretrained_lenet(train)


class _Stop(Exception):
    pass


def test_driver_fixes_every_weight_and_resumes(mnist_small, lenet_small, tmp_path):
    train, test = mnist_small
    kwargs = dict(
        test_data=test, schedule=(0.5, 0.8, 1.0), num_steps=4, batch_size=64,
        cluster=ClusterConfig(b=6, tau=1.0, max_order=2, max_b=8), checkpoint_dir=tmp_path,
        eval_samples=3, progress=False,
    )
    # first run: killed right after round 1 has been checkpointed
    model, guide = _setup(train, lenet_small)
    runner = PWFN(model, guide, train, log=None, **kwargs)
    orig_save = runner._save

    def save_then_stop(t, *a):
        orig_save(t, *a)
        if t == 1:
            raise _Stop

    runner._save = save_then_stop
    with pytest.raises(_Stop):
        runner.run()
    assert (tmp_path / "pwfn-1.bq").exists()
    round1 = guide.fixed.clone()

    # second run: resumes after round 1 and finishes
    pyro.clear_param_store()
    model, guide = _setup(train, lenet_small)
    lines = []
    res = PWFN(model, guide, train, log=lines.append, **kwargs).run()
    assert res.resumed_from.endswith("pwfn-1.bq") and lines[0].startswith("resumed from pwfn-1.bq")
    assert bool(guide.fixed[round1].all())  # round 1's weights stayed fixed
    # round log: fraction fixed follows the schedule, codebook and accuracy are recorded
    assert [r["round"] for r in res.rounds] == [1, 2, 3]
    fracs = [r["fraction_fixed"] for r in res.rounds]
    n = guide.num_params
    assert fracs[:2] == [math.ceil(0.5 * n) / n, math.ceil(0.8 * n) / n] and fracs[2] == 1.0
    assert all(r["codebook_size"] >= 1 and 0.0 <= r["accuracy"] <= 1.0 for r in res.rounds)
    assert res.rounds[1]["train_steps"] == 4
    assert any(line.startswith("round 3/3") for line in lines)
    # every weight of median() lies on a centre of the final codebook
    codebook = guide.codebook()
    med = torch.cat([v.reshape(-1) for v in guide.median().values()])
    assert bool(torch.isin(med, codebook).all())
    assert res.final["unique"] == codebook.numel() and res.final["fraction_fixed"] == 1.0
    assert res.final["entropy"] <= math.log2(codebook.numel()) + 1e-9
    assert 0.0 <= res.final["ensemble_accuracy"] <= 1.0
    # the quantized net still classifies (the quick 2,000-image pretrain is far from converged)
    assert res.final["accuracy"] > 0.5
    assert (tmp_path / "pwfn-3.bq").exists() and not list(tmp_path.glob("round-*/ckpt-*.bq"))

    # third run: everything is done, nothing is retrained, same guide
    pyro.clear_param_store()
    model2, guide2 = _setup(train, lenet_small)
    res2 = PWFN(model2, guide2, train, log=None, **kwargs).run()
    assert res2.resumed_from.endswith("pwfn-3.bq")
    assert torch.equal(guide2.fixed_loc, guide.fixed_loc) and torch.equal(guide2.fixed_scale, guide.fixed_scale)
    assert res2.rounds == res.rounds
    assert res2.final["accuracy"] == res.final["accuracy"]


def test_driver_on_dataloaders_equals_the_in_memory_run(mnist_small, lenet_small):
    from torch.utils.data import DataLoader, TensorDataset

    from pyro_bq.data import InMemoryDataset

    train, test = mnist_small
    train, test = InMemoryDataset(train.x[:600], train.y[:600]), InMemoryDataset(test.x[:300], test.y[:300])
    kwargs = dict(schedule=(0.5, 1.0), num_steps=2, batch_size=64, cluster=ClusterConfig(b=6, tau=1.0, max_order=2,
                  max_b=8), eval_samples=2, progress=False, log=None, device="cpu")
    runs = []
    for train_data, test_data in ((train, test), (DataLoader(TensorDataset(train.x, train.y), batch_size=64,
                                                             shuffle=True),
                                                  DataLoader(TensorDataset(test.x, test.y), batch_size=100))):
        pyro.clear_param_store()
        model, guide = _setup(train, lenet_small)
        runs.append((guide, PWFN(model, guide, train_data, test_data=test_data, **kwargs).run()))
    (g1, r1), (g2, r2) = runs
    assert torch.allclose(g1.fixed_loc, g2.fixed_loc, atol=1e-6) and torch.equal(g1.fixed, g2.fixed)
    assert r1.final["accuracy"] == r2.final["accuracy"]
    assert r1.final["ensemble_accuracy"] == r2.final["ensemble_accuracy"]


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_example_runs_with_tiny_settings(data_root, capsys, preset):
    mod = _load_example()
    args = mod.build_parser().parse_args(
        ["--data-dir", str(data_root), "--train-limit", "600", "--test-limit", "300", "--pretrain-epochs", "1",
         "--num-steps", "3", "--schedule", "0.6", "1.0", "--eval-samples", "2", "--no-progress", "--preset", preset]
    )
    out = mod.main(args)
    text = capsys.readouterr().out
    assert "round 2/2" in text and "final table" in text and "codebook:" in text
    assert "point network (codebook indices)" in text and "Bayesian (mu, sigma) packed file" in text
    assert "per site (the paper's Figure 2)" in text and "movement per codebook value" in text
    assert out["fraction_fixed"] == 1.0 and out["unique"] == len(out["codebook"])
    assert set(out["per_site"]) == set(out["guide"].sites)
    assert sum(m["count"] for m in out["movement"]) == out["guide"].num_params


@pytest.mark.slow
def test_full_schedule_lenet5_on_mnist(data_root, tmp_path):
    """The full run: all of MNIST, LeNet-5, the default schedule, one epoch per round."""
    mod = _load_example()
    args = mod.build_parser().parse_args(
        ["--data-dir", str(data_root), "--pretrain-epochs", "5", "--no-progress",
         "--checkpoint-dir", str(tmp_path / "pwfn"), "--pretrained", str(tmp_path / "lenet5.bq")]
        + os.environ.get("PWFN_SLOW_ARGS", "").split()
    )
    out = mod.main(args)
    med = torch.cat([v.reshape(-1) for v in out["guide"].median().values()])
    assert bool(torch.isin(med, torch.tensor(out["codebook"])).all())
    assert out["unique"] <= 32
    assert out["entropy"] <= 2.5
    assert out["accuracy"] >= out["pretrained_accuracy"] - 0.005


def test_warmup_trains_sigma_before_any_weight_is_fixed(mnist_small, lenet_small, tmp_path):
    train, test = mnist_small
    kwargs = dict(test_data=test, preset="paper", schedule=(1.0,), num_steps=2, batch_size=200, warmup_epochs=1,
                  cluster=ClusterConfig(b=6, tau=1.0, max_order=2, max_b=8), checkpoint_dir=tmp_path,
                  eval_samples=2, progress=False)
    model, guide = _setup(train, lenet_small)
    guide.setup(*next(iter(train.batches(200))))
    sigma0 = float(guide.flat_loc_scale()[1].detach().median())
    lines = []
    res = PWFN(model, guide, train, log=lines.append, **kwargs).run()
    warm = res.final["warmup"]
    assert warm["epochs"] == 1 and warm["train_steps"] == 10  # 2,000 images in batches of 200
    # the regulariser raised the free scales before the first clustering (nothing was fixed yet)
    assert warm["sigma_median"] > sigma0
    assert res.rounds[0]["sigma_median"] >= warm["sigma_median"] > 0
    assert lines[1].startswith("warm-up: 1 epochs (10 steps)") and lines[2].startswith("round 1/1")
    assert not (tmp_path / "warmup").exists()
    # a rerun resumes after the last round and does not train the warm-up again
    pyro.clear_param_store()
    model2, guide2 = _setup(train, lenet_small)
    lines2 = []
    res2 = PWFN(model2, guide2, train, log=lines2.append, **kwargs).run()
    assert not any(line.startswith("warm-up") for line in lines2) and res2.final["warmup"] == warm


def test_warmup_epochs_is_validated(mnist_small, lenet_small):
    train, _ = mnist_small
    model, guide = _setup(train, lenet_small)
    with pytest.raises(ValueError, match="warmup_epochs"):
        PWFN(model, guide, train, warmup_epochs=-1, progress=False)


def test_train_mode_reaches_every_training_call_and_is_validated(mnist_small, lenet_small, monkeypatch):
    import pyro_bq.pwfn.driver as driver

    train, _ = mnist_small
    seen = []
    real = driver.fit_svi

    def spy(*args, **kwargs):
        seen.append(kwargs["train_mode"])
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "fit_svi", spy)
    model, guide = _setup(train, lenet_small)
    PWFN(model, guide, train, schedule=(0.5, 1.0), num_steps=1, batch_size=200, warmup_epochs=1, train_mode=False,
         eval_samples=1, progress=False, log=None).run()
    assert seen == [False, False, False]  # the warm-up and both rounds
    with pytest.raises(TypeError, match="train_mode"):
        PWFN(model, guide, train, train_mode="eval", progress=False)
