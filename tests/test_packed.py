"""Bit packing, packed files (exact reload, size, corruption) and memory accounting."""

import os

import numpy as np
import pyro
import pytest
import torch
from guide_contract import float_guide, tiny_classifier
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import Predictive

from pyro_bq.guides import AutoLogQuantNormal, quantize
from pyro_bq.io import CorruptFileError, load_packed, memory_report, pack_bits, save_packed, unpack_bits
from pyro_bq.io.container import read_container, write_container
from pyro_bq.io.packed import KIND
from pyro_bq.quant import JQ, SPQ, VPQ, CodebookQuantizer, FloatPolicy, IntervalQuantizer, Log2Quantizer, UniformQuantizer


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip_fixed_bits(bits, n, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, size=n)
    buf = pack_bits(codes, bits)
    assert buf.dtype == np.uint8 and buf.size == -(-n * bits // 8)
    assert np.array_equal(unpack_bits(buf, n, bits), codes)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip_per_element_bits(n, seed):
    rng = np.random.default_rng(seed)
    widths = rng.integers(1, 17, size=n)
    codes = rng.integers(0, 2**widths)
    buf = pack_bits(codes, widths)
    assert buf.size == -(-int(widths.sum()) // 8)
    assert np.array_equal(unpack_bits(buf, n, widths), codes)


def test_packing_is_vectorized_enough_for_a_million_codes():
    codes = np.random.default_rng(0).integers(0, 8, size=1_000_000)
    buf = pack_bits(codes, 3)
    assert buf.size == 375_000
    assert np.array_equal(unpack_bits(buf, codes.size, 3), codes)


def _setup(net="mlp"):
    model, guide, x, _ = float_guide(net)
    return model, guide, x


def _predict(model, guide, x, seed=11):
    pyro.set_rng_seed(seed)
    return Predictive(model, guide=guide, num_samples=4, return_sites=["logits"])(x)["logits"]


POLICIES = {
    "float": lambda: FloatPolicy(),
    "vpq4": lambda: VPQ(4),
    "spq3": lambda: SPQ(3),
    "jq2": lambda: JQ(2, skip=["net.3.bias"]),
    "jq-asym-percentile": lambda: JQ(
        5, loc_quantizer=UniformQuantizer(8, symmetric=False, range="percentile"), scale_bits=3
    ),
    "jq-pot-codebook": lambda: JQ(
        4, loc_quantizer=CodebookQuantizer(4, family="pot", per_channel=True),
        sample_quantizer=CodebookQuantizer(4, family="apot"), scale_quantizer=Log2Quantizer(4, per_channel=False),
    ),
    "jq-per-element-bits": lambda: JQ(
        4, site_bits={"net.1.weight": torch.randint(1, 9, (16, 784), generator=torch.Generator().manual_seed(0))}
    ),
}


@pytest.mark.parametrize("which", list(POLICIES))
def test_load_packed_predicts_exactly_what_was_saved(which, tmp_path):
    model, guide, x = _setup()
    q = quantize(guide, POLICIES[which]())
    path = tmp_path / "g.bq"
    size = save_packed(q, path)
    assert size == os.path.getsize(path)
    loaded = load_packed(path, model)
    assert torch.equal(_predict(model, q, x), _predict(model, loaded, x))
    for name in q.sites:
        a, b = q.get_loc_scale(name), loaded.get_loc_scale(name)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the report predicts the file's size within 1% (it is exact here)
    report = memory_report(q)
    assert abs(report.file_bytes - size) <= 0.01 * size


def test_memory_report_counts_codes_metadata_and_floats():
    model, guide, x = _setup()
    n = guide.num_params
    fl = memory_report(quantize(guide, FloatPolicy()))
    assert fl.bits_per_param == 64.0 and fl.total_bits == 64 * n
    per_tensor = JQ(4, loc_quantizer=UniformQuantizer(8), scale_quantizer=Log2Quantizer(4), sample_quantizer=UniformQuantizer(8))
    r = memory_report(quantize(guide, per_tensor))
    # 4-bit loc + 4-bit scale codes; per site: a float32 loc range, an int16 exponent, a float32 sample range
    assert r.total_bits == 8 * n + len(guide.sites) * (32 + 16 + 32)
    spq = memory_report(quantize(guide, SPQ(4)))
    assert spq.bits_per_param > 64.0  # float parameters plus the sample quantizer's ranges
    assert "bits/param" in r.table()


def test_packed_4bit_jq_lenet_is_at_most_a_seventh_of_the_float_file(tmp_path):
    model, guide, x = _setup("lenet")
    fsize = save_packed(guide, tmp_path / "float.bq")
    q = quantize(guide, JQ(4))
    qsize = save_packed(q, tmp_path / "jq4.bq")
    assert qsize * 7 <= fsize
    report = memory_report(q)
    assert abs(report.file_bytes - qsize) <= 0.01 * qsize
    assert abs(report.float_file_bytes - fsize) <= 0.01 * fsize


def test_truncated_or_corrupted_files_give_a_clear_error(tmp_path):
    model, guide, x = _setup()
    path = tmp_path / "g.bq"
    save_packed(quantize(guide, JQ(3)), path)
    raw = path.read_bytes()
    (tmp_path / "cut.bq").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError, match="truncated|checksum"):
        load_packed(tmp_path / "cut.bq", model)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    (tmp_path / "flip.bq").write_bytes(bytes(flipped))
    with pytest.raises(CorruptFileError, match="checksum|corrupt"):
        load_packed(tmp_path / "flip.bq", model)
    torch.save({"a": 1}, tmp_path / "pickle.pt")
    with pytest.raises(CorruptFileError):
        load_packed(tmp_path / "pickle.pt", model)


def test_loading_into_a_different_model_is_refused(tmp_path):
    model, guide, x = _setup("mlp")
    path = tmp_path / "g.bq"
    save_packed(quantize(guide, VPQ(4)), path)
    other, _, _ = tiny_classifier("lenet")
    with pytest.raises(ValueError, match="site"):
        load_packed(path, other)


def test_log_quantized_guide_packs_its_scales_as_codes(tmp_path):
    model, x, y = tiny_classifier("mlp")
    guide = AutoLogQuantNormal(model, bits=3, init_scale=0.05)
    guide(x, y)
    report = memory_report(guide)
    # float32 loc, 3-bit scale code, one int16 exponent window per site
    assert report.total_bits == (32 + 3) * guide.num_params + 16 * len(guide.sites)
    size = save_packed(guide, tmp_path / "lq.bq")
    loaded = load_packed(tmp_path / "lq.bq", model)
    for name in guide.sites:
        assert torch.equal(loaded.get_loc_scale(name)[1], guide.get_loc_scale(name)[1])
    assert abs(report.file_bytes - size) <= 0.01 * size


# -- the packed-format registry: a quantizer class declares its own format -------------------

from pyro_bq.quant.quantizers import Quantizer, packed_types, quantizer_class, register_quantizer  # noqa: E402


class _OffsetGrid(Quantizer):
    """A test quantizer: ``2**bits`` levels ``offset + lo + step * k`` (lo, step calibrated, f32 and i16 state)."""

    packed_type = "test-offset-grid"
    packed_keys = frozenset({"offset"})

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        return [("lo", "f32", [1]), ("step", "f32", [1]), ("tag", "i16", [2])]

    def __init__(self, bits=4, *, offset: float = 0.0):
        super().__init__(bits)
        if isinstance(offset, bool) or not isinstance(offset, (int, float)):
            raise TypeError(f"offset must be a number, got {offset!r}")
        self.offset = float(offset)

    def _calibrate(self, tensors):
        x = tensors[0] - self.offset
        self.lo = x.min().float().reshape(1)
        self.step = ((x.max() - x.min()) / (2**self.bits - 1)).clamp(min=1e-12).float().reshape(1)

    def encode(self, x):
        k = torch.round((x - self.offset - self.lo.to(x)) / self.step.to(x))
        return k.clamp(0, 2**self.bits - 1).to(torch.int64)

    def decode(self, codes, dtype=torch.float32):
        return (self.offset + self.lo.to(dtype) + self.step.to(dtype) * codes.to(dtype)).to(dtype)

    def config(self):
        return {"type": self.packed_type, "offset": self.offset}

    def state(self):
        return {"lo": self.lo, "step": self.step, "tag": torch.tensor([7, -7], dtype=torch.int16)}

    def _set_state(self, state):
        self.lo, self.step = state["lo"].float(), state["step"].float()


def test_a_new_quantizer_class_packs_with_its_own_declaration(tmp_path):
    assert quantizer_class("test-offset-grid") is _OffsetGrid and "test-offset-grid" in packed_types()
    model, guide, x = _setup()
    q = quantize(guide, VPQ(3, loc_quantizer=_OffsetGrid(8, offset=0.25)))
    path = tmp_path / "offset.bq"
    size = save_packed(q, path)
    report = memory_report(q)
    assert report.file_bytes == size == os.path.getsize(path)
    # default metadata accounting: the layout's two float32 values and two int16 values per site
    assert all(sq.loc.metadata_bits() == 2 * 32 + 2 * 16 for sq in q.quantizers.values())
    loaded = load_packed(path, model)
    assert all(isinstance(sq.loc, _OffsetGrid) and sq.loc.offset == 0.25 for sq in loaded.quantizers.values())
    assert torch.equal(_predict(model, q, x), _predict(model, loaded, x))
    # its configuration is checked by its constructor
    from pyro_bq.io.container import read_container, write_container

    meta, tensors = read_container(path, "packed-guide")
    idx = next(i for i, c in enumerate(meta["cfgs"]) if c["type"] == "test-offset-grid")
    meta["cfgs"][idx]["offset"] = "x"
    write_container(tmp_path / "bad.bq", "packed-guide", meta, tensors)
    with pytest.raises(CorruptFileError, match=r"bad\.bq.*offset must be a number"):
        load_packed(tmp_path / "bad.bq", model)


def test_register_quantizer_refuses_clashing_or_incomplete_declarations(tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        class Clash(UniformQuantizer):  # noqa: F841
            packed_type = "uniform"
    with pytest.raises(TypeError, match="packed_layout"):
        class NoLayout(Quantizer):  # noqa: F841
            packed_type = "test-no-layout"
    with pytest.raises(ValueError, match="'type'"):
        class TypeKey(_OffsetGrid):  # noqa: F841
            packed_type = "test-type-key"
            packed_keys = frozenset({"type", "offset"})
    with pytest.raises(TypeError, match="Quantizer subclass"):
        register_quantizer(int)
    with pytest.raises(ValueError, match="unknown quantizer type 'nope'"):
        quantizer_class("nope")
    assert quantizer_class("uniform") is UniformQuantizer  # unchanged by the refused classes

    class Unpackable(UniformQuantizer):
        packed_type = None  # opts out

    model, guide, x = _setup()
    q = quantize(guide, VPQ(4, loc_quantizer=Unpackable(8)))
    with pytest.raises(TypeError, match="Unpackable has no packed format"):
        save_packed(q, tmp_path / "u.bq")


def test_every_quantizer_is_registered_without_importing_pyro_bq_mixed():
    import subprocess
    import sys

    code = ("import pyro_bq.quant.quantizers as q, sys; assert 'pyro_bq.mixed' not in sys.modules; "
            "print(q.quantizer_class('gaussian-lloyd').__name__, q.packed_types())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("GaussianLloydQuantizer")
    for kind in ("uniform", "log2", "codebook", "gaussian-lloyd", "interval", "signed"):
        assert repr(kind) in out


@pytest.mark.parametrize("bits", [0, 17, 32, 2.0, True])
def test_pack_bits_takes_the_widths_a_packed_file_stores(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_bits(np.array([0, 1]), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(np.zeros(8, dtype=np.uint8), 2, bits)


@pytest.mark.parametrize("old", ["percentile-interval", "interval"])
def test_files_of_the_earlier_interval_types_still_load(old, tmp_path):
    """Files written when the percentile and the fixed interval were two packed types load unchanged."""
    model, guide, x = _setup()
    template = IntervalQuantizer(3) if old == "percentile-interval" else IntervalQuantizer(3, interval=(-0.2, 0.2))
    q = quantize(guide, VPQ(4, site_quantizers={"net.1.weight": {"loc": template}}))
    path = tmp_path / "g.bq"
    save_packed(q, path)
    meta, tensors = read_container(path, KIND)
    for i, cfg in enumerate(meta["cfgs"]):
        if cfg["type"] == "interval":
            meta["cfgs"][i] = ({"type": "percentile-interval", "low": 5.0, "high": 95.0}
                               if old == "percentile-interval" else {"type": "interval"})
    write_container(path, KIND, meta, tensors)
    loaded = load_packed(path, model)
    assert torch.equal(_predict(model, q, x), _predict(model, loaded, x))


def test_load_packed_map_location_round_trip(tmp_path):
    model, guide, x = _setup()
    q = quantize(guide, JQ(4))
    path = tmp_path / "g.bq"
    save_packed(q, path)
    loaded = load_packed(path, model, map_location="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(_predict(model, q, x), _predict(model, loaded, x))
    assert torch.equal(_predict(model, loaded, x), _predict(model, load_packed(path, model, map_location="auto"), x)
                       ) or torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="map_location.*no GPU"):
            load_packed(path, model, map_location="cuda")
