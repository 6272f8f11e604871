"""Gaussian quantization levels (the QINU grid of Quantile Inform).

* :func:`gaussian_quantile_levels`: ``2**b`` levels for a Normal: the cells are
  the equal-probability intervals; finite cells are represented by their
  midpoints, the two infinite tail cells by their medians.
* :func:`lloyd_max_median`: refines a set of levels for a Normal by the
  alternating iteration for the *absolute* error: boundaries at the midpoints
  of neighbouring levels, then each level at the median of its cell. Neither
  half-step can increase ``E|X - c(X)|`` (computed in closed form by
  :func:`expected_abs_error`).
* :func:`gaussian_levels`: both, for ``Normal(mean, std)`` (cached per width).

Everything works on tensors, in float64 for the Normal computations.

Usage::

    levels = lloyd_max_median(gaussian_quantile_levels(3)).levels   # standard Normal, 8 levels
    q = nearest_code(x, mean + std * levels)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from pyro_bq._validation import check_float, check_int, check_positive, check_tensor

from .grids import check_bits

__all__ = [
    "gaussian_quantile_levels",
    "gaussian_levels",
    "expected_abs_error",
    "lloyd_max_median",
    "LloydMaxResult",
    "median_condition_residual",
]

_SQRT2PI = math.sqrt(2.0 * math.pi)


def _ndtr(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / _SQRT2PI


def gaussian_quantile_levels(bits: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """``2**bits`` levels for ``Normal(mean, std)`` from its quantiles (float64).

    The boundaries are ``F^-1(k / m)``; a finite cell is represented by its
    midpoint, the two infinite tails by their medians ``F^-1(1 / 2m)`` and
    ``F^-1(1 - 1 / 2m)``. One bit gives the two tail medians.

    :param bits: the width, an int in ``[1, 16]`` (``MAX_BITS`` of :mod:`pyro_bq.quant`).
    :param mean: the Normal's mean, a finite number.
    :param std: its standard deviation, a finite number > 0.
    :raises ValueError: for ``bits`` outside ``[1, 16]`` or ``std <= 0``.
    """
    bits = check_bits("bits", bits)
    mean = check_float("mean", mean)
    std = check_positive("std", std)
    m = 2**bits
    k = torch.arange(1, m, dtype=torch.float64)
    a = torch.special.ndtri(k / m)
    levels = torch.empty(m, dtype=torch.float64)
    levels[1:-1] = 0.5 * (a[:-1] + a[1:])
    tail = float(torch.special.ndtri(torch.tensor(1.0 / (2 * m), dtype=torch.float64)))
    levels[0], levels[-1] = tail, -tail
    return mean + std * levels


def _boundaries(levels: torch.Tensor) -> torch.Tensor:
    inf = torch.tensor([math.inf], dtype=levels.dtype)
    return torch.cat([-inf, 0.5 * (levels[:-1] + levels[1:]), inf])


def expected_abs_error(levels: torch.Tensor, boundaries: torch.Tensor | None = None) -> float:
    """``E|Z - c(Z)|`` for a standard Normal ``Z``, where ``c`` maps the cell
    ``(boundaries[i], boundaries[i+1]]`` to ``levels[i]``.

    Default boundaries: the midpoints (nearest-level assignment).
    """
    q = torch.as_tensor(levels, dtype=torch.float64)
    b = _boundaries(q) if boundaries is None else torch.as_tensor(boundaries, dtype=torch.float64)
    if b.numel() != q.numel() + 1:
        raise ValueError(f"boundaries must have len(levels) + 1 = {q.numel() + 1} entries, got {b.numel()}")
    lo, hi = b[:-1], b[1:]
    c = torch.minimum(torch.maximum(q, lo), hi)
    fc, flo, fhi = _ndtr(c), _ndtr(lo), _ndtr(hi)
    pc, plo, phi = _pdf(c), _pdf(lo), _pdf(hi)
    left = q * (fc - flo) + (pc - plo)  # integral over (lo, c) of (q - z) phi(z)
    right = (pc - phi) - q * (fhi - fc)  # integral over (c, hi) of (z - q) phi(z)
    return float((left + right).sum())


@dataclass
class LloydMaxResult:
    """Levels (standard-Normal units unless scaled), the error after every half-step, and the iterations run."""

    levels: torch.Tensor
    errors: list = field(default_factory=list)
    iterations: int = 0
    converged: bool = False


def lloyd_max_median(
    levels,
    *,
    max_iter: int = 200,
    tol: float = 1e-10,
) -> LloydMaxResult:
    """Refine levels for a standard Normal by the median iteration (absolute error).

    Each iteration sets the cell boundaries to the midpoints of neighbouring
    levels, then moves each level to the median of its cell,
    ``F^-1((F(a_{i-1}) + F(a_i)) / 2)``. ``errors`` holds ``E|Z - c(Z)|`` at the
    start and after each half-step; it never increases. Scale the result by
    ``mean + std * levels`` for ``Normal(mean, std)``.

    :param levels: initial levels, a non-empty 1-D tensor of finite values
        sorted ascending, e.g. :func:`gaussian_quantile_levels`.
    :param max_iter: most iterations (>= 0).
    :param tol: stop when no level moves by more than ``tol`` (a finite number > 0).
    :raises TypeError: if ``levels`` is not a real tensor.
    :raises ValueError: if it is empty, not 1-D, not finite or not sorted.
    """
    check_tensor("levels", levels, ndim=1)
    if levels.dtype == torch.bool or levels.is_complex():
        raise TypeError(f"levels must be a real tensor, got dtype {levels.dtype}")
    q = levels.detach().to(torch.float64).clone()
    if q.numel() < 1 or not bool(torch.isfinite(q).all()):
        raise ValueError("levels must be a non-empty tensor of finite values")
    if q.numel() > 1 and not bool((q[1:] >= q[:-1]).all()):
        raise ValueError("levels must be sorted ascending (e.g. pass levels.sort().values)")
    max_iter = check_int("max_iter", max_iter, low=0)
    tol = check_positive("tol", tol)
    result = LloydMaxResult(levels=q, errors=[expected_abs_error(q)])
    # the initial partition is the nearest-level one, so errors[0] is also the
    # error after "boundaries at midpoints"
    for it in range(max_iter):
        b = _boundaries(q)
        mid = 0.5 * (_ndtr(b[:-1]) + _ndtr(b[1:]))
        new_q = torch.special.ndtri(mid.clamp(1e-300, 1 - 1e-16))
        result.errors.append(expected_abs_error(new_q, b))  # levels moved, old partition
        result.errors.append(expected_abs_error(new_q))  # partition re-drawn at midpoints
        moved = float((new_q - q).abs().max())
        q = new_q
        result.iterations = it + 1
        if moved <= tol:
            result.converged = True
            break
    result.levels = q
    return result


def median_condition_residual(levels) -> torch.Tensor:
    """Residuals of the fixed-point conditions for a standard Normal:
    ``2 F(q_i) - F(a_{i-1}) - F(a_i)`` with ``a`` the midpoints (``F(-inf) = 0``,
    ``F(inf) = 1``). All zero exactly when every level is the median of its cell."""
    q = torch.as_tensor(levels, dtype=torch.float64).flatten()
    b = _boundaries(q)
    return 2 * _ndtr(q) - _ndtr(b[:-1]) - _ndtr(b[1:])


@lru_cache(maxsize=64)
def _std_levels(bits: int, max_iter: int) -> torch.Tensor:
    return lloyd_max_median(gaussian_quantile_levels(bits), max_iter=max_iter).levels


def gaussian_levels(bits: int, mean: float, std: float, *, max_iter: int = 200) -> torch.Tensor:
    """QINU levels for ``Normal(mean, std)``: the Gaussian-quantile start refined by the median iteration.

    Usage::

        levels = gaussian_levels(3, float(w.mean()), float(w.std()))
    """
    return mean + std * _std_levels(int(bits), int(max_iter)).clone()
