"""The PWFN guide: a Gaussian per weight, started from a pretrained network,
with PWFN's power-of-two-aware initial scales (:func:`pwfn_sigma_init`) and a
per-weight freeze mask.

See :mod:`pyro_bq.pwfn` for the training objective (Eq. 2-3), the clustering
(Algorithm 1) and the driver that alternates them.

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

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pyro_bq._validation import check_float, check_positive, check_probability, check_tensor, check_type
from pyro_bq.quant.grids import quantile_rows

from .meanfield import AutoMeanFieldNormal, _softplus_inverse

__all__ = ["AutoPWFN", "pwfn_sigma_init", "relative_pow2_distances", "quantile", "SIGMA_MIN", "SIGMA_MAX"]

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

    Usage::

        v75 = quantile(v, 0.75)
    """
    check_tensor("x", x, floating=True)
    q = check_probability("q", q)
    if x.numel() == 0:
        raise ValueError("x must hold at least one element")
    if bool(torch.isnan(x).any()):
        raise ValueError("x must not hold NaN (its quantiles are undefined)")
    return quantile_rows(x.reshape(1, -1), q)[0]


def relative_pow2_distances(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative distances ``(d_lo, d_hi)`` of ``|mu|`` to its power-of-two neighbours.

    ``d_lo = (|mu| - 2**x) / 2**x`` in ``[0, 1)`` and
    ``d_hi = (2**(x+1) - |mu|) / 2**(x+1)`` in ``(0, 1/2]``; both are 0 for ``mu = 0``.
    With ``|mu| = m * 2**(x+1)``, ``m`` in ``[1/2, 1)`` (the :func:`torch.frexp`
    mantissa), these are ``2m - 1`` and ``1 - m``: one pass, no division.

    Usage::

        d_lo, d_hi = relative_pow2_distances(torch.tensor([0.375]))   # 0.5, 0.25
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
    norm = quantile_rows(v.reshape(1, -1), q)[0].clamp_min(torch.finfo(v.dtype).tiny)
    return (scale * v / norm).clamp(sigma_min, sigma_max)


class AutoPWFN(AutoMeanFieldNormal):
    """Mean-field Normal guide for probabilistic weight fixing (PWFN).

    Every weight ``w_i`` has ``q(w_i) = Normal(mu_i, sigma_i)``. ``mu`` starts
    at a pretrained network (pass ``init_loc_fn=init_to_pretrained(net)``);
    ``sigma`` starts from Eq. 12-13 of the paper
    (:func:`pwfn_sigma_init`: small next to a power of
    two, large half-way between two, normalised by the 0.75 quantile over the
    whole network, clamped to ``[2**-30, 0.05]``). With ``prior_init=False``
    it is the paper's "PWFN (no prior)" variant: every sigma starts at
    ``init_scale``.

    Weights can be *fixed* (frozen on a cluster centre) by the clustering
    step: the boolean buffer :attr:`fixed` marks them and the buffers
    :attr:`fixed_loc` / :attr:`fixed_scale` hold their values. For fixed
    weights :meth:`get_loc_scale` returns the buffer values through a
    ``torch.where``, so their gradients with respect to ``loc`` and
    ``scale_raw`` are exactly zero and a fresh optimizer never moves them;
    :meth:`enforce_fixed_` additionally writes the values into the parameters.

    :param model: a Pyro model, usually a :class:`~pyro_bq.models.BayesianClassifier`.
    :param init_loc_fn: ``site -> initial loc``; use :func:`init_to_pretrained`
        (required by the paper's training mode, see :class:`pyro_bq.pwfn.PWFNObjective`).
    :param prior_init: True (default): Eq. 12-13 scales; False: uniform ``init_scale``.
    :param init_scale: the uniform initial sigma of the no-prior variant. The
        paper does not give its value; the default ``0.05**2`` is the sigma
        Eq. 12 assigns to a weight at the 0.75 quantile.

    Usage::

        guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
        guide.setup(x, y)
        guide.num_fixed, guide.fraction_fixed   # 0, 0.0 before clustering
    """

    def __init__(
        self,
        model,
        *,
        init_loc_fn: Optional[Callable[[dict], torch.Tensor]] = None,
        prior_init: bool = True,
        init_scale: float = 0.05**2,
        create_plates=None,
    ):
        check_type("prior_init", prior_init, bool)
        init_scale = check_positive("init_scale", init_scale)
        super().__init__(model, init_loc_fn=init_loc_fn, init_scale=init_scale, create_plates=create_plates)
        self.prior_init = prior_init

    # -- set-up -------------------------------------------------------------------
    def _setup_params(self, trace) -> None:
        locs = []
        for name in self.sites:
            locs.append(self._initial_loc(name, trace.nodes[name]).reshape(-1))
        loc = torch.cat(locs).detach()
        scale = pwfn_sigma_init(loc) if self.prior_init else torch.full_like(loc, self.init_scale)
        self.loc = torch.nn.Parameter(loc.clone())
        self.scale_raw = torch.nn.Parameter(_softplus_inverse(scale.clamp_min(1e-30)))
        self.register_buffer("fixed", torch.zeros(loc.shape, dtype=torch.bool))
        self.register_buffer("fixed_loc", torch.zeros_like(loc))
        self.register_buffer("fixed_scale", torch.ones_like(loc))

    # -- loc and scale, with fixed weights taken from the buffers -----------------------
    def flat_loc_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All locs and scales as two flat vectors in site order (fixed ones from the buffers)."""
        self._require_setup()
        loc, scale = self.loc, F.softplus(self.scale_raw)
        if self._any_fixed():
            loc = torch.where(self.fixed, self.fixed_loc, loc)
            scale = torch.where(self.fixed, self.fixed_scale, scale)
        return loc, scale

    def _any_fixed(self) -> bool:
        """Whether any weight is fixed; cached on the identity and version of the :attr:`fixed`
        buffer, so any write to it (in place, ``copy_``, a new tensor) is seen at the next call."""
        fixed = self.fixed
        cache = self.__dict__.get("_any_fixed_cache")
        if cache is None or cache[0] is not fixed or cache[1] != fixed._version:
            cache = (fixed, fixed._version, bool(fixed.any()))
            object.__setattr__(self, "_any_fixed_cache", cache)
        return cache[2]

    def _invalidate(self) -> None:
        object.__setattr__(self, "_any_fixed_cache", None)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._invalidate()

    def get_loc_scale(self, name):
        info = self._check_site(name)
        sl = slice(info.offset, info.offset + info.numel)
        loc, scale = self.loc[sl], F.softplus(self.scale_raw[sl])
        if self._any_fixed():
            fixed = self.fixed[sl]
            loc = torch.where(fixed, self.fixed_loc[sl], loc)
            scale = torch.where(fixed, self.fixed_scale[sl], scale)
        return loc.view(info.shape), scale.view(info.shape)

    # -- the freeze mask ------------------------------------------------------------------
    @property
    def num_fixed(self) -> int:
        self._require_setup()
        return int(self.fixed.sum())

    @property
    def fraction_fixed(self) -> float:
        return self.num_fixed / max(1, self.num_params)

    @torch.no_grad()
    def fix_(self, index: torch.Tensor, value: torch.Tensor, scale: torch.Tensor) -> "AutoPWFN":
        """Freeze the flat weights ``index`` at loc ``value`` with scale ``scale``. Returns ``self``."""
        self._require_setup()
        index = torch.as_tensor(index, dtype=torch.long, device=self.loc.device).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_params):
            raise ValueError(f"index must lie in [0, {self.num_params}), got values outside")
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device).expand(index.shape)
        scale = torch.as_tensor(scale, dtype=self.loc.dtype, device=self.loc.device).expand(index.shape)
        if not bool(torch.isfinite(value).all()) or not bool((scale > 0).all()):
            raise ValueError("value must be finite and scale positive for every fixed weight")
        self.fixed[index] = True
        self.fixed_loc[index] = value
        self.fixed_scale[index] = scale
        self._invalidate()
        return self.enforce_fixed_()

    @torch.no_grad()
    def set_fixed_(self, fixed: torch.Tensor, fixed_loc: torch.Tensor, fixed_scale: torch.Tensor) -> "AutoPWFN":
        """Replace the whole freeze state (flat vectors of length :attr:`num_params`). Returns ``self``."""
        self._require_setup()
        n = self.num_params
        for name, t in (("fixed", fixed), ("fixed_loc", fixed_loc), ("fixed_scale", fixed_scale)):
            if not isinstance(t, torch.Tensor) or t.shape != (n,):
                raise ValueError(f"{name} must be a tensor of shape ({n},)")
        if fixed.dtype != torch.bool:
            raise TypeError(f"fixed must be a bool tensor, got dtype {fixed.dtype}")
        if not bool((fixed_scale[fixed] > 0).all()):
            raise ValueError("fixed_scale must be positive for every fixed weight")
        self.fixed.copy_(fixed)
        self.fixed_loc.copy_(torch.where(fixed, fixed_loc, torch.zeros_like(fixed_loc)))
        self.fixed_scale.copy_(torch.where(fixed, fixed_scale, torch.ones_like(fixed_scale)))
        self._invalidate()
        return self.enforce_fixed_()

    @torch.no_grad()
    def enforce_fixed_(self) -> "AutoPWFN":
        """Write the fixed values into ``loc`` / ``scale_raw`` (a no-op for free weights). Returns ``self``."""
        self._require_setup()
        if self._any_fixed():
            self.loc.copy_(torch.where(self.fixed, self.fixed_loc, self.loc))
            raw = _softplus_inverse(self.fixed_scale.clamp_min(1e-30))
            self.scale_raw.copy_(torch.where(self.fixed, raw, self.scale_raw))
        return self

    @torch.no_grad()
    def codebook(self) -> torch.Tensor:
        """Sorted unique values of the fixed weights (empty before any clustering)."""
        self._require_setup()
        return torch.unique(self.fixed_loc[self.fixed])
