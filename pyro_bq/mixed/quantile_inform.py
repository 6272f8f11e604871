"""Quantile Inform: per-layer bit-widths from aggregated informativeness.

Each site's informativeness (mean of ``|mu|/sigma``, or the entropy-based
confidence) is min-max normalised and square-rooted to ``I_j`` in [0, 1].
With ``K`` candidate widths ``b_1 < ... < b_K`` and a scale factor ``f > 0``
the thresholds ``f * k / K`` (``k = 1..K-1``) split [0, 1]; a site gets the
width of the cell its ``I_j`` falls in, ``b_{1 + #(thresholds <= I_j)}``.
A larger ``f`` gives fewer bits. The mean bits (weighted by site size) is a
step function of ``f`` that only changes where some ``I_j * K / k`` equals
``f``, so the search evaluates all those breakpoints (every distinct trial)
in one vectorized pass and takes the one whose mean bits is nearest to the
target or, given held-out training data, the most accurate one not above it.

QIU and QINU share this allocation and differ in the grid they quantize a
site's means onto: ``2**b`` uniform levels on the 5th-95th percentile range
(QIU, :class:`~pyro_bq.quant.IntervalQuantizer`), or Gaussian-quantile levels
refined by the median (Lloyd-Max style) iteration (QINU,
:class:`~pyro_bq.quant.GaussianLloydQuantizer`); the allocation carries that
grid as its ``site_quantizers``, and :func:`quantize_means` applies it.

Readings of the paper:

* A "layer" is a Pyro site by default (weights and biases apart);
  ``layers="module"`` makes a module's weight and bias one layer, as the
  paper's ``l_j`` (one aggregate, one width, and for QIU one interval from
  the 5th-95th percentile of all their means). With layers per site, a
  bias's own percentile interval clamps its few extreme entries; with module
  layers those entries fall inside the weight's wider interval, or are
  clamped by it. Informativeness uses ``sigma``, as Eq. 1 is written (see
  :mod:`~pyro_bq.mixed.informativeness`).
* Thresholds: for ``K`` widths the text places "k thresholds" evenly in
  [0, 1] and scales them by one factor. We use the ``K - 1`` interior ones,
  ``f * k / K``, which cut ``[0, f]`` into ``K`` equal cells; a site above
  ``f`` keeps the top width.
* The paper finds the factor by repeated trials; we enumerate every
  breakpoint of the step function at once, so every distinct trial is known.
* Step 4 (choosing among the trials): the text repeats trials "to achieve
  the desired level of quantization and accuracy" without saying on which
  data the accuracy is measured. With ``validation=(model, data)`` every
  distinct trial whose mean bits does not exceed ``gamma`` is tried and the
  one most accurate at the quantized means on ``data`` is kept; ``data`` must
  be held out of the *training* set (never the test set, which would make
  the reported accuracy optimistic). Without validation data the trial is
  chosen by its mean bits alone: ``mode="nearest"`` (default) takes the
  achievable mean closest to ``gamma`` and may exceed it; ``mode="at_most"``
  keeps the paper's bound (when some allocation meets it).
* The metric: the paper reports the accuracy of the deterministic network
  at the quantized means (``M_det``); :func:`~pyro_bq.mixed.evaluate_allocation`
  reports it as ``accuracy_at_means``, beside the posterior predictive's
  ``accuracy_sampled``.
* QIU interval: the 5th and 95th percentiles (Section 3.2), computed with
  linear interpolation (:func:`torch.quantile`); the paper does not fix the
  percentile definition. A site whose two percentiles coincide gets a
  slightly widened interval. This clip is the paper's grid and it has a
  cost: every mean outside the interval is clamped, which shrinks each
  layer's weights (and outputs) towards the middle and on LeNet-5 MNIST
  lowers the AUROC of the mutual information against Fashion-MNIST (see
  the README for measured figures). ``clip=False`` (method ``"QIU-minmax"``)
  spans the means' full range instead: nothing is clamped, at the price of
  a coarser step.
* QINU: the Normal is fitted to a site's means by their sample mean and
  standard deviation (per site also with ``layers="module"``: the Lloyd-Max
  grid is fitted to each tensor, only the width is shared). The
  Gaussian-quantile levels of Section 3.3 are, by default, refined by the
  median (Lloyd-Max style) iteration of the appendix (``max_iter=200`` of
  :class:`~pyro_bq.quant.GaussianLloydQuantizer`); the experiments cite
  Section 3.3 itself, which is ``max_iter=0``.
* QI reads only the posterior (``training="data-free"``); the validation
  data of Step 4 picks among trials but trains nothing.

Usage::

    alloc = quantile_inform(guide, 3.2, candidate_bits=range(2, 9))   # QIU
    alloc = quantile_inform(guide, 3.2, grid="gaussian")              # QINU
    alloc = quantile_inform(guide, 3.2, layers="module", validation=(model, held_out_train))
    locs = quantize_means(guide, alloc)        # {site: quantized loc}
"""

from __future__ import annotations

from typing import Iterable

import torch

from pyro_bq._validation import check_bool, check_choice
from pyro_bq.quant.grids import percentile_range, widen_empty
from pyro_bq.quant.quantizers import GaussianLloydQuantizer, IntervalQuantizer

from .informativeness import (
    BitAllocation,
    check_candidate_bits,
    check_target,
    decode_metadata_bits,
    grouped_params,
    layer_groups,
    layer_informativeness,
    normalized_informativeness,
    site_sizes,
    validated,
)
from .report import accuracy_at_means

__all__ = ["quantile_inform", "bits_for_scale", "quantize_means"]

#: grid name: (method, grid of the allocation, its quantizer template for the means)
_GRIDS = {
    "uniform": ("QIU", "uniform-percentile", IntervalQuantizer),
    "gaussian": ("QINU", "gaussian-lloyd", GaussianLloydQuantizer),
}


def bits_for_scale(norm_info: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Widths for one or many scale factors: ``scale`` of shape ``(M,)`` gives ``(M, N)``."""
    k = candidates.numel()
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1, 1)
    idx = torch.floor(norm_info.reshape(1, -1) * k / scale + 1e-12).clamp(0, k - 1).long()
    return candidates[idx]


def quantile_inform(
    posterior,
    target_mean_bits: float,
    *,
    candidate_bits: Iterable[int] = range(2, 9),
    aggregate: str = "mean",
    grid: str = "uniform",
    mode: str = "nearest",
    clip: bool = True,
    layers: str = "site",
    validation=None,
    sites=None,
) -> BitAllocation:
    """Allocate per-layer widths from the layers' informativeness at a target mean bit-width.

    :param posterior: a trained pyro_bq guide or ``{site: (loc, scale)}``.
    :param target_mean_bits: target mean bits per weight (``gamma``), within the candidate range.
    :param candidate_bits: allowed widths (ints from 1 to 16).
    :param aggregate: ``"mean"`` (Eq. 2) or ``"entropy"`` (Eq. 15).
    :param grid: ``"uniform"`` (QIU) or ``"gaussian"`` (QINU); recorded in the result.
    :param mode: without ``validation``: ``"nearest"`` (mean bits closest to the
        target) or ``"at_most"`` (the largest mean bits not above it).
    :param clip: QIU only: ``True`` spans the uniform grid from the 5th to the
        95th percentile of the layer's means (the paper's grid; the means
        outside are clamped), ``False`` from their minimum to their maximum.
    :param layers: ``"site"`` (every Pyro site is a layer) or ``"module"`` (a
        module's weight and bias form one layer: one width, and for QIU one
        interval, for both; see :func:`~pyro_bq.mixed.informativeness.layer_groups`).
        The result is keyed by site name either way.
    :param validation: ``None``, or a ``(model, dataset)`` pair: the paper's
        Step 4. Every distinct threshold trial whose mean bits do not exceed
        the target is tried, and the one whose deterministic network at the
        quantized means is most accurate on ``dataset`` is kept (ties: the
        mean bits nearest the target). ``dataset`` must be held-out *training*
        examples, never the test set.
    :returns: a :class:`BitAllocation` (``info`` holds the scale factor, the
        normalised informativeness, the achievable mean bits and, with
        ``validation``, ``validation_trials``: ``(mean bits, accuracy)`` of
        every trial; ``site_quantizers`` the grid of the means).
    :raises ValueError: for an empty candidate set, a target outside the
        candidate range, a non-positive sigma, or an unknown option.
    :raises TypeError: for a ``validation`` that is not a ``(model, dataset)`` pair.

    Usage::

        alloc = quantile_inform(guide, 3.2, layers="module", validation=(model, held_out_train))
    """
    candidates = check_candidate_bits(candidate_bits)
    gamma = check_target(target_mean_bits, candidates)
    check_choice("grid", grid, tuple(_GRIDS))
    check_choice("mode", mode, ("nearest", "at_most"))
    if not check_bool("clip", clip) and grid != "uniform":
        raise ValueError("clip=False applies to the uniform grid (QIU) only; the gaussian grid (QINU) never clips")
    if validation is not None and not (isinstance(validation, (tuple, list)) and len(validation) == 2
                                       and hasattr(validation[1], "x") and hasattr(validation[1], "y")):
        raise TypeError("validation must be None or a (model, dataset) pair, the dataset held-out training "
                        f"examples with .x and .y; got {type(validation).__name__}")
    params = validated(posterior, sites)
    groups = layer_groups(params, layers)
    layer_params = grouped_params(params, groups)
    sizes = site_sizes(layer_params)
    raw = layer_informativeness(layer_params, aggregate=aggregate)
    norm = normalized_informativeness(raw)
    names = list(layer_params)
    info = torch.tensor([norm[n] for n in names], dtype=torch.float64)
    size = torch.tensor([sizes[n] for n in names], dtype=torch.float64)
    cand = torch.tensor(candidates, dtype=torch.float64)
    scales, bits, means = _trials(info, size, cand)
    method, grid_name, _ = _GRIDS[grid]
    if grid == "uniform" and not clip:
        method, grid_name = "QIU-minmax", "uniform-minmax"
    make = _grid_maker(grid, clip, params, groups)
    trials = None
    if validation is None:
        best = _by_target(means, gamma, mode)
    else:
        all_locs = {n: loc for n, (loc, _) in validated(posterior).items()}
        best, trials = _by_validation(means, bits, gamma, validation, params, all_locs, groups, names, make)
    chosen = {s: int(b) for g, b in zip(names, bits[best].tolist()) for s in groups[g]}
    site_quantizers = {s: {"loc": make(s, b)} for s, b in chosen.items()}
    locs = {s: params[s][0] for s in chosen}
    extra = {} if trials is None else {"validation_trials": trials}
    return BitAllocation(
        chosen,
        method=method,
        sizes=site_sizes(params),
        grid=grid_name,
        site_quantizers=site_quantizers,
        training="data-free",
        metadata_bits=decode_metadata_bits(site_quantizers, chosen, locs),
        info={
            "scale": float(scales[best]),
            "target": gamma,
            "aggregate": aggregate,
            "layers": layers,
            "clip": clip,
            "layer_informativeness": raw,
            "normalized_informativeness": norm,
            "achievable_mean_bits": sorted(set(round(float(m), 6) for m in means)),
            **extra,
        },
    )


def _trials(info, size, cand):
    """Every distinct step of the widths as a function of the scale factor: ``(scales, bits (M, N), means (M,))``."""
    k = cand.numel()
    # breakpoints of the step function, and just above each one, plus "all minimum"
    ks = torch.arange(1, k, dtype=torch.float64)
    bp = (info.reshape(-1, 1) * k / ks.reshape(1, -1)).flatten()
    bp = bp[bp > 0]
    scales = torch.cat([bp, bp * (1 + 1e-9), torch.tensor([float(k) + 1.0])]) if bp.numel() else torch.tensor([1.0])
    bits = bits_for_scale(info, cand, scales)  # (M, N)
    means = (bits * size).sum(-1) / size.sum()
    return scales, bits, means


def _by_target(means, gamma, mode) -> int:
    if mode == "nearest":
        gap = (means - gamma).abs()
        # ties: prefer the allocation not above the target, then the smaller scale
        return int(torch.argmin(gap + 1e-12 * (means > gamma + 1e-12)))
    ok = means <= gamma + 1e-12
    if not bool(ok.any()):
        return int(torch.argmin(means))
    return int(torch.argmax(torch.where(ok, means, torch.full_like(means, -1.0))))


def _grid_maker(grid, clip, params, groups):
    """``make(site, bits)``: the quantizer template of a site's means."""
    _, _, quantizer = _GRIDS[grid]
    pct = (5.0, 95.0) if clip else (0.0, 100.0)
    if grid != "uniform":
        return lambda site, b: quantizer(b)
    interval = {}
    for g, members in groups.items():
        if len(members) > 1:  # one interval for the whole layer, from all its means
            flat = torch.cat([params[m][0].flatten() for m in members]).reshape(1, -1).double()
            lo, hi = widen_empty(*percentile_range(flat, *pct))
            interval.update({m: (float(lo[0]), float(hi[0])) for m in members})
    return lambda site, b: (IntervalQuantizer(b, interval=interval[site]) if site in interval
                            else IntervalQuantizer(b, percentiles=pct))


def _by_validation(means, bits, gamma, validation, params, all_locs, groups, names, make):
    """The paper's Step 4: the trial not above ``gamma`` whose network at the quantized means is most accurate
    on the validation data; returns ``(index, [(mean bits, accuracy), ...])``."""
    model, data = validation
    ok = torch.nonzero(means <= gamma + 1e-12).flatten().tolist() or [int(torch.argmin(means))]
    seen, trials, best, best_key = set(), [], None, None
    for i in ok:
        key = tuple(bits[i].tolist())
        if key in seen:
            continue
        seen.add(key)
        widths = {s: int(b) for g, b in zip(names, key) for s in groups[g]}
        locs = dict(all_locs)
        for s, b in widths.items():
            locs[s] = make(s, b).calibrate(params[s][0]).quantize(params[s][0])
        acc = accuracy_at_means(model, locs, data)
        trials.append((float(means[i]), acc))
        rank = (acc, -abs(float(means[i]) - gamma))
        if best_key is None or rank > best_key:
            best, best_key = i, rank
    return best, trials


def quantize_means(posterior, allocation: BitAllocation) -> dict:
    """Quantize each site's posterior means on the allocation's own grid, at its widths.

    The grid is ``allocation.site_quantizers`` (QIU: the 5th-95th percentile
    interval of the site's means; QINU: a Normal fitted to them; Random Bits:
    its learned interval; SMOL: its signed grid and scale, meant for the tuned
    guide :func:`~pyro_bq.mixed.smol.smol` returns). Sites not in the
    allocation are returned unchanged. Returns ``{site: tensor}``.

    :raises ValueError: for an allocated site without a grid in ``site_quantizers``.

    Usage::

        locs = quantize_means(guide, quantile_inform(guide, 3.2))
    """
    out = {}
    for name, (loc, _) in validated(posterior).items():
        if name not in allocation:
            out[name] = loc.clone()
            continue
        template = allocation.site_quantizers.get(name, {}).get("loc")
        if template is None:
            raise ValueError(f"allocation has no grid for site {name!r}: give the BitAllocation site_quantizers, "
                             "or quantize with a policy's own grid")
        out[name] = template.with_bits(allocation[name]).calibrate(loc).quantize(loc)
    return out
