"""Collapsed draws: varying_fraction, the warning of quantize, and the figures of memory_report and evaluate."""

import warnings

import pytest
import torch
from guide_contract import spread_guide

from pyro_bq.guides import (DETERMINISTIC_THRESHOLD, DeterministicDrawsWarning, quantize,
                            varying_fraction)
from pyro_bq.io import memory_report
from pyro_bq.quant import JQ, VPQ
from pyro_bq.uncertainty import evaluate


def test_tiny_scales_at_two_bits_collapse_the_draws_and_warn():
    model, guide, x, y = spread_guide(1e-4)
    with pytest.warns(DeterministicDrawsWarning, match="whole guide"):
        qguide = quantize(guide, JQ(2, calib_width=1.0))
    fractions = varying_fraction(qguide, num_draws=16, seed=0)
    assert set(fractions) == set(guide.sites) and max(fractions.values()) < DETERMINISTIC_THRESHOLD
    report = memory_report(qguide)
    assert report.varying_fraction < DETERMINISTIC_THRESHOLD and report.deterministic_sites == list(guide.sites)
    assert all(s.varying_fraction == fractions[s.name] for s in report.sites) and "varying" in report.table()
    record = evaluate(model, qguide, (x, y), x.flip(0), num_samples=4, seed=0)
    assert record["varying_fraction"] < DETERMINISTIC_THRESHOLD and record["varying_fraction_sites"] == fractions
    assert record["epistemic_in"] < 1e-6  # all draws agree: no mutual information


def test_large_scales_keep_the_draws_varying_without_a_warning():
    model, guide, x, y = spread_guide(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeterministicDrawsWarning)
        qguide = quantize(guide, JQ(2))
        quantize(guide, VPQ(2))
    fractions = varying_fraction(qguide, num_draws=16, seed=0)
    assert min(fractions.values()) > 0.5
    assert varying_fraction(guide) == {name: 1.0 for name in guide.sites}  # float draws: every weight varies
    assert memory_report(qguide).deterministic_sites == []


def test_varying_fraction_is_seeded_and_leaves_the_global_rng_alone():
    model, guide, x, y = spread_guide(0.3)
    qguide = quantize(guide, JQ(3))
    state = torch.get_rng_state()
    assert varying_fraction(qguide, seed=3) == varying_fraction(qguide, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="num_draws"):
        varying_fraction(qguide, num_draws=1)
