"""Bit allocators of pyro_bq.mixed on toy posteriors (fast)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_bq.guides import quantize
from pyro_bq.io import load_packed, memory_report, save_packed
from pyro_bq.mixed import (
    BitAllocation,
    bits_from_s,
    bits_table,
    layer_informativeness,
    mean_bits,
    noise_amplitude,
    normalized_informativeness,
    plot_bits,
    quantile_inform,
    quantize_means,
    random_bits,
    s_from_bits,
    smol_penalty,
)
from pyro_bq.quant import (
    JQ,
    VPQ,
    GaussianLloydQuantizer,
    IntervalQuantizer,
    SignedGridQuantizer,
    SiteQuantizers,
    make_policy,
    nearest_code,
)
from pyro_bq.quant.lloyd_max import (
    expected_abs_error,
    gaussian_quantile_levels,
    lloyd_max_median,
    median_condition_residual,
)


def odd_multiples(theta, bits):
    """The nearest value of ``bits`` signed bits: an odd multiple of ``2**(1-bits)`` of magnitude below 2."""
    half = torch.pow(2.0, 1.0 - torch.as_tensor(bits, dtype=theta.dtype))
    return torch.clamp((2 * torch.floor(theta / (2 * half)) + 1) * half, -(2 - half), 2 - half)


def policy_of(alloc, mode="vpq", bits=8):
    """The allocation as a policy of ``mode``: a plain constructor call."""
    return make_policy(mode, bits, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers)


def signed_allocation(bits, scales, sizes, method="SMOL"):
    """A SMOL-style allocation: ``bits`` on each site's signed grid of scale ``scales[site]``."""
    grids = {n: {"loc": SignedGridQuantizer(b, scale=scales[n])} for n, b in bits.items()}
    return BitAllocation(bits, method=method, sizes=sizes, grid="signed", info={"scales": scales}, site_quantizers=grids)


def toy_two_layer(seed=0, n=400):
    """Layer "informative" has |mu|/sigma ~ 100, layer "vague" ~ 1; same size."""
    g = torch.Generator().manual_seed(seed)
    mu_a = torch.randn(n, generator=g)
    mu_b = torch.randn(n, generator=g)
    return {
        "informative": (mu_a, torch.full((n,), 0.01)),
        "vague": (mu_b, torch.full((n,), 1.0)),
    }


def toy_many(num_layers, seed=0, size=50):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(num_layers):
        mu = torch.randn(size, generator=g)
        sigma = torch.rand(size, generator=g) * 0.1 + 0.02 * (i + 1) ** 1.3
        out[f"layer{i}"] = (mu, sigma)
    return out


# -- informativeness --------------------------------------------------------------------

def test_mean_and_entropy_aggregation_by_hand():
    post = {"a": (torch.tensor([1.0, -2.0, 0.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 2.0]))}
    assert layer_informativeness(post, "mean")["a"] == pytest.approx((1 + 2 + 0 + 2) / 4)
    p = torch.tensor([1.0, 2.0, 0.0, 2.0]) / 5
    h = -sum(float(v * math.log(v)) for v in p if v > 0)
    assert layer_informativeness(post, "entropy")["a"] == pytest.approx(1 - h / math.log(4))


def test_normalisation_is_minmax_then_sqrt():
    norm = normalized_informativeness({"a": 1.0, "b": 3.0, "c": 2.0})
    assert norm == pytest.approx({"a": 0.0, "b": 1.0, "c": math.sqrt(0.5)})


def test_mean_bits_weights_by_site_size():
    assert mean_bits({"a": 2, "b": 8}, {"a": 3, "b": 1}) == pytest.approx((6 + 8) / 4)
    assert mean_bits({"a": torch.tensor([1, 3]), "b": 4}, {"a": 2, "b": 2}) == pytest.approx(3.0)


# -- Quantile Inform --------------------------------------------------------------------

@pytest.mark.parametrize("aggregate", ["mean", "entropy"])
@pytest.mark.parametrize("grid", ["uniform", "gaussian"])
def test_qi_gives_informative_layer_more_bits(aggregate, grid):
    post = toy_two_layer()
    if aggregate == "entropy":
        # entropy confidence rewards a few dominant weights: make the informative layer sparse
        mu, s = post["informative"]
        mu = torch.where(torch.arange(mu.numel()) % 20 == 0, mu * 100, mu * 0.01)
        post["informative"] = (mu, s)
    a = quantile_inform(post, 4.0, candidate_bits=range(2, 9), aggregate=aggregate, grid=grid)
    assert a["informative"] > a["vague"]
    assert a.method == ("QIU" if grid == "uniform" else "QINU")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), target=st.floats(2.0, 7.6))
def test_qi_scaling_search_hits_target(seed, target):
    post = toy_many(20, seed=seed)
    a = quantile_inform(post, target, candidate_bits=range(2, 9))
    assert abs(a.mean_bits - target) <= 0.05
    assert set(a.values()) <= set(range(2, 9))


def test_qi_at_most_mode_never_exceeds_target():
    post = toy_many(7, seed=3, size=10)
    for target in (2.3, 3.2, 4.4, 5.9):
        a = quantile_inform(post, target, mode="at_most")
        assert a.mean_bits <= target + 1e-9


def test_qi_more_informative_never_fewer_bits():
    post = toy_many(10, seed=1)
    a = quantile_inform(post, 4.0)
    info = a.info["normalized_informativeness"]
    names = sorted(info, key=info.get)
    widths = [a[n] for n in names]
    assert widths == sorted(widths)


# -- Random Bits ----------------------------------------------------------------------

def test_rb_informative_layer_more_bits_loss_decreases_and_mean_hits_target():
    post = toy_two_layer()
    a = random_bits(post, 4.0, candidate_bits=range(2, 9), num_steps=600)
    assert a["informative"] > a["vague"]
    loss = a.info["loss"]
    assert loss[-1] < loss[0]
    assert loss[-1] <= min(loss[:50])
    assert abs(a.info["expected_mean_bits"] - 4.0) <= 0.1
    assert abs(a.mean_bits - 4.0) <= 0.1
    assert a.method == "RB" and a.grid == "uniform-interval"


def test_rb_budget_rounding_mean_close_to_target():
    post = toy_many(12, seed=5)
    for target in (3.2, 4.5):
        a = random_bits(post, target, num_steps=400, rounding="budget")
        assert abs(a.info["expected_mean_bits"] - target) <= 0.1
        assert abs(a.mean_bits - target) <= 0.1


def test_rb_boundaries_never_increase_site_error():
    from pyro_bq.mixed.informativeness import validated
    from pyro_bq.mixed.random_bits import RandomBitsProblem

    post = toy_many(4, seed=2)
    a = random_bits(post, 2.5, candidate_bits=range(2, 9), num_steps=200, boundary_every=5, boundary_steps=3)
    prob = RandomBitsProblem(validated(post), list(range(2, 9)))
    bits = torch.tensor([float(a[n]) for n in prob.names])
    start = prob.site_errors(prob.alpha, prob.beta, bits)
    alpha = torch.tensor([a.info["alpha"][n] for n in prob.names])
    beta = torch.tensor([a.info["beta"][n] for n in prob.names])
    end = prob.site_errors(alpha, beta, bits)
    assert bool((end <= start * (1 + 1e-5)).all())
    assert bool((beta > alpha).all())


# -- Lloyd-Max / grids -----------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_lloyd_max_never_increases_error(bits):
    r = lloyd_max_median(gaussian_quantile_levels(bits), max_iter=300)
    errs = torch.tensor(r.errors, dtype=torch.float64)
    assert bool((errs[1:] <= errs[:-1] + 1e-13).all())
    assert errs[-1] <= errs[0]


@pytest.mark.parametrize("bits", [2, 3])
def test_lloyd_max_fixed_point_satisfies_median_conditions(bits):
    init = gaussian_quantile_levels(bits)
    assert median_condition_residual(init).abs().max() > 1e-4  # the start is not a fixed point
    r = lloyd_max_median(init, max_iter=5000, tol=1e-13)
    assert r.converged
    assert median_condition_residual(r.levels).abs().max() < 1e-9
    # symmetric, like the Normal
    assert torch.allclose(r.levels, -r.levels.flip(0), atol=1e-9)


def test_gaussian_quantile_levels_by_hand():
    lv = gaussian_quantile_levels(2)  # boundaries at the quartiles
    a = float(torch.special.ndtri(torch.tensor(0.75, dtype=torch.float64)))
    tail = float(torch.special.ndtri(torch.tensor(7 / 8, dtype=torch.float64)))
    assert lv.tolist() == pytest.approx([-tail, -a / 2, a / 2, tail])


def test_expected_abs_error_matches_monte_carlo():
    lv = torch.tensor([-1.3, -0.2, 0.4, 1.1], dtype=torch.float64)
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mc = float((z - nearest_code(z, lv)).abs().mean())
    assert expected_abs_error(lv) == pytest.approx(mc, abs=3e-3)


def test_interval_grid_by_hand():
    x = torch.tensor([-5.0, 0.0, 0.26, 0.5, 5.0])
    q = IntervalQuantizer(2, interval=(0.0, 1.0)).calibrate(x)  # levels 0, 1/3, 2/3, 1; 0.5 is a tie
    assert q.quantize(x).tolist() == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3, 1.0])


def test_widths_are_capped_at_16_bits_everywhere():
    assert gaussian_quantile_levels(16).numel() == 2**16
    with pytest.raises(ValueError, match="bits"):
        gaussian_quantile_levels(17)
    with pytest.raises(ValueError, match="1, 16"):
        BitAllocation({"a": 20}, method="QINU", sizes={"a": 20}, grid="gaussian-lloyd")
    with pytest.raises(ValueError, match="candidate_bits"):
        quantile_inform(toy_two_layer(), 4.0, candidate_bits=[2, 17])
    with pytest.raises(ValueError, match="1, 16"):
        mean_bits({"a": 17}, {"a": 3})


def test_an_allocation_without_a_grid_has_no_means_of_its_own():
    post = {"a": (torch.randn(20), torch.ones(20))}
    alloc = BitAllocation({"a": 3}, method="hand", sizes={"a": 20}, grid="none")
    with pytest.raises(ValueError, match="no grid for site 'a'"):
        quantize_means(post, alloc)
    with pytest.raises(ValueError, match="site_quantizers names site 'b'"):
        BitAllocation({"a": 3}, method="hand", sizes={"a": 20}, grid="none", site_quantizers={"b": {}})


def _positive_toy(seed=0):
    """Means all positive and away from 0, so a grid that must contain 0 differs from the paper's."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a": (1.0 + torch.rand(300, generator=g), torch.full((300,), 0.05)),
        "b": (torch.randn(7, 9, generator=g) * 0.2 - 0.5, torch.full((7, 9), 0.5)),
    }


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_the_qiu_grid_is_the_papers(bits):
    post = _positive_toy()
    alloc = quantile_inform(post, bits, candidate_bits=[bits])
    assert all(isinstance(g["loc"], IntervalQuantizer) for g in alloc.site_quantizers.values())
    ref = quantize_means(post, alloc)
    for name, (loc, _) in post.items():
        q = IntervalQuantizer(bits).calibrate(loc)
        lo, hi = torch.quantile(loc.double().flatten(), torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
        assert q.interval() == pytest.approx((lo, hi), rel=1e-12)
        # 2**b levels alpha + s k from the 5th to the 95th percentile, no zero point
        levels = q.levels()
        assert levels.numel() == 2**bits
        assert float(levels[0]) == pytest.approx(lo, rel=1e-6) and float(levels[-1]) == pytest.approx(hi, rel=1e-6)
        assert torch.allclose(levels.diff(), torch.full((2**bits - 1,), (hi - lo) / (2**bits - 1)), rtol=1e-4)
        assert torch.equal(q.quantize(loc), ref[name])  # bit for bit
        assert set(torch.unique(ref[name]).tolist()) <= set(levels.tolist())
    assert float(ref["a"].min()) > 1.0  # 0 is not forced onto the grid


def test_a_qiu_policy_quantizes_the_means_as_the_allocation_does(small_guide, tmp_path):
    model, guide = small_guide
    with torch.no_grad():  # all means positive, so the paper's grid and a zero-point grid differ
        guide.loc.copy_(0.3 + torch.rand(guide.loc.shape, generator=torch.Generator().manual_seed(1)))
    alloc = quantile_inform(guide, 4.0)
    assert alloc.grid == "uniform-percentile" and len(set(alloc.values())) > 1
    ref = quantize_means(guide, alloc)
    for mode in ("vpq", "spq", "jq"):
        q = quantize(guide, policy_of(alloc, mode))
        for name in guide.sites:
            loc_q = q.get_loc_scale(name)[0]
            if mode == "spq":  # float means; the samples use the policy's sample grid
                assert q.quantizers[name].loc is None
                continue
            assert isinstance(q.quantizers[name].loc, IntervalQuantizer)
            assert torch.equal(loc_q, ref[name])
            assert float(loc_q.detach().min()) >= 0.3
        # packing and the memory report handle the grid; a file reads back the same means
        report = memory_report(q)
        path = tmp_path / f"qiu-{mode}.bq"
        assert save_packed(q, path) == report.file_bytes
        back = load_packed(path, model)
        for name in guide.sites:
            assert torch.equal(back.get_loc_scale(name)[0], q.get_loc_scale(name)[0])
        if mode != "spq":
            row = {s.name: s for s in report.sites}
            for name in guide.sites:  # loc codes at the allocation's bits
                assert row[name].code_bits >= alloc[name] * alloc.sizes[name]


# -- SMOL ------------------------------------------------------------------------------

def test_smol_noise_and_penalty_by_hand():
    # p = 3 bits: noise half-width 2**(1-3) = 1/4; s = logit(1/4) = log(1/3)
    assert float(noise_amplitude(3)) == pytest.approx(0.25)
    s = s_from_bits(3.0)
    assert float(s) == pytest.approx(math.log(1 / 3))
    assert float(torch.sigmoid(s)) == pytest.approx(0.25)
    # log2(1 + e^-s) = log2(1 + 3) = 2 = p - 1
    assert float(smol_penalty(s.reshape(1), 0.5)) == pytest.approx(0.5 * 2.0)
    s2 = torch.tensor([0.0, 2.0, -1.5])
    expected = 1e-3 * sum(math.log2(1 + math.exp(-v)) for v in s2.tolist())
    assert float(smol_penalty(s2, 1e-3)) == pytest.approx(expected)
    p = torch.tensor([1.5, 2.0, 4.25, 8.0], dtype=torch.float64)
    assert torch.allclose(bits_from_s(s_from_bits(p)), p)
    with pytest.raises(ValueError, match="bits"):
        s_from_bits(1.0)


def test_signed_grid_levels_and_error_bound():
    # two signed bits: +-0.5, +-1.5
    theta = torch.tensor([-1.9, -0.7, -0.1, 0.1, 0.9, 1.2, 1.99])
    q = SignedGridQuantizer(2, scale=1.0).calibrate(theta)
    assert q.quantize(theta).tolist() == pytest.approx([-1.5, -0.5, -0.5, 0.5, 0.5, 1.5, 1.5])
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(1)) * 4 - 2
    for p in range(1, 7):
        v = SignedGridQuantizer(p, scale=1.0).calibrate(x).quantize(x)
        assert len(torch.unique(v)) <= 2**p
        assert float((v - x).abs().max()) <= 2.0 ** (1 - p) + 1e-6
        assert torch.equal(v, odd_multiples(x, p))


# -- validation ------------------------------------------------------------------------

@pytest.mark.parametrize("alloc", [quantile_inform, random_bits])
def test_bad_input_errors(alloc):
    post = toy_two_layer()
    with pytest.raises(ValueError, match="target_mean_bits"):
        alloc(post, 9.0, candidate_bits=range(2, 9))
    with pytest.raises(ValueError, match="target_mean_bits"):
        alloc(post, 1.5, candidate_bits=[2, 4])
    with pytest.raises(ValueError, match="candidate_bits"):
        alloc(post, 3.0, candidate_bits=[])
    with pytest.raises(TypeError, match="target_mean_bits"):
        alloc(post, "3")
    bad = dict(post)
    bad["vague"] = (post["vague"][0], torch.zeros(400))
    with pytest.raises(ValueError, match="sigma"):
        alloc(bad, 3.0)
    bad["vague"] = (post["vague"][0], -torch.ones(400))
    with pytest.raises(ValueError, match="sigma"):
        alloc(bad, 3.0)
    with pytest.raises(TypeError, match="posterior"):
        alloc([1, 2], 3.0)


# -- policies and reporting --------------------------------------------------------------

@pytest.fixture
def small_guide():
    from pyro_bq import IIDNormal
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.models import MLP, BayesianClassifier

    torch.manual_seed(0)
    model = BayesianClassifier(MLP((6, 16, 3)), IIDNormal(1.0), dataset_size=64)
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    guide.setup(torch.randn(4, 6))
    return model, guide


def test_allocations_plug_into_policies(small_guide):
    model, guide = small_guide
    for alloc in (
        quantile_inform(guide, 4.0),
        quantile_inform(guide, 4.0, grid="gaussian"),
        random_bits(guide, 4.0, num_steps=100),
    ):
        assert isinstance(alloc, BitAllocation) and isinstance(alloc, dict)
        assert set(alloc) == set(guide.sites)
        q = quantize(guide, policy_of(alloc, "vpq"))
        med, ref = q.median(), quantize_means(guide, alloc)
        for name in guide.sites:
            levels = torch.unique(med[name])
            assert levels.numel() <= 2 ** alloc[name]
            assert torch.allclose(med[name], ref[name], atol=1e-6)
        quantize(guide, VPQ(8, site_bits=alloc))  # a plain policy takes the map too
        quantize(guide, JQ(8, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers))


def test_per_parameter_bits_plug_into_policy(small_guide):
    from pyro_bq.mixed.smol import site_scales
    from pyro_bq.mixed.informativeness import validated

    model, guide = small_guide
    params = validated(guide)
    bits = {n: (torch.arange(loc.numel()) % 4 + 1).reshape(loc.shape) for n, (loc, _) in params.items()}
    scales = site_scales(params)
    alloc = signed_allocation(bits, scales, {n: l.numel() for n, (l, _) in params.items()})
    q = quantize(guide, policy_of(alloc))
    med = q.median()
    for n, (loc, _) in params.items():
        expected = scales[n] * odd_multiples(loc / scales[n], bits[n])
        assert torch.allclose(med[n], expected, atol=1e-6)
    assert alloc.mean_bits == pytest.approx(2.5, abs=0.1)


def test_smol_runs_and_lambda_lowers_bits(small_guide):
    from pyro_bq.data import InMemoryDataset
    from pyro_bq.mixed import smol

    model, guide = small_guide
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    data = InMemoryDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())
    low, tuned = smol(model, guide, data, lam=0.0, precision_steps=15, finetune_steps=3, batch_size=32, s_lr=0.2)
    high, _ = smol(model, guide, data, lam=1.0, precision_steps=15, finetune_steps=3, batch_size=32, s_lr=0.2)
    for name, (loc, _) in zip(guide.sites, (guide.get_loc_scale(n) for n in guide.sites)):
        assert high[name].shape == loc.shape and high[name].dtype == torch.int64
    assert high.mean_bits < low.mean_bits
    assert 1 <= high.mean_bits <= 8
    # the quantized means are on each weight's signed grid
    for name in guide.sites:
        c = high.info["scales"][name]
        q = high.info["locs"][name] / c
        assert torch.allclose(odd_multiples(q, high[name]), q, atol=1e-5)
        assert isinstance(high.site_quantizers[name]["loc"], SignedGridQuantizer)
    layer, _ = smol(model, guide, data, lam=1.0, granularity="layer", precision_steps=5, finetune_steps=2, batch_size=32)
    assert all(isinstance(v, int) for v in layer.values()) and layer.method == "SMOL-L"
    with pytest.raises(ValueError, match="granularity"):
        smol(model, guide, data, granularity="channel")


def test_smol_on_a_shuffled_dataloader_equals_the_in_memory_run(small_guide):
    from torch.utils.data import DataLoader, TensorDataset

    from pyro_bq.data import InMemoryDataset
    from pyro_bq.inference.batches import BatchError
    from pyro_bq.mixed import smol

    model, guide = small_guide
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    options = dict(lam=0.5, precision_steps=5, finetune_steps=3, batch_size=16, s_lr=0.2, seed=2)
    ref, ref_guide = smol(model, guide, InMemoryDataset(x, y), **options)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    got, got_guide = smol(model, guide, loader, device="cpu", **options)
    assert torch.allclose(torch.tensor(got.info["precision_loss"]), torch.tensor(ref.info["precision_loss"]), rtol=1e-5)
    for name in guide.sites:
        assert torch.equal(got[name], ref[name])
        assert torch.allclose(got.info["locs"][name], ref.info["locs"][name], atol=1e-6)
    batches = [(x[:32], y[:32]), (x[32:], y[32:] - 5)]
    with pytest.raises(BatchError, match="batch 1 of epoch 0"):
        smol(model, guide, batches, **options)


def test_bits_table_and_plot(tmp_path):
    post = toy_many(5)
    allocs = {"QIU": quantile_inform(post, 4.0), "RB": random_bits(post, 4.0, num_steps=50)}
    table = bits_table(allocs)
    for name in post:
        assert name in table
    assert f"{allocs['QIU'].mean_bits:.3f}" in table
    plot_bits(allocs, tmp_path / "bits.png")
    assert (tmp_path / "bits.png").stat().st_size > 1000


# -- packed files of every allocation policy -----------------------------------------------

_LOC_GRIDS = {"QIU": "IntervalQuantizer", "QINU": "GaussianLloydQuantizer", "RB": "IntervalQuantizer",
              "SMOL": "SignedGridQuantizer", "SMOL-L": "SignedGridQuantizer", "SMOL-run": "SignedGridQuantizer"}
_MIXED = {}


def _mixed_setup():
    """A small guide and one allocation of each kind (built once: the allocators are the slow part)."""
    if _MIXED:
        return _MIXED["setup"]
    from pyro_bq import IIDNormal
    from pyro_bq.data import InMemoryDataset
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.mixed import smol
    from pyro_bq.mixed.informativeness import validated
    from pyro_bq.mixed.smol import site_scales
    from pyro_bq.models import MLP, BayesianClassifier

    torch.manual_seed(0)
    model = BayesianClassifier(MLP((6, 16, 3)), IIDNormal(1.0), dataset_size=64)
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    guide.setup(x)
    params = validated(guide)
    sizes = {n: loc.numel() for n, (loc, _) in params.items()}
    scales = site_scales(params)
    per_param = {n: (torch.arange(loc.numel()) % 6 + 1).reshape(loc.shape) for n, (loc, _) in params.items()}
    data = InMemoryDataset(x, (x[:, 0] > 0).long())
    allocs = {
        "QIU": quantile_inform(guide, 4.0),
        "QINU": quantile_inform(guide, 4.0, grid="gaussian"),
        "RB": random_bits(guide, 4.0, num_steps=50),
        "SMOL": signed_allocation(per_param, scales, sizes),
        "SMOL-L": signed_allocation({n: 2 + i % 3 for i, n in enumerate(params)}, scales, sizes, "SMOL-L"),
        "SMOL-run": smol(model, guide, data, lam=0.5, precision_steps=3, finetune_steps=1, batch_size=8)[0],
    }
    _MIXED["setup"] = (model, guide, x, allocs)
    return _MIXED["setup"]


def _predict(model, guide, x, seed=7):
    import pyro
    from pyro.infer import Predictive

    pyro.set_rng_seed(seed)
    return Predictive(model, guide=guide, num_samples=3, return_sites=["logits"])(x)["logits"]


@pytest.mark.parametrize("mode", ["vpq", "spq", "jq"])
@pytest.mark.parametrize("method", list(_LOC_GRIDS))
def test_every_allocation_policy_round_trips_through_a_packed_file(method, mode, tmp_path):
    """QIU, QINU, RB and SMOL policies save, load to a guide that predicts the same, and the
    memory report gives the file's size."""
    model, guide, x, allocs = _mixed_setup()
    alloc = allocs[method]
    q = quantize(guide, policy_of(alloc, mode))
    path = tmp_path / f"{method}-{mode}.bq"
    size = save_packed(q, path)
    assert size == path.stat().st_size
    report = memory_report(q)
    assert abs(report.file_bytes - size) <= 0.01 * size
    back = load_packed(path, model)
    for name in guide.sites:
        a, b = q.quantizers[name], back.quantizers[name]
        for quantity in ("loc", "scale", "sample"):
            qa, qb = getattr(a, quantity), getattr(b, quantity)
            assert type(qa) is type(qb), (name, quantity)
            if qa is not None:
                assert qa.config() == qb.config()
                assert qa.metadata_bits() == qb.metadata_bits()
                assert (torch.equal(qa.bits, qb.bits) if isinstance(qa.bits, torch.Tensor) else qa.bits == qb.bits)
        if mode != "spq":
            assert type(a.loc).__name__ == _LOC_GRIDS[method]
        la, lb = q.get_loc_scale(name), back.get_loc_scale(name)
        assert torch.equal(la[0], lb[0]) and torch.equal(la[1], lb[1])
    assert torch.equal(_predict(model, q, x), _predict(model, back, x))
    assert torch.equal(_predict(model, q, x, seed=8), _predict(model, back, x, seed=8))
    rows = {s.name: s for s in report.sites}
    per_element = isinstance(next(iter(alloc.values())), torch.Tensor)
    for name in guide.sites:
        assert (rows[name].bitmap_bits > 0) == per_element  # the allocation's bits tensors use the bit map
        if mode != "spq":  # at least the loc codes at the allocation's bits
            want = int(alloc[name].sum()) if per_element else alloc[name] * alloc.sizes[name]
            assert rows[name].code_bits >= want


def test_mixed_quantizers_metadata_is_their_float64_state():
    loc = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    bits = torch.randint(1, 7, (5, 4), generator=torch.Generator().manual_seed(1))
    for q, meta in ((GaussianLloydQuantizer(3), 128), (IntervalQuantizer(bits, interval=(-1.0, 1.0)), 128),
                    (SignedGridQuantizer(bits), 64), (IntervalQuantizer(4), 128)):
        q = q.calibrate(loc)
        assert q.metadata_bits() == meta
        state = q.state()
        assert all(t.dtype == torch.float64 for t in state.values())
        back = q.load_state(state, loc.shape)
        assert torch.equal(back.quantize(loc), q.quantize(loc))


def _all_mixed_file(folder):
    """A packed file whose sites use the allocators' quantizers (bit maps included), and its model."""
    model, guide, x, allocs = _mixed_setup()
    q = quantize(guide, JQ(4))
    for i, name in enumerate(guide.sites):
        loc = guide.get_loc_scale(name)[0].detach()
        bits = (torch.arange(loc.numel()) % 5 + 1).reshape(loc.shape)
        make = [lambda: GaussianLloydQuantizer(3), lambda: IntervalQuantizer(bits, interval=(-0.2, 0.3)),
                lambda: SignedGridQuantizer(bits), lambda: IntervalQuantizer(4)][i % 4]
        old = q.quantizers[name]
        q.quantizers[name] = SiteQuantizers(loc=make().calibrate(loc), scale=old.scale, sample=old.sample)
    path = folder / "mixed.bq"
    save_packed(q, path)
    return path, model, q


def test_a_file_of_all_mixed_quantizers_loads_exactly(tmp_path):
    path, model, q = _all_mixed_file(tmp_path)
    back = load_packed(path, model)
    for name in q.sites:
        assert type(back.quantizers[name].loc) is type(q.quantizers[name].loc)
        assert torch.equal(back.get_loc_scale(name)[0], q.get_loc_scale(name)[0])
    assert memory_report(q).file_bytes == path.stat().st_size


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    return _all_mixed_file(tmp_path_factory.mktemp("mixed"))


def _set(key, value):
    def edit(cfg, item):
        cfg[key] = value
    return edit


def _drop(key):
    def edit(cfg, item):
        del cfg[key]
    return edit


def _item(fn):
    def edit(cfg, item):
        fn(item)
    return edit


@pytest.mark.parametrize("kind, edit, words", [
    ("gaussian-lloyd", _set("max_iter", -1), "max_iter"),
    ("gaussian-lloyd", _set("max_iter", "9"), "max_iter"),
    ("gaussian-lloyd", _drop("max_iter"), "keys"),
    ("interval", _set("lo", 0.0), "keys"),
    ("interval", _set("high", 95.0), "keys"),  # {"type": "interval"} alone is the earlier fixed-interval form
    ("interval", _set("percentiles", [200.0, 95.0]), "percentiles"),
    ("interval", _set("percentiles", [99.0, 5.0]), "low < high"),
    ("interval", _set("percentiles", "5-95"), "percentiles"),
    ("signed", _set("type", "signed-v2"), "'type' is one of"),
    ("gaussian-lloyd", _item(lambda item: item.__setitem__(1, -1)), "per-element bits"),
    ("interval", _item(lambda item: item.append(5)), "needs"),
    ("interval", _item(lambda item: item.__setitem__(1, 17)), "bits"),
])
def test_edited_headers_of_mixed_quantizer_files_give_clear_errors(tmp_path, mixed_file, kind, edit, words):
    from pyro_bq.io import CorruptFileError
    from pyro_bq.io.container import read_container, write_container

    path, model, _ = mixed_file
    meta, tensors = read_container(path, "packed-guide")
    idx = next(i for i, c in enumerate(meta["cfgs"]) if c["type"] == kind)
    item = next(e[3] for e in meta["sites"] if e[3] is not None and e[3][0] == idx)  # a loc using it
    edit(meta["cfgs"][idx], item)
    crafted = tmp_path / "edited.bq"
    write_container(crafted, "packed-guide", meta, tensors)
    with pytest.raises(CorruptFileError, match=words) as info:
        load_packed(crafted, model)
    assert str(crafted) in str(info.value)


@pytest.mark.parametrize("which, key, values", [
    ("IntervalQuantizer", "interval", [0.5, -0.5]),
    ("IntervalQuantizer", "interval", [math.nan, 1.0]),
    ("GaussianLloydQuantizer", "std", [0.0]),
    ("GaussianLloydQuantizer", "mean", [math.inf]),
    ("SignedGridQuantizer", "scale", [-1.0]),
    ("IntervalQuantizer", "interval", [1.0, 1.0]),
])
def test_bad_float64_state_in_a_resealed_file_gives_a_clear_error(tmp_path, which, key, values):
    """A file whose float64 calibration data was edited (and its checksum redone) is refused by name."""
    from pyro_bq.io import CorruptFileError

    path, model, q = _all_mixed_file(tmp_path)
    loc_q = next(sq.loc for sq in q.quantizers.values() if type(sq.loc).__name__ == which)
    good = loc_q.state()
    loc_q.state = lambda: {**good, key: torch.tensor(values, dtype=torch.float64)}  # the codes stay valid
    crafted = tmp_path / "state.bq"
    save_packed(q, crafted)
    with pytest.raises(CorruptFileError, match="does not fit the data") as info:
        load_packed(crafted, model)
    assert str(crafted) in str(info.value)


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=st.data())
def test_random_header_edits_of_mixed_quantizer_files_never_crash(mixed_file, edit):
    from header_edits import check_edited_header_is_refused_clearly, header_leaves, read_meta

    path, model, _ = mixed_file
    meta, tensors = read_meta(path)
    leaves = [["cfgs"] + t for t in header_leaves(meta["cfgs"])] + [["sites"] + t for t in header_leaves(meta["sites"])]
    trail = edit.draw(st.sampled_from([t for t in leaves if len(t) > 1]))
    replacement = edit.draw(st.one_of(st.none(), st.integers(-3, 10**6), st.floats(), st.text(max_size=3),
                                      st.sampled_from(["interval", "signed", "gaussian-lloyd", "codebook"]), st.just([]), st.just({})))
    check_edited_header_is_refused_clearly(meta, tensors, trail, replacement, path.parent / "edited.bq", model)
