"""PWFN selection rules: the text's (Eq. 6-8: nearest-centre popularity, running-mean prefix) against
the authors' code's (popularity and group by the weights within tau sigmas), with non-uniform sigma."""

import pytest
import torch

from pyro_bq.pwfn import ClusterConfig, pwfn_cluster
from pyro_bq.quant.codebook import pow2_codebook


def _free(n, dtype=torch.float32):
    return torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype)


def _cfg(selection, **kw):
    kw = {"b": 1, "tau": 1.0, "order": 1, "max_order": 1, "max_b": 1, **kw}
    return ClusterConfig(selection=selection, **kw)


def test_popularity_within_tau_differs_from_nearest_centre():
    # centres {0, +-1/2, +-1}. Three weights at 0.3 with sigma 1: nearest centre 1/2, but 0, 1/2,
    # 1 and -1/2 all lie within one sigma. Two weights at 0.005 with sigma 0.01: within tau of 0 only.
    # Nearest-centre counts: 1/2 -> 3, 0 -> 2; within-tau counts: 0 -> 5, 1/2 -> 3, 1 -> 3.
    mu = torch.tensor([0.3, 0.3, 0.3, 0.005, 0.005])
    sigma = torch.tensor([1.0, 1.0, 1.0, 0.01, 0.01])
    text = pwfn_cluster(mu, sigma, *_free(5), 5, _cfg("text"))
    ref = pwfn_cluster(mu, sigma, *_free(5), 5, _cfg("reference"))
    assert text.fixed_loc.tolist() == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert [g["centre"] for g in text.groups] == [0.5, 0.0]
    assert ref.fixed_loc.tolist() == [0.0] * 5
    assert [(g["centre"], g["count"]) for g in ref.groups] == [(0.0, 5)]


def test_reference_group_is_the_weights_within_tau_not_the_running_mean_prefix():
    # distances to 1/2 in sigmas: 0.1, 0.1 and 1.5. The running mean of all three is 0.57 <= 1,
    # so the text fixes all three; the authors' code takes only the two within one sigma.
    mu = torch.tensor([0.51, 0.49, 0.65])
    sigma = torch.tensor([0.1, 0.1, 0.1])
    text = pwfn_cluster(mu, sigma, *_free(3), 3, _cfg("text"))
    ref = pwfn_cluster(mu, sigma, *_free(3), 2, _cfg("reference"))
    assert text.groups[0]["count"] == 3
    assert ref.fixed.tolist() == [True, True, False] and ref.groups[0]["count"] == 2


def test_reference_group_is_cut_to_the_target_nearest_first():
    # five weights within tau of 1/2; a target of 2 keeps the two nearest in sigmas (not in value)
    mu = torch.tensor([0.52, 0.45, 0.5, 0.3, 0.6])
    sigma = torch.tensor([0.01, 0.5, 0.1, 0.4, 0.2])  # d = 2 (out), 0.1, 0, 0.5, 0.5
    res = pwfn_cluster(mu, sigma, *_free(5), 2, _cfg("reference", tau=1.0))
    assert res.fixed.tolist() == [False, True, True, False, False]


def _brute_reference(mu, sigma, target, cfg):
    """The authors' selection at one level, written with a dense distance matrix and Python loops."""
    codebook = pow2_codebook(cfg.b, cfg.order, max_exp=0, include_zero=True, dtype=mu.dtype)
    free = torch.ones(mu.numel(), dtype=torch.bool)
    loc = torch.zeros_like(mu)
    tried = set()
    need = target
    while need > 0:
        dist = (mu[None, :] - codebook[:, None]).abs() / sigma[None, :]
        counts = [int(((dist[k] <= cfg.tau) & free).sum()) if k not in tried else 0 for k in range(len(codebook))]
        k = max(range(len(codebook)), key=lambda j: (counts[j], -j))
        if counts[k] == 0:
            break
        tried.add(k)
        idx = [i for i in sorted(range(mu.numel()), key=lambda i: (float(dist[k, i]), i))
               if free[i] and dist[k, i] <= cfg.tau][:need]
        for i in idx:
            free[i] = False
            loc[i] = codebook[k]
        need -= len(idx)
    return ~free, loc


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reference_selection_matches_a_dense_loop_implementation(seed):
    g = torch.Generator().manual_seed(seed)
    n = 300
    mu = (torch.randn(n, generator=g, dtype=torch.float64) * 0.2).clamp(-0.99, 0.99)
    sigma = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 1.5 - 3.0)  # spread over decades
    cfg = ClusterConfig(b=4, order=1, max_order=1, tau=1.5, selection="reference", level_rule="reference",
                        max_exp=0)
    want_fixed, want_loc = _brute_reference(mu, sigma, n, cfg)
    target = int(want_fixed.sum())  # all the first level can fix; below that the cut is exercised
    for t in (target, target // 2):
        res = pwfn_cluster(mu, sigma, *_free(n, torch.float64), t, cfg)
        f, loc = _brute_reference(mu, sigma, t, cfg)
        assert torch.equal(res.fixed, f)
        assert torch.equal(res.fixed_loc[f], loc[f])


def test_selection_validation():
    with pytest.raises(ValueError, match="selection"):
        ClusterConfig(selection="nearest")
