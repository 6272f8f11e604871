"""varying_fraction on a seeded subsample of each large site (what the warning of quantize draws)."""

import pytest
import torch
from guide_contract import tiny_classifier

from pyro_bq.guides import AutoMeanFieldNormal, quantize, varying_fraction
from pyro_bq.guides.meanfield import softplus_inverse
from pyro_bq.guides.quantized import VARYING_SUBSAMPLE
from pyro_bq.quant import JQ, UniformQuantizer

SITE = "net.1.weight"  # [16, 784]: the one site above the caps used here


def _half_collapsed_guide():
    """A tiny MLP guide whose first-layer rows 0..7 have tiny scales (their draws collapse at 2 bits)
    and rows 8..15 large ones (their draws vary), so about half of that site varies."""
    model, x, y = tiny_classifier("mlp", n=16)
    guide = AutoMeanFieldNormal(model, init_scale=0.3)
    guide(x, y)
    info = guide.sites[SITE]
    scale = torch.full(info.shape, 0.3)
    scale[: info.shape[0] // 2] = 1e-5
    with torch.no_grad():
        guide.loc.copy_(torch.rand(guide.loc.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
        guide.scale_raw[info.offset:info.offset + info.numel] = softplus_inverse(scale).reshape(-1)
    return guide


@pytest.mark.parametrize("channel_dim", [0, 1])
def test_subsample_keeps_every_channel_and_estimates_the_exact_fraction(channel_dim):
    guide = _half_collapsed_guide()
    sample = UniformQuantizer(2, symmetric=False, per_channel=True, channel_dim=channel_dim)
    qguide = quantize(guide, JQ(2, calib_width=1.0, site_quantizers={SITE: {"sample": sample}}))
    exact = varying_fraction(qguide, seed=0)
    est = varying_fraction(qguide, seed=0, max_per_site=2000)
    assert 0.3 < exact[SITE] < 0.7  # the collapsed rows hold half the site
    assert abs(est[SITE] - exact[SITE]) < 5 * 0.5 / 2000**0.5
    assert varying_fraction(qguide, seed=0, max_per_site=2000) == est  # seeded
    assert varying_fraction(qguide, seed=0, max_per_site=16 * 784) == exact  # a cap at the size: every weight


def test_per_weight_bits_are_measured_whole_and_the_cap_is_checked():
    guide = _half_collapsed_guide()
    bits = torch.full((16, 784), 2, dtype=torch.long)
    qguide = quantize(guide, JQ(2, calib_width=1.0, site_bits={SITE: {"sample": bits}}))
    assert varying_fraction(qguide, seed=1, max_per_site=1000) == varying_fraction(qguide, seed=1)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_per_site"):
            varying_fraction(qguide, max_per_site=bad)
    assert VARYING_SUBSAMPLE == 65536


def test_subsample_of_the_float_parameters_draws_what_the_whole_site_would(monkeypatch):
    import pyro_bq.guides.quantized as quantized

    guide = _half_collapsed_guide()
    for policy in (JQ(2, calib_width=1.0), JQ(3, site_quantizers={SITE: {"sample": UniformQuantizer(
            3, symmetric=False, per_channel=True, channel_dim=1)}})):
        qguide = quantize(guide, policy)
        fast = varying_fraction(qguide, seed=2, max_per_site=3000)
        monkeypatch.setattr(quantized, "_quantized_subsample", lambda *args: None)  # quantize the whole site
        assert varying_fraction(qguide, seed=2, max_per_site=3000) == fast
        monkeypatch.undo()
