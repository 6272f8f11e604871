"""Power-of-two and additive power-of-two codebooks, and nearest-code lookup.

A *codebook* here is a sorted 1-D tensor of allowed weight values.  The
power-of-two family used by PWFN and APoT-style quantizers is built from the
magnitudes ``2**max_exp, 2**(max_exp-1), ..., 2**-b`` (the powers of two
"down to precision ``2**-b``").  A code of *order* ``r`` is a sum of at most
``r`` distinct such powers; the codebook holds every code of order ``1..r``,
with both signs, plus zero.

Sums of two equal powers are not enumerated separately: ``2**-k + 2**-k`` is
``2**(1-k)``, which is already a power in the set (or exceeds ``2**max_exp``
for ``k = -max_exp``, in which case it is deliberately excluded).

Rounding onto a codebook is :func:`pyro_bq.quant.grids.nearest_code`.

Usage::

    from pyro_bq.quant.codebook import pow2_codebook, pow2_family

    cb = pow2_codebook(b=3, r=1)          # 0, +-1/8, +-1/4, +-1/2, +-1
    apot4 = pow2_family(4, "apot")        # at most 16 codes, largest magnitude 1
"""

from __future__ import annotations

import math

import torch

from pyro_bq._validation import check_int, check_type

__all__ = ["pow2_codebook", "pow2_magnitudes", "pow2_family", "codebook_size"]

#: refuse to build codebooks larger than this (the enumeration is combinatorial)
MAX_CODEBOOK_SIZE = 2_000_000


def pow2_magnitudes(b: int, *, max_exp: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return the positive powers of two ``2**max_exp, ..., 2**-b`` in ascending order.

    :param int b: precision; the smallest magnitude is ``2**-b``. Must satisfy ``-b <= max_exp``.
    :param int max_exp: exponent of the largest power (default 0, i.e. 1.0).
    :param dtype: floating dtype of the result.
    """
    b = check_int("b", b, low=0, high=126)
    max_exp = check_int("max_exp", max_exp, low=-126, high=126)
    if -b > max_exp:
        raise ValueError(f"b must satisfy -b <= max_exp (= {max_exp}), got b={b}")
    exps = torch.arange(-b, max_exp + 1, dtype=torch.float64)
    return torch.pow(2.0, exps).to(dtype)


def codebook_size(b: int, r: int, *, max_exp: int = 0, signed: bool = True, include_zero: bool = True) -> int:
    """Number of entries :func:`pow2_codebook` would return (without building it)."""
    n = max_exp + b + 1
    pos = sum(math.comb(n, k) for k in range(1, min(r, n) + 1))
    return pos * (2 if signed else 1) + (1 if include_zero else 0)


def pow2_codebook(
    b: int,
    r: int = 1,
    *,
    max_exp: int = 0,
    signed: bool = True,
    include_zero: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sorted codebook of additive powers of two.

    Every entry is ``s * sum(S)`` for a sign ``s`` in ``{+1, -1}`` (only ``+1``
    when ``signed=False``) and a non-empty set ``S`` of at most ``r`` distinct
    powers of two from ``2**max_exp`` down to ``2**-b``; zero is added when
    ``include_zero``.  ``r = 1`` gives the plain power-of-two set.

    The sums are formed in float64 (exact for ``b + max_exp < 52``) and cast
    to ``dtype``; duplicates after the cast are removed.

    :param int b: precision exponent, ``b >= -max_exp``; smallest non-zero magnitude is ``2**-b``.
    :param int r: order, the most powers added together (``r >= 1``).
    :param int max_exp: exponent of the largest power in the sums (default 0).
    :param bool signed: include negative codes.
    :param bool include_zero: include 0.
    :param dtype: floating dtype of the result.
    :returns: sorted, unique 1-D tensor.
    :raises ValueError: if the codebook would exceed ``MAX_CODEBOOK_SIZE`` entries.

    Usage::

        pow2_codebook(2, 2, signed=False, include_zero=False)
        # tensor([0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    """
    r = check_int("r", r, low=1)
    mags = pow2_magnitudes(b, max_exp=max_exp)
    check_type("signed", signed, bool)
    check_type("include_zero", include_zero, bool)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    size = codebook_size(b, r, max_exp=max_exp, signed=signed, include_zero=include_zero)
    if size > MAX_CODEBOOK_SIZE:
        raise ValueError(
            f"pow2_codebook(b={b}, r={r}) would hold {size} codes (> {MAX_CODEBOOK_SIZE}); "
            "lower b or r"
        )
    n = mags.numel()
    # Sums over k-subsets, built level by level: level k = level k-1 plus a
    # power with a smaller index than the smallest one already used (so every
    # subset appears exactly once).  Loops run over orders, not over weights.
    levels = [mags.clone()]
    last_idx = [torch.arange(n)]  # smallest power index used in each sum
    for _ in range(2, min(r, n) + 1):
        prev, prev_idx = levels[-1], last_idx[-1]
        j = torch.arange(n)
        ok = j[None, :] < prev_idx[:, None]  # [P, n]
        rows, cols = ok.nonzero(as_tuple=True)
        levels.append(prev[rows] + mags[cols])
        last_idx.append(cols)
    pos = torch.cat(levels)
    parts = [pos]
    if signed:
        parts.append(-pos)
    if include_zero:
        parts.append(torch.zeros(1, dtype=torch.float64))
    return torch.unique(torch.cat(parts).to(dtype))  # unique() sorts


def pow2_family(bits: int, family: str) -> torch.Tensor:
    """The largest signed power-of-two (``family="pot"``) or additive power-of-two (``"apot"``, sums
    of two) codebook with zero and at most ``2**bits`` codes, scaled so its largest magnitude is 1.

    Usage::

        cb = pow2_family(4, "pot")   # 0, +-2**-6 .. +-1: 15 codes
    """
    if bits == 1:
        return torch.tensor([-1.0, 1.0])
    r = 1 if family == "pot" else 2
    best = None
    for b in range(0, 64):
        cb = pow2_codebook(b, r, max_exp=0, signed=True, include_zero=True)
        if cb.numel() > 2**bits:
            break
        best = cb
    if best is None:  # e.g. apot at 2 bits: fall back to pot
        best = pow2_codebook(0, 1, signed=True, include_zero=True)
    return best / best.abs().max()
