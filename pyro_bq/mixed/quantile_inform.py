"""Quantile Inform: per-layer bit-widths from aggregated informativeness.

Each site's informativeness (mean of ``|mu|/sigma``, or the entropy-based
confidence) is min-max normalised and square-rooted to ``I_j`` in [0, 1].
With ``K`` candidate widths ``b_1 < ... < b_K`` and a scale factor ``f > 0``
the thresholds ``f * k / K`` (``k = 1..K-1``) split [0, 1]; a site gets the
width of the cell its ``I_j`` falls in, ``b_{1 + #(thresholds <= I_j)}``.
A larger ``f`` gives fewer bits. The mean bits (weighted by site size) is a
step function of ``f`` that only changes where some ``I_j * K / k`` equals
``f``, so the search evaluates all those breakpoints in one vectorized pass
and takes the one whose mean bits is nearest to the target.

QIU and QINU share this allocation and differ in the grid they quantize a
site's means onto: ``2**b`` uniform levels on the 5th-95th percentile range
(QIU, :class:`~pyro_bq.quant.IntervalQuantizer`), or Gaussian-quantile levels
refined by the median (Lloyd-Max style) iteration (QINU,
:class:`~pyro_bq.quant.GaussianLloydQuantizer`); the allocation carries that
grid as its ``site_quantizers``, and :func:`quantize_means` applies it.

Readings of the paper:

* A "layer" is a Pyro site (weights and biases apart); informativeness uses
  ``sigma``, as Eq. 1 is written (see :mod:`~pyro_bq.mixed.informativeness`).
* Thresholds: for ``K`` widths the text places "k thresholds" evenly in
  [0, 1] and scales them by one factor. We use the ``K - 1`` interior ones,
  ``f * k / K``, which cut ``[0, f]`` into ``K`` equal cells; a site above
  ``f`` keeps the top width.
* The paper finds the factor by repeated trials; we evaluate every breakpoint
  of the step function at once, so the search is exact.
* Target: the paper asks for a mean of *no more than* ``gamma``. The default
  ``mode="nearest"`` takes the achievable mean closest to ``gamma`` and may
  exceed it; ``mode="at_most"`` keeps the paper's bound (when some allocation
  meets it).
* QIU interval: the 5th and 95th percentiles, computed with linear
  interpolation (:func:`torch.quantile`); the paper does not fix the
  percentile definition. A site whose two percentiles coincide gets a
  slightly widened interval.
* QINU: the Normal is fitted to a site's means by their sample mean and
  standard deviation. The Gaussian-quantile levels of Section 3.3 are, by
  default, refined by the median (Lloyd-Max style) iteration of the
  appendix (``max_iter=200`` of :class:`~pyro_bq.quant.GaussianLloydQuantizer`);
  the experiments cite Section 3.3 itself, which is ``max_iter=0``.

Usage::

    alloc = quantile_inform(guide, 3.2, candidate_bits=range(2, 9))   # QIU
    alloc = quantile_inform(guide, 3.2, grid="gaussian")              # QINU
    locs = quantize_means(guide, alloc)        # {site: quantized loc}
"""

from __future__ import annotations

from typing import Iterable

import torch

from pyro_bq._validation import check_choice
from pyro_bq.quant.quantizers import GaussianLloydQuantizer, IntervalQuantizer

from .informativeness import (
    BitAllocation,
    check_candidate_bits,
    check_target,
    layer_informativeness,
    normalized_informativeness,
    single_thread,
    site_sizes,
    validated,
)

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
    sites=None,
) -> BitAllocation:
    """Allocate per-site widths whose size-weighted mean is as close as possible to the target.

    :param posterior: a trained pyro_bq guide or ``{site: (loc, scale)}``.
    :param target_mean_bits: target mean bits per weight (``gamma``), within the candidate range.
    :param candidate_bits: allowed widths.
    :param aggregate: ``"mean"`` (Eq. 2) or ``"entropy"`` (Eq. 15).
    :param grid: ``"uniform"`` (QIU) or ``"gaussian"`` (QINU); recorded in the result.
    :param mode: ``"nearest"`` (mean bits closest to the target) or ``"at_most"``
        (the largest mean bits not above it).
    :returns: a :class:`BitAllocation` (``info`` holds the scale factor, the
        normalised informativeness and the achievable mean bits; ``site_quantizers``
        the grid of the means).
    :raises ValueError: for an empty candidate set, a target outside the
        candidate range, a non-positive sigma, or an unknown option.
    """
    with single_thread():
        return _quantile_inform(posterior, target_mean_bits, candidate_bits, aggregate, grid, mode, sites)


def _quantile_inform(posterior, target_mean_bits, candidate_bits, aggregate, grid, mode, sites) -> BitAllocation:
    candidates = check_candidate_bits(candidate_bits)
    gamma = check_target(target_mean_bits, candidates)
    check_choice("grid", grid, tuple(_GRIDS))
    check_choice("mode", mode, ("nearest", "at_most"))
    params = validated(posterior, sites)
    sizes = site_sizes(params)
    raw = layer_informativeness(params, aggregate=aggregate)
    norm = normalized_informativeness(raw)
    names = list(params)
    info = torch.tensor([norm[n] for n in names], dtype=torch.float64)
    size = torch.tensor([sizes[n] for n in names], dtype=torch.float64)
    cand = torch.tensor(candidates, dtype=torch.float64)
    k = len(candidates)

    # breakpoints of the step function, and just above each one, plus "all minimum"
    ks = torch.arange(1, k, dtype=torch.float64)
    bp = (info.reshape(-1, 1) * k / ks.reshape(1, -1)).flatten()
    bp = bp[bp > 0]
    scales = torch.cat([bp, bp * (1 + 1e-9), torch.tensor([float(k) + 1.0])]) if bp.numel() else torch.tensor([1.0])
    bits = bits_for_scale(info, cand, scales)  # (M, N)
    means = (bits * size).sum(-1) / size.sum()
    if mode == "nearest":
        gap = (means - gamma).abs()
        # ties: prefer the allocation not above the target, then the smaller scale
        best = int(torch.argmin(gap + 1e-12 * (means > gamma + 1e-12)))
    else:
        ok = means <= gamma + 1e-12
        if not bool(ok.any()):
            best = int(torch.argmin(means))
        else:
            best = int(torch.argmax(torch.where(ok, means, torch.full_like(means, -1.0))))
    chosen = {n: int(b) for n, b in zip(names, bits[best].tolist())}
    method, grid_name, quantizer = _GRIDS[grid]
    return BitAllocation(
        chosen,
        method=method,
        sizes=sizes,
        grid=grid_name,
        site_quantizers={n: {"loc": quantizer(b)} for n, b in chosen.items()},
        info={
            "scale": float(scales[best]),
            "target": gamma,
            "aggregate": aggregate,
            "layer_informativeness": raw,
            "normalized_informativeness": norm,
            "achievable_mean_bits": sorted(set(round(float(m), 6) for m in means)),
        },
    )


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
