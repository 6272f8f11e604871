"""PWFN's initial posterior scales: small next to a power of two, large between two.

The PWFN paper (Section 3, Eq. 4, and the appendix, Eq. 12-13) starts every
weight's Gaussian at its pretrained value ``mu`` and chooses the initial
standard deviation from where ``|mu|`` sits between its two neighbouring
powers of two ``2**x <= |mu| < 2**(x+1)``:

* ``d_lo = (|mu| - 2**x) / 2**x`` -- relative distance to the power below,
* ``d_hi = (2**(x+1) - |mu|) / 2**(x+1)`` -- relative distance to the power above,
* ``v = d_lo * d_hi`` -- zero on a power of two, largest half-way between,
* ``sigma = clamp(0.05**2 * v / quantile(v, 0.75), 2**-30, 0.05)``.

Readings of the paper (where our copy is garbled, silent or inconsistent):

* Eq. 12 prints the two relative distances joined by a minus sign, but the
  main text (Eq. 4) describes, and the properties it claims need, a
  *product* (zero at both ends of the interval, maximal in between). We use
  the product.
* The normaliser ``v_0.75`` is the 0.75 quantile of that product
  ``d_lo * d_hi``. The appendix defines ``v`` from the distance to the upper
  power of two only; we normalise by the quantity that is being scaled.
* A relative distance divides by the power of two (Eq. 4 as printed), not by
  ``|mu|``. (The copy of the authors' code we read divides by ``|mu|``, WFN's
  relative distance, and takes the quantile per weight tensor.)
* Eq. 13 prints ``max(0.1, min(f, 2**-30))``, which would be a constant; the
  sentence before it says "clamp ... to the range [2^-30, 0.05]". We clamp.
* The result is used as the standard deviation ``sigma`` (what the guide
  stores and what Eq. 6 divides by), not as a variance.
* The 0.75 quantile is taken over every weight of the network at once (the
  text does not say over which set).
* ``mu = 0`` is itself a cluster centre in PWFN's codebook, so it gets
  ``v = 0`` (the smallest scale), like an exact power of two.
* If the 0.75 quantile is 0 (three quarters of the weights sit exactly on
  powers of two or zero) the normaliser is floored at the smallest positive
  float, so every other weight gets the upper clamp ``0.05``.

The quantile uses :func:`torch.kthvalue` (linear interpolation, the same
definition as :func:`torch.quantile`), which has no input-size limit, so this
works for 10^7+ weights.
"""

from __future__ import annotations

import torch

from pyro_bq._validation import check_float, check_probability, check_tensor

__all__ = ["pow2_bracket", "relative_pow2_distances", "quantile", "pwfn_sigma_init", "SIGMA_MIN", "SIGMA_MAX"]

#: lower clamp of the initial scale (Eq. 13)
SIGMA_MIN = 2.0**-30
#: upper clamp of the initial scale (Eq. 13)
SIGMA_MAX = 0.05


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of all elements of ``x`` (linear interpolation).

    Agrees with ``torch.quantile(x.flatten(), q)`` but is built on two
    :func:`torch.kthvalue` calls, so it accepts inputs of any size.

    :param x: a non-empty floating-point tensor without NaN.
    :param q: the level, a number in ``[0, 1]``.
    :raises TypeError: if ``x`` is not a floating-point tensor or ``q`` not a number.
    :raises ValueError: if ``x`` is empty or holds NaN, or ``q`` lies outside ``[0, 1]``.
    """
    check_tensor("x", x, floating=True)
    q = check_probability("q", q)
    if x.numel() == 0:
        raise ValueError("x must hold at least one element")
    if bool(torch.isnan(x).any()):
        raise ValueError("x must not hold NaN (its quantiles are undefined)")
    return _quantile(x, q)


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """:func:`quantile` of a validated tensor (internal)."""
    flat = x.reshape(-1)
    n = flat.numel()
    pos = q * (n - 1)
    lo = int(pos)  # floor, pos >= 0
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    v_lo = torch.kthvalue(flat, lo + 1).values
    if frac == 0.0 or hi == lo:
        return v_lo
    v_hi = torch.kthvalue(flat, hi + 1).values
    return v_lo + (v_hi - v_lo) * frac


def pow2_bracket(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbouring powers of two ``(2**x, 2**(x+1))`` with ``2**x <= |mu| < 2**(x+1)``.

    Zeros get ``(0, 0)``. Computed with :func:`torch.frexp`, so exact powers
    of two give ``2**x == |mu|`` without rounding error.
    """
    check_tensor("mu", mu, floating=True)
    a = mu.abs()
    mant, _ = torch.frexp(a)  # a = mant * 2**e with mant in [0.5, 1): 2**x = a / (2 mant), exact
    lower = torch.where(a == 0, torch.zeros_like(a), a / (2 * mant).masked_fill(a == 0, 1.0))
    return lower, 2 * lower


def relative_pow2_distances(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative distances ``(d_lo, d_hi)`` of ``|mu|`` to its power-of-two neighbours.

    ``d_lo = (|mu| - 2**x) / 2**x`` in ``[0, 1)`` and
    ``d_hi = (2**(x+1) - |mu|) / 2**(x+1)`` in ``(0, 1/2]``; both are 0 for ``mu = 0``.
    With ``|mu| = m * 2**(x+1)``, ``m`` in ``[1/2, 1)`` (the :func:`torch.frexp`
    mantissa), these are ``2m - 1`` and ``1 - m``: one pass, no division.
    """
    check_tensor("mu", mu, floating=True)
    mant, _ = torch.frexp(mu.abs())
    zero = mant == 0
    d_lo = (2 * mant - 1).masked_fill_(zero, 0.0)
    d_hi = (1 - mant).masked_fill_(zero, 0.0)
    return d_lo, d_hi


def pwfn_sigma_init(
    mu: torch.Tensor,
    *,
    scale: float = SIGMA_MAX**2,
    q: float = 0.75,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> torch.Tensor:
    """Initial PWFN standard deviations for pretrained weights ``mu`` (Eq. 12-13).

    :param mu: the pretrained weights, any shape (usually all weights of a
        network as one flat vector, since the quantile is global).
    :param scale: numerator constant, ``0.05**2`` in the paper.
    :param q: quantile used to normalise (0.75 in the paper).
    :param sigma_min: lower clamp (``2**-30``).
    :param sigma_max: upper clamp (``0.05``).
    :returns: a new tensor of the shape of ``mu``; finite and in
        ``[sigma_min, sigma_max]`` for any finite input, zeros included.

    Usage::

        sigma = pwfn_sigma_init(torch.tensor([0.0, 0.25, 0.375, -0.3]))
    """
    check_tensor("mu", mu, floating=True)
    if mu.numel() == 0:
        raise ValueError("mu must hold at least one weight")
    if not bool(torch.isfinite(mu).all()):
        raise ValueError("mu must be finite (the pretrained weights hold NaN or inf)")
    scale = check_float("scale", scale, low=0.0, low_open=True)
    q = check_probability("q", q, open_interval=True)
    sigma_min = check_float("sigma_min", sigma_min, low=0.0, low_open=True)
    sigma_max = check_float("sigma_max", sigma_max, low=sigma_min)
    d_lo, d_hi = relative_pow2_distances(mu)
    v = d_lo * d_hi
    norm = _quantile(v, q).clamp_min(torch.finfo(v.dtype).tiny)
    return (scale * v / norm).clamp(sigma_min, sigma_max)
