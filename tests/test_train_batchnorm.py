"""BatchNorm under weight sampling: deterministic affine parameters, running statistics updated only by SVI's
training steps (training mode, each sampled network's batch statistics), never by a guide's setup or by
prediction draws, which read them in eval mode."""

from __future__ import annotations

import copy

import pytest
import torch

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal, init_to_pretrained
from pyro_bq.inference import fit_svi, predict_batched, predict_looped
from pyro_bq.models import BayesianClassifier, ResNet20

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_model(n=40, blocks=1):
    torch.manual_seed(0)
    net = ResNet20(num_classes=10, in_channels=1, blocks_per_stage=blocks)
    model = BayesianClassifier(copy.deepcopy(net), IIDNormal(1.0), dataset_size=n)
    return net, model


def _stats(model):
    return {k: v.clone() for k, v in model.net.named_buffers()}


def test_bn_affine_parameters_stay_deterministic_sites(mnist_small):
    _, model = _bn_model()
    assert not any("bn" in s or "shortcut.1" in s for s in model.weight_sites)
    assert any("bn1.weight" in name for name, _ in model.net.named_parameters())


def test_svi_updates_running_statistics_in_training_mode_and_restores_the_modules_modes(mnist_small):
    train = mnist_small[0].subset(40)
    net, model = _bn_model()
    model.eval()
    guide = AutoMeanFieldNormal(model, init_loc_fn=init_to_pretrained(net), init_scale=1e-3)
    before = _stats(model)
    fit_svi(model, guide, train, num_steps=2, batch_size=20, progress=False)
    after = _stats(model)
    assert not model.training and not any(m.training for m in model.modules())
    assert all(not torch.equal(before[k], after[k]) for k in before if "num_batches" not in k)
    assert int(after["bn1.num_batches_tracked"]) == 2  # two training steps; the guide's setup left them alone


def test_the_guide_setup_leaves_running_statistics_alone(mnist_small):
    train = mnist_small[0].subset(40)
    net, model = _bn_model()
    before = _stats(model)
    guide = AutoMeanFieldNormal(model, init_loc_fn=init_to_pretrained(net))
    fit_svi(model, guide, train, num_steps=1, batch_size=40, progress=False)
    assert int(model.net.bn1.num_batches_tracked) == int(before["bn1.num_batches_tracked"]) + 1
    assert model.training  # a model in training mode stays so


@pytest.mark.parametrize("mode", [True, False])
def test_prediction_draws_never_update_running_statistics_and_both_paths_agree(mnist_small, mode):
    train, test = mnist_small[0].subset(40), mnist_small[1]
    net, model = _bn_model()
    guide = AutoMeanFieldNormal(model, init_loc_fn=init_to_pretrained(net), init_scale=1e-2)
    fit_svi(model, guide, train, num_steps=2, batch_size=20, progress=False)
    model.train(mode)
    before = _stats(model)
    torch.manual_seed(1)
    fast = predict_batched(model, guide, test.x[:16], num_samples=3)
    torch.manual_seed(1)
    slow = predict_looped(model, guide, test.x[:16], num_samples=3)
    assert all(torch.equal(before[k], v) for k, v in _stats(model).items())
    assert torch.allclose(fast, slow, atol=1e-4)  # both normalize with the running statistics
    assert model.training == mode


def test_train_mode_false_keeps_batchnorm_a_fixed_affine_map_and_a_resume_must_agree(mnist_small, tmp_path):
    train = mnist_small[0].subset(40)
    net, model = _bn_model()
    model.train()
    guide = AutoMeanFieldNormal(model, init_loc_fn=init_to_pretrained(net), init_scale=1e-3)
    before = _stats(model)
    result = fit_svi(model, guide, train, num_steps=2, batch_size=20, progress=False, train_mode=False,
                     checkpoint_dir=tmp_path)
    assert result.steps == 2
    after = _stats(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics neither used up nor moved
    assert model.training  # each module back in its own mode
    # the loss sees the weight noise through the frozen statistics: the guide's loc moved
    assert any(not torch.equal(guide.get_loc_scale(n)[0], init) for n, init in
               ((n, net.state_dict()[n.removeprefix("net.")]) for n in guide.sites))
    with pytest.raises(ValueError, match="train_mode=False"):
        fit_svi(model, guide, train, num_steps=3, batch_size=20, progress=False, train_mode=True,
                checkpoint_dir=tmp_path)
    with pytest.raises(TypeError, match="train_mode"):
        fit_svi(model, guide, train, num_steps=1, batch_size=20, progress=False, train_mode="eval")
