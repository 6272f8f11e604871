"""PWFN clustering (the text's selection) against a straightforward implementation: full stable sorts,
a dense distance matrix and Python loops over centres, on random weights with heavy-tailed distances."""

import math
from dataclasses import replace

import pytest
import torch

from pyro_bq.pwfn import ClusterConfig, pwfn_cluster
from pyro_bq.pwfn.clustering import prefix_within_tau
from pyro_bq.quant.codebook import pow2_codebook


def _sorted_prefix(d: torch.Tensor, tau: float, limit=None) -> torch.Tensor:
    """The longest nearest-first prefix whose running mean stays <= tau, from one stable sort of all of
    ``d`` (ties by position); the extras' excesses summed in double against the slack, as the rule reads."""
    order = torch.sort(d, stable=True).indices
    ds = d[order]
    inside = int((ds <= tau).sum())
    slack = float((tau - ds[:inside]).double().sum())
    cum = torch.cumsum((ds[inside:] - tau).double(), 0)
    m = inside + int((cum <= slack * (1 + 1e-12)).sum())
    if limit is not None:
        m = min(m, limit)
    sel = torch.zeros(d.shape, dtype=torch.bool)
    sel[order[:m]] = True
    return sel


def _heavy_tailed(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.exp(torch.randn(n, generator=g) * 2.5)  # decades apart: many bins of the search stay empty
    d[: n // 8] = torch.round(d[: n // 8] * 8) / 8  # ties
    d[torch.rand(n, generator=g) < 0.05] = float("inf")  # fixed weights
    return d


@pytest.mark.parametrize("seed", range(4))
def test_prefix_within_tau_matches_one_full_sort_on_heavy_tails_with_ties(seed):
    d = _heavy_tailed([3_000, 150_000, 400_000, 90_000][seed], seed)
    for tau in (0.5, 1.0, 4.0):
        want = _sorted_prefix(d, tau)
        assert torch.equal(prefix_within_tau(d, tau), want)
        for limit in (int(want.sum()) // 3, int(want.sum()) + 5):
            assert torch.equal(prefix_within_tau(d, tau, limit=limit), _sorted_prefix(d, tau, limit))


def _dense_round(mu, sigma, fixed, target, cfg):
    """One call of the text's selection, level after level, with dense ``[N, K]`` distances (and the
    jump of tau over the levels that cannot fix a weight, once the codebook has stopped growing)."""
    fixed, loc, scale = fixed.clone(), torch.zeros_like(mu), torch.ones_like(mu)
    groups, level, need = [], cfg.start_level(), target - int(fixed.sum())
    max_exp = max(0, math.ceil(math.log2(float(mu.abs().max()))))
    while need > 0:
        cb = pow2_codebook(level.b, level.order, max_exp=max(max_exp, -level.b), include_zero=True, dtype=mu.dtype)
        dist = (mu[:, None] - cb[None, :]).abs()
        ties = dist == dist.min(1, keepdim=True).values
        nearest = torch.where(ties, cb.abs()[None, :], torch.inf).argmin(1)  # a tie: the smaller magnitude
        if not level.codebook_grows(cfg):
            d_min = float(torch.where(fixed, torch.inf, (mu - cb[nearest]).abs() / sigma).min())
            if d_min > level.tau:
                level = replace(level, tau=level.tau_after(cfg, d_min))
        counts = torch.bincount(nearest[~fixed], minlength=len(cb)).tolist()
        tried = set()
        while need > 0:
            k = max((j for j in range(len(cb)) if j not in tried), key=lambda j: (counts[j], -j), default=None)
            if k is None or counts[k] <= 0:
                break
            tried.add(k)
            d = torch.where(fixed, torch.inf, (mu - cb[k]).abs() / sigma)
            sel = _sorted_prefix(d, level.tau, need)
            if sel.any():
                for j in nearest[sel].tolist():
                    counts[j] -= 1
                fixed[sel], loc[sel] = True, cb[k]
                scale[sel] = max(float(mu[sel].std(unbiased=False)) if int(sel.sum()) > 1 else 0.0, cfg.sigma_min)
                need -= int(sel.sum())
                groups.append((float(cb[k]), int(sel.sum())))
        if need > 0:
            level = level.raised(cfg)
    return fixed, loc, scale, groups


@pytest.mark.parametrize("seed,n", [(0, 4_000), (1, 20_000), (2, 120_000), (3, 7_000)])
@pytest.mark.parametrize("level_rule", ["text", "reference"])
def test_text_selection_matches_a_dense_loop_implementation(seed, n, level_rule):
    g = torch.Generator().manual_seed(seed)
    scale_of = torch.tensor([0.2, 0.05, 0.01])[torch.randint(0, 3, (n,), generator=g)]
    mu = torch.randn(n, generator=g) * scale_of
    sigma = torch.exp(torch.randn(n, generator=g) * 1.5 - 5.0)  # some weights 10^3 sigmas from every centre
    fixed = torch.rand(n, generator=g) < (0.0 if seed % 2 else 0.3)
    cfg = ClusterConfig(b=3 + seed, level_rule=level_rule)
    for fraction in (0.45, 0.8):
        target = int(fraction * n)
        res = pwfn_cluster(mu, sigma, fixed, torch.zeros(n), torch.ones(n), target, cfg)
        want_fixed, want_loc, want_scale, want_groups = _dense_round(mu, sigma, fixed, target, cfg)
        new = res.fixed & ~fixed
        assert torch.equal(res.fixed, want_fixed)
        assert torch.equal(res.fixed_loc[new], want_loc[new]) and torch.equal(res.fixed_scale[new], want_scale[new])
        assert [(gr["centre"], gr["count"]) for gr in res.groups] == want_groups
