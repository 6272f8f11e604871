"""Grid kernels: how numbers become integer codes and codes become numbers.

This module is the one home of the quantization grids. Every quantizer of
:mod:`pyro_bq.quant.quantizers`, the allocators of :mod:`pyro_bq.mixed`, the
activation fake-quantizer, the log-quantized guide and the PWFN codebook call
these functions; none of them rounds on its own.

* **Rounding rule**: round half to even (:func:`torch.round`, the IEEE 754
  default). A value exactly half-way between two levels goes to the even code.
  It is exact (unlike ``floor(x + 0.5)``, whose addition can round up a value
  just below one half) and symmetric under negation.
* **Uniform grids** are a step, a zero point ``zp`` and the top code
  ``qmax``: codes ``clamp(round(x / step + zp), 0, qmax)``, values
  ``(k - zp) * step``. :func:`interval_grid` spans ``[lo, hi]`` without a
  zero point; :func:`zero_point_grid` puts 0 on a level (asymmetric, or
  symmetric around 0); :func:`signed_grid` gives the odd multiples of
  ``scale * 2**(1 - bits)`` (SMOL's signed bits). A degenerate range
  (``hi == lo``) collapses onto its one value.
* **Ranges** of the rows of a ``[C, M]`` tensor: :func:`minmax_range` and
  :func:`percentile_range` (linear interpolation, as :func:`torch.quantile`,
  for any number of elements); :func:`widen_empty` opens an empty interval.
* **The log2 window**: :func:`log2_top`, :func:`log2_window`,
  :func:`log2_exponents` (rounding in the log domain).
* **Codebooks**: :func:`nearest_code_index` and :func:`nearest_code` for any
  sorted codebook; there a tie goes to the code of smaller magnitude (a sorted
  codebook has no "even" code).
* **Stochastic rounding** of weight draws (:data:`ROUNDINGS`):
  :func:`stochastic_round` rounds ``t`` up with probability ``t - floor(t)``
  (so ``E[round(t)] = t``), from the global torch generator, the one
  ``Normal.rsample`` draws from; :func:`uniform_codes_stochastic` applies it
  on a uniform grid (codes outside ``[0, qmax]`` are clamped, so the mean is
  ``t`` only inside the grid). :func:`rounding_variance` is the variance it
  adds, :func:`matched_noise_scale` the Gaussian noise that keeps the total
  variance at a target, and :func:`matchable` where that target can be met.
* :func:`ste` (the straight-through estimator) and :func:`check_bits` with
  :data:`MAX_BITS`.

Usage::

    step, zp, qmax = interval_grid(torch.tensor(-1.0), torch.tensor(1.0), 3)
    codes = uniform_codes(x, step, zp, qmax)          # 0 .. 7 (floats)
    values = uniform_decode(codes, step, zp)          # 8 levels from -1 to 1
"""

from __future__ import annotations

import math
import numbers
from typing import Union

import torch

from pyro_bq._validation import check_tensor

__all__ = [
    "MAX_BITS",
    "check_bits",
    "ste",
    "bits_like",
    "interval_grid",
    "zero_point_grid",
    "signed_grid",
    "uniform_codes",
    "uniform_decode",
    "uniform_quantize",
    "minmax_range",
    "percentile_range",
    "quantile_rows",
    "widen_empty",
    "log2_top",
    "log2_window",
    "log2_exponents",
    "nearest_code_index",
    "nearest_code",
    "ROUNDINGS",
    "MATCHED_ROUNDINGS",
    "MATCHED_OR_NEAREST",
    "check_rounding",
    "stochastic_round",
    "uniform_codes_stochastic",
    "rounding_variance",
    "matched_noise_scale",
    "matchable",
]

#: the widest code: a packed file stores widths from 1 to 16 (its bit map holds ``bits - 1`` in 4 bits)
MAX_BITS = 16


def check_bits(name: str, bits, *, allow_tensor: bool = False) -> Union[int, torch.Tensor]:
    """Validate a bit width: an int from 1 to :data:`MAX_BITS` or, if allowed, an integer tensor of such values.

    Returns the int, or the tensor as ``torch.int64``. Anything else raises
    :class:`ValueError` naming ``name`` and the allowed values.

    Usage::

        bits = check_bits("bits", 4)
        per_weight = check_bits("bits", torch.full((3, 5), 4), allow_tensor=True)
    """
    if isinstance(bits, torch.Tensor) and allow_tensor:
        if bits.is_floating_point() or bits.is_complex() or bits.dtype == torch.bool:
            raise ValueError(f"{name} must be an int from 1 to {MAX_BITS} or an integer tensor of such values, "
                             f"got a tensor of dtype {bits.dtype}")
        if bits.numel() == 0 or int(bits.min()) < 1 or int(bits.max()) > MAX_BITS:
            shown = f"[{int(bits.min())}, {int(bits.max())}]" if bits.numel() else "an empty tensor"
            raise ValueError(f"{name} must hold integers from 1 to {MAX_BITS}, got {shown}")
        return bits.detach().to(torch.int64)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= int(bits) <= MAX_BITS:
        allowed = f"an int from 1 to {MAX_BITS}" + (" or an integer tensor of such values" if allow_tensor else "")
        raise ValueError(f"{name} must be {allowed}, got {bits!r}")
    return int(bits)


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``q``, the gradient of ``x``.

    Written as ``q + (x - x.detach())`` so the forward value is exactly ``q``.

    Usage::

        w_q = ste(w, uniform_quantize(w.detach(), step, zp, qmax))
    """
    if not x.requires_grad:
        return q.detach()
    return q.detach() + (x - x.detach())


def bits_like(bits, like: torch.Tensor) -> torch.Tensor:
    """``bits`` (an int or an integer tensor) as a tensor of ``like``'s dtype and device.

    Usage::

        levels = torch.exp2(bits_like(bits, x))
    """
    return torch.as_tensor(bits, dtype=like.dtype, device=like.device)


def _positive(step: torch.Tensor) -> torch.Tensor:
    """A degenerate (zero) step becomes the smallest normal number: the grid collapses onto its range."""
    return step.clamp(min=torch.finfo(step.dtype).tiny)


def interval_grid(lo: torch.Tensor, hi: torch.Tensor, bits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(step, zp, qmax)`` of ``2**bits`` evenly spaced levels from ``lo`` to ``hi`` (no zero point).

    ``bits`` is an int or a tensor; everything broadcasts.

    Usage::

        step, zp, qmax = interval_grid(torch.tensor(-0.1), torch.tensor(0.1), 3)   # 8 levels
    """
    qmax = torch.exp2(bits_like(bits, lo)) - 1
    step = _positive((hi - lo) / qmax)
    return step, -lo / step, qmax


def zero_point_grid(lo: torch.Tensor, hi: torch.Tensor, bits, *, symmetric: bool):
    """``(step, zp, qmax)`` of a grid on ``[lo, hi]`` (``lo <= 0 <= hi``) on which 0 is a level.

    ``symmetric=True``: levels ``step * k`` for ``|k| <= 2**(bits-1) - 1`` with
    ``step = hi / (2**(bits-1) - 1)`` (one code unused; one bit gives the two
    levels ``-hi`` and ``hi``). ``symmetric=False``: ``2**bits`` levels and an
    integer zero point.

    Usage::

        step, zp, qmax = zero_point_grid(w.min().clamp(max=0), w.max().clamp(min=0), 4, symmetric=False)
    """
    b = bits_like(bits, hi)
    if symmetric:
        qmax = torch.where(b == 1, torch.ones_like(b), torch.exp2(b) - 2)
        zp = qmax / 2
        return _positive(hi / zp), zp, qmax
    qmax = torch.exp2(b) - 1
    step = _positive((hi - lo) / qmax)
    zp = torch.minimum(torch.round(-lo / step).clamp(min=0), qmax)
    return step, zp, qmax


def signed_grid(bits, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(step, zp, qmax)`` of ``bits`` signed bits: the ``2**bits`` odd multiples of
    ``scale * 2**(1 - bits)`` of magnitude below ``2 * scale`` (SMOL's value map).

    Usage::

        theta_q = uniform_quantize(theta, *signed_grid(3, torch.tensor(1.0)))   # +-1/8, +-3/8, ... +-7/4
    """
    b = bits_like(bits, scale)
    levels = torch.exp2(b)
    return scale * torch.exp2(2 - b), (levels - 1) / 2, levels - 1


def uniform_codes(x: torch.Tensor, step, zp, qmax) -> torch.Tensor:
    """The codes ``clamp(round(x / step + zp), 0, qmax)`` (a floating tensor of integer values).

    Usage::

        codes = uniform_codes(x, *interval_grid(lo, hi, 4)).to(torch.int64)
    """
    return torch.minimum(torch.round(x / step + zp).clamp(min=0), qmax)


def uniform_decode(codes: torch.Tensor, step, zp) -> torch.Tensor:
    """The values ``(codes - zp) * step`` of floating ``codes``.

    Usage::

        values = uniform_decode(codes.float(), step, zp)
    """
    return (codes - zp) * step


def uniform_quantize(x: torch.Tensor, step, zp, qmax) -> torch.Tensor:
    """``x`` on the grid: :func:`uniform_decode` of :func:`uniform_codes` (no gradient trick).

    Usage::

        x_q = uniform_quantize(x, *interval_grid(lo, hi, 4))
    """
    return uniform_decode(uniform_codes(x, step, zp, qmax), step, zp)


def minmax_range(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest value of each row of ``flat`` (``[C, M]``).

    Usage::

        lo, hi = minmax_range(w.reshape(w.shape[0], -1))   # per output channel
    """
    return flat.amin(dim=-1), flat.amax(dim=-1)


def quantile_rows(flat: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile (``0 <= q <= 1``) of each row of ``flat``, by linear interpolation.

    The definition of :func:`torch.quantile`, built on :func:`torch.kthvalue`,
    so any number of elements works.

    Usage::

        median = quantile_rows(x.reshape(1, -1), 0.5)[0]
    """
    m = flat.shape[-1]
    pos = q * (m - 1)
    k = min(int(pos), m - 1)
    below = flat.kthvalue(k + 1, dim=-1).values
    if pos == k or k + 1 >= m:
        return below
    return torch.lerp(below, flat.kthvalue(k + 2, dim=-1).values, pos - k)


def percentile_range(flat: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``low`` and ``high`` percentiles (in ``[0, 100]``) of each row of ``flat``.

    Usage::

        lo, hi = percentile_range(loc.reshape(1, -1), 5.0, 95.0)
    """
    return quantile_rows(flat, low / 100), quantile_rows(flat, high / 100)


def widen_empty(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``, where ``hi <= lo`` widened by ``1e-3 * max(|lo|, 1e-8)`` on each side.

    Usage::

        lo, hi = widen_empty(*minmax_range(flat))
    """
    pad = torch.where(hi <= lo, lo.abs().clamp(min=1e-8) * 1e-3, torch.zeros_like(lo))
    return lo - pad, hi + pad


def log2_top(e_max: torch.Tensor) -> torch.Tensor:
    """The top exponent of a log2 window whose largest value is ``2**e_max``: ``round(e_max)`` in
    ``[-140, 127]``; NaN or ``-inf`` (the log2 of a non-positive value) give ``-126``.

    Usage::

        top = log2_top(torch.log2(scale.max()))
    """
    return torch.round(torch.nan_to_num(e_max, nan=-126.0, neginf=-126.0)).clamp(-140, 127)


def log2_window(top: torch.Tensor, bits) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest exponent of the ``2**bits`` integer exponents ending at ``top``.

    Usage::

        low, top = log2_window(torch.tensor(-3.0), 2)   # -6, -3
    """
    return top - (torch.exp2(bits_like(bits, top)) - 1), top


def log2_exponents(e: torch.Tensor, low, top) -> torch.Tensor:
    """Exponents ``e = log2(x)`` rounded (half to even) and clamped to the window ``[low, top]``.

    Usage::

        low, top = log2_window(log2_top(torch.log2(scale.max())), 4)
        scale_q = torch.exp2(log2_exponents(torch.log2(scale), low, top))
    """
    return torch.clamp(torch.round(e), min=low, max=top)


def _check_codebook(codebook: torch.Tensor) -> torch.Tensor:
    check_tensor("codebook", codebook, ndim=1, floating=True)
    if codebook.numel() == 0:
        raise ValueError("codebook must hold at least one value, got an empty tensor")
    if codebook.numel() > 1 and not bool((codebook[1:] > codebook[:-1]).all()):
        raise ValueError("codebook must be sorted strictly ascending (use torch.unique(codebook))")
    return codebook


def nearest_code_index(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index into ``codebook`` of the entry nearest to each element of ``values``.

    Vectorized with :func:`torch.searchsorted` (``O(N log K)``). A value exactly
    half-way between two codes goes to the one with the smaller magnitude (so
    the result is symmetric under negation).

    :param values: a floating tensor of any shape.
    :param codebook: a sorted, strictly ascending 1-D floating tensor.
    :returns: a ``long`` tensor with the shape of ``values``.
    :raises TypeError: for a non-floating ``values`` or ``codebook``.
    :raises ValueError: for an empty or unsorted codebook.

    Usage::

        idx = nearest_code_index(torch.tensor([0.3, -0.07]), pow2_codebook(3))
    """
    check_tensor("values", values, floating=True)
    _check_codebook(codebook)
    cb = codebook.to(device=values.device, dtype=values.dtype)
    flat = values.reshape(-1).contiguous()
    hi = torch.searchsorted(cb, flat).clamp_(max=cb.numel() - 1)
    # the neighbours' distances, in place; lo = hi - 1 except at the bottom (hi = 0, lo = 0)
    d_lo = torch.sub(flat, cb[(hi - 1).clamp_(min=0)]).abs_()
    d_hi = cb[hi].sub_(flat).abs_()
    # a tie goes to the smaller magnitude: per upper index, whether the lower code wins it
    lower_wins = torch.ones_like(cb, dtype=torch.bool)
    lower_wins[1:] = cb[:-1].abs() <= cb[1:].abs()
    pick_lo = (d_lo == d_hi).logical_and_(lower_wins[hi]).logical_or_(d_lo < d_hi)
    return hi.sub_(pick_lo.view(torch.uint8)).clamp_(min=0).reshape(values.shape)


def nearest_code(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Every element of ``values`` rounded to the nearest entry of ``codebook`` (ties as in
    :func:`nearest_code_index`); the shape and dtype of ``values``.

    Usage::

        nearest_code(torch.tensor([0.3, 0.74]), pow2_codebook(3, 2))  # [0.25, 0.75]
    """
    idx = nearest_code_index(values, codebook)
    return codebook.to(device=values.device, dtype=values.dtype)[idx]


#: the rule that rounds only some weights stochastically (:meth:`pyro_bq.quant.Quantizer.stochastic_mask`)
MATCHED_OR_NEAREST = "stochastic-matched-or-nearest"
#: rounding rules of weight draws: round to nearest (half to even), stochastic rounding,
#: stochastic rounding with the Gaussian noise shrunk so that the total variance matches (see
#: :func:`matched_noise_scale`), and that matched rule only where it can give the posterior's
#: variance, round to nearest for the other weights (see :func:`matchable`)
ROUNDINGS = ("nearest", "stochastic", "stochastic-matched", MATCHED_OR_NEAREST)
#: the rules whose draws need a per-weight noise scale (:meth:`pyro_bq.quant.Quantizer.draw_rule`)
MATCHED_ROUNDINGS = ("stochastic-matched", MATCHED_OR_NEAREST)


def check_rounding(name: str, rounding) -> str:
    """Validate a rounding rule: one of :data:`ROUNDINGS`; ValueError naming ``name`` otherwise.

    Usage::

        rounding = check_rounding("rounding", "stochastic")
    """
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, ROUNDINGS))}, got {rounding!r}")
    return rounding


def stochastic_round(t: torch.Tensor, u: torch.Tensor = None) -> torch.Tensor:
    """``floor(t) + 1`` with probability ``t - floor(t)``, else ``floor(t)``: an unbiased rounding.

    ``u`` holds uniform numbers in ``[0, 1)`` of ``t``'s shape; by default they are drawn with
    :func:`torch.rand_like` from the global generator (reproducible under ``pyro.set_rng_seed``).
    The result is ``floor(t) + (u < t - floor(t))``; its variance is ``f * (1 - f)`` with
    ``f = t - floor(t)`` (:func:`rounding_variance`).

    Usage::

        k = stochastic_round(torch.full((10000,), 0.25))   # about a quarter ones, the rest zeros
    """
    lower = torch.floor(t)
    if u is None:
        u = torch.rand_like(t)
    return lower + (u < (t - lower)).to(t.dtype)


def uniform_codes_stochastic(x: torch.Tensor, step, zp, qmax, u: torch.Tensor = None) -> torch.Tensor:
    """The codes ``clamp(stochastic_round(x / step + zp), 0, qmax)`` (floats of integer values).

    Inside the grid the expected decoded value is ``x`` itself; a value beyond the lowest or
    highest level is clipped onto it (as by round to nearest), so there the mean is the clip value.

    Usage::

        codes = uniform_codes_stochastic(w, *interval_grid(lo, hi, 2))
    """
    return torch.minimum(stochastic_round(x / step + zp, u).clamp(min=0), qmax)


#: Fourier terms of :func:`rounding_variance` for noise of at least :data:`_SERIES_NOISE` steps; the
#: damping makes the truncation error below ``1e-30`` there
_VARIANCE_TERMS = 48
#: below this noise (in steps) :func:`rounding_variance` sums the exact Gaussian expectation over
#: the :data:`_NEAR_LEVELS` levels on each side of ``t`` (more than 12 noise widths)
_SERIES_NOISE = 0.25
_NEAR_LEVELS = 3


def rounding_variance(t: torch.Tensor, noise=0.0) -> torch.Tensor:
    """Variance (in units of ``step**2``) that stochastic rounding adds to a value at grid position ``t``.

    ``noise`` (in units of ``step``): the standard deviation of Gaussian noise added to ``t``
    before rounding; the result is then the expectation over that noise. With ``noise = 0`` it is
    exactly ``f * (1 - f)`` (``f = t - floor(t)``), between 0 on a level and ``1/4`` half-way;
    averaged over positions it is ``1/6``. With noise below a quarter step it is the exact
    Gaussian expectation of ``f (1 - f)``, piece by piece between the levels near ``t``
    (:func:`_smoothed_rounding_variance`; on a level it grows as ``0.8 noise`` for small noise);
    above, the Gaussian smoothing of the Fourier series ``f(1 - f) = 1/6 - sum_k cos(2 pi k t) / (pi k)**2``
    (each term damped by ``exp(-2 (pi k noise)**2)``), which tends to ``1/6`` once the noise exceeds
    about a third of a step.

    Usage::

        v = rounding_variance(torch.tensor([0.0, 0.5, 0.25]))   # 0, 0.25, 0.1875
    """
    noise = torch.as_tensor(noise, dtype=t.dtype, device=t.device)
    frac, noise = torch.broadcast_tensors(t - torch.floor(t), noise)
    out = frac * (1 - frac)
    small = (noise > 0) & (noise < _SERIES_NOISE)
    large = noise >= _SERIES_NOISE
    out = out.masked_scatter(small, _smoothed_rounding_variance(frac[small], noise[small]))
    return out.masked_scatter(large, _series_rounding_variance(frac[large], noise[large])).clamp(0, 0.25)


def _series_rounding_variance(frac: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``E[g(frac + noise Z)]`` (``g``: see :func:`_smoothed_rounding_variance`) from the damped
    Fourier series of :func:`rounding_variance`, for 1-d ``frac`` and ``noise``."""
    kk = torch.arange(1, _VARIANCE_TERMS + 1, dtype=frac.dtype, device=frac.device).unsqueeze(1)
    damp = torch.exp(-2 * (torch.pi * kk * noise) ** 2)
    return 1 / 6 - (torch.cos(2 * torch.pi * kk * frac) * damp / (torch.pi * kk) ** 2).sum(0)


def _smoothed_rounding_variance(frac: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``E[g(frac + noise Z)]`` for ``g(x) = f (1 - f)`` of ``x``'s fractional part and a standard
    normal ``Z``, exactly for ``noise`` below :data:`_SERIES_NOISE` (in float64): on each interval
    ``[j, j + 1)`` near ``frac``, ``g(x) = u (1 - u)`` with ``u = x - j``, whose Gaussian
    expectation over the interval follows from the partial moments of the normal distribution."""
    dtype = noise.dtype
    frac, s = frac.double(), noise.double()
    total = torch.zeros_like(frac)
    for j in range(-_NEAR_LEVELS, _NEAR_LEVELS + 1):
        mu = frac - j  # u = x - j is Normal(mu, s**2); the interval is 0 <= u < 1
        a, b = -mu / s, (1 - mu) / s
        pa, pb = (torch.exp(-z * z / 2) / math.sqrt(2 * math.pi) for z in (a, b))
        mass = torch.special.ndtr(b) - torch.special.ndtr(a)
        m1 = mu * mass + s * (pa - pb)
        m2 = (mu * mu + s * s) * mass + s * (mu * pa - (1 + mu) * pb)
        total = total + (m1 - m2)
    return total.to(dtype)


def matched_noise_scale(t: torch.Tensor, sigma: torch.Tensor, iters: int = 24) -> torch.Tensor:
    """The Gaussian noise ``s`` (in units of ``step``) for which noise plus stochastic rounding has
    the variance ``sigma**2``: ``s**2 + rounding_variance(t, s) = sigma**2`` (``t``: the grid
    position of the mean, ``sigma`` in units of ``step``).

    Solved by bisection on ``[0, sigma]``. Where even ``s = 0`` gives more than ``sigma**2`` (the
    rounding variance ``f (1 - f)`` of the mean alone is larger: ``sigma`` below about half a
    step), ``s = 0``: the draws are the stochastic rounding of the mean, the least variance this
    rule can give.

    Usage::

        s = matched_noise_scale(loc / step + zp, scale / step) * step
    """
    target = sigma * sigma
    lo = torch.zeros_like(sigma)
    hi = sigma.clone()
    for _ in range(iters):
        mid = (lo + hi) / 2
        over = mid * mid + rounding_variance(t, mid) > target
        hi = torch.where(over, mid, hi)
        lo = torch.where(over, lo, mid)
    return torch.where(matchable(t, sigma), (lo + hi) / 2, torch.zeros_like(sigma))


def matchable(t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Where stochastic rounding can give a draw both the posterior's mean and its variance:
    the rounding variance ``f (1 - f)`` of the mean alone (``t``: its grid position) is below
    ``sigma**2`` (``sigma`` in units of ``step``). There :func:`matched_noise_scale` is positive
    and the draws have the variance ``sigma**2``; elsewhere every unbiased rounding onto the
    grid has more, and the rule ``"stochastic-matched-or-nearest"`` rounds those weights to nearest.

    Usage::

        stochastic = matchable(loc / step + zp, scale / step)   # a bool tensor of loc's shape
    """
    return rounding_variance(t) < sigma * sigma
