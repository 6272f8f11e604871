"""NLL is a log-mean-exp of per-draw log-probabilities: nothing is clipped."""

import math

import pytest
import torch

from pyro_bq.uncertainty import nll


def _logits_with_label_log_prob(log_p: torch.Tensor, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(S, N, C)`` whose label (class 0) has log-probability ``log_p[s, n]`` (float64, exact enough)."""
    rest = torch.log(-torch.expm1(log_p)) - math.log(num_classes - 1)  # the other classes share the remainder
    logits = rest.unsqueeze(-1).repeat(1, 1, num_classes)
    logits[..., 0] = log_p
    return logits, torch.zeros(log_p.shape[1], dtype=torch.long)


def test_a_label_below_the_old_clip_costs_its_full_log_probability():
    log_p = torch.full((4, 3), -40.0, dtype=torch.float64)  # p = 4e-18, far below a 1e-12 clip
    logits, y = _logits_with_label_log_prob(log_p)
    assert nll(None, y, logits=logits) == pytest.approx(40.0, rel=1e-9)
    assert nll(logits.float().softmax(-1), y) == pytest.approx(40.0, rel=1e-5)  # float32 probabilities hold 4e-18
    deep = torch.full((4, 3), -200.0, dtype=torch.float64)  # underflows float32 probabilities to 0
    logits, y = _logits_with_label_log_prob(deep)
    assert nll(None, y, logits=logits.float()) == pytest.approx(200.0, rel=1e-5)


def test_nll_averages_probabilities_over_draws_not_log_probabilities():
    log_p = torch.tensor([[-1.0, -0.5], [-100.0, -0.5]], dtype=torch.float64)  # two draws, two inputs
    logits, y = _logits_with_label_log_prob(log_p)
    expected = -torch.log(log_p.exp().mean(0)).mean().item()  # float64 reference
    assert nll(None, y, logits=logits) == pytest.approx(expected, rel=1e-12)
    assert nll(logits.softmax(-1), y) == pytest.approx(expected, rel=1e-9)
    assert nll(logits.softmax(-1).mean(0), y) == pytest.approx(expected, rel=1e-9)  # the model average itself


def test_nll_checks_its_arguments():
    logits, y = _logits_with_label_log_prob(torch.full((2, 3), -1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="exactly one"):
        nll(logits.softmax(-1), y, logits=logits)
    with pytest.raises(ValueError, match="labels"):
        nll(None, y[:2], logits=logits)
    with pytest.raises(ValueError, match="NaN"):
        nll(None, y, logits=torch.full_like(logits, float("nan")))
