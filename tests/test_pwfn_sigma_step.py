"""SigmaSGD: SGD on sigma = softplus(raw) itself (the authors' parameterisation), and the driver's scale_step."""

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro_bq import IIDNormal
from pyro_bq.guides import init_to_pretrained
from pyro_bq.guides.meanfield import softplus_inverse
from pyro_bq.inference import fit_svi
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.pwfn import PWFN, AutoPWFN
from pyro_bq.pwfn.optim import SigmaSGD


def _loss(sigma, target):
    return ((sigma - target) ** 2 * torch.arange(1.0, sigma.numel() + 1, dtype=sigma.dtype)).sum()


def test_sigma_space_steps_match_sgd_on_sigma_itself():
    target = torch.tensor([0.05, 0.004, 0.02, 0.3], dtype=torch.float64)
    start = torch.tensor([2.0**-9, 0.006, 0.02, 0.1], dtype=torch.float64)
    sigma = start.clone().requires_grad_(True)
    raw = softplus_inverse(start).requires_grad_(True)
    plain = torch.optim.SGD([sigma], lr=0.01, momentum=0.9)
    ours = SigmaSGD([raw], lr=0.01, momentum=0.9, sigma_space=True)
    for _ in range(20):
        for opt, p, s in ((plain, sigma, sigma), (ours, raw, None)):
            opt.zero_grad()
            _loss(s if s is not None else F.softplus(p), target).backward()
            opt.step()
    torch.testing.assert_close(F.softplus(raw).detach(), sigma.detach(), rtol=1e-9, atol=1e-12)
    assert float((F.softplus(raw.detach()) - start).abs().max()) > 1e-3  # it moved


def test_sigma_space_floor_and_plain_mode():
    raw = softplus_inverse(torch.tensor([1e-3, 1e-3])).requires_grad_(True)
    opt = SigmaSGD([raw], lr=1.0, sigma_space=True, sigma_min=2.0**-30)
    raw.grad = torch.tensor([1.0, 0.0])  # a huge step down on the first, no gradient on the second
    opt.step()
    assert F.softplus(raw)[0].item() == pytest.approx(2.0**-30, rel=1e-4)
    assert torch.equal(raw[1], softplus_inverse(torch.tensor(1e-3)))  # untouched, not round-tripped
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    plain = SigmaSGD([w], lr=0.5)
    w.grad = torch.tensor([1.0, -2.0])
    plain.step()
    assert w.tolist() == [0.5, 3.0]
    with pytest.raises(TypeError, match="sigma_space"):
        SigmaSGD([w], lr=0.1, sigma_space=1)
    with pytest.raises(ValueError, match="momentum"):
        SigmaSGD([w], lr=0.1, momentum=1.0)


def _run(train, scale_step):
    pyro.clear_param_store()
    torch.manual_seed(0)
    net = LeNet5().eval()
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=len(train))
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    x0, y0 = next(train.batches(64))
    guide.setup(x0, y0)
    before = F.softplus(guide.scale_raw.detach()).clone()
    run = PWFN(model, guide, train, preset="paper", batch_size=64, scale_step=scale_step, progress=False, log=None)
    fit_svi(model, guide, train, num_steps=5, batch_size=64, optim=run._optimizer(), elbo=run.objective,
            progress=False, step_hook=guide.enforce_fixed_)
    return (F.softplus(guide.scale_raw.detach()) - before).abs().median()


def test_paper_preset_moves_sigma_only_when_stepping_sigma(mnist_small):
    train, _ = mnist_small
    raw_move = _run(train, "raw")
    sigma_move = _run(train, "sigma")
    # SGD on raw moves sigma by sigmoid(raw)**2 (~1e-5) times the step on sigma itself
    assert sigma_move > 1000 * raw_move
    assert sigma_move > 1e-6


def test_scale_step_validation(mnist_small):
    train, _ = mnist_small
    net = LeNet5()
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=len(train))
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    with pytest.raises(ValueError, match="scale_step"):
        PWFN(model, guide, train, preset="paper", scale_step="log")
    with pytest.raises(ValueError, match="scale_step"):
        PWFN(model, guide, train, preset="fast", scale_step="sigma")
    assert PWFN(model, guide, train, progress=False, log=None).scale_step == "raw"
