"""NaN/inf guard of fit_svi: stop naming the site(s) and step after saving the last good
state, or skip the step; checked by injecting a NaN into one site's gradient at step k."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_bq import IIDNormal
from pyro_bq.data import InMemoryDataset
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import NonFiniteError, fit_svi
from pyro_bq.io import latest_checkpoint, load_checkpoint
from pyro_bq.models import MLP, BayesianClassifier

STEPS, BATCH = 10, 50


@pytest.fixture
def train(mnist_small):
    return mnist_small[0].subset(200)


def _setup(train, seed=0):
    torch.manual_seed(seed)
    model = BayesianClassifier(MLP((784, 8, 10)), IIDNormal(1.0), dataset_size=len(train))
    guide = AutoMeanFieldNormal(model).setup(train.x[:2], train.y[:2])
    return model, guide


def _poison(guide, param: str, site: str, at_step: int, value=float("nan")):
    """Make ``site``'s slice of the gradient of the flat ``param`` non-finite at backward call ``at_step``."""
    info = guide.sites[site]
    calls = {"n": 0}

    def hook(grad):
        step, calls["n"] = calls["n"], calls["n"] + 1
        if step != at_step:
            return grad
        grad = grad.clone()
        grad[info.offset + info.numel // 2] = value
        return grad

    return getattr(guide, param).register_hook(hook)


def _snapshots(guide):
    snaps = {}

    def callback(step, loss):
        snaps[step] = {k: v.detach().clone() for k, v in guide.state_dict().items()}

    return snaps, callback


@pytest.mark.parametrize("param, site, value", [("loc", "net.3.weight", float("nan")), ("scale_raw", "net.1.bias", float("inf"))])
def test_a_nonfinite_gradient_stops_the_run_naming_site_and_step_after_saving_the_last_good_state(train, tmp_path, param, site, value):
    model, guide = _setup(train)
    _poison(guide, param, site, at_step=5, value=value)
    snaps, callback = _snapshots(guide)
    with pytest.raises(NonFiniteError) as info:
        fit_svi(model, guide, train, num_steps=STEPS, batch_size=BATCH, checkpoint_dir=tmp_path,
                checkpoint_every=3, progress=False, callback=callback)
    message = str(info.value)
    assert "step 5" in message and site in message, message
    others = [s for s in guide.sites if s != site]
    assert not any(f"{s}," in message or message.split("site(s) ")[1].startswith(s) for s in others), message
    # the last good state (after 5 steps) is on disk and loads
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "ckpt-5.bq"
    state = load_checkpoint(ckpt)
    assert state["step"] == 5 and len(state["losses"]) == 5
    for key, value_ in snaps[5].items():
        assert torch.equal(state["guide"][key], value_), key
    # nothing of the bad step reached the parameters
    assert torch.equal(guide.loc.detach(), snaps[5]["loc"])
    assert all(torch.isfinite(v).all() for v in state["guide"].values())


def test_the_saved_state_resumes_to_completion_once_the_cause_is_gone(train, tmp_path):
    model, guide = _setup(train)
    handle = _poison(guide, "loc", "net.1.weight", at_step=4)
    with pytest.raises(NonFiniteError):
        fit_svi(model, guide, train, num_steps=STEPS, batch_size=BATCH, checkpoint_dir=tmp_path, progress=False)
    handle.remove()
    model2, guide2 = _setup(train)
    result = fit_svi(model2, guide2, train, num_steps=STEPS, batch_size=BATCH, checkpoint_dir=tmp_path, progress=False)
    assert result.resumed_from.endswith("ckpt-4.bq") and result.steps == STEPS
    assert len(result.losses) == STEPS and all(math.isfinite(v) for v in result.losses)


def test_resuming_from_the_nonfinite_checkpoint_matches_an_uninterrupted_run(train, tmp_path):
    model, guide = _setup(train)
    handle = _poison(guide, "loc", "net.1.weight", at_step=4)
    with pytest.raises(NonFiniteError):
        fit_svi(model, guide, train, num_steps=6, batch_size=BATCH, checkpoint_dir=tmp_path / "a", progress=False)
    handle.remove()
    model2, guide2 = _setup(train)
    fit_svi(model2, guide2, train, num_steps=6, batch_size=BATCH, checkpoint_dir=tmp_path / "a", progress=False)
    model3, guide3 = _setup(train)
    fit_svi(model3, guide3, train, num_steps=6, batch_size=BATCH, checkpoint_dir=tmp_path / "b", progress=False)
    assert torch.equal(guide2.loc, guide3.loc)


@pytest.mark.filterwarnings("ignore:Encountered")
def test_a_nonfinite_loss_is_reported_as_the_loss_with_its_step(train, tmp_path):
    import pyro

    model, guide = _setup(train)
    calls = {"n": 0}

    def poisoned(x, y=None):  # the model plus an infinite log factor at its 4th run (step 3)
        out = model(x, y)
        calls["n"] += 1
        if calls["n"] == 4:
            pyro.factor("poison", torch.tensor(float("inf")))
        return out

    with pytest.raises(NonFiniteError, match=r"step 3: the loss is not finite"):
        fit_svi(poisoned, guide, train, num_steps=STEPS, batch_size=BATCH, checkpoint_dir=tmp_path, progress=False)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "ckpt-3.bq" and load_checkpoint(ckpt)["step"] == 3


def test_a_nan_in_the_data_stops_with_the_step_named(train, tmp_path):
    x = train.x.clone()
    x[17, 0, 5, 5] = float("nan")
    data = InMemoryDataset(x, train.y, name="poisoned")
    bad_step = int((data.epoch_order(0, 0) == 17).nonzero()) // BATCH
    model, guide = _setup(data)
    with pytest.raises(NonFiniteError, match=rf"step {bad_step}"):
        fit_svi(model, guide, data, num_epochs=1, batch_size=BATCH, checkpoint_dir=tmp_path, progress=False)
    assert latest_checkpoint(tmp_path).name == f"ckpt-{bad_step}.bq"


def test_skip_leaves_the_parameters_and_optimizer_untouched_for_that_step_only(train):
    model, guide = _setup(train)
    _poison(guide, "loc", "net.3.bias", at_step=6)
    snaps, callback = _snapshots(guide)
    optim = __import__("pyro").optim.Adam({"lr": 1e-2})
    result = fit_svi(model, guide, train, num_steps=STEPS, batch_size=BATCH, optim=optim, on_nonfinite="skip",
                     progress=False, callback=callback)
    assert result.skipped_steps == [6] and result.steps == STEPS and len(result.losses) == STEPS - 1
    assert torch.equal(snaps[7]["loc"], snaps[6]["loc"])  # the skipped step changed nothing
    assert not torch.equal(snaps[8]["loc"], snaps[7]["loc"])  # the next one trains again
    assert all(torch.isfinite(v).all() for v in guide.state_dict().values())
    adam = next(iter(optim.get_state().values()))
    assert int(adam["state"][0]["step"]) == STEPS - 1


def test_the_guard_does_not_fire_on_a_healthy_run(train):
    model, guide = _setup(train)
    result = fit_svi(model, guide, train, num_steps=4, batch_size=BATCH, progress=False)
    assert result.skipped_steps == [] and len(result.losses) == 4
