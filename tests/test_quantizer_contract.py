"""The quantizer contract, run on every packed quantizer type pyro_bq registers.

Each case is a quantizer specification and a tensor to calibrate on. The
contract: calibration returns a calibrated copy and leaves the specification
alone; codes lie in ``[0, 2**bits)``; encode and decode invert each other on
the grid; the state (:meth:`~pyro_bq.quant.Quantizer.state`, as its packed
layout declares it) rebuilds a quantizer that decodes the same; quantizing
twice changes nothing; the gradient passes straight through. A new
quantizer class with a ``packed_type`` fails :func:`test_every_registered_type_has_a_case`
until it gets a case here.
"""

import math

import pytest
import torch

from pyro_bq.quant import (
    CodebookQuantizer,
    GaussianLloydQuantizer,
    IntervalQuantizer,
    Log2Quantizer,
    SignedGridQuantizer,
    UniformQuantizer,
    packed_types,
    quantizer_class,
)
from pyro_bq.quant.quantizers import STATE_STREAMS, quantizer_from_state


#: the dtype a state tensor of each packed stream has (a packed file stores it exactly)
STREAM_DTYPES = {"f32": torch.float32, "i16": torch.int16, "f64": torch.float64}


def _normal(shape=(6, 10), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _positive(shape=(6, 10), seed=1):
    return torch.exp2(3 * _normal(shape, seed))


def _bits_map(shape=(6, 10), high=9, seed=2):
    return torch.randint(1, high, shape, generator=torch.Generator().manual_seed(seed))


#: packed type -> [(case id, specification factory, tensor factory)]
CASES = {
    "uniform": [
        ("symmetric-4", lambda: UniformQuantizer(4), _normal),
        ("symmetric-1", lambda: UniformQuantizer(1), _normal),
        ("zero-point-per-channel-3", lambda: UniformQuantizer(3, symmetric=False, per_channel=True), _normal),
        ("percentile-2", lambda: UniformQuantizer(2, symmetric=False, range="percentile"), _normal),
        ("mse-3", lambda: UniformQuantizer(3, range="mse", per_channel=True), _normal),
        ("bits-map", lambda: UniformQuantizer(_bits_map(), symmetric=False, range="auto"), _normal),
        ("16", lambda: UniformQuantizer(16, symmetric=False), _normal),
    ],
    "interval": [
        ("percentile-3", lambda: IntervalQuantizer(3), _normal),
        ("fixed-bits-map", lambda: IntervalQuantizer(_bits_map(), interval=(-0.7, 1.2)), _normal),
        ("percentile-1", lambda: IntervalQuantizer(1, percentiles=(0.0, 100.0)), _normal),
    ],
    "log2": [
        ("4", lambda: Log2Quantizer(4), _positive),
        ("per-channel-2", lambda: Log2Quantizer(2, per_channel=True), _positive),
        ("percentile-bits-map", lambda: Log2Quantizer(_bits_map(high=5), range="percentile"), _positive),
    ],
    "codebook": [
        ("pot-4", lambda: CodebookQuantizer(4), _normal),
        ("apot-per-channel-mse", lambda: CodebookQuantizer(5, family="apot", per_channel=True, range="mse"), _normal),
        ("custom-fixed", lambda: CodebookQuantizer(codebook=torch.tensor([-0.5, 0.0, 0.25, 1.0]), range="fixed"),
         _normal),
    ],
    "gaussian-lloyd": [
        ("3", lambda: GaussianLloydQuantizer(3), _normal),
        ("quantile-start-5", lambda: GaussianLloydQuantizer(5, max_iter=0), _normal),
    ],
    "signed": [
        ("4", lambda: SignedGridQuantizer(4), _normal),
        ("fixed-scale-bits-map", lambda: SignedGridQuantizer(_bits_map(), scale=0.3), _normal),
    ],
}
PARAMS = [pytest.param((kind, make, data), id=f"{kind}-{name}") for kind, cases in CASES.items()
          for name, make, data in cases]


def _library_types():
    return {t for t in packed_types() if quantizer_class(t).__module__.startswith("pyro_bq.")}


def test_every_registered_type_has_a_case():
    assert _library_types() == set(CASES)


@pytest.fixture(params=PARAMS)
def case(request):
    kind, make, data = request.param
    spec, x = make(), data()
    assert type(spec).packed_type == kind
    return spec, x, spec.calibrate(x)


def test_calibrate_returns_a_calibrated_copy_and_leaves_the_spec_alone(case):
    spec, x, q = case
    before = spec.config()
    assert q is not spec and type(q) is type(spec)
    assert q.calibrated and not spec.calibrated
    assert spec.config() == before == q.config()
    with pytest.raises(RuntimeError, match="calibrate"):
        spec.encode(x)


def test_codes_lie_in_0_to_2_to_the_bits(case):
    _, x, q = case
    codes = q.encode(torch.stack([x, 10 * x, -10 * x]))  # values far outside the range as well
    assert codes.dtype == torch.int64
    assert bool((codes >= 0).all()) and bool((codes < 2**q.bits).all())
    if q.code_count() is not None:
        assert int(codes.max()) < q.code_count()


def test_encode_and_decode_invert_each_other_on_the_grid(case):
    _, x, q = case
    codes = q.encode(x)
    values = q.decode(codes, x.dtype)
    assert values.shape == x.shape and values.dtype == x.dtype
    assert torch.equal(values, q.quantize(x))
    assert torch.equal(q.encode(values), codes)


def test_quantizing_twice_changes_nothing(case):
    _, x, q = case
    once = q.quantize(x)
    assert torch.equal(q.quantize(once), once)


def test_the_state_rebuilds_a_quantizer_that_decodes_the_same(case):
    _, x, q = case
    state, layout = q.state(), type(q).packed_layout(q.config(), list(x.shape), q.packed_size())
    assert sorted(state) == sorted(name for name, _, _ in layout)
    for name, stream, shape in layout:  # the layout the packed file and metadata_bits rely on
        assert list(state[name].shape) == shape and state[name].dtype == STREAM_DTYPES[stream], name
    assert q.metadata_bits() == sum(STATE_STREAMS[s] * math.prod(shape) for _, s, shape in layout)
    back = quantizer_from_state(q.config(), q.bits, state, x.shape)
    assert type(back) is type(q) and back.config() == q.config()
    codes = q.encode(x)
    assert torch.equal(back.decode(codes), q.decode(codes))
    assert torch.equal(back.encode(x), codes)


def test_the_gradient_passes_straight_through(case):
    _, x, q = case
    leaf = x.clone().requires_grad_(True)
    out = q(leaf)
    assert torch.equal(out.detach(), q.quantize(x))
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(x))


def test_leading_sample_dimensions_broadcast(case):
    _, x, q = case
    samples = torch.stack([x, 0.5 * x, x])
    assert torch.equal(q.quantize(samples)[2], q.quantize(x))
