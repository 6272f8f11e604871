"""The one-pass ``quantize`` of the uniform-grid and log2 quantizers gives the bits of ``decode(encode(x))``."""

import pytest
import torch

from pyro_bq.guides import QuantizedNormal
from pyro_bq.quant import IntervalQuantizer, Log2Quantizer, SignedGridQuantizer, UniformQuantizer


def _inputs(seed: int, dtype) -> torch.Tensor:
    """Random weights with exact half-steps, zeros and values far outside the range mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 300, generator=g, dtype=torch.float64) * 0.1
    x[:, :20] = torch.round(x[:, :20] * 64) / 64 + 1 / 128  # half-way between levels of several grids
    x[:, 20:25] = 0.0
    x[:, 25:30] *= 1e3
    return x.to(dtype)


QUANTIZERS = [
    UniformQuantizer(4, symmetric=False, per_channel=True),
    UniformQuantizer(3, symmetric=True, per_channel=True, channel_dim=1),
    UniformQuantizer(8, symmetric=False),
    UniformQuantizer(16, symmetric=False, per_channel=True),
    UniformQuantizer(1, symmetric=True),
    IntervalQuantizer(5),
    SignedGridQuantizer(3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("index", range(len(QUANTIZERS)))
def test_uniform_grid_quantize_is_decode_of_encode_bit_for_bit(index, dtype):
    for seed in range(3):
        x = _inputs(seed, dtype)
        q = QUANTIZERS[index].calibrate(_inputs(seed + 10, dtype) * 0.5)
        want = q.decode(q.encode(x), dtype=x.dtype)
        got = q.quantize(x)
        assert got.dtype == want.dtype and torch.equal(got.view(torch.int8), want.view(torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_channel", [False, True])
def test_log2_quantize_is_decode_of_encode_bit_for_bit(per_channel, dtype):
    for seed in range(3):
        x = _inputs(seed, dtype)  # negative values and zeros go to the bottom of the window
        q = Log2Quantizer(4, per_channel=per_channel).calibrate(_inputs(seed + 10, dtype).abs() + 1e-6)
        want = q.decode(q.encode(x), dtype=x.dtype)
        assert torch.equal(q.quantize(x).view(torch.int8), want.view(torch.int8))


def test_quantized_normal_draws_are_on_the_grid_and_seeded():
    loc = _inputs(0, torch.float32)
    q = UniformQuantizer(4, symmetric=False, per_channel=True).calibrate(loc - 0.2, loc + 0.2)
    d = QuantizedNormal(loc, torch.full_like(loc, 0.05), q)
    torch.manual_seed(0)
    w = d.sample((3,))
    torch.manual_seed(0)
    raw = torch.distributions.Normal(loc, torch.full_like(loc, 0.05)).sample((3,))
    assert torch.equal(w, q.decode(q.encode(raw), dtype=raw.dtype))


@pytest.mark.parametrize("per_channel", [False, True])
def test_log2_codes_are_the_rounded_clamped_exponents(per_channel):
    from pyro_bq.quant.grids import log2_exponents

    x = _inputs(4, torch.float32)
    q = Log2Quantizer(3, per_channel=per_channel).calibrate(_inputs(5, torch.float32).abs() + 1e-6)
    low, top = q.window()
    e = torch.nan_to_num(torch.log2(x), nan=-1e9, neginf=-1e9)
    assert torch.equal(q.encode(x), (log2_exponents(e, low, top) - low).to(torch.int64))
