"""PWFN clustering (Algorithm 1 of the paper), vectorized over weights.

One call fixes free weights until a target count is reached:

1. Candidate centres: :func:`~pyro_bq.quant.codebook.pow2_codebook` -- the
   powers of two down to ``2**-b``, their sums of up to ``order`` distinct
   terms, both signs, and zero (``include_zero``).
2. Popularity and group, by ``ClusterConfig.selection``:

   * ``"text"`` (Eq. 6-8): every free weight's nearest centre under
     ``D(w_i, c) = |mu_i - c| / sigma_i`` (Eq. 6; the nearest in sigma units
     is the nearest in value, so it is one
     :func:`~pyro_bq.quant.grids.nearest_code_index`); ``n_k`` counts the
     weights per centre. The most popular centre ``c_k`` is taken; the free
     weights are ordered by ``D(w, c_k)`` and the longest nearest-first
     prefix whose running mean of ``D`` stays ``<= tau`` is fixed to ``c_k``.
   * ``"reference"`` (the authors' ``clustering/Cluster.py``): ``n_k``
     counts the free weights within ``tau`` sigmas of ``c_k`` (a weight may
     count for several centres; two binary searches per weight, no
     ``K x N`` matrix), and every free weight within ``tau`` sigmas of the
     most popular centre is fixed to it, nearest first up to the round's
     target, even where another centre is nearer.

3. A fixed group's ``sigma`` becomes the (population) standard deviation of
   its ``mu`` (floored at ``sigma_min`` so a lone weight keeps a positive scale).
4. Then the next most popular centre, and so on. Once every centre has been
   tried at the current level (none can take a weight), the level is raised
   by ``ClusterConfig.level_rule``:

   * ``"text"`` (Section 3 as printed): ``tau += tau_step`` (1) and
     ``b += b_step`` (2), ``b`` up to ``max_b``; the order stays.
   * ``"reference"`` (the authors' public code, ``clustering/Cluster.py``):
     on the 1st, 3rd, 5th ... raise the order goes up by one (up to
     ``max_order = 4``), on the others ``tau *= tau_factor`` (2 in their
     runs); ``b`` stays. Once the order is at 4 every raise doubles ``tau``.

   Under both rules every call (every round of the driver) starts again at
   the configured ``(b, order, tau)``, as the authors' code does (it rebuilds
   the order-1 codebook and resets ``tau`` each round). Once the codebook can
   no longer grow (``b`` at ``max_b`` / order at ``max_order``), a run of
   failed levels is skipped in one jump of ``tau`` to the first value the
   rule would reach that lets a weight in: the same result as raising it one
   step at a time, without millions of empty passes when some ``sigma`` is tiny.
5. The last group of a round is cut so that exactly ``target`` weights are
   fixed (the nearest ones), so the fixed fraction follows the schedule ``p_t``.

Readings of the paper (its garbled, silent or inconsistent parts) and of the
authors' code, and where this module departs from them:

* Raising the level: the text raises ``tau`` by 1 and ``b`` by 2 when no
  weight fits; Algorithm 1 raises the order (its second update is illegible
  in our copy); the authors' code does what ``"reference"`` does. Both the
  text and the code are offered. Default ``"text"``: on LeNet-5 / MNIST
  (full data, paper preset with 300 steps a round,
  ``benchmarks/pwfn_acceptance.py``) it ended with 21 unique values and
  3.42 bits of entropy at 98.60% (pretrained 98.61%); ``"reference"`` with
  66 values and 4.75 bits at 99.06%. Both are within 0.3 points of the
  pretrained net, and the text's rule needs a third of the values: raising
  the order adds sums of powers that only a few weights use. (With the full
  paper preset, 3 epochs a round, the text's rule gave 25 values, 3.42 bits,
  98.96%.) These rows stepped the raw scale parameter (``scale_step="raw"``),
  under which SGD barely moves the scales (see :mod:`pyro_bq.pwfn.driver`),
  without ``zero_fix``; the rows under "Selection" step sigma itself.
  ``max_b`` (default 40) bounds the text's ``b += 2``, which has no stated end.
* Selection: the text counts popularity by nearest centre and fixes the
  running-mean prefix (Eq. 7-8); the authors' code counts the weights
  within ``tau`` sigmas and fixes all of them. Both are offered
  (``selection``). Counting within ``tau`` favours the centres near which
  many weights lie (zero, the small powers) and piles the weights onto them.
  With ``zero_fix`` (their runs set it) the zero centre also takes every
  weight with ``|mu| <= zero_fix`` first; ours does so at the start of each
  round rather than by giving those weights distance 0 to zero.
  Measured on LeNet-5 / MNIST (full data, pretrained 4 epochs to 98.61%,
  paper preset with ``scale_step="sigma"`` and 100 steps a round, ``b=7``,
  ``zero_fix=2**-7`` as in the authors' runs; ``benchmarks/pwfn_acceptance.py``
  ``--preset paper --num-steps 100 --zero-fix 0.0078125``):

  =============  ==============  ==========  ======  =======  ===========
  level rule     selection       accuracy    unique  entropy  point file
  =============  ==============  ==========  ======  =======  ===========
  text           reference       98.71%      13      3.27     4.08 bit/w
  text           text            98.90%      13      3.28     4.08 bit/w
  reference      reference       99.15%      67      4.56     7.09 bit/w
  =============  ==============  ==========  ======  =======  ===========

  The two selections end on the same 13 values (zero and the powers
  ``2**-7 .. 2**-2``, both signs) with the same entropy: here the level rule
  and ``zero_fix`` decide the codebook, not the selection; the authors'
  level rule (order up to 4) ends on 67 values. None meets the
  paper's few values and low entropy: only 12% of the weights end on zero,
  as the scales stay far below the weights' magnitudes. The regulariser
  raises a free sigma by at most ``lr * alpha / (1 - momentum)`` (about
  ``5e-6``) a step, so it needs the paper's ~12,700 steps (27 epochs) to
  approach ``S = 0.05`` from the Eq. 12 start (~``2e-3``); 900 steps add
  about ``4e-3``. The default stays ``"text"``. The runs with the full paper
  preset (3 epochs a round, both level rules) are in the acceptance table of
  :mod:`pyro_bq.pwfn.driver`: 15 and 50 values, 3.1 and 3.0 bits.
* The authors' code builds order-``r`` centres as sums of ``r`` powers drawn
  with replacement, between ``2**-b`` and the largest free ``|mu|``; we use
  sums of at most ``r`` distinct powers up to ``2**max_exp`` (every sum with
  repeats equals a sum of fewer distinct powers, so the sets agree up to the
  top end).
* Fixed weights take the value of the most popular centre ``c_k`` they were
  grouped under (the text). Algorithm 1's last step writes ``c(i)``, each
  weight's own nearest centre, which would split the group.
* A group's new sigma is the population standard deviation of its means
  (the text's ``std``, and the authors' ``std_mu`` option; Algorithm 1 says
  variance), floored at ``sigma_min = 2**-30`` so a group of one, or of equal
  means, keeps a positive scale.
* The last group of a round is cut (its nearest weights kept) so that
  exactly ``ceil(p_t * N)`` weights are fixed, the text's ``N p_t`` rounded
  up (the authors' code also rounds up and cuts the last group).
* "the next most popular cluster": each centre is tried at most once per
  level; a centre whose prefix is empty is skipped rather than ending the round.
* Eq. 6 divides by the weight's own ``sigma_i`` ("how many sigmas away is the
  centre from the weight"), as the authors' code does (it floors sigma at
  ``2**-20``; we do not floor it).
* Sorting all free weights for every centre is replaced by an exact
  equivalent: every weight with ``D <= tau`` belongs to the prefix, and only
  weights with ``tau < D <= tau + slack`` (``slack = sum over the former of
  tau - D``) can extend it, so only those are sorted.
* Tail sweep (not in the paper or the code): a weight whose ``sigma`` is tiny
  (Eq. 13 allows ``2**-30``) but whose ``mu`` has drifted off every centre
  can sit 10^5 sigmas from the nearest one; the exact rule then needs one
  full pass per handful of such weights. After ``max_jumps`` jumps in one
  call, the weights still needed (the nearest ones in sigmas) go to their
  nearest centre in one pass, one group (and one std) per centre. This is
  where the exact rule would put almost all of them, as ``tau`` then exceeds
  their distance to their nearest centre only.
* ``zero_fix``: an option (off by default, not in the paper; the authors'
  code has a ``zero_fix`` flag that puts weights with ``|mu| < 2**-b`` at
  distance 0 from the zero centre). Here the free weights with
  ``|mu| <= zero_fix`` are fixed to 0 first, nearest to zero in sigmas first,
  and they count against the round's target like any other group.
* Every group logs ``d_max``, ``d_sum`` and ``d_sumsq`` of its distances in
  sigmas, for :func:`~pyro_bq.pwfn.metrics.cluster_movement`.

No step loops over weights; the Python loops run over centres and levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from pyro_bq._validation import check_choice, check_float, check_int, check_tensor, check_type
from pyro_bq.guides.pwfn import AutoPWFN
from pyro_bq.quant.codebook import pow2_codebook
from pyro_bq.quant.grids import nearest_code_index

__all__ = ["ClusterConfig", "ClusterLevel", "ClusterResult", "pwfn_cluster", "cluster_guide_", "prefix_within_tau"]

SIGMA_FLOOR = 2.0**-30


LEVEL_RULES = ("text", "reference")
SELECTIONS = ("text", "reference")


@dataclass(frozen=True)
class ClusterConfig:
    """Settings of the PWFN clustering.

    :param b: starting precision: the smallest power of two is ``2**-b`` (0..max_b).
    :param order: starting order ``r`` (number of powers added), >= 1.
    :param tau: starting threshold on the mean distance in sigmas (> 0).
    :param level_rule: how the level rises when no centre can take a weight
        (see the module docstring): ``"text"`` (default; Section 3:
        ``tau += tau_step``, ``b += b_step`` up to ``max_b``, order fixed) or
        ``"reference"`` (the authors' code: order up to ``max_order``,
        alternating with ``tau *= tau_factor``, ``b`` fixed). Either way every call
        (every round) starts again at ``(b, order, tau)``.
    :param selection: which centre is taken and which weights join it (see
        the module docstring): ``"text"`` (Eq. 6-8: popularity by nearest
        centre, the longest nearest-first prefix whose running mean of the
        distances stays ``<= tau``) or ``"reference"`` (the authors' code:
        popularity by the number of free weights within ``tau`` sigmas, and
        all of those join, nearest first up to the round's target).
    :param tau_step: increase of ``tau`` under ``"text"`` (> 0; 1 in the paper).
    :param b_step: increase of ``b`` under ``"text"`` (>= 0; 2 in the paper).
    :param tau_factor: factor of ``tau`` under ``"reference"`` (> 1; 2 in the authors' runs).
    :param max_b: largest ``b`` (<= 40) the ``"text"`` rule may reach. The
        paper's ``b += 2`` has no stated end, and every raise adds codes that
        few weights use.
    :param max_order: largest order the ``"reference"`` rule may reach (4 in the authors' code).
    :param max_exp: exponent of the largest power of two; None: ``max(0,
        ceil(log2(max|mu|)))`` over all weights (so ``+-1`` is always a
        candidate, and larger powers when some ``|mu|`` exceeds 1).
    :param include_zero: zero is a candidate centre (it is in the paper's set).
    :param zero_fix: fix free weights with ``|mu| <= zero_fix`` to 0 first,
        counted against the round's target (0 = off).
    :param sigma_min: floor of the scale given to fixed weights (> 0).
    :param max_jumps: after this many ``tau`` jumps in one call (codebook at
        its cap, see the module docstring), the weights still needed are fixed
        to their nearest centre in one vectorized sweep.

    Usage::

        ClusterConfig(b=7, level_rule="reference")      # the authors' level rule
        ClusterConfig(selection="reference", zero_fix=2**-7)  # their selection, and zero_fix as in their runs
        ClusterConfig(b=3, max_b=5, level_rule="text")  # Section 3 as printed
    """

    b: int = 7
    order: int = 1
    tau: float = 1.0
    level_rule: str = "text"
    selection: str = "text"
    tau_step: float = 1.0
    b_step: int = 2
    tau_factor: float = 2.0
    max_b: int = 40
    max_order: int = 4
    max_exp: Optional[int] = None
    include_zero: bool = True
    zero_fix: float = 0.0
    sigma_min: float = SIGMA_FLOOR
    max_jumps: int = 16

    def __post_init__(self):
        check_choice("level_rule", self.level_rule, LEVEL_RULES)
        check_choice("selection", self.selection, SELECTIONS)
        check_int("max_b", self.max_b, low=0, high=40)
        check_int("b", self.b, low=0, high=self.max_b)
        check_int("max_order", self.max_order, low=1, high=8)
        check_int("order", self.order, low=1, high=self.max_order)
        check_float("tau", self.tau, low=0.0, low_open=True)
        check_float("tau_step", self.tau_step, low=0.0, low_open=True)
        check_int("b_step", self.b_step, low=0, high=40)
        check_float("tau_factor", self.tau_factor, low=1.0, low_open=True)
        if self.max_exp is not None:
            check_int("max_exp", self.max_exp, low=-40, high=40)
        check_type("include_zero", self.include_zero, bool)
        check_float("zero_fix", self.zero_fix, low=0.0)
        check_float("sigma_min", self.sigma_min, low=0.0, low_open=True)
        check_int("max_jumps", self.max_jumps, low=0)

    def start_level(self) -> "ClusterLevel":
        """The level every call of :func:`pwfn_cluster` starts at."""
        return ClusterLevel(self.b, self.order, float(self.tau))


@dataclass(frozen=True)
class ClusterLevel:
    """The current precision ``b``, order and threshold ``tau``; ``raises`` counts the raises so far."""

    b: int
    order: int
    tau: float
    raises: int = 0

    def raised(self, cfg: ClusterConfig) -> "ClusterLevel":
        """The next level under ``cfg.level_rule`` (see the module docstring)."""
        if cfg.level_rule == "text":
            return ClusterLevel(min(self.b + cfg.b_step, cfg.max_b), self.order, self.tau + cfg.tau_step,
                                self.raises + 1)
        if self.order < cfg.max_order and self.raises % 2 == 0:
            return ClusterLevel(self.b, self.order + 1, self.tau, self.raises + 1)
        return ClusterLevel(self.b, self.order, self.tau * cfg.tau_factor, self.raises + 1)

    def codebook_grows(self, cfg: ClusterConfig) -> bool:
        """Whether some later raise still adds centres (else raises only change ``tau``)."""
        if cfg.level_rule == "text":
            return self.b < cfg.max_b
        return self.order < cfg.max_order

    def tau_after(self, cfg: ClusterConfig, d_min: float) -> float:
        """The first ``tau`` the rule reaches (codebook at its cap) that is ``>= d_min``."""
        if cfg.level_rule == "text":
            return self.tau + math.ceil((d_min - self.tau) / cfg.tau_step) * cfg.tau_step
        tau = self.tau
        while tau < d_min:
            tau *= cfg.tau_factor
        return tau

    def as_dict(self) -> dict:
        return {"b": self.b, "order": self.order, "tau": self.tau, "raises": self.raises}


@dataclass
class ClusterResult:
    """What :func:`pwfn_cluster` returns: new freeze state and a log of the groups fixed."""

    fixed: torch.Tensor
    fixed_loc: torch.Tensor
    fixed_scale: torch.Tensor
    level: ClusterLevel
    groups: list = field(default_factory=list)  # dicts: centre, count, std, tau
    num_new: int = 0


_BINS = 4096
_SORT_BELOW = 1 << 16


def _extras_within_slack(vals: torch.Tensor, tau: float, slack: float) -> torch.Tensor:
    """Mask of the smallest ``vals`` (all > tau) whose summed ``val - tau`` stays within ``slack``.

    Exact, in linear time, ties taken by position: a radix selection on the
    bit patterns of the excesses ``val - tau`` as doubles (for positive
    doubles the order of the patterns, read as integers, is the order of the
    values, and a scale-free one: heavy tails do not crowd one bin). Each pass
    buckets the patterns into ``_BINS`` bins between their min and max, takes
    the whole bins while the running sum fits, and goes on inside the one bin
    where it stops, until that bin is small enough to sort.
    """
    excess = (vals - tau).double()
    key = excess.view(torch.int64)  # non-negative: the sign bit is clear
    rest = slack * (1 + 1e-12)
    take, cur = None, None  # first pass over all of vals, without an index
    while (excess if cur is None else cur).numel() > _SORT_BELOW:
        k = key if cur is None else key[cur]
        lo, hi = int(k.min()), int(k.max())
        if hi <= lo:
            break
        shift = max(0, (hi - lo).bit_length() - _BINS.bit_length() + 1)
        bins = torch.sub(k, lo).bitwise_right_shift_(shift)  # monotone in the value, < _BINS
        nb = ((hi - lo) >> shift) + 1
        cum = torch.cumsum(torch.bincount(bins, weights=excess if cur is None else excess[cur], minlength=nb), 0)
        full = int((cum <= rest).sum())  # bins 0..full-1 fit entirely (cum is non-decreasing)
        if cur is None:
            take = bins < full
        else:
            take[cur[bins < full]] = True
        if full == nb:
            return take
        rest -= float(cum[full - 1]) if full > 0 else 0.0
        cur = (bins == full).nonzero().squeeze(1) if cur is None else cur[bins == full]
    if take is None:
        take = torch.zeros(excess.shape, dtype=torch.bool, device=excess.device)
        cur = torch.arange(excess.numel(), device=excess.device)
    pv, order = torch.sort(excess[cur])
    k = int((torch.cumsum(pv, 0) <= rest).sum())
    if k:
        take[cur[order[:k]]] = True
    return take


def _k_smallest(d: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` smallest ``d`` among ``mask`` (ties by position), in linear time."""
    out = torch.zeros_like(mask)
    if k <= 0:
        return out
    sub = mask.nonzero().squeeze(1)
    if k >= sub.numel():
        out[sub] = True
        return out
    ds = d[sub]
    th = torch.kthvalue(ds, k).values
    take = ds < th
    eq = ds == th
    take = take | (eq & (torch.cumsum(eq.long(), 0) <= k - int(take.sum())))
    out[sub[take]] = True
    return out


def prefix_within_tau(d: torch.Tensor, tau: float, limit: Optional[int] = None) -> torch.Tensor:
    """Bool mask of the longest nearest-first prefix of ``d`` with running mean ``<= tau``.

    Entries of ``d`` that are ``inf`` never qualify. With ``limit`` the prefix
    is cut to the ``limit`` smallest distances (ties broken by position).
    Exact, without sorting all of ``d``: see the module docstring.

    :param d: distances, a 1-D floating-point tensor without NaN (``inf`` allowed).
    :param tau: the threshold on the running mean, a finite number > 0.
    :param limit: most entries to select (an int >= 0), or None for no cut.
    :raises TypeError: for an argument of the wrong type.
    :raises ValueError: for a ``d`` that is not 1-D or holds NaN, or ``tau``/``limit`` out of range.
    """
    check_tensor("d", d, ndim=1, floating=True)
    if bool(torch.isnan(d).any()):
        raise ValueError("d must not hold NaN (use inf for entries that must never qualify)")
    tau = check_float("tau", tau, low=0.0, low_open=True)
    if limit is not None:
        limit = check_int("limit", limit, low=0)
    return _prefix_within_tau(d, tau, limit)


def _prefix_within_tau(d: torch.Tensor, tau: float, limit: Optional[int] = None) -> torch.Tensor:
    """:func:`prefix_within_tau` on validated arguments (internal; the clustering's inner loop)."""
    inside = d <= tau
    count_a = int(inside.sum())
    if limit is not None and count_a >= limit:
        # every weight within tau precedes every extra one: the cut lies inside
        return _k_smallest(d, inside, limit)
    slack = float((tau - d[inside]).double().sum()) if count_a else 0.0
    chosen, count = inside, count_a
    if slack > 0:
        idx = (~inside).logical_and_(d <= tau + slack).nonzero().squeeze(1)  # tau < d <= tau + slack
        if idx.numel():
            extra = idx[_extras_within_slack(d[idx], tau, slack)]
            if extra.numel():
                chosen[extra] = True  # chosen is inside, made here
                count += extra.numel()
    if limit is not None and count > limit:
        return _k_smallest(d, chosen, limit)
    return chosen


def _auto_max_exp(mu: torch.Tensor) -> int:
    """``max(0, ceil(log2(max|mu|)))`` (0 for an empty or all-zero ``mu``).

    The exponent of the largest candidate power of two: at least ``2**0 = 1``
    (so ``+-1`` is always a centre), and above it only when some ``|mu|``
    exceeds 1, just far enough to cover the largest weight.
    """
    m = float(mu.abs().max()) if mu.numel() else 0.0
    if m <= 0:
        return 0
    return max(int(math.ceil(math.log2(m))), 0)


@torch.no_grad()
def pwfn_cluster(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    fixed: torch.Tensor,
    fixed_loc: torch.Tensor,
    fixed_scale: torch.Tensor,
    target: int,
    config: ClusterConfig = ClusterConfig(),
    level: Optional[ClusterLevel] = None,
) -> ClusterResult:
    """Fix free weights onto power-of-two centres until ``target`` weights are fixed.

    A pure function: the inputs are flat vectors (all weights of the network)
    and are not modified; the result holds new tensors.

    :param mu: posterior means.
    :param sigma: posterior scales (> 0).
    :param fixed: bool mask of the weights already fixed.
    :param fixed_loc: centres of the fixed weights (ignored elsewhere).
    :param fixed_scale: scales of the fixed weights (ignored elsewhere).
    :param target: number of fixed weights wanted at the end (``ceil(p_t * N)``).
    :param config: :class:`ClusterConfig`.
    :param level: the level to start at (default ``config.start_level()``).

    Usage::

        res = pwfn_cluster(mu, sigma, fixed, fixed_loc, fixed_scale, target=len(mu))
        res.fixed.all(), torch.unique(res.fixed_loc)
    """
    n = mu.numel()
    for name, t in (("mu", mu), ("sigma", sigma), ("fixed_loc", fixed_loc), ("fixed_scale", fixed_scale)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != n or not t.is_floating_point():
            raise ValueError(f"{name} must be a flat floating tensor of length {n}")
    if not isinstance(fixed, torch.Tensor) or fixed.dtype != torch.bool or fixed.shape != mu.shape:
        raise ValueError(f"fixed must be a bool tensor of shape ({n},)")
    target = check_int("target", target, low=0, high=n)
    check_type("config", config, ClusterConfig)
    level = level if level is not None else config.start_level()
    if not bool(torch.isfinite(mu).all()):
        raise ValueError("mu must be finite")
    if not bool((sigma > 0).all()):
        raise ValueError("sigma must be positive for every weight")

    state = _Clustering(mu, sigma, fixed, fixed_loc, fixed_scale, target, config, level)
    if config.zero_fix > 0 and state.free_idx.numel() and state.need > 0:
        # the nearest to zero in sigmas first, and no more than the round still needs
        d0 = state.mu_f.abs() / state.sig_f
        sel = _k_smallest(d0, state.mu_f.abs() <= config.zero_fix, state.need)
        if bool(sel.any()):
            state.fix(sel.nonzero().squeeze(1), 0.0)
    max_exp = config.max_exp if config.max_exp is not None else _auto_max_exp(mu)
    while state.need > 0:
        state.compact_()
        b = state.level.b
        codebook = pow2_codebook(
            b, state.level.order, max_exp=max(max_exp, -b), include_zero=config.include_zero, dtype=mu.dtype
        ).to(mu.device)
        if not state.try_level(codebook):
            break
    return ClusterResult(state.fixed, state.fixed_loc, state.fixed_scale, state.level, state.groups, state.num_new)


class _Clustering:
    """The working state of :func:`pwfn_cluster`: the freeze state, the free weights and the level."""

    def __init__(self, mu, sigma, fixed, fixed_loc, fixed_scale, target: int, config: ClusterConfig, level):
        self.config, self.level = config, level
        self.fixed, self.fixed_loc, self.fixed_scale = fixed.clone(), fixed_loc.clone(), fixed_scale.clone()
        self.groups: list[dict] = []
        if bool(fixed.any()):
            self.free_idx = (~fixed).nonzero().squeeze(1)
            self.mu_f, self.sig_f = mu[self.free_idx], sigma[self.free_idx]
        else:  # all free: the inputs themselves (only read, never written)
            self.free_idx = torch.arange(mu.numel(), device=mu.device)
            self.mu_f, self.sig_f = mu, sigma
        self.alive = torch.ones(self.free_idx.numel(), dtype=torch.bool, device=mu.device)
        self.num_alive = self.free_idx.numel()
        self.need = target - (mu.numel() - self.free_idx.numel())
        self.num_new = 0
        self.inf = torch.tensor(float("inf"), dtype=mu.dtype, device=mu.device)
        self.jumps = 0

    def compact_(self) -> None:
        """Drop the fixed weights from the working arrays once they are half of them."""
        if self.num_alive < self.alive.numel() // 2:
            alive = self.alive
            self.free_idx, self.mu_f, self.sig_f = self.free_idx[alive], self.mu_f[alive], self.sig_f[alive]
            self.alive = torch.ones(self.free_idx.numel(), dtype=torch.bool, device=alive.device)

    def _freeze(self, sel: torch.Tensor, loc, scale) -> int:
        """Fix the working positions ``sel`` (ascending indices) to ``loc`` with scale ``scale``."""
        gi = self.free_idx[sel]
        self.fixed[gi] = True
        self.fixed_loc[gi] = loc
        self.fixed_scale[gi] = scale
        self.alive[sel] = False
        k = int(gi.numel())
        self.need -= k
        self.num_new += k
        self.num_alive -= k
        return k

    def fix(self, sel: torch.Tensor, centre: float) -> None:
        """Fix the free weights at ``sel`` (ascending working indices) to ``centre``, with the
        (floored) std of their means as scale."""
        vals = self.mu_f[sel]
        std = max(float(vals.std(unbiased=False)) if vals.numel() > 1 else 0.0, self.config.sigma_min)
        d = ((vals - centre).abs() / self.sig_f[sel]).double()
        move = {"d_max": float(d.max()), "d_sum": float(d.sum()), "d_sumsq": float((d * d).sum())}
        k = self._freeze(sel, centre, std)
        self.groups.append({"centre": float(centre), "count": k, "std": std, "tau": self.level.tau, **move})

    def fix_many(self, sel: torch.Tensor, code_idx: torch.Tensor, codebook: torch.Tensor) -> None:
        """Fix the weights at ``sel`` (ascending working indices) to ``codebook[code_idx]``, one group
        per code (vectorized)."""
        k_codes = codebook.numel()
        vals = self.mu_f[sel].double()
        cnt = torch.bincount(code_idx, minlength=k_codes).double()
        mean = torch.bincount(code_idx, weights=vals, minlength=k_codes) / cnt.clamp_min(1)
        sq = torch.bincount(code_idx, weights=vals * vals, minlength=k_codes) / cnt.clamp_min(1)
        std = (sq - mean * mean).clamp_min(0).sqrt().clamp_min(self.config.sigma_min)
        d = ((self.mu_f[sel] - codebook[code_idx]).abs() / self.sig_f[sel]).double()
        d_sum = torch.bincount(code_idx, weights=d, minlength=k_codes)
        d_sumsq = torch.bincount(code_idx, weights=d * d, minlength=k_codes)
        d_max = torch.zeros(k_codes, dtype=torch.float64).scatter_reduce(0, code_idx, d, "amax")
        self._freeze(sel, codebook[code_idx], std[code_idx].to(self.fixed_scale.dtype))
        for j in cnt.nonzero().squeeze(1).tolist():
            self.groups.append({"centre": float(codebook[j]), "count": int(cnt[j]), "std": float(std[j]),
                                "tau": self.level.tau, "sweep": True, "d_max": float(d_max[j]),
                                "d_sum": float(d_sum[j]), "d_sumsq": float(d_sumsq[j])})

    def _distances(self, centre: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        """``|mu - centre| / sigma`` of the free weights, ``inf`` at the fixed ones, written into ``out``
        (a buffer of the last centre's, reused: no fresh allocation per centre)."""
        out = torch.sub(self.mu_f, centre, out=out if out is not None else torch.empty_like(self.mu_f))
        out.abs_().div_(self.sig_f)
        return out if self.num_alive == out.numel() else out.masked_fill_(~self.alive, float("inf"))

    def _within_tau_counts(self, codebook: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per centre of the sorted ``codebook``: how many weights of ``mask`` (a bool mask or ascending
        working indices) lie within ``tau`` sigmas of it.

        The centres within ``tau`` sigmas of a weight form one run of the
        sorted codebook, found by two binary searches; the runs are summed
        with a difference array (no ``K x N`` distance matrix).
        """
        k_codes = codebook.numel()
        reach = self.level.tau * self.sig_f[mask]
        mu = self.mu_f[mask]
        lo = torch.searchsorted(codebook, mu - reach, right=False)
        hi = torch.searchsorted(codebook, mu + reach, right=True)
        diff = torch.bincount(lo, minlength=k_codes + 1) - torch.bincount(hi, minlength=k_codes + 1)
        return torch.cumsum(diff, 0)[:k_codes]

    def try_level(self, codebook: torch.Tensor) -> bool:
        """Fix weights to the centres of ``codebook`` at the current level (most popular first), then
        raise the level if more are needed; False once the tail sweep has fixed the rest."""
        config, level = self.config, self.level
        k_codes = codebook.numel()
        nearest = nearest_code_index(self.mu_f, codebook)
        all_alive = self.num_alive == self.alive.numel()
        counts = torch.bincount(nearest if all_alive else nearest[self.alive], minlength=k_codes)
        if not level.codebook_grows(config):
            # The codebook can no longer grow, so failed levels only raise
            # tau: jump over the ones that cannot fix anything.
            d_near = torch.where(self.alive, (self.mu_f - codebook[nearest]).abs() / self.sig_f, self.inf)
            d_min = float(d_near.min())
            if d_min > level.tau:
                self.level = replace(level, tau=level.tau_after(config, d_min))
                self.jumps += 1
                if self.jumps > config.max_jumps:
                    sel = _k_smallest(d_near, torch.isfinite(d_near), self.need).nonzero().squeeze(1)
                    self.fix_many(sel, nearest[sel], codebook)
                    return False
        if config.selection == "reference":
            counts = self._within_tau_counts(codebook, self.alive)
        tried = torch.zeros(k_codes, dtype=torch.bool, device=codebook.device)
        d = None
        while self.need > 0:
            cand = counts.masked_fill(tried, 0)
            k = int(torch.argmax(cand))
            if int(cand[k]) <= 0:
                break
            tried[k] = True
            d = self._distances(codebook[k], d)
            if config.selection == "reference":
                sel = _k_smallest(d, d <= self.level.tau, self.need)
            else:
                sel = _prefix_within_tau(d, self.level.tau, limit=self.need)
            sel = sel.nonzero().squeeze(1)
            if sel.numel():
                if config.selection == "reference":
                    counts -= self._within_tau_counts(codebook, sel)
                else:
                    counts -= torch.bincount(nearest[sel], minlength=k_codes)
                self.fix(sel, float(codebook[k]))
        if self.need > 0:
            self.level = self.level.raised(config)
        return True


def cluster_guide_(guide, fraction: float, config: ClusterConfig = ClusterConfig(), level=None) -> ClusterResult:
    """Run :func:`pwfn_cluster` on an :class:`~pyro_bq.guides.pwfn.AutoPWFN` guide and freeze the result.

    ``fraction`` is ``p_t``: afterwards ``ceil(p_t * N)`` weights are fixed
    (or more, if more were already fixed). Mutates ``guide``; returns the result.

    Usage::

        res = cluster_guide_(guide, 0.5, ClusterConfig(b=6))
    """
    check_type("guide", guide, AutoPWFN, "an AutoPWFN guide")
    fraction = check_float("fraction", fraction, low=0.0, high=1.0)
    guide._require_setup()
    n = guide.num_params
    target = n if fraction >= 1.0 else min(n, int(math.ceil(fraction * n - 1e-9)))
    target = max(target, guide.num_fixed)
    with torch.no_grad():
        mu = guide.loc.detach()
        sigma = torch.nn.functional.softplus(guide.scale_raw.detach())
        res = pwfn_cluster(
            mu, sigma, guide.fixed, guide.fixed_loc, guide.fixed_scale, target, config, level
        )
    guide.set_fixed_(res.fixed, res.fixed_loc, res.fixed_scale)
    return res
