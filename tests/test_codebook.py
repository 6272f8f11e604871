import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bq.quant.codebook import codebook_size, pow2_codebook, pow2_family, pow2_magnitudes
from pyro_bq.quant.grids import nearest_code, nearest_code_index


def _t(xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_pow2_r1_hand_computed():
    cb = pow2_codebook(2, 1)
    assert cb.tolist() == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]


def test_pow2_r2_unsigned_hand_computed():
    cb = pow2_codebook(2, 2, signed=False, include_zero=False)
    # 1/4, 1/2, 1 and the pairwise sums 3/4, 5/4, 3/2
    assert cb.tolist() == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def test_pow2_r3_unsigned_hand_computed():
    cb = pow2_codebook(2, 3, signed=False, include_zero=False)
    assert cb.tolist() == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    # r beyond the number of powers adds nothing
    assert torch.equal(pow2_codebook(2, 9, signed=False, include_zero=False), cb)


def test_pow2_b0_and_max_exp():
    assert pow2_codebook(0, 1).tolist() == [-1.0, 0.0, 1.0]
    assert pow2_codebook(1, 2, max_exp=1, signed=False).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert pow2_magnitudes(3, max_exp=-1).tolist() == [0.125, 0.25, 0.5]


def test_pow2_signed_symmetric_and_sorted():
    cb = pow2_codebook(5, 2)
    assert torch.equal(cb, torch.sort(-cb).values)
    assert bool((cb[1:] > cb[:-1]).all())
    assert cb.numel() == codebook_size(5, 2) == 2 * (6 + 15) + 1


def test_pow2_r2_b3_contains_expected():
    cb = set(pow2_codebook(3, 2).tolist())
    for v in [0.375, 0.625, 1.125, -0.75, 0.0]:
        assert v in cb
    for v in [0.875, 1.75, 2.0, 0.1875]:  # need 3 terms, or beyond max_exp / precision b
        assert v not in cb


def test_pow2_bad_args():
    with pytest.raises(ValueError, match="b"):
        pow2_codebook(-1, 1)
    with pytest.raises(ValueError, match="r"):
        pow2_codebook(3, 0)
    with pytest.raises(TypeError, match="r"):
        pow2_codebook(3, 1.5)
    with pytest.raises(ValueError, match="b"):
        pow2_codebook(1, 1, max_exp=-3)
    with pytest.raises(ValueError, match="codes"):
        pow2_codebook(60, 8)


def test_nearest_code_hand_computed():
    cb = pow2_codebook(3, 1)  # 0, +-1/8, +-1/4, +-1/2, +-1
    v = _t([0.3, -0.07, 0.05, 5.0, -5.0, 0.0, 0.74, 0.76, -0.2])
    assert nearest_code(v, cb).tolist() == [0.25, -0.125, 0.0, 1.0, -1.0, 0.0, 0.5, 1.0, -0.25]


def test_nearest_code_ties_go_to_smaller_magnitude():
    cb = _t([-1.0, -0.5, 0.0, 0.5, 1.0])
    v = _t([0.25, -0.25, 0.75, -0.75])
    assert nearest_code(v, cb).tolist() == [0.0, 0.0, 0.5, -0.5]
    assert nearest_code_index(v, cb).tolist() == [2, 2, 3, 1]


def test_nearest_code_shape_dtype_and_single_code():
    v = torch.randn(3, 4, 5, dtype=torch.float64)
    out = nearest_code(v, pow2_codebook(4, 2))
    assert out.shape == v.shape and out.dtype == torch.float64
    assert torch.equal(nearest_code(v, _t([0.5])), torch.full_like(v, 0.5))


def test_nearest_code_bad_codebook():
    with pytest.raises(ValueError, match="codebook"):
        nearest_code(_t([0.1]), _t([1.0, 0.0]))
    with pytest.raises(ValueError, match="codebook"):
        nearest_code(_t([0.1]), _t([]))
    with pytest.raises(TypeError, match="values"):
        nearest_code(torch.tensor([1, 2]), _t([0.0]))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 6),
    st.integers(1, 3),
    st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=1, max_size=30),
)
def test_nearest_code_matches_bruteforce(b, r, xs):
    cb = pow2_codebook(b, r)
    v = _t(xs)
    q = nearest_code(v, cb)
    brute = (v[:, None] - cb[None, :]).abs().min(dim=1).values
    assert torch.allclose((v - q).abs(), brute, atol=0, rtol=0)
    # every output is a code
    assert bool(torch.isin(q, cb).all())


def test_codebook_size_formula():
    for b, r in [(0, 1), (3, 2), (6, 3), (4, 10)]:
        n = b + 1
        expect = 2 * sum(math.comb(n, k) for k in range(1, min(r, n) + 1)) + 1
        assert codebook_size(b, r) == expect == pow2_codebook(b, r).numel()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("family", ["pot", "apot"])
def test_pow2_family_is_the_largest_set_that_fits_the_bits(bits, family):
    cb = pow2_family(bits, family)
    assert cb.numel() <= 2**bits and float(cb.abs().max()) == 1.0
    assert torch.equal(cb, -cb.flip(0))
    if family == "pot" and bits > 1:  # zero and +-2**-k .. +-1: one more power (two codes) would not fit
        assert cb.numel() + 2 > 2**bits and float(cb[cb > 0].min()) == 2.0 ** -((cb.numel() - 3) // 2)
