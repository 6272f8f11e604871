"""Metrics: accuracy, NLL, Brier, ECE / reliability data and rank-based AUROC."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bq.uncertainty import accuracy, auroc, brier, ece, nll, reliability_data


def _brute_auroc(a, b):
    """P(out > in) + 0.5 P(out == in) by counting every pair."""
    a = torch.as_tensor(a, dtype=torch.float64)[:, None]
    b = torch.as_tensor(b, dtype=torch.float64)[None, :]
    return ((b > a).double() + 0.5 * (b == a).double()).mean().item()


# -- AUROC ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-5, 5), min_size=1, max_size=40),
    st.lists(st.integers(-5, 5), min_size=1, max_size=40),
)
def test_auroc_equals_brute_force_pair_count_with_ties(a, b):
    # small integer ranges force many ties
    assert auroc(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)) == pytest.approx(
        _brute_auroc(a, b), abs=1e-12
    )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=60),
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=60),
)
def test_auroc_equals_brute_force_on_real_scores(a, b):
    assert auroc(a, b) == pytest.approx(_brute_auroc(a, b), abs=1e-12)


def test_auroc_random_scores_and_limits():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, generator=g), torch.randn(200, generator=g) + 1.0
    assert auroc(a, b) == pytest.approx(_brute_auroc(a, b), abs=1e-12)
    assert auroc(a, a + 100) == 1.0
    assert auroc(a + 100, a) == 0.0
    assert auroc(torch.ones(5), torch.ones(7)) == 0.5
    # swapping the roles mirrors the value
    assert auroc(b, a) == pytest.approx(1 - auroc(a, b), abs=1e-12)


@pytest.mark.parametrize("bad_in, bad_out", [([], [1.0]), ([1.0], []), (torch.empty(0), torch.ones(3))])
def test_auroc_with_an_empty_set_raises(bad_in, bad_out):
    with pytest.raises(ValueError, match="empty"):
        auroc(bad_in, bad_out)


def test_auroc_rejects_nan_and_matrices():
    with pytest.raises(ValueError, match="finite"):
        auroc(torch.tensor([0.1, float("nan")]), torch.ones(2))
    with pytest.raises(ValueError, match="score_out"):
        auroc(torch.ones(3), torch.ones(2, 2))


# -- ECE -----------------------------------------------------------------------------------
def _binary(conf_correct):
    """Two-class probabilities with confidence ``c`` on class 0; labels 0 (right) or 1 (wrong)."""
    probs, labels = [], []
    for c, n_total, n_right in conf_correct:
        for i in range(n_total):
            probs.append([c, 1 - c])
            labels.append(0 if i < n_right else 1)
    return torch.tensor(probs, dtype=torch.float64), torch.tensor(labels)


def test_ece_is_zero_when_perfectly_calibrated():
    # in each bin the fraction of correct predictions equals the confidence
    probs, y = _binary([(0.6, 5, 3), (0.8, 10, 8), (0.9, 20, 18), (1.0, 4, 4)])
    assert ece(probs, y) == pytest.approx(0.0, abs=1e-12)
    rel = reliability_data(probs, y)
    nonempty = rel["counts"] > 0
    assert torch.allclose(rel["accuracy"][nonempty], rel["confidence"][nonempty])


def test_ece_matches_a_hand_computation():
    # three inputs, 3 classes; confidences 0.5, 0.7, 0.95
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.7, 0.2], [0.95, 0.03, 0.02]])
    y = torch.tensor([0, 0, 0])  # right, wrong, right
    # 15 bins of width 1/15: 0.5 -> bin 7 ((7/15, 8/15]), 0.7 -> bin 10, 0.95 -> bin 14
    hand = (abs(1 - 0.5) + abs(0 - 0.7) + abs(1 - 0.95)) / 3
    assert ece(probs, y) == pytest.approx(hand, abs=1e-7)
    # with 2 bins, 0.5 falls in (0, 0.5] and 0.7, 0.95 share (0.5, 1]
    hand2 = (1 / 3) * abs(1 - 0.5) + (2 / 3) * abs(0.5 - (0.7 + 0.95) / 2)
    assert ece(probs, y, num_bins=2) == pytest.approx(hand2, abs=1e-7)
    rel = reliability_data(probs, y)
    assert rel["counts"].sum() == 3
    assert rel["counts"][[7, 10, 14]].tolist() == [1, 1, 1]
    assert len(rel["edges"]) == 16
    assert torch.isnan(rel["accuracy"][0])


def test_ece_averages_a_sample_dimension_first():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(6, 40, 4, generator=g), -1)
    y = torch.randint(0, 4, (40,), generator=g)
    assert ece(probs, y) == pytest.approx(ece(probs.mean(0), y), abs=1e-12)


# -- accuracy, NLL, Brier ------------------------------------------------------------------
def test_accuracy_nll_brier_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    y = torch.tensor([0, 0, 1])
    assert accuracy(probs, y) == pytest.approx(1 / 3)
    assert nll(probs, y) == pytest.approx(-(math.log(0.9) + math.log(0.2) + math.log(0.4)) / 3, rel=1e-6)
    hand = ((0.1**2 + 0.1**2) + (0.8**2 + 0.8**2) + (0.6**2 + 0.6**2)) / 3
    assert brier(probs, y) == pytest.approx(hand, rel=1e-6)


def test_perfect_and_worst_predictions():
    y = torch.tensor([2, 0, 1])
    onehot = torch.nn.functional.one_hot(y, 3).float()
    assert accuracy(onehot, y) == 1.0
    assert brier(onehot, y) == 0.0
    assert nll(onehot, y) == pytest.approx(0.0, abs=1e-9)
    wrong = onehot.roll(1, dims=-1)
    assert brier(wrong, y) == pytest.approx(2.0)
    assert nll(wrong, y) == math.inf  # probability exactly 0 for every label: nothing is clipped


def test_metrics_reject_bad_input():
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="sum to 1"):
        accuracy(torch.tensor([[0.5, 0.6], [0.5, 0.5]]), y)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*not logits"):
        ece(torch.tensor([[2.0, -1.0], [0.0, 1.0]]), y)
    with pytest.raises(ValueError, match="NaN"):
        ece(torch.tensor([[float("nan"), 0.5], [0.5, 0.5]]), y)
    with pytest.raises(ValueError, match="labels"):
        nll(torch.tensor([[0.5, 0.5], [0.5, 0.5]]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="rows"):
        brier(torch.tensor([[0.5, 0.5]]), y)
    with pytest.raises(ValueError, match="num_bins"):
        ece(torch.tensor([[0.5, 0.5], [0.5, 0.5]]), y, num_bins=0)
    with pytest.raises(TypeError, match="probs"):
        accuracy([[0.5, 0.5]], torch.tensor([0]))
