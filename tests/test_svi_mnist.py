"""Stock Pyro SVI on real MNIST, and save/reload of what was learned."""

import pyro
import pytest
import torch
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import batched_forward
from pyro_bq.io import load_checkpoint, save_checkpoint
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.recipes import fit_meanfield_bnn


def _accuracy(model, guide, data, num_samples=8):
    probs = batched_forward(model, guide.sample_latents(num_samples), data.x).softmax(-1).mean(0)
    return (probs.argmax(-1) == data.y).float().mean().item()


def _nll(model, guide, data, num_samples=4):
    logits = batched_forward(model, guide.sample_latents(num_samples), data.x)
    return torch.nn.functional.cross_entropy(logits.mean(0), data.y).item()


def test_stock_svi_on_real_mnist_lowers_the_loss_and_beats_chance(mnist_small):
    train, test = mnist_small
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train))
    guide = AutoMeanFieldNormal(model, init_scale=1e-3).setup(train.x[:2], train.y[:2])
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-3}), TraceMeanField_ELBO())
    nll_before = _nll(model, guide, train)
    losses = []
    for epoch in range(3):
        for xb, yb in train.batches(100, shuffle=True, epoch=epoch):
            losses.append(svi.step(xb, yb))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first
    assert _nll(model, guide, train) < 0.3 * nll_before
    acc = _accuracy(model, guide, test)
    assert acc > 0.80, acc  # chance is 0.10


def test_save_and_reload_model_and_guide_gives_identical_predictions(mnist_small, tmp_path):
    train, test = mnist_small
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train))
    guide, _ = fit_meanfield_bnn(model, train.subset(500), num_steps=20, batch_size=50, progress=False)
    save_checkpoint(tmp_path / "run.bq", {"model": model.state_dict(), "guide": guide.state_dict()})

    state = load_checkpoint(tmp_path / "run.bq")
    model2 = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train))
    guide2 = AutoMeanFieldNormal(model2).setup(test.x[:2])
    model2.load_state_dict(state["model"])
    guide2.load_state_dict(state["guide"])

    x = test.x[:200]
    pyro.set_rng_seed(7)
    a = Predictive(model, guide=guide, num_samples=5, return_sites=["logits"])(x)["logits"]
    pyro.set_rng_seed(7)
    b = Predictive(model2, guide=guide2, num_samples=5, return_sites=["logits"])(x)["logits"]
    assert torch.equal(a, b)
    torch.manual_seed(3)
    sa = guide.sample_latents(4)
    torch.manual_seed(3)
    sb = guide2.sample_latents(4)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_full_mnist_lenet_reaches_high_accuracy(data_root):
    from pyro_bq.data import load_mnist

    train, test = load_mnist(data_root, train=True), load_mnist(data_root, train=False)
    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=len(train))
    guide, _ = fit_meanfield_bnn(model, train, num_epochs=3, batch_size=128, lr=1e-3, progress=False)
    assert _accuracy(model, guide, test, num_samples=16) > 0.98
