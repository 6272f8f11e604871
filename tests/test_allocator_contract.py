"""The allocator contract, run on QIU, QINU, Random Bits and SMOL (per parameter and per layer).

An allocator returns a :class:`~pyro_bq.mixed.BitAllocation`: a ``{site: bits}``
map keyed by the guide's site names, in its order, with valid widths; its mean
bits keeps the budget where the allocator promises one; a seed makes it
deterministic; and it becomes a policy through a plain constructor call that
:func:`~pyro_bq.guides.quantize` accepts, quantizing the means on the
allocator's own grid at the allocated widths.
"""

import pytest
import torch
from guide_contract import float_guide

from pyro_bq.data import InMemoryDataset
from pyro_bq.guides import quantize
from pyro_bq.mixed import BitAllocation, quantile_inform, quantize_means, random_bits, smol
from pyro_bq.quant import JQ, SPQ, VPQ, GaussianLloydQuantizer, IntervalQuantizer, SignedGridQuantizer, check_bits

TARGET = 3.5
CANDIDATES = range(2, 7)


def _smol(granularity):
    def run(model, guide, data, seed):
        return smol(model, guide, data, lam=0.0, granularity=granularity, precision_steps=4, finetune_steps=2,
                    batch_size=16, init_bits=3.9, s_lr=0.5, max_bits=6, seed=seed)

    return run


#: name -> (run(model, guide, data, seed) -> (allocation, guide to quantize), the grid of its means,
#:          whether its mean bits keeps the budget (at most TARGET))
ALLOCATORS = {
    "QIU": (lambda m, g, d, seed: (quantile_inform(g, TARGET, candidate_bits=CANDIDATES, mode="at_most"), g),
            IntervalQuantizer, True),
    "QINU": (lambda m, g, d, seed: (quantile_inform(g, TARGET, candidate_bits=CANDIDATES, grid="gaussian",
                                                    mode="at_most"), g), GaussianLloydQuantizer, True),
    "RB": (lambda m, g, d, seed: (random_bits(g, TARGET, candidate_bits=CANDIDATES, num_steps=150, seed=seed,
                                              rounding="budget"), g), IntervalQuantizer, False),
    "SMOL": (_smol("parameter"), SignedGridQuantizer, False),
    "SMOL-L": (_smol("layer"), SignedGridQuantizer, False),
}
_RUNS = {}


def _allocate(name, seed=0, global_seed=0):
    """(model, guide, allocation, guide to quantize), computed once per allocator and seed; the global
    generator is seeded with ``global_seed`` just before the allocator runs."""
    if (name, seed) not in _RUNS:
        model, guide, x, y = float_guide()
        torch.manual_seed(global_seed)
        alloc, base = ALLOCATORS[name][0](model, guide, InMemoryDataset(x, y), seed)
        _RUNS[(name, seed)] = model, guide, alloc, base
    return _RUNS[(name, seed)]


@pytest.fixture(params=list(ALLOCATORS))
def name(request):
    return request.param


def test_the_allocation_is_keyed_by_the_guide_sites(name):
    _, guide, alloc, _ = _allocate(name)
    assert isinstance(alloc, BitAllocation)
    assert list(alloc) == list(guide.sites)
    assert alloc.sizes == {n: info.numel for n, info in guide.sites.items()}


def test_the_widths_are_valid(name):
    _, guide, alloc, _ = _allocate(name)
    high = max(CANDIDATES)
    for site, bits in alloc.items():
        if isinstance(bits, torch.Tensor):
            assert bits.shape == guide.sites[site].shape
            assert torch.equal(check_bits(site, bits, allow_tensor=True), bits)
            assert int(bits.max()) <= high
        else:
            assert check_bits(site, bits) in CANDIDATES
    weights = sum(alloc.sizes.values())
    total = sum(float(b.double().sum()) if isinstance(b, torch.Tensor) else b * alloc.sizes[s] for s, b in alloc.items())
    assert alloc.mean_bits == pytest.approx(total / weights)


def test_the_mean_bits_keeps_the_budget_where_promised(name):
    _, _, alloc, _ = _allocate(name)
    if ALLOCATORS[name][2]:
        assert alloc.mean_bits <= TARGET + 1e-9
        # and it is the largest achievable mean that does
        best = max(m for m in alloc.info["achievable_mean_bits"] if m <= TARGET + 1e-9)  # rounded to 1e-6
        assert alloc.mean_bits == pytest.approx(best, abs=1e-6)
    if name == "RB":  # the expected width is pulled to the target, the rounded one stays near it
        assert abs(alloc.info["expected_mean_bits"] - TARGET) < 0.25
        assert abs(alloc.mean_bits - TARGET) <= 1.0


def _same(a, b):
    """``a`` and ``b`` hold the same values (dicts, lists, tensors, numbers, strings, quantizers)."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, (int, float, str, type(None))):
        assert a == b
    else:  # a quantizer template
        assert a.config() == b.config() and repr(a) == repr(b)


def test_a_seed_makes_the_allocation_deterministic(name):
    first = _allocate(name)[2]
    _RUNS.pop((name, 0))
    again = _allocate(name, global_seed=12345)[2]  # the global generator must not matter
    _same(dict(first), dict(again))
    _same(first.info, again.info)


@pytest.mark.parametrize("mode", [VPQ, SPQ, JQ])
def test_the_allocation_becomes_a_policy_by_a_constructor_call(name, mode):
    model, guide, alloc, base = _allocate(name)
    qguide = quantize(base, mode(8, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers))
    grid, means = ALLOCATORS[name][1], quantize_means(base, alloc)
    for site, bits in alloc.items():
        sq = qguide.quantizers[site]
        assert sq.scale is None or sq.scale.bits == 8  # scales keep the policy's own bits
        for quantizer in (sq.loc, sq.sample):
            if quantizer is not None:
                assert (torch.equal(quantizer.bits, bits) if isinstance(bits, torch.Tensor) else quantizer.bits == bits)
        if mode is SPQ:
            assert sq.loc is None
            continue
        assert type(sq.loc) is grid
        loc = qguide.get_loc_scale(site)[0]
        assert torch.equal(loc, means[site])
        if isinstance(bits, int):
            assert torch.unique(loc).numel() <= 2**bits
        if "locs" in alloc.info:  # SMOL's own quantized means
            assert torch.allclose(loc, alloc.info["locs"][site], rtol=0, atol=1e-6)


def test_storage_bits_are_what_the_packed_file_holds_for_the_means(name):
    """``storage_bits`` counts the codes, the bit map of per-weight widths and each site's grid data, as
    :func:`memory_report` of the quantized guide does (the file's scale codes and grids taken out)."""
    from pyro_bq.io import memory_report

    _, _, alloc, base = _allocate(name)
    qguide = quantize(base, VPQ(8, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers))
    report = memory_report(qguide)
    means = 0
    for site in report.sites:
        scale_q = qguide.quantizers[site.name].scale
        assert not isinstance(scale_q.bits, torch.Tensor) and qguide.quantizers[site.name].sample is None
        means += site.code_bits + site.bitmap_bits + site.metadata_bits - scale_q.bits * site.numel
        means -= scale_q.metadata_bits()
    assert alloc.storage_bits == pytest.approx(means / report.num_params, rel=1e-12)
    assert alloc.code_bits == alloc.mean_bits
    assert alloc.storage_bits > alloc.code_bits


def test_the_allocation_says_whether_it_trained_on_data(name):
    _, _, alloc, _ = _allocate(name)
    assert alloc.training == ("trained" if name.startswith("SMOL") else "data-free")
