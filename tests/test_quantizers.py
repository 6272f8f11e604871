"""Grid kernels and quantizers: the rounding rule, validation, grids, error bounds, order.

The contract every quantizer type passes (copies, code range, round trips,
idempotence, straight-through gradients) is tests/test_quantizer_contract.py.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bq.quant import (
    CodebookQuantizer,
    IntervalQuantizer,
    Log2Quantizer,
    SignedGridQuantizer,
    UniformQuantizer,
    check_bits,
    pow2_codebook,
)
from pyro_bq.quant.grids import (
    interval_grid,
    percentile_range,
    signed_grid,
    uniform_codes,
    uniform_quantize,
    zero_point_grid,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def tensors(draw, min_size=2, max_size=60, positive=False):
    n = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(1e-3, 1e3)) if not positive else 1.0
    g = torch.Generator().manual_seed(seed)
    if positive:
        return torch.exp2(torch.rand(n, generator=g) * draw(st.floats(0.5, 20.0)) - draw(st.floats(-10, 20)))
    x = torch.randn(n, generator=g) * scale + draw(st.floats(-2, 2)) * scale
    return x


uniform_specs = st.builds(
    lambda bits, sym, rng: UniformQuantizer(bits, symmetric=sym, range=rng),
    st.integers(1, 16),
    st.booleans(),
    st.sampled_from(["minmax", "percentile", "mse"]),
)


@pytest.mark.parametrize("bad", [0, 17, -3, 4.0, 2.5, True, "4", None])
@pytest.mark.parametrize("cls", [UniformQuantizer, IntervalQuantizer, Log2Quantizer, CodebookQuantizer,
                                 SignedGridQuantizer])
def test_bits_must_be_an_int_from_1_to_16(cls, bad):
    with pytest.raises(ValueError, match="bits"):
        cls(bad)
    with pytest.raises(ValueError, match="my_bits"):
        check_bits("my_bits", bad)


def test_check_bits_takes_integer_tensors_only_where_allowed():
    assert check_bits("b", 16) == 16
    assert check_bits("b", torch.tensor([1, 16]), allow_tensor=True).dtype == torch.int64
    for bad in (torch.tensor([0, 3]), torch.tensor([4, 17]), torch.tensor([2.0]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="b"):
            check_bits("b", bad, allow_tensor=True)
    with pytest.raises(ValueError, match="an int from 1 to 16, got tensor"):
        check_bits("b", torch.tensor([4]))


# -- the grid kernels ---------------------------------------------------------------------------------

def test_ties_round_half_to_even_in_every_uniform_grid():
    one = torch.tensor(1.0)
    # levels 0, 1, 2, 3: values half-way between two go to the even code
    step, zp, qmax = interval_grid(torch.tensor(0.0), torch.tensor(3.0), 2)
    assert uniform_codes(torch.tensor([0.5, 1.5, 2.5, -0.5, 3.5]), step, zp, qmax).tolist() == [0, 2, 2, 0, 3]
    step, zp, qmax = zero_point_grid(-one, 2 * one, 2, symmetric=False)  # levels -1, 0, 1, 2: zero point 1
    assert uniform_codes(torch.tensor([-0.5, 0.5, 1.5]), step, zp, qmax).tolist() == [0, 2, 2]
    # two signed bits: levels -1.5, -0.5, 0.5, 1.5 (codes 0 .. 3); 0 and +-1 are ties, won by codes 2, 2, 0
    step, zp, qmax = signed_grid(2, one)
    assert uniform_quantize(torch.tensor([0.0, 1.0, -1.0, 1.9]), step, zp, qmax).tolist() == [0.5, 0.5, -1.5, 1.5]


def test_a_degenerate_range_collapses_onto_its_value():
    zero = torch.tensor(0.0)
    for step, zp, qmax in (interval_grid(zero, zero, 4), zero_point_grid(zero, zero, 4, symmetric=False),
                           zero_point_grid(zero, zero, 3, symmetric=True)):
        assert bool((uniform_quantize(torch.tensor([-3.0, 0.0, 0.7, 5.0]), step, zp, qmax).abs() < 1e-30).all())


def test_percentiles_interpolate_linearly_like_torch_quantile():
    x = torch.randn(7, 333, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lo, hi = percentile_range(x, 0.5, 99.5)
    ref = torch.quantile(x, torch.tensor([0.005, 0.995], dtype=torch.float64), dim=1)
    assert torch.allclose(lo, ref[0], rtol=0, atol=1e-12) and torch.allclose(hi, ref[1], rtol=0, atol=1e-12)


def test_interval_quantizer_fixed_or_from_percentiles():
    x = torch.linspace(-1.0, 3.0, 401)
    q = IntervalQuantizer(2).calibrate(x)
    assert q.interval() == pytest.approx((-0.8, 2.8))
    assert q.levels().tolist() == pytest.approx([-0.8, 0.4, 1.6, 2.8])
    assert 0.0 not in q.quantize(x).tolist()  # no zero point
    fixed = IntervalQuantizer(1, interval=(0.25, 0.5)).calibrate(x)
    assert set(fixed.quantize(x).tolist()) == {0.25, 0.5}
    for bad in ((1.0, 1.0), (2.0, 1.0), (0.0, math.nan), (0.0,)):
        with pytest.raises(ValueError, match="interval"):
            IntervalQuantizer(3, interval=bad)


def test_bad_options_are_rejected_with_their_name():
    with pytest.raises(ValueError, match="range"):
        UniformQuantizer(4, range="max")
    with pytest.raises(TypeError, match="symmetric"):
        UniformQuantizer(4, symmetric="yes")
    with pytest.raises(ValueError, match="percentiles"):
        UniformQuantizer(4, range="percentile", percentiles=(95, 5))
    with pytest.raises(ValueError, match="bits"):
        UniformQuantizer(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="family"):
        CodebookQuantizer(4, family="int")


@SETTINGS
@given(spec=uniform_specs, x=tensors())
def test_uniform_outputs_lie_on_the_grid_and_quantizing_twice_changes_nothing(spec, x):
    q = spec.calibrate(x)
    v = q.quantize(x)
    k = v / q.step()
    lo, hi = q.grid_range()
    # on the grid: an integer (or, for 1-bit symmetric, a half-integer) number of steps, inside the range
    offset = 0.5 if (spec.symmetric and spec.bits == 1) else 0.0
    assert torch.allclose(k - offset, torch.round(k - offset), atol=1e-3)
    assert bool((v >= lo - 1e-6 * lo.abs()).all() and (v <= hi + 1e-6 * hi.abs()).all())
    assert torch.equal(q.quantize(v), v)
    assert bool((q.encode(x) >= 0).all() and (q.encode(x) < 2**spec.bits).all())


@SETTINGS
@given(spec=uniform_specs, x=tensors())
def test_uniform_error_inside_the_range_is_at_most_half_a_step(spec, x):
    q = spec.calibrate(x)
    lo, hi = q.grid_range()
    inside = (x >= lo) & (x <= hi)
    err = (q.quantize(x) - x).abs()[inside]
    # float32 arithmetic adds a few ulps of the largest magnitude (visible at 16 bits)
    assert bool((err <= q.step().max() / 2 + 4e-7 * x.abs().max()).all())


@SETTINGS
@given(spec=uniform_specs, x=tensors())
def test_uniform_preserves_order(spec, x):
    q = spec.calibrate(x)
    order = torch.argsort(x)
    v = q.quantize(x)[order]
    assert bool((v[1:] >= v[:-1]).all())


def test_asymmetric_grid_has_2_to_the_bits_levels_and_an_exact_zero():
    x = torch.linspace(-1.0, 3.0, 1001)
    for bits in (2, 3, 4, 8):
        q = UniformQuantizer(bits, symmetric=False).calibrate(x)
        assert q.quantize(x).unique().numel() == 2**bits
        assert q.quantize(torch.zeros(1)).item() == 0.0


def test_symmetric_grid_is_symmetric_and_one_bit_is_a_sign():
    x = torch.linspace(-2.0, 1.0, 301)
    q = UniformQuantizer(3, symmetric=True).calibrate(x)
    x = torch.linspace(-2.0, 2.0, 401)
    levels = q.quantize(x).unique()
    assert levels.numel() == 7 and torch.allclose(levels, -levels.flip(0))
    q1 = UniformQuantizer(1, symmetric=True).calibrate(x)
    assert set(q1.quantize(x).unique().tolist()) == {-2.0, 2.0}


def test_per_channel_ranges_follow_each_output_channel():
    w = torch.randn(4, 50) * torch.tensor([0.01, 0.1, 1.0, 10.0])[:, None]
    per_tensor = UniformQuantizer(4, per_channel=False).calibrate(w)
    per_channel = UniformQuantizer(4, per_channel=True).calibrate(w)
    assert per_channel.step().shape == (4, 1)
    err_t = (per_tensor.quantize(w) - w).pow(2).mean(1)
    err_c = (per_channel.quantize(w) - w).pow(2).mean(1)
    assert bool((err_c[:3] < err_t[:3]).all())
    # leading Monte Carlo dimensions broadcast against the per-channel range
    samples = w.expand(3, 4, 50)
    assert torch.equal(per_channel.quantize(samples)[1], per_channel.quantize(w))


def test_percentile_range_clips_the_tails():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    q = UniformQuantizer(8, symmetric=False, range="percentile", percentiles=(5, 95)).calibrate(x)
    lo, hi = q.grid_range()
    assert abs(hi.item() - 1.645) < 0.05 and abs(lo.item() + 1.645) < 0.05
    mm = UniformQuantizer(8, symmetric=False).calibrate(x)
    assert mm.grid_range()[1].item() > 3.5


def test_mse_range_beats_minmax_at_low_bits():
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    for bits in (2, 3):
        mm = UniformQuantizer(bits, range="minmax").calibrate(x)
        mse = UniformQuantizer(bits, range="mse").calibrate(x)
        assert (mse.quantize(x) - x).pow(2).mean() < 0.8 * (mm.quantize(x) - x).pow(2).mean()


def test_per_element_bits_tensor():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g)
    bits = torch.randint(1, 9, (6, 40), generator=g)
    q = UniformQuantizer(bits, per_channel=True).calibrate(w)
    codes = q.encode(w)
    assert bool((codes < 2**bits).all())
    v = q.quantize(w)
    assert torch.equal(q.quantize(v), v)
    # more bits, smaller error (elementwise on average)
    err = (v - w).abs()
    assert err[bits >= 6].mean() < err[bits <= 2].mean()
    with pytest.raises(ValueError, match="broadcast"):
        UniformQuantizer(torch.ones(5, dtype=torch.long)).calibrate(w)


@SETTINGS
@given(bits=st.integers(1, 16), x=tensors(positive=True))
def test_log2_outputs_are_powers_of_two_in_the_window(bits, x):
    q = Log2Quantizer(bits).calibrate(x)
    v = q.quantize(x)
    e = torch.log2(v)
    low, top = q.window()
    assert torch.equal(e, torch.round(e))
    assert bool((e >= low).all() and (e <= top).all())
    assert torch.equal(q.quantize(v), v)


@SETTINGS
@given(bits=st.integers(1, 16), x=tensors(positive=True))
def test_log2_relative_error_bound_inside_the_window_and_order(bits, x):
    q = Log2Quantizer(bits).calibrate(x)
    v = q.quantize(x)
    low, top = q.window()
    inside = (x >= 2.0**low) & (x <= 2.0**top)
    rel = ((v - x).abs() / x)[inside]
    assert bool((rel <= math.sqrt(2) - 1 + 1e-5).all())
    order = torch.argsort(x)
    assert bool((v[order][1:] >= v[order][:-1]).all())


def test_log2_window_is_anchored_at_the_largest_value():
    x = torch.tensor([2.0**-20, 2.0**-3, 0.2, 0.9])
    q = Log2Quantizer(2).calibrate(x)
    low, top = q.window()
    assert top.item() == 0 and low.item() == -3
    assert q.quantize(x)[0].item() == 2.0**-3  # below the window: clamped to its lowest level


@SETTINGS
@given(bits=st.integers(1, 8), family=st.sampled_from(["pot", "apot"]), x=tensors())
def test_codebook_quantizer_outputs_are_scaled_codebook_entries(bits, family, x):
    q = CodebookQuantizer(bits, family=family).calibrate(x)
    assert q.codebook.numel() <= 2**bits
    v = q.quantize(x)
    entries = q.codebook * q.alpha.reshape(())
    assert bool(torch.isclose(v[:, None], entries[None, :], rtol=1e-6, atol=0).any(1).all())
    assert torch.equal(q.quantize(v), v)
    order = torch.argsort(x)
    assert bool((v[order][1:] >= v[order][:-1]).all())
    # nearest entry: error at most half the widest gap inside the range
    gap = (entries[1:] - entries[:-1]).max()
    inside = x.abs() <= entries.abs().max()
    assert bool(((v - x).abs()[inside] <= gap / 2 * (1 + 1e-5)).all())


def test_pot_codebook_is_built_from_the_shared_codebook_module():
    q = CodebookQuantizer(4, family="pot").calibrate(torch.tensor([-1.0, 1.0]))
    expected = pow2_codebook(6, 1)  # 0, +-2^-6 .. +-1: 15 codes
    assert torch.equal(q.codebook, expected)
    custom = CodebookQuantizer(codebook=torch.tensor([-1.0, 0.0, 0.5, 1.0])).calibrate(torch.tensor([-2.0, 2.0]))
    assert custom.bits == 2
    assert custom.quantize(torch.tensor([0.9])).item() == 1.0
