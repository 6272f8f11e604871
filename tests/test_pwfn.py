"""PWFN: sigma initialisation, regulariser, clustering, freeze mask, metrics, validation."""

import math

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pyro_bq import IIDNormal
from pyro_bq.guides import init_to_pretrained
from pyro_bq.models import MLP, BayesianClassifier
from pyro_bq.pwfn import (
    PWFN,
    AutoPWFN,
    ClusterConfig,
    ClusterLevel,
    PWFNObjective,
    check_schedule,
    cluster_guide_,
    compression_stats,
    fl_bias_excluded_sites,
    prefix_within_tau,
    pwfn_cluster,
    pwfn_sigma_init,
    quantile,
    relative_pow2_distances,
    sigma_regularizer,
    weight_entropy,
)

S_MIN = 2.0**-30


# -- sigma initialisation (Eq. 12-13) -------------------------------------------------------
def test_relative_distances_hand_computed():
    mu = torch.tensor([0.0, 0.25, -0.5, 0.375, 0.3, 0.078125])
    d_lo, d_hi = relative_pow2_distances(mu)
    # 0.375 in [1/4, 1/2]: (0.375-0.25)/0.25 = 0.5, (0.5-0.375)/0.5 = 0.25
    # 0.3: 0.05/0.25 = 0.2, 0.2/0.5 = 0.4; 0.078125 in [1/16, 1/8]: 0.25, 0.375
    torch.testing.assert_close(d_lo, torch.tensor([0.0, 0.0, 0.0, 0.5, 0.2, 0.25]))
    torch.testing.assert_close(d_hi, torch.tensor([0.0, 0.5, 0.5, 0.25, 0.4, 0.375]))


def test_sigma_init_hand_computed_with_zeros_and_powers_of_two():
    mu = torch.tensor([0.0, 0.25, -0.5, 0.375, 0.3, 0.75, 0.078125])
    # v = d_lo * d_hi = [0, 0, 0, 0.125, 0.08, 0.125, 0.09375]
    # sorted: 0, 0, 0, 0.08, 0.09375, 0.125, 0.125; q75 at position 4.5 -> 0.109375
    q75 = 0.109375
    expect = torch.tensor(
        [S_MIN, S_MIN, S_MIN, 0.0025 * 0.125 / q75, 0.0025 * 0.08 / q75, 0.0025 * 0.125 / q75, 0.0025 * 0.09375 / q75]
    )
    torch.testing.assert_close(pwfn_sigma_init(mu), expect, rtol=1e-6, atol=0)


def test_sigma_init_clamps_to_upper_bound():
    # three of four on powers of two: q75 = 0.25 * v(0.375) ... tiny normaliser -> clamp at 0.05
    mu = torch.tensor([0.5, 0.25, 0.125, 0.375, 1.0, 2.0, 4.0, 8.0])
    sigma = pwfn_sigma_init(mu)
    assert sigma[3] == pytest.approx(0.05)
    assert bool((sigma[[0, 1, 2, 4, 5, 6, 7]] == S_MIN).all())


def test_sigma_init_all_zero_and_huge_input():
    assert bool((pwfn_sigma_init(torch.zeros(10)) == S_MIN).all())
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(12_000_000, generator=g) * 0.05
    mu[::7] = 0.0
    sigma = pwfn_sigma_init(mu)
    assert bool(torch.isfinite(sigma).all())
    assert float(sigma.min()) >= S_MIN and float(sigma.max()) <= 0.05
    assert bool((sigma[::7] == S_MIN).all())


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=50), st.floats(0, 1))
def test_quantile_matches_torch(xs, q):
    x = torch.tensor(xs, dtype=torch.float64)
    torch.testing.assert_close(quantile(x, q), torch.quantile(x, q), rtol=1e-9, atol=1e-12)


def test_sigma_init_rejects_bad_input():
    with pytest.raises(ValueError, match="mu"):
        pwfn_sigma_init(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="q"):
        pwfn_sigma_init(torch.tensor([0.1]), q=1.0)


# -- the prefix rule (Eq. 7-8) and one clustering step ------------------------------------------
def test_prefix_within_tau_hand_computed():
    d = torch.tensor([0.5, 3.0, 1.5, 0.2, 5.0])
    # sorted 0.2, 0.5, 1.5, 3, 5: running means 0.2, 0.35, 0.733, 1.3 -> three fit tau = 1
    assert prefix_within_tau(d, 1.0).tolist() == [True, False, True, True, False]
    assert prefix_within_tau(d, 1.0, limit=2).tolist() == [True, False, False, True, False]
    assert prefix_within_tau(d, 0.1).tolist() == [False] * 5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 20, allow_nan=False, width=32), min_size=1, max_size=40), st.floats(0.1, 6))
def test_prefix_within_tau_matches_sorting(ds, tau):
    d = torch.tensor(ds, dtype=torch.float64)
    vals = torch.sort(d).values
    means = torch.cumsum(vals, 0) / torch.arange(1, len(vals) + 1)
    m = int((means <= tau).long().cumprod(0).sum())
    sel = prefix_within_tau(d, tau)
    assert int(sel.sum()) == m
    if m:
        assert float(d[sel].max()) <= float(vals[m - 1])


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_prefix_within_tau_large_input_matches_sorting(tau):
    # > 65,536 candidates: exercises the bucketed search, not only the final sort
    g = torch.Generator().manual_seed(1)
    d = -torch.log(torch.rand(300_000, generator=g)) / 0.3
    vals = torch.sort(d).values
    m = int((torch.cumsum(vals.double(), 0) / torch.arange(1, len(d) + 1) <= tau).sum())
    sel = prefix_within_tau(d, tau)
    assert int(sel.sum()) == m
    assert float(d[sel].max()) == float(vals[m - 1])


def _toy():
    mu = torch.tensor([0.24, 0.26, 0.25, 0.5, 0.1, -0.3, 0.0, 0.9])
    sigma = torch.full_like(mu, 0.02)
    return mu, sigma, torch.zeros(8, dtype=torch.bool), torch.zeros(8), torch.ones(8)


def test_one_clustering_step_toy_vector():
    mu, sigma, fixed, loc, scale = _toy()
    res = pwfn_cluster(mu, sigma, fixed, loc, scale, 4, ClusterConfig(b=3, tau=1.0))
    # codebook 0, +-1/8, +-1/4, +-1/2, +-1: 1/4 is nearest to three weights and takes them
    # (distances 0.5, 0.5, 0 sigmas); the next centres in order: -1/4 (-0.3 is 2.5 sigmas
    # away: too far), then 0, which takes the weight 0.0 and completes the target of 4.
    assert res.fixed.tolist() == [True, True, True, False, False, False, True, False]
    assert res.fixed_loc[res.fixed].tolist() == [0.25, 0.25, 0.25, 0.0]
    std = math.sqrt((0.01**2 + 0.01**2) / 3)
    torch.testing.assert_close(res.fixed_scale[:3], torch.full((3,), std), rtol=1e-4, atol=0)
    assert float(res.fixed_scale[6]) == pytest.approx(S_MIN)
    assert [g["centre"] for g in res.groups] == [0.25, 0.0]
    assert res.level == ClusterLevel(3, 1, 1.0)
    # the inputs are untouched
    assert not bool(fixed.any())


def test_clustering_tau_jump_when_codebook_is_capped():
    mu = torch.tensor([0.3125])
    sigma = torch.tensor([2.0**-10])
    cfg = ClusterConfig(b=2, tau=1.0, max_b=2, max_order=1, level_rule="text")
    res = pwfn_cluster(mu, sigma, torch.zeros(1, dtype=torch.bool), torch.zeros(1), torch.ones(1), 1, cfg)
    # 0.3125 is 64 sigmas from 1/4 (the nearest code): tau steps 1, 2, ... up to 64
    assert res.fixed_loc.tolist() == [0.25]
    assert res.level.tau == 64.0


def test_tail_sweep_sends_far_weights_to_their_nearest_centre():
    mu = torch.tensor([0.3, 0.31, 0.7, 0.1])
    sigma = torch.full_like(mu, 1e-6)  # every weight is >= 5e4 sigmas from every centre
    cfg = ClusterConfig(b=2, max_b=2, max_order=1, max_jumps=0)
    res = pwfn_cluster(mu, sigma, torch.zeros(4, dtype=torch.bool), torch.zeros(4), torch.ones(4), 4, cfg)
    assert res.fixed_loc.tolist() == [0.25, 0.25, 0.5, 0.0]
    assert res.fixed_scale[:2].tolist() == pytest.approx([0.005, 0.005], rel=1e-3)
    assert res.fixed_scale[2:].tolist() == [S_MIN, S_MIN]
    assert all(g.get("sweep") for g in res.groups) and sum(g["count"] for g in res.groups) == 4
    # a partial target takes the nearest ones in sigmas: 0.7 (0.2 from 1/2) is left out
    res = pwfn_cluster(mu, sigma, torch.zeros(4, dtype=torch.bool), torch.zeros(4), torch.ones(4), 3, cfg)
    assert res.fixed.tolist() == [True, True, False, True]


def test_zero_fix_option():
    mu, sigma, fixed, loc, scale = _toy()
    res = pwfn_cluster(mu, sigma, fixed, loc, scale, 2, ClusterConfig(b=3, zero_fix=0.12))
    # the weights with |mu| <= 0.12 (0.1 and 0.0) go to 0 first, within the target of 2
    assert res.fixed.tolist() == [False, False, False, False, True, False, True, False]
    assert res.fixed_loc[res.fixed].tolist() == [0.0, 0.0]


def test_cluster_config_validation():
    with pytest.raises(ValueError, match="tau"):
        ClusterConfig(tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        ClusterConfig(tau=-1.0)
    with pytest.raises(ValueError, match="b"):
        ClusterConfig(b=-1)
    with pytest.raises(ValueError, match="b"):
        ClusterConfig(b=41)
    with pytest.raises(ValueError, match="order"):
        ClusterConfig(order=0)
    with pytest.raises(ValueError, match="sigma"):
        mu, sigma, fixed, loc, scale = _toy()
        pwfn_cluster(mu, torch.zeros_like(mu), fixed, loc, scale, 2)


def test_schedule_validation():
    assert check_schedule([0.5, 1]) == (0.5, 1.0)
    with pytest.raises(ValueError, match="increasing"):
        check_schedule([0.5, 0.4, 1.0])
    with pytest.raises(ValueError, match="increasing"):
        check_schedule([0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="end at 1"):
        check_schedule([0.2, 0.9])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_schedule([0.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        check_schedule([])


# -- guide, freeze mask, objective ------------------------------------------------------------------
def _small(pretrained=True, prior_scale=1.0, seed=0):
    torch.manual_seed(seed)
    net = MLP((784, 8, 10))
    model = BayesianClassifier(net, IIDNormal(prior_scale), dataset_size=100)
    init = init_to_pretrained(net) if pretrained else None
    guide = AutoPWFN(model, init_loc_fn=init)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    guide.setup(x, y)
    return model, guide, x, y


def test_guide_starts_at_pretrained_with_eq12_scales():
    model, guide, x, y = _small()
    loc, scale = guide.flat_loc_scale()
    init = model.initial_params()
    flat = torch.cat([init[name].reshape(-1) for name in guide.sites])
    assert torch.equal(loc.detach(), flat)
    torch.testing.assert_close(scale.detach(), pwfn_sigma_init(flat), rtol=1e-4, atol=1e-12)
    assert guide.started_from_pretrained


def test_no_prior_variant_is_uniform():
    torch.manual_seed(0)
    net = MLP((784, 8, 10))
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=100)
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net), prior_init=False, init_scale=0.003)
    guide.setup(torch.randn(4, 1, 28, 28))
    torch.testing.assert_close(guide.flat_loc_scale()[1].detach(), torch.full((guide.num_params,), 0.003))
    with pytest.raises(TypeError, match="prior_init"):
        AutoPWFN(model, prior_init="yes")


def test_freeze_mask_blocks_gradients_and_updates():
    model, guide, x, y = _small()
    res = cluster_guide_(guide, 0.5, ClusterConfig(b=6, tau=1.0))
    fixed = guide.fixed.clone()
    assert guide.num_fixed == math.ceil(0.5 * guide.num_params) == int(res.fixed.sum())
    loc0, scale0 = (t.detach().clone() for t in guide.flat_loc_scale())
    # the fixed values are codebook values with the group's std as scale
    assert torch.equal(loc0[fixed], guide.fixed_loc[fixed])
    obj = PWFNObjective(guide)
    loss = obj.differentiable_loss(model, guide, x, y)
    loss.backward()
    assert bool((guide.loc.grad[fixed] == 0).all()) and bool((guide.scale_raw.grad[fixed] == 0).all())
    assert bool((guide.loc.grad[~fixed] != 0).any())
    guide.loc.grad = guide.scale_raw.grad = None
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), obj)
    for _ in range(3):
        svi.step(x, y)
    loc1, scale1 = (t.detach() for t in guide.flat_loc_scale())
    assert torch.equal(loc1[fixed], loc0[fixed]) and torch.equal(scale1[fixed], scale0[fixed])
    assert torch.equal(guide.loc.detach()[fixed], loc0[fixed])  # the raw parameter did not move either
    assert not torch.equal(loc1[~fixed], loc0[~fixed])
    # median is the fixed values where fixed
    med = torch.cat([v.reshape(-1) for v in guide.median().values()])
    assert torch.equal(med[fixed], guide.fixed_loc[fixed])


def test_guide_state_dict_round_trip_keeps_the_mask():
    model, guide, x, y = _small()
    cluster_guide_(guide, 0.3, ClusterConfig(b=6))
    _, other, _, _ = _small(seed=1)
    other.load_state_dict(guide.state_dict())
    assert torch.equal(other.fixed, guide.fixed)
    assert torch.equal(other.flat_loc_scale()[0], guide.flat_loc_scale()[0])


def test_sigma_regularizer_hand_computed():
    sigma = torch.tensor([0.01, 0.05, 0.1, 0.02])
    assert float(sigma_regularizer(sigma, S=0.05, alpha=2.0)) == pytest.approx(2 * (0.04 + 0.03))
    free = torch.tensor([True, True, True, False])
    assert float(sigma_regularizer(sigma, S=0.05, alpha=2.0, free=free)) == pytest.approx(0.08)


@pytest.mark.parametrize("base", [Trace_ELBO, TraceMeanField_ELBO])
def test_paper_mode_has_no_kl_and_adds_the_regulariser(base):
    losses = {}
    for prior_scale in (1.0, 0.01):
        for mode in ("paper", "elbo"):
            for alpha in (0.0, 2.0**-11):
                pyro.clear_param_store()
                model, guide, x, y = _small(prior_scale=prior_scale)
                obj = PWFNObjective(guide, mode=mode, alpha=alpha, base=base())
                pyro.set_rng_seed(7)
                losses[prior_scale, mode, alpha] = float(obj.loss(model, guide, x, y))
    # the paper's mode ignores the prior entirely; the ELBO mode does not
    assert losses[1.0, "paper", 0.0] == pytest.approx(losses[0.01, "paper", 0.0], rel=1e-6)
    assert losses[1.0, "elbo", 0.0] != pytest.approx(losses[0.01, "elbo", 0.0], rel=1e-3)
    # the regulariser adds exactly dataset_size * alpha * sum(relu(S - sigma)) in both modes
    model, guide, x, y = _small()
    reg = 100 * float(sigma_regularizer(guide.flat_loc_scale()[1].detach(), alpha=2.0**-11))
    for mode in ("paper", "elbo"):
        diff = losses[1.0, mode, 2.0**-11] - losses[1.0, mode, 0.0]
        assert diff == pytest.approx(reg, rel=1e-4)


def test_paper_mode_needs_pretrained_guide():
    model, guide, x, y = _small(pretrained=False)
    with pytest.raises(ValueError, match="pretrained"):
        PWFNObjective(guide, mode="paper")
    PWFNObjective(guide, mode="elbo")  # fine
    with pytest.raises(ValueError, match="mode"):
        PWFNObjective(guide, mode="kl")
    with pytest.raises(ValueError, match="S"):
        PWFNObjective(guide, mode="elbo", S=0.0)
    with pytest.raises(TypeError, match="guide"):
        PWFNObjective(object())


def test_driver_validates_arguments(mnist_small):
    train, test = mnist_small
    model, guide, _, _ = _small(pretrained=False)
    with pytest.raises(ValueError, match="pretrained"):
        PWFN(model, guide, train)
    model, guide, _, _ = _small()
    with pytest.raises(ValueError, match="end at 1"):
        PWFN(model, guide, train, schedule=(0.5, 0.9))
    with pytest.raises(ValueError, match="increasing"):
        PWFN(model, guide, train, schedule=(0.5, 0.3, 1.0))
    with pytest.raises(ValueError, match="lr"):
        PWFN(model, guide, train, lr=0.0)


# -- metrics ------------------------------------------------------------------------------------------
def test_weight_entropy_hand_computed():
    assert weight_entropy(torch.tensor([0.0, 0.0, 0.5, 0.5])) == pytest.approx(1.0)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert weight_entropy({"a": torch.zeros(3), "b": torch.ones(1)}) == pytest.approx(h)
    assert weight_entropy(torch.full((7,), 0.25)) == 0.0


def test_fl_bias_exclusion_and_stats():
    sites = ["net.conv1.weight", "net.conv1.bias", "net.conv2.weight", "net.conv2.bias",
             "net.fc1.weight", "net.fc1.bias", "net.fc3.weight", "net.fc3.bias"]
    assert fl_bias_excluded_sites(sites) == ["net.conv2.weight", "net.fc1.weight"]
    w = {s: torch.zeros(4) for s in sites}
    w["net.conv2.weight"] = torch.tensor([0.0, 0.5, 0.5, 0.5])
    w["net.fc3.weight"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    stats = compression_stats(w)
    assert stats["unique"] == 6 and stats["unique_wo_fl_bias"] == 2
    p = 3 / 8
    assert stats["entropy_wo_fl_bias"] == pytest.approx(-(p * math.log2(p) + (1 - p) * math.log2(1 - p)))
    assert stats["codebook"] == [0.0, 0.5, 1.0, 2.0, 3.0, 4.0]


# -- packed export -------------------------------------------------------------------------------------
def test_codebook_policy_packs_a_fixed_guide_exactly(tmp_path):
    from pyro.infer import Predictive

    from pyro_bq.pwfn import codebook_policy
    from pyro_bq.guides import quantize
    from pyro_bq.io import load_packed, memory_report, save_packed

    model, guide, x, y = _small()
    with pytest.raises(ValueError, match="fixed"):
        codebook_policy(guide)  # nothing fixed yet
    with pytest.raises(TypeError, match="guide"):
        codebook_policy(object())
    cluster_guide_(guide, 0.6, ClusterConfig(b=6, tau=1.0))
    cluster_guide_(guide, 1.0, ClusterConfig(b=6, tau=1.0))
    q = quantize(guide, codebook_policy(guide))
    for name in guide.sites:  # the same loc and scale, bit for bit
        for a, b in zip(guide.get_loc_scale(name), q.get_loc_scale(name)):
            assert torch.equal(a, b), name
    k = guide.codebook().numel()
    report = memory_report(q)
    path = tmp_path / "pwfn.bq"
    assert save_packed(q, path) == path.stat().st_size == report.file_bytes
    # indices of ceil(log2 K) bits for the means: far below float storage
    assert report.bits_per_param < 64 and math.ceil(math.log2(k)) < 32
    loaded = load_packed(path, model)
    draws = []
    for g in (guide, q, loaded):
        pyro.set_rng_seed(3)
        draws.append(Predictive(model, guide=g, num_samples=3, return_sites=["logits"])(x)["logits"])
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[1], draws[2])
