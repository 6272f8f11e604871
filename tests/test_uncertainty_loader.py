"""The uncertainty functions on DataLoaders and batch iterables equal their in-memory results."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_bq import IIDNormal
from pyro_bq.data import InMemoryDataset
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference.batches import BatchError, NonFiniteBatchError
from pyro_bq.models import MLP, BayesianClassifier
from pyro_bq.uncertainty import evaluate, predictive_logits, to_arviz, uncertainty_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(n=60, seed=0):
    torch.manual_seed(seed)
    model = BayesianClassifier(MLP((784, 16, 10)), IIDNormal(1.0), dataset_size=100)
    guide = AutoMeanFieldNormal(model, init_scale=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    guide.setup(x[:2])
    return model, guide, InMemoryDataset(x, y)


def _loader(data, batch_size=16, shuffle=False):
    return DataLoader(TensorDataset(data.x, data.y), batch_size=batch_size, shuffle=shuffle)


def test_predictive_logits_on_a_loader_and_a_list_equal_in_memory():
    model, guide, data = _setup()
    ref = predictive_logits(model, guide, data, num_samples=5, seed=3)
    batches = [(data.x[i:i + 7], data.y[i:i + 7]) for i in range(0, 60, 7)]
    for source in (_loader(data), batches):
        got = predictive_logits(model, guide, source, num_samples=5, seed=3, device="cpu")
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_evaluate_on_loaders_equals_in_memory():
    model, guide, data = _setup()
    _, _, ood = _setup(n=40, seed=5)
    ref = evaluate(model, guide, data, ood, num_samples=6, seed=1)
    got = evaluate(model, guide, _loader(data), _loader(ood, 9), num_samples=6, seed=1, device="cpu")
    assert set(got) == set(ref)
    for key, value in ref.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # a shuffling loader pairs each label with its own prediction, so the figures stay the same
    mixed = evaluate(model, guide, _loader(data, shuffle=True), ood, num_samples=6, seed=1)
    assert mixed["accuracy"] == pytest.approx(ref["accuracy"])
    assert mixed["nll"] == pytest.approx(ref["nll"], rel=1e-5)
    assert mixed["auroc_mi"] == pytest.approx(ref["auroc_mi"], rel=1e-6)


def test_uncertainty_scores_on_a_loader_equal_in_memory():
    model, guide, data = _setup()
    ref = uncertainty_scores(model, guide, {"a": data, "b": data.x}, num_samples=4, seed=2)
    got = uncertainty_scores(model, guide, {"a": _loader(data), "b": _loader(data, 11)}, num_samples=4, seed=2)
    for name in ref:
        for part in ("mean_probs", "total", "aleatoric", "epistemic"):
            assert torch.allclose(got[name][part], ref[name][part], rtol=1e-5, atol=1e-5), (name, part)


def test_to_arviz_on_a_loader_equals_in_memory():
    model, guide, data = _setup()
    ref = to_arviz(model, guide, data, None, num_samples=5, seed=0)
    got = to_arviz(model, guide, _loader(data), None, num_samples=5, seed=0, device="cpu")
    for group in ("posterior", "log_likelihood", "posterior_predictive", "observed_data"):
        a, b = getattr(ref, group), getattr(got, group)
        for var in a.data_vars:
            assert np.allclose(a[var].values, b[var].values, atol=1e-5), (group, var)
    with pytest.raises(ValueError, match="y must be None"):
        to_arviz(model, guide, _loader(data), data.y, num_samples=2)


def test_a_bad_batch_in_evaluate_names_its_index():
    model, guide, data = _setup()
    x = data.x.clone()
    x[37, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteBatchError, match=r"in_data: batch 2 of epoch 0.*row\(s\) \[5\]"):
        evaluate(model, guide, _loader(InMemoryDataset(x, data.y)), num_samples=2)
    bad = [(data.x[:10], data.y[:10]), (data.x[10:20], data.y[10:20] - 20)]
    with pytest.raises(BatchError, match=r"ood: batch 1 of epoch 0"):
        uncertainty_scores(model, guide, {"ood": bad}, num_samples=2)
    with pytest.raises(BatchError, match=r"in_data: batch 1 .*not an \(x, y\) pair"):
        evaluate(model, guide, [(data.x[:5], data.y[:5]), (data.x[5:10],)], num_samples=2)


def test_a_one_shot_generator_is_refused():
    model, guide, data = _setup()
    with pytest.raises(TypeError, match="one-shot"):
        predictive_logits(model, guide, ((data.x[i:i + 5], data.y[i:i + 5]) for i in range(0, 60, 5)),
                          num_samples=2)
