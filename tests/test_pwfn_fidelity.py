"""PWFN against the paper and the authors' code: level rules, sigma-scaled distances, zero_fix and the
round's target, the freeze-mask cache, float64 export, the point network, the paper preset, metrics."""

import math

import pyro
import pytest
import torch

from pyro_bq import IIDNormal
from pyro_bq.guides import init_to_pretrained, quantize
from pyro_bq.io import CorruptFileError
from pyro_bq.models import MLP, BayesianClassifier, LeNet5
from pyro_bq.pwfn.optim import SigmaSGD
from pyro_bq.pwfn import (
    PAPER_SCHEDULE,
    PWFN,
    AutoPWFN,
    ClusterConfig,
    ClusterLevel,
    cluster_guide_,
    cluster_movement,
    codebook_policy,
    load_point_network,
    per_site_stats,
    point_network_bits_per_param,
    pwfn_cluster,
    save_point_network,
)


def _free(n, dtype=torch.float32):
    return torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype)


def _toy():
    mu = torch.tensor([0.24, 0.26, 0.25, 0.5, 0.1, -0.3, 0.0, 0.9])
    return mu, torch.full_like(mu, 0.02)


# -- level rules --------------------------------------------------------------------------------
def test_text_rule_raises_tau_by_one_and_b_by_two_order_fixed():
    mu, sigma = _toy()
    res = pwfn_cluster(mu, sigma, *_free(8), 8, ClusterConfig(b=3, tau=1.0, level_rule="text"))
    # tau=1 (b=3): 1/4 takes three, then 0 and 1/2. tau=2, b=5: 0.1 -> 1/8 (1.25 sigmas).
    # tau=3, b=7: -0.3 -> -1/4 (2.5 sigmas). 0.9 -> 1 is 5 sigmas: tau 4, 5 fail, 6 takes it.
    assert res.fixed_loc.tolist() == [0.25, 0.25, 0.25, 0.5, 0.125, -0.25, 0.0, 1.0]
    assert [g["tau"] for g in res.groups] == [1.0, 1.0, 1.0, 2.0, 3.0, 6.0]
    assert res.level == ClusterLevel(13, 1, 6.0, 5)


def test_reference_rule_alternates_order_and_doubling_tau_with_b_fixed():
    mu, sigma = _toy()
    res = pwfn_cluster(mu, sigma, *_free(8), 8, ClusterConfig(b=3, tau=1.0, level_rule="reference"))
    # raise 1: order 2 (tau 1): nothing within 1 sigma. raise 2: tau 2: 0.1 -> 1/8 and
    # 0.9 -> 1/2+1/4+1/8 (1.25 sigmas each). raise 3: order 3. raise 4: tau 4: -0.3 -> -1/4.
    assert res.fixed_loc.tolist() == [0.25, 0.25, 0.25, 0.5, 0.125, -0.25, 0.0, 0.875]
    assert [g["tau"] for g in res.groups] == [1.0, 1.0, 1.0, 2.0, 2.0, 4.0]
    assert res.level == ClusterLevel(3, 3, 4.0, 4)


def test_every_call_starts_at_the_configured_level():
    mu, sigma = _toy()
    fixed, loc, scale = _free(8)
    cfg = ClusterConfig(b=3, tau=1.0, level_rule="reference")
    first = pwfn_cluster(mu, sigma, fixed, loc, scale, 6, cfg)
    assert first.level.tau > 1.0
    second = pwfn_cluster(mu, sigma, first.fixed, first.fixed_loc, first.fixed_scale, 8, cfg)
    assert second.groups[0]["tau"] <= first.level.tau and second.level.raises >= 1


def test_reference_rule_tau_jump_is_a_power_of_the_factor():
    mu, sigma = torch.tensor([0.3125]), torch.tensor([2.0**-10])
    cfg = ClusterConfig(b=2, tau=1.0, order=1, max_order=1, level_rule="reference")
    res = pwfn_cluster(mu, sigma, *_free(1), 1, cfg)
    # 0.3125 is 64 sigmas from 1/4: tau doubles 1 -> 64
    assert res.fixed_loc.tolist() == [0.25] and res.level.tau == 64.0


def test_level_rule_validation():
    with pytest.raises(ValueError, match="level_rule"):
        ClusterConfig(level_rule="paper")
    with pytest.raises(ValueError, match="tau_factor"):
        ClusterConfig(tau_factor=1.0)


# -- the distance is in units of each weight's own sigma (Eq. 6) ------------------------------------
def test_nonuniform_sigma_picks_the_nearest_in_sigmas_not_in_value():
    # one candidate near 1/4: weight 0 is nearer in value (0.01) but 10 of its sigmas away,
    # weight 1 is farther in value (0.05) but half a sigma away; a target of one takes weight 1
    mu = torch.tensor([0.26, 0.30])
    sigma = torch.tensor([0.001, 0.1])
    res = pwfn_cluster(mu, sigma, *_free(2), 1, ClusterConfig(b=2, tau=1.0, max_order=1, order=1))
    assert res.fixed.tolist() == [False, True]
    assert res.fixed_loc[1] == 0.25


def test_nonuniform_sigma_prefix_skips_a_near_value_with_a_tiny_sigma():
    # distances to 1/4 in sigmas: 0.27 -> 0.2, 0.255 -> 5, 0.25 -> 0. The running mean over
    # 0, 0.2 stays <= 1 and adding 5 breaks it: {0.25, 0.27} form the group, 0.255 stays free
    # (by value alone 0.255 would come before 0.27).
    mu = torch.tensor([0.27, 0.255, 0.25])
    sigma = torch.tensor([0.1, 0.001, 0.02])
    res = pwfn_cluster(mu, sigma, *_free(3), 2, ClusterConfig(b=2, tau=1.0, max_order=1, order=1))
    assert res.fixed.tolist() == [True, False, True]
    assert res.groups[0]["count"] == 2
    assert res.fixed_scale[0] == pytest.approx(0.01)  # std of {0.27, 0.25}


def test_nonuniform_sigma_decides_which_weights_a_round_fixes():
    # two groups of equal size; the sigmas make the group near 1/2 fit and the one near 1/4 not
    mu = torch.tensor([0.26, 0.26, 0.51, 0.51])
    sigma = torch.tensor([0.001, 0.001, 0.1, 0.1])
    res = pwfn_cluster(mu, sigma, *_free(4), 2, ClusterConfig(b=2, tau=1.0, max_order=1, order=1))
    assert res.fixed.tolist() == [False, False, True, True]


# -- zero_fix counts against the target ---------------------------------------------------------------
def test_zero_fix_respects_the_target():
    mu, sigma = _toy()
    res = pwfn_cluster(mu, sigma, *_free(8), 1, ClusterConfig(b=3, zero_fix=0.12))
    assert int(res.fixed.sum()) == 1 and res.fixed.tolist()[6] and res.fixed_loc[6] == 0.0
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2000, generator=g) * 0.01
    sigma = torch.rand(2000, generator=g) * 0.01 + 1e-3
    res = pwfn_cluster(mu, sigma, *_free(2000), 100, ClusterConfig(b=7, zero_fix=0.05))
    assert int(res.fixed.sum()) == 100 and bool((res.fixed_loc[res.fixed] == 0).all())
    d = mu.abs() / sigma  # the ones nearest to zero in sigmas
    assert float(d[res.fixed].max()) <= float(d[~res.fixed].min())


# -- the freeze-mask cache sees every write -------------------------------------------------------------
def _mlp_guide(dtype=torch.float32):
    torch.manual_seed(0)
    net = MLP((784, 16, 10)).to(dtype)
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=100)
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    x, y = torch.randn(4, 784, dtype=dtype), torch.randint(0, 10, (4,))
    guide(x, y)
    return model, guide, x, y


def test_writes_to_fixed_after_flat_loc_scale_are_seen():
    _, guide, _, _ = _mlp_guide()
    loc0, _ = guide.flat_loc_scale()
    assert float(loc0[0]) != 0.5
    with torch.no_grad():
        guide.fixed[0] = True
        guide.fixed_loc[0] = 0.5
        guide.fixed_scale[0] = 0.25
    loc, scale = guide.flat_loc_scale()
    assert float(loc[0]) == 0.5 and float(scale[0]) == 0.25
    site = next(iter(guide.sites))
    assert float(guide.get_loc_scale(site)[0].reshape(-1)[0]) == 0.5
    with torch.no_grad():
        guide.fixed[0] = False
    assert float(guide.flat_loc_scale()[0][0]) == float(loc0[0])


# -- export -----------------------------------------------------------------------------------------
def test_float64_guide_round_trips_through_codebook_policy():
    _, guide, _, _ = _mlp_guide(torch.float64)
    assert guide.loc.dtype == torch.float64
    cluster_guide_(guide, 1.0, ClusterConfig(b=20, order=1, max_order=1, tau=1.0))
    with torch.no_grad():  # centres that float32 cannot hold
        guide.fixed_loc.add_(1e-12 * guide.fixed_loc.sign())
        guide.fixed_scale.add_(1e-12)
    q = quantize(guide, codebook_policy(guide))
    for name in guide.sites:
        for a, b in zip(guide.get_loc_scale(name), q.get_loc_scale(name)):
            assert a.dtype == torch.float64 and torch.equal(a, b.to(a.dtype)), name


def test_point_network_round_trip_float64(tmp_path):
    _, guide, _, _ = _mlp_guide(torch.float64)
    with pytest.raises(ValueError, match="fixed"):
        save_point_network(guide, tmp_path / "p.bq")
    cluster_guide_(guide, 1.0, ClusterConfig(b=7, tau=1.0))
    with torch.no_grad():
        guide.fixed_loc.add_(1e-12 * guide.fixed_loc.sign())
    path = tmp_path / "p.bq"
    assert save_point_network(guide, path) == path.stat().st_size
    loaded = load_point_network(path)
    med = guide.median()
    assert list(loaded) == list(med)
    for k in med:
        assert loaded[k].dtype == torch.float64 and torch.equal(loaded[k], med[k]), k
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 1
    (tmp_path / "bad.bq").write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError):
        load_point_network(tmp_path / "bad.bq")


@pytest.mark.parametrize("cfg", [ClusterConfig(b=4, order=1, max_order=1, level_rule="reference"),
                                 ClusterConfig(b=7, level_rule="reference")])
def test_point_network_size_on_lenet5(tmp_path, cfg):
    torch.manual_seed(1)
    net = LeNet5()
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=100)
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    guide(torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,)))
    for p in (0.5, 0.9, 1.0):  # order 4: a codebook of dozens of sums of powers of two
        cluster_guide_(guide, p, cfg)
    k = guide.codebook().numel()
    path = tmp_path / "lenet.bq"
    save_point_network(guide, path)
    bpp = point_network_bits_per_param(path, guide.num_params)
    assert bpp <= math.ceil(math.log2(k)) + 0.1
    assert bpp == path.stat().st_size * 8 / guide.num_params


# -- the paper preset -----------------------------------------------------------------------------------
def test_paper_preset_sets_sgd_three_epochs_and_the_authors_schedule(mnist_small):
    train, test = mnist_small
    torch.manual_seed(0)
    net = LeNet5()
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=len(train))
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    run = PWFN(model, guide, train, preset="paper", progress=False, log=None)
    assert (run.optimizer, run.lr, run.momentum, run.num_epochs) == ("sgd", 1e-3, 0.9, 3)
    assert run.schedule == PAPER_SCHEDULE and run.schedule[-2:] == (0.99, 1.0) and len(run.schedule) == 10
    assert run._train_length(0) == (None, math.ceil(0.05 * math.ceil(len(train) / 128)))
    assert run._train_length(1) == (3, None)
    assert isinstance(run._optimizer(), pyro.optim.PyroOptim)
    assert run._optimizer().pt_optim_constructor is SigmaSGD and run.scale_step == "sigma"
    fast = PWFN(model, guide, train, progress=False, log=None)
    assert (fast.optimizer, fast.lr, fast.num_epochs, fast._train_length(0)) == ("adam", 1e-4, 1, (1, None))
    mixed = PWFN(model, guide, train, preset="paper", num_epochs=1, lr=5e-3, progress=False, log=None)
    assert (mixed.optimizer, mixed.lr, mixed.num_epochs) == ("sgd", 5e-3, 1)
    with pytest.raises(ValueError, match="preset"):
        PWFN(model, guide, train, preset="slow")
    with pytest.raises(ValueError, match="optimizer"):
        PWFN(model, guide, train, optimizer="rmsprop")


# -- metrics --------------------------------------------------------------------------------------------
def test_per_site_stats_hand_computed():
    stats = per_site_stats({"a.weight": torch.tensor([0.0, 0.0, 0.5, 0.5]), "a.bias": torch.tensor([1.0, 1.0])})
    assert stats["a.weight"] == {"count": 4, "entropy": 1.0, "unique": 2}
    assert stats["a.bias"] == {"count": 2, "entropy": 0.0, "unique": 1}


def test_cluster_movement_hand_computed():
    mu = torch.tensor([0.24, 0.26, 0.25, 0.30])
    sigma = torch.tensor([0.02, 0.01, 0.02, 0.1])
    res = pwfn_cluster(mu, sigma, *_free(4), 4, ClusterConfig(b=2, tau=1.0, max_order=1, order=1))
    move = cluster_movement(res.groups)
    # all four go to 1/4 at distances 0.5, 1, 0, 0.5 sigmas
    assert [m["centre"] for m in move] == [0.25]
    m = move[0]
    assert m["count"] == 4 and m["max"] == pytest.approx(1.0) and m["mean"] == pytest.approx(0.5)
    assert m["std"] == pytest.approx(math.sqrt(0.125))
    with pytest.raises(ValueError, match="groups"):
        cluster_movement([{"centre": 0.0}])
