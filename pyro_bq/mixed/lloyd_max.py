"""Quantization grids used by the bit allocators.

* :func:`quantize_uniform`: ``2**b`` evenly spaced levels on ``[alpha, beta]``
  with rounding and clamping (the QIU grid on the 5th-95th percentile range,
  and Random Bits' trainable interval).
* :func:`gaussian_quantile_levels`: ``2**b`` levels for a Normal: the cells are
  the equal-probability intervals; finite cells are represented by their
  midpoints, the two infinite tail cells by their medians.
* :func:`lloyd_max_median`: refines a set of levels for a Normal by the
  alternating iteration for the *absolute* error: boundaries at the midpoints
  of neighbouring levels, then each level at the median of its cell. Neither
  half-step can increase ``E|X - c(X)|`` (computed in closed form by
  :func:`expected_abs_error`).

Everything works on tensors, in float64 for the Normal computations.

Usage::

    levels = lloyd_max_median(gaussian_quantile_levels(3)).levels   # standard Normal, 8 levels
    q = quantize_to_levels(x, mean + std * levels)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pyro_bq._validation import check_float, check_int, check_positive, check_tensor
from pyro_bq.quant.quantizers import MAX_BITS

__all__ = [
    "quantize_uniform",
    "percentile_interval",
    "gaussian_quantile_levels",
    "expected_abs_error",
    "lloyd_max_median",
    "LloydMaxResult",
    "median_condition_residual",
    "quantize_to_levels",
]

_SQRT2PI = math.sqrt(2.0 * math.pi)


def _ndtr(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / _SQRT2PI


def quantize_uniform(x: torch.Tensor, alpha, beta, bits) -> torch.Tensor:
    """Round ``x`` onto ``2**bits`` evenly spaced levels from ``alpha`` to ``beta``.

    ``alpha``, ``beta`` and ``bits`` broadcast against ``x``. Values outside
    ``[alpha, beta]`` go to the end levels.

    :param x: a floating-point tensor.
    :param alpha: lower end of the interval: a finite number or a tensor of them.
    :param beta: upper end, ``> alpha`` everywhere: a finite number or a tensor of them.
    :param bits: the width: an int in ``[1, 16]`` or a tensor of such integers.
    :raises TypeError: for an argument of the wrong type.
    :raises ValueError: for non-finite ends, ``beta <= alpha``, widths outside
        ``[1, 16]`` or shapes that do not broadcast against ``x``.
    """
    check_tensor("x", x, floating=True)
    alpha = _real_tensor("alpha", alpha, x)
    beta = _real_tensor("beta", beta, x)
    if not bool((beta > alpha).all()):
        shown = f"alpha={alpha.item()}, beta={beta.item()}" if alpha.numel() == 1 and beta.numel() == 1 else "some entries"
        raise ValueError(f"beta must be > alpha (the interval [alpha, beta] must not be empty or reversed), got {shown}")
    levels_minus_1 = torch.pow(2.0, _bits_tensor("bits", bits, x)) - 1
    return _quantize_uniform(x, alpha, beta, levels_minus_1)


def _quantize_uniform(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, levels_minus_1: torch.Tensor) -> torch.Tensor:
    """:func:`quantize_uniform` on validated tensors (internal)."""
    step = (beta - alpha) / levels_minus_1
    step = torch.where(step > 0, step, torch.ones_like(step))
    k = torch.clamp(torch.round((x - alpha) / step), torch.zeros_like(levels_minus_1), levels_minus_1)
    return alpha + step * k


def _real_tensor(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A finite real number or real tensor that broadcasts against ``like``, as a tensor of its dtype (internal)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number or a real tensor, got a tensor of dtype {value.dtype}")
        _check_broadcast(name, value, like)
        out = value.detach().to(dtype=like.dtype, device=like.device)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{name} must be finite everywhere (it holds NaN or inf)")
        return out
    return torch.tensor(check_float(name, value), dtype=like.dtype, device=like.device)


def _bits_tensor(name: str, bits, like: torch.Tensor, high: int = 16) -> torch.Tensor:
    """Widths: an int in ``[1, high]`` or a tensor of such integers, as a tensor of ``like``'s dtype (internal)."""
    if isinstance(bits, torch.Tensor):
        if bits.dtype == torch.bool or bits.is_complex():
            raise TypeError(f"{name} must be an int or an integer tensor, got a tensor of dtype {bits.dtype}")
        if bits.numel() == 0:
            raise ValueError(f"{name} must not be an empty tensor")
        _check_broadcast(name, bits, like)
        b = bits.detach()
        lo, hi = (float(v) for v in torch.aminmax(b))
        if not (1 <= lo and hi <= high) or (b.is_floating_point() and not bool((b == b.round()).all())):
            raise ValueError(f"{name} must hold integers in [1, {high}], got values in [{lo}, {hi}]")
        return b.to(dtype=like.dtype, device=like.device)
    return torch.tensor(float(check_int(name, bits, low=1, high=high)), dtype=like.dtype, device=like.device)


def _check_broadcast(name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    try:
        torch.broadcast_shapes(value.shape, like.shape)
    except RuntimeError as err:
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} does not broadcast against x of shape {tuple(like.shape)}"
        ) from err


def percentile_interval(x: torch.Tensor, low: float = 0.05, high: float = 0.95) -> tuple[float, float]:
    """The ``low`` and ``high`` quantiles of ``x`` (the QIU interval); widened to a
    non-empty interval if they coincide."""
    flat = torch.as_tensor(x).detach().flatten().double()
    if flat.numel() > 2**24:  # torch.quantile limit; a strided subsample is plenty
        flat = flat[:: flat.numel() // 2**23 + 1]
    a, b = torch.quantile(flat, torch.tensor([low, high], dtype=torch.float64)).tolist()
    if b <= a:
        pad = max(abs(a), 1e-8) * 1e-3
        a, b = a - pad, b + pad
    return a, b


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
    bits = check_int("bits", bits, low=1, high=MAX_BITS)
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


def quantize_to_levels(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Map each entry of ``x`` to its nearest level (``levels`` sorted ascending)."""
    x = torch.as_tensor(x)
    lv = torch.as_tensor(levels, dtype=x.dtype).flatten()
    if lv.numel() == 1:
        return torch.full_like(x, float(lv))
    mids = 0.5 * (lv[:-1] + lv[1:])
    idx = torch.bucketize(x.contiguous(), mids)
    return lv[idx]
