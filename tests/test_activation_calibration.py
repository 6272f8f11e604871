"""An uncalibrated fake-quant activation refuses to run instead of outputting zeros."""

import pyro
import pytest
import torch
from guide_contract import tiny_classifier
from pyro.infer import Predictive

from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import batched_forward
from pyro_bq.quant import UncalibratedActivationError, calibrate_activations_, check_calibrated, quantize_activations
from pyro_bq.uncertainty import predictive_probs


@pytest.fixture
def lenet():
    model, x, y = tiny_classifier("lenet")
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    guide(x, y)
    return model, guide, x


def test_an_uncalibrated_activation_raises_and_names_the_calibration_call(lenet):
    model, guide, x = lenet
    qm = quantize_activations(model, 4)  # range="calibrated", no data: nothing calibrated yet
    draws = {k: v[None] for k, v in guide.median().items()}
    for run in (lambda: batched_forward(qm, draws, x),
                lambda: predictive_probs(qm, guide, x, num_samples=2, seed=0),
                lambda: Predictive(qm, guide=guide, num_samples=1, return_sites=["logits"])(x),
                lambda: check_calibrated(qm)):
        with pytest.raises(UncalibratedActivationError, match="calibrate_activations_"):
            run()
    calibrate_activations_(qm, guide, x, num_samples=1)
    check_calibrated(qm)
    logits = batched_forward(qm, draws, x)[0]
    assert not torch.allclose(logits, logits[:1].expand_as(logits))  # inputs get their own predictions
    probs = predictive_probs(qm, guide, x, num_samples=2, seed=0)
    assert not torch.allclose(probs[0], probs[0, :1].expand_as(probs[0]))
    pyro.set_rng_seed(0)
    assert Predictive(qm, guide=guide, num_samples=1, return_sites=["logits"])(x)["logits"].shape == (1, len(x), 10)


def test_natural_ranges_need_no_calibration(lenet):
    model, guide, x = lenet
    qm = quantize_activations(model, 4, activation="relu6", range="natural")
    check_calibrated(qm)
    assert torch.isfinite(batched_forward(qm, guide.sample_latents(2), x)).all()


def _ranges(qm):
    return [(m.lo.clone(), m.hi.clone(), m.ready.clone()) for m in qm.net.modules() if hasattr(m, "ready")]


def test_calibration_from_a_dataloader_equals_calibration_from_the_tensor(lenet):
    from torch.utils.data import DataLoader, TensorDataset

    model, guide, x = lenet
    y = torch.zeros(len(x), dtype=torch.long)
    ref = quantize_activations(model, 4, guide=guide, data=x, num_samples=3, seed=1)
    for data in (DataLoader(TensorDataset(x, y), batch_size=3), [x[:2], x[2:]], [(x[:1], y[:1]), (x[1:], y[1:])]):
        got = quantize_activations(model, 4, guide=guide, data=data, num_samples=3, seed=1, device="cpu")
        for (lo, hi, ready), (lo2, hi2, ready2) in zip(_ranges(ref), _ranges(got)):
            assert torch.equal(ready, ready2)
            assert torch.allclose(lo, lo2, atol=1e-6) and torch.allclose(hi, hi2, atol=1e-6)
    qm = quantize_activations(model, 4)
    with pytest.raises(TypeError, match="batch 1"):
        calibrate_activations_(qm, guide, [x[:2], torch.zeros(2, dtype=torch.long)])
    with pytest.raises(TypeError, match="data must be"):
        calibrate_activations_(qm, guide, 3)
