"""Predictive sampling, the uncertainty decomposition, evaluate() and the plots."""

import math

import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.inference import fit_svi, prediction
from pyro_bq.models import MLP, BayesianClassifier, BayesianRegressor
from pyro_bq.uncertainty import (
    accuracy,
    auroc,
    decompose,
    decompose_regression,
    ece,
    evaluate,
    evaluate_details,
    nll,
    plot_reliability,
    plot_uncertainty,
    predictive_logits,
    predictive_probs,
    predictive_regression,
    sample_weights,
    uncertainty_scores,
)


# a shared, loaded CPU: one intra-op thread avoids oversubscription stalls
pytestmark = pytest.mark.usefixtures("one_thread")


# -- decomposition on hand-built probabilities --------------------------------------------
def test_identical_samples_have_zero_mutual_information():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, 20, 6, generator=g), -1).expand(9, 20, 6)
    parts = decompose(p)
    assert torch.allclose(parts["epistemic"], torch.zeros(20), atol=1e-6)
    assert torch.allclose(parts["total"], parts["aleatoric"], atol=1e-6)
    assert torch.allclose(parts["mean_probs"], p[0])


@pytest.mark.parametrize("k", [2, 3, 10])
def test_k_disagreeing_one_hot_samples_give_log_k(k):
    p = torch.eye(k).unsqueeze(1)  # sample s puts all mass on class s: (K, 1, K)
    parts = decompose(p)
    assert parts["epistemic"].item() == pytest.approx(math.log(k), abs=1e-6)
    assert parts["total"].item() == pytest.approx(math.log(k), abs=1e-6)
    assert parts["aleatoric"].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("k", [2, 7])
def test_uniform_prediction_has_total_entropy_log_k(k):
    p = torch.full((4, 3, k), 1.0 / k)
    parts = decompose(p)
    assert torch.allclose(parts["total"], torch.full((3,), math.log(k)), atol=1e-6)
    assert torch.allclose(parts["aleatoric"], torch.full((3,), math.log(k)), atol=1e-6)
    assert torch.allclose(parts["epistemic"], torch.zeros(3), atol=1e-6)


def test_confident_draws_that_disagree_are_all_epistemic():
    parts = decompose(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # two draws, one input, zero probabilities
    assert torch.allclose(parts["epistemic"], torch.full((1,), math.log(2)))
    assert torch.equal(parts["aleatoric"], torch.zeros(1))


def test_decomposition_adds_up_and_accepts_a_single_input():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(3 * torch.randn(30, 8, 5, generator=g), -1)
    parts = decompose(p)
    assert torch.allclose(parts["total"], parts["aleatoric"] + parts["epistemic"], atol=1e-6)
    assert bool((parts["epistemic"] >= 0).all()) and bool((parts["total"] <= math.log(5) + 1e-6).all())
    single = decompose(p[:, 0])  # (S, C)
    assert torch.allclose(single["epistemic"], parts["epistemic"][:1])


def test_decompose_rejects_non_probabilities():
    with pytest.raises(ValueError, match="sum to 1"):
        decompose(torch.full((2, 3, 4), 0.3))
    with pytest.raises(ValueError, match="dimensions"):
        decompose(torch.full((4,), 0.25))
    with pytest.raises(TypeError, match="probs"):
        decompose([[0.5, 0.5]])


def test_decompose_regression_by_hand():
    loc = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # draws x inputs
    parts = decompose_regression(loc, 0.5)
    assert torch.allclose(parts["mean"], torch.tensor([2.0, 0.0]))
    assert torch.allclose(parts["epistemic"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(parts["aleatoric"], torch.tensor([0.25, 0.25]))
    assert torch.allclose(parts["total"], torch.tensor([1.25, 0.25]))
    hetero = decompose_regression(loc, torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
    assert torch.allclose(hetero["aleatoric"], torch.tensor([5.0, 4.0]))
    with pytest.raises(ValueError, match="noise_scale"):
        decompose_regression(loc, -1.0)


# -- predictive sampling -----------------------------------------------------------------
def _tiny(seed=0):
    torch.manual_seed(seed)
    model = BayesianClassifier(MLP((784, 16, 10)), IIDNormal(1.0), dataset_size=100)
    guide = AutoMeanFieldNormal(model, init_scale=0.2)
    x = torch.randn(23, 1, 28, 28)
    guide.setup(x[:2])
    return model, guide, x


def test_vectorized_and_predictive_paths_agree_for_the_same_draws():
    model, guide, x = _tiny()
    draws = sample_weights(model, guide, 6)
    fast = predictive_probs(model, guide, x, samples=draws, batch_size=5, sample_chunk=4)
    slow = predictive_probs(model, guide, x, samples=draws, method="predictive", batch_size=10)
    assert fast.shape == (6, 23, 10)
    assert torch.allclose(fast, slow, atol=1e-5)
    # the same seed gives the same draws on both paths
    a = predictive_probs(model, guide, x, num_samples=5, seed=3)
    b = predictive_probs(model, guide, x, num_samples=5, seed=3, method="predictive")
    assert torch.allclose(a, b, atol=1e-5)
    c = predictive_probs(model, guide, x, num_samples=5, seed=4)
    assert not torch.allclose(a, c)


def test_generic_pyro_guide_uses_predictive_and_matches_vectorized():
    model, _, x = _tiny()
    y = torch.randint(0, 10, (len(x),))
    guide = AutoNormal(model)
    guide(x, y)  # create its parameters
    a = predictive_probs(model, guide, x, num_samples=4, seed=1)  # draws from Predictive(guide), vmap'ed net
    b = predictive_probs(model, guide, x, num_samples=4, seed=1, method="predictive", batch_size=9)
    assert a.shape == (4, 23, 10)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a[0], a[1])  # draws differ


def test_chunking_gives_the_same_numbers_and_few_vectorized_calls(monkeypatch):
    model, guide, x = _tiny()
    draws = sample_weights(model, guide, 10)
    calls = []
    original = prediction.batched_forward

    def counting(model, samples, xb):
        calls.append((next(iter(samples.values())).shape[0], xb.shape[0]))
        return original(model, samples, xb)

    monkeypatch.setattr(prediction, "batched_forward", counting)
    whole = predictive_logits(model, None, x, samples=draws, batch_size=100, sample_chunk=100)
    assert calls == [(10, 23)]  # all 10 draws in one vectorized pass
    calls.clear()
    chunked = predictive_logits(model, None, x, samples=draws, batch_size=10, sample_chunk=4)
    # ceil(10/4) sample chunks x ceil(23/10) input batches, never one pass per draw
    assert sorted(calls) == sorted([(s, n) for s in (4, 4, 2) for n in (10, 10, 3)])
    assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-4)
    calls.clear()
    # the default: as many draws per pass as fit the byte budget
    per_input = prediction.activation_bytes_per_sample(model.functional_net(draws, x)[0], x[:1])
    budget = predictive_logits(model, None, x, samples=draws, batch_size=10, max_bytes=per_input * 10 * 3)
    assert calls == [(3, 10), (3, 10), (3, 3)] * 3 + [(1, 10), (1, 10), (1, 3)]
    assert torch.allclose(whole, budget, rtol=1e-5, atol=1e-4)


def test_drawing_chunk_by_chunk_keeps_draws_shared_across_input_batches():
    model, guide, x = _tiny()
    # identical inputs in two different input batches must see the same draws
    xx = torch.cat([x[:3], x[:3]])
    p = predictive_probs(model, guide, xx, num_samples=7, batch_size=3, sample_chunk=2, seed=0)
    assert torch.allclose(p[:, :3], p[:, 3:], atol=1e-6)


def test_seeded_draws_do_not_depend_on_chunking_or_method():
    model, guide, x = _tiny()
    a = predictive_probs(model, guide, x, num_samples=12, seed=7)
    b = predictive_probs(model, guide, x, num_samples=12, seed=7, batch_size=4, sample_chunk=5)
    c = predictive_probs(model, guide, x, num_samples=12, seed=7, method="predictive", batch_size=11)
    d = predictive_probs(model, guide, x[5:9], num_samples=12, seed=7)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    assert torch.allclose(a[:, 5:9], d, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -3])
def test_num_samples_below_one_raises(bad):
    model, guide, x = _tiny()
    with pytest.raises(ValueError, match="num_samples"):
        predictive_probs(model, guide, x, num_samples=bad)
    with pytest.raises(ValueError, match="num_samples"):
        sample_weights(model, guide, bad)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(model, guide, (x, torch.zeros(len(x), dtype=torch.long)), num_samples=bad)


def test_predictive_rejects_bad_arguments():
    model, guide, x = _tiny()
    with pytest.raises(TypeError, match="x"):
        predictive_probs(model, guide, x.numpy(), num_samples=2)
    with pytest.raises(ValueError, match="method"):
        predictive_probs(model, guide, x, num_samples=2, method="fast")
    with pytest.raises(ValueError, match="batch_size"):
        predictive_probs(model, guide, x, num_samples=2, batch_size=0)
    draws = sample_weights(model, guide, 3)
    with pytest.raises(ValueError, match="num_samples"):
        predictive_probs(model, guide, x, num_samples=5, samples=draws)
    draws.pop("net.1.weight")
    with pytest.raises(ValueError, match="net.1.weight"):
        predictive_probs(model, None, x, samples=draws)


def test_regression_uncertainty():
    torch.manual_seed(0)
    model = BayesianRegressor(torch.nn.Linear(3, 1), IIDNormal(1.0), dataset_size=50, noise=0.3)
    guide = AutoMeanFieldNormal(model, init_scale=0.5)
    x = torch.randn(40, 3)
    guide.setup(x[:2], torch.zeros(2))
    pred = predictive_regression(model, guide, x, num_samples=50, seed=0)
    assert pred["loc"].shape == (50, 40)
    parts = decompose_regression(pred["loc"], pred["noise_scale"])
    assert torch.allclose(parts["aleatoric"], torch.full((40,), 0.09))
    assert torch.allclose(parts["epistemic"], pred["loc"].var(0, unbiased=False))
    fresh = AutoMeanFieldNormal(BayesianRegressor(torch.nn.Linear(3, 1), IIDNormal(1.0), dataset_size=50, noise=0.3))
    with pytest.raises(ValueError, match="setup"):
        predictive_regression(fresh.model, fresh, x, num_samples=2)
    # far-away inputs are more uncertain about the mean (weight uncertainty grows with |x|)
    far = predictive_regression(model, guide, 10 * x, num_samples=50, seed=0)
    assert decompose_regression(far["loc"], 0.3)["epistemic"].mean() > parts["epistemic"].mean()


# -- evaluate() on real MNIST and Fashion-MNIST ------------------------------------------------
@pytest.fixture(scope="module")
def trained(mnist_small, data_root):
    from pyro_bq.data import load_fashion_mnist

    train, test = mnist_small
    torch.manual_seed(0)
    model = BayesianClassifier(MLP((784, 100, 10)), IIDNormal(1.0), dataset_size=len(train))
    guide = AutoMeanFieldNormal(model, init_scale=1e-3)
    fit_svi(model, guide, train, num_epochs=2, batch_size=100, lr=5e-3, progress=False)
    fashion = load_fashion_mnist(data_root, train=False, limit=500)
    return model, guide, test.subset(500), fashion


def test_evaluate_on_mnist_vs_fashion(trained):
    model, guide, test, fashion = trained
    record, details = evaluate_details(model, guide, test, fashion, num_samples=20, seed=5)
    assert evaluate(model, guide, test, fashion, num_samples=20, seed=5) == record
    for key in ("accuracy", "nll", "brier", "ece", "aleatoric_in", "epistemic_in", "aleatoric_out", "epistemic_out", "auroc_mi"):
        assert key in record and math.isfinite(record[key]), key
    assert 0.8 < record["accuracy"] <= 1.0  # chance is 0.1
    assert 0 <= record["ece"] <= 1 and 0 <= record["brier"] <= 2
    assert 0 <= record["auroc_mi"] <= 1
    assert record["epistemic_out"] > record["epistemic_in"]
    assert record["auroc_mi"] > 0.6
    # the record agrees with the building blocks run on the same draws
    probs = predictive_probs(model, guide, test, num_samples=20, seed=5)
    assert record["accuracy"] == pytest.approx(accuracy(probs, test.y))
    assert record["nll"] == pytest.approx(nll(probs, test.y), rel=1e-5)
    assert record["ece"] == pytest.approx(ece(probs, test.y), rel=1e-5, abs=1e-7)
    assert record["auroc_mi"] == pytest.approx(auroc(details["in"]["epistemic"], details["ood"]["epistemic"]))
    assert "auroc_aleatoric_ambiguous" not in record


def test_evaluate_with_an_ambiguous_set(trained):
    model, guide, test, fashion = trained
    # blends of two digits stand in for ambiguous inputs
    amb = 0.5 * (test.x[:200] + test.x[200:400])
    record = evaluate(model, guide, test, ambiguous_data=amb, num_samples=10)
    assert 0 <= record["auroc_aleatoric_ambiguous"] <= 1
    assert record["aleatoric_ambiguous"] > record["aleatoric_in"]
    assert "auroc_mi" not in record


def test_evaluate_rejects_bad_data(trained):
    model, guide, test, fashion = trained
    with pytest.raises(ValueError, match="in_data needs labels"):
        evaluate(model, guide, test.x, fashion, num_samples=2)
    with pytest.raises(TypeError, match="ood_data"):
        evaluate(model, guide, test, "fashion", num_samples=2)


def test_plots_are_written(trained, tmp_path):
    model, guide, test, fashion = trained
    parts = uncertainty_scores(model, guide, {"MNIST": test, "Fashion-MNIST": fashion}, num_samples=10)
    fig = plot_uncertainty(parts, tmp_path / "unc.png")
    assert (tmp_path / "unc.png").stat().st_size > 1000
    assert len(fig.axes) == 2
    fig = plot_reliability(parts["MNIST"]["mean_probs"], test.y, tmp_path / "sub" / "rel.png")
    assert (tmp_path / "sub" / "rel.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="lacks"):
        plot_uncertainty({"a": {"total": torch.ones(3)}})
