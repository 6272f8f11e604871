"""Entropy-coded code streams (pyro_bq.io.codec) and entropy-coded packed files."""

import numpy as np
import pytest
import torch
from guide_contract import float_guide
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bq.guides import quantize
from pyro_bq.io import CorruptFileError, load_packed, memory_report, save_packed
from pyro_bq.io import codec
from pyro_bq.quant import JQ, VPQ, CodebookQuantizer


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 2**16), n=st.integers(0, 400), seed=st.integers(0, 2**31 - 1),
       name=st.sampled_from(codec.CODECS))
def test_encode_decode_roundtrip(k, n, seed, name):
    rng = np.random.default_rng(seed)
    # a skewed stream over a random sub-alphabet, as quantized weights give
    support = rng.integers(0, k, size=min(k, 20))
    codes = torch.from_numpy(support[np.minimum(rng.geometric(0.4, size=n) - 1, support.size - 1)])
    data, header = codec.encode(codes, k, name)
    assert torch.equal(codec.decode(data, header), codes)


def test_ans_spends_about_the_empirical_entropy():
    rng = np.random.default_rng(0)
    codes = torch.from_numpy(np.minimum(rng.geometric(0.5, size=20000) - 1, 15))
    data, header = codec.encode(codes, 16, "ans")
    entropy = codec.empirical_entropy_bits(codes, 16)
    assert entropy < 2.1 * 20000
    assert 8 * len(data) <= entropy + 0.01 * codes.numel() + 64


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="num_symbols"):
        codec.encode(torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="codes must lie"):
        codec.encode(torch.tensor([0, 4]), 4)
    with pytest.raises(TypeError, match="integer"):
        codec.encode(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match="codec"):
        codec.encode(torch.tensor([0]), 4, "zstd")
    data, header = codec.encode(torch.tensor([0, 1, 1, 2] * 50), 4)
    with pytest.raises(CorruptFileError):
        codec.decode(data, {**header, "n": 7})


def _same_guide(a, b):
    for name in a.sites:
        la, sa = a.get_loc_scale(name)
        lb, sb = b.get_loc_scale(name)
        assert torch.equal(la, lb) and torch.equal(sa, sb), name


@pytest.mark.parametrize("name", ["ans", "lzma"])
@pytest.mark.parametrize("policy", ["jq4", "vpq-bitmap", "codebook"])
def test_coded_packed_file_loads_the_same_guide(name, policy, tmp_path):
    model, guide, x, _ = float_guide("mlp")
    if policy == "jq4":
        q = quantize(guide, JQ(4))
    elif policy == "vpq-bitmap":
        bits = torch.randint(2, 6, (16, 784))
        q = quantize(guide, VPQ(4, site_bits={"net.1.weight": bits}))
    else:
        q = quantize(guide, VPQ(4, loc_quantizer=CodebookQuantizer(3)))
    fixed = save_packed(q, tmp_path / "fixed.bq")
    coded = save_packed(q, tmp_path / "coded.bq", codec=name)
    loaded_fixed = load_packed(tmp_path / "fixed.bq", model)
    loaded = load_packed(tmp_path / "coded.bq", model)
    _same_guide(loaded_fixed, loaded)
    _same_guide(q, loaded)
    for sa, sb in zip(loaded_fixed.quantizers.values(), loaded.quantizers.values()):
        for quantity in ("loc", "scale", "sample"):
            qa, qb = getattr(sa, quantity), getattr(sb, quantity)
            assert (qa is None) == (qb is None)
            if qa is not None:
                assert all(torch.equal(qa.state()[k], qb.state()[k]) for k in qa.state())
    assert coded > 0 and fixed > 0


def test_jq4_coded_file_is_much_smaller_than_fixed_width(tmp_path):
    """A trained-looking posterior: bell-shaped locs put most 4-bit codes near the middle."""
    model, guide, x, _ = float_guide("lenet")
    with torch.no_grad():
        guide.loc.copy_(torch.randn_like(guide.loc) * 0.05)
    q = quantize(guide, JQ(4))
    fixed = save_packed(q, tmp_path / "fixed.bq")
    coded = save_packed(q, tmp_path / "coded.bq", codec="ans")
    assert fixed / coded >= 1.3, (fixed, coded)
    _same_guide(q, load_packed(tmp_path / "coded.bq", model))


def test_memory_report_shows_fixed_entropy_and_actual_bits(tmp_path):
    model, guide, x, _ = float_guide("mlp")
    q = quantize(guide, JQ(4))
    plain = memory_report(q)
    report = memory_report(q, codec="ans")
    assert report.file_bytes == save_packed(q, tmp_path / "c.bq", codec="ans")
    for a, b in zip(plain.sites, report.sites):
        assert a.fixed_width_bits == b.fixed_width_bits == a.code_bits + a.bitmap_bits
        assert a.actual_bits == a.fixed_width_bits  # without a codec the file spends the fixed width
        assert 0 < b.entropy_bits < b.fixed_width_bits
        assert b.entropy_bits <= b.actual_bits
    assert "entropy" in report.codec_table()


def test_corrupt_coded_stream_is_refused(tmp_path):
    from pyro_bq.io.container import read_container, write_container
    from pyro_bq.io.packed import KIND

    model, guide, x, _ = float_guide("mlp")
    save_packed(quantize(guide, JQ(4)), tmp_path / "c.bq", codec="ans")
    meta, tensors = read_container(tmp_path / "c.bq", KIND)
    meta["streams"]["codes"][0]["nbytes"] += 4
    write_container(tmp_path / "bad.bq", KIND, meta, tensors)
    with pytest.raises(CorruptFileError, match=r"streams\[.codes.\]\[0\]"):
        load_packed(tmp_path / "bad.bq", model)


def test_short_streams_cost_no_more_than_fixed_width():
    codes = torch.tensor([0, 5, 9, 3, 15, 2, 7, 7, 1, 12])
    data, header = codec.encode(codes, 16, "ans")
    assert 8 * len(data) + codec.model_bits(header) <= 4 * codes.numel() + 8 * 40
    assert torch.equal(codec.decode(data, header), codes)
