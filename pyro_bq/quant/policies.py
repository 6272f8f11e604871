"""Policies: which guide tensor of which site gets which quantizer.

A guide holds, per weight site, a ``loc`` and a ``scale``; a draw from it is a
``sample``. These are the three *quantities* a policy can quantize:

* :class:`VPQ` (variational parameter quantization): ``loc`` uniformly and
  ``scale`` logarithmically; sampling stays in float.
* :class:`SPQ` (sampled parameter quantization): float ``loc`` and ``scale``;
  every sampled weight is quantized with a quantizer calibrated on the
  posterior (the envelope ``loc +- calib_width * scale``).
* :class:`JQ` (joint quantization): both; the sample quantizer is calibrated
  on the quantized posterior.
* :class:`FloatPolicy`: nothing is quantized (the baseline).

Bits are resolved per site and quantity, most specific first:
``site_bits[site][quantity]`` > ``site_bits[site]`` > ``loc_bits`` /
``scale_bits`` / ``sample_bits`` > ``bits``; the quantizer template likewise:
``site_quantizers[site][quantity]`` > ``loc_quantizer`` / ``scale_quantizer``
/ ``sample_quantizer``. Keys of ``site_bits`` and ``site_quantizers`` and
entries of ``skip`` are exact site names or regular expressions (matched with
:func:`re.fullmatch`); an exact name wins over a pattern. A bit value is an
int from 1 to 16 or, for quantizers that take one, an integer tensor of the
site's shape (per-parameter precision). A bit allocation of
:mod:`pyro_bq.mixed` becomes a policy through the constructor:
``JQ(8, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers)``.

``rounding`` chooses how the sample quantizer rounds each weight draw
(SPQ, JQ, and any policy that quantizes samples): ``"nearest"``, ``"stochastic"``
(unbiased; keeps draws varying where the posterior scale is far below the grid
step), ``"stochastic-matched"`` (stochastic rounding of a narrower Gaussian,
so the draw's variance stays the posterior's where it can) or
``"stochastic-matched-or-nearest"`` (the matched rule only for the weights
whose variance it matches, round to nearest for the others); see
:mod:`pyro_bq.quant.quantizers` and docs/stochastic_rounding.md. ``None`` keeps the template's own rule.

The one extension point is :meth:`Policy.configure_site`, which returns the
(uncalibrated) quantizers of one site.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Union

import torch

from pyro_bq._validation import check_float, check_type

from .grids import check_bits, check_rounding
from .quantizers import Log2Quantizer, Quantizer, UniformQuantizer

__all__ = ["Policy", "VPQ", "SPQ", "JQ", "FloatPolicy", "SiteQuantizers", "QUANTITIES", "make_policy", "end_sites",
           "end_site_bits", "default_loc_quantizer", "default_sample_quantizer"]

QUANTITIES = ("loc", "scale", "sample")
MODES = ("float", "vpq", "spq", "jq")


@dataclass
class SiteQuantizers:
    """The quantizers of one site (``None``: that quantity stays float).

    Usage::

        sq = SiteQuantizers(loc=UniformQuantizer(4), scale=Log2Quantizer(4))
        sq.is_float   # False
    """

    loc: Optional[Quantizer] = None
    scale: Optional[Quantizer] = None
    sample: Optional[Quantizer] = None

    @property
    def is_float(self) -> bool:
        return self.loc is None and self.scale is None and self.sample is None


def default_loc_quantizer(range: str = "auto") -> UniformQuantizer:
    """Per-channel asymmetric uniform grid; ``range="auto"``: min/max range at >= 4 bits, 0.5/99.5
    percentiles below (any ``range`` of :class:`UniformQuantizer`, e.g. ``"mse"``).

    Usage::

        policy = JQ(4, loc_quantizer=default_loc_quantizer("mse"), sample_quantizer=default_sample_quantizer("mse"))
    """
    return UniformQuantizer(8, symmetric=False, per_channel=True, range=range)


def default_scale_quantizer() -> Log2Quantizer:
    """Per-channel power-of-two grid anchored at the largest scale."""
    return Log2Quantizer(4, per_channel=True)


def default_sample_quantizer(range: str = "auto") -> UniformQuantizer:
    """The sample grid: the same per-channel asymmetric uniform grid as :func:`default_loc_quantizer`.

    Usage::

        policy = SPQ(4, sample_quantizer=default_sample_quantizer("mse"))
    """
    return default_loc_quantizer(range)


def _check_bits_value(name, value):
    if isinstance(value, Mapping):
        unknown = set(value) - set(QUANTITIES)
        if unknown:
            raise ValueError(f"{name} has unknown quantities {sorted(unknown)}; allowed: {', '.join(QUANTITIES)}")
        return {k: check_bits(f"{name}[{k!r}]", v, allow_tensor=True) for k, v in value.items()}
    return check_bits(name, value, allow_tensor=True)


def _check_quantizer(name: str, value) -> Quantizer:
    if not isinstance(value, Quantizer):
        raise TypeError(f"{name} must be a pyro_bq Quantizer (e.g. UniformQuantizer, Log2Quantizer, "
                        f"CodebookQuantizer), got {type(value).__name__}")
    return value


class Policy:
    """Base policy; ``mode`` is one of ``"float"``, ``"vpq"``, ``"spq"``, ``"jq"``.

    :param bits: default bits of every quantized quantity (int from 1 to 16).
    :param loc_bits, scale_bits, sample_bits: bits per quantity (override ``bits``).
    :param site_bits: ``{site name or regex: bits}`` where bits is an int, an
        integer tensor of the site's shape, or ``{"loc"|"scale"|"sample": bits}``.
    :param site_quantizers: ``{site name or regex: {"loc"|"scale"|"sample": Quantizer}}``:
        per-site templates that replace the policy-wide ones at those sites.
    :param skip: site names or regexes that stay float (e.g. first and last layer).
    :param loc_quantizer, scale_quantizer, sample_quantizer: quantizer templates;
        their bits are replaced by the resolved bits. Defaults: per-channel
        asymmetric uniform with ``range="auto"`` for ``loc`` and ``sample``,
        per-channel :class:`Log2Quantizer` for ``scale``.
    :param calib_width: the sample quantizer is calibrated on
        ``loc +- calib_width * scale`` (SPQ, JQ).
    :param rounding: how sampled weights are rounded: ``"nearest"``, ``"stochastic"``,
        ``"stochastic-matched"`` or ``"stochastic-matched-or-nearest"``
        (:data:`~pyro_bq.quant.grids.ROUNDINGS`); it replaces the
        rounding of every sample quantizer (policy-wide and per-site templates), which must
        then be uniform-grid quantizers. ``None``: each template's own (round to nearest by default).

    Usage::

        policy = JQ(4, skip=[r"net\\.conv1\\..*"], site_bits={"net.fc3.weight": 8})
        qguide = quantize(guide, policy)
    """

    mode = "float"

    def __init__(
        self,
        bits: int = 8,
        *,
        loc_bits=None,
        scale_bits=None,
        sample_bits=None,
        site_bits: Optional[Mapping[str, object]] = None,
        site_quantizers: Optional[Mapping[str, Mapping[str, Quantizer]]] = None,
        skip: Union[str, Iterable[str]] = (),
        loc_quantizer: Optional[Quantizer] = None,
        scale_quantizer: Optional[Quantizer] = None,
        sample_quantizer: Optional[Quantizer] = None,
        calib_width: float = 2.0,
        rounding: Optional[str] = None,
    ):
        self.bits = check_bits("bits", bits)
        self.quantity_bits = {}
        for q, b in (("loc", loc_bits), ("scale", scale_bits), ("sample", sample_bits)):
            if b is not None:
                self.quantity_bits[q] = check_bits(f"{q}_bits", b, allow_tensor=True)
        self.site_bits = {key: _check_bits_value(f"site_bits[{key!r}]", value)
                          for key, value in self._site_map("site_bits", site_bits, "bits").items()}
        self.site_quantizers = {}
        for key, value in self._site_map("site_quantizers", site_quantizers, "{quantity: Quantizer}").items():
            if not isinstance(value, Mapping) or set(value) - set(QUANTITIES):
                raise ValueError(f"site_quantizers[{key!r}] must map quantities ({', '.join(QUANTITIES)}) to "
                                 f"quantizers, got {value!r:.80}")
            self.site_quantizers[key] = {q: _check_quantizer(f"site_quantizers[{key!r}][{q!r}]", t)
                                         for q, t in value.items()}
        if isinstance(skip, str):
            skip = [skip]
        if isinstance(skip, (bytes, Mapping, torch.Tensor)) or not isinstance(skip, Iterable):
            raise TypeError(f"skip must be a site name or regex, or a list of them (e.g. ['net.0.weight']; () to "
                            f"skip nothing), got {type(skip).__name__} ({skip!r:.60})")
        self.skip = []
        for i, s in enumerate(skip):
            check_type(f"skip[{i}]", s, str, "a site name or regex (str)")
            self._compile(s, "skip")
            self.skip.append(s)
        self.loc_quantizer = default_loc_quantizer() if loc_quantizer is None \
            else _check_quantizer("loc_quantizer", loc_quantizer)
        self.scale_quantizer = default_scale_quantizer() if scale_quantizer is None \
            else _check_quantizer("scale_quantizer", scale_quantizer)
        self.sample_quantizer = default_sample_quantizer() if sample_quantizer is None \
            else _check_quantizer("sample_quantizer", sample_quantizer)
        self.calib_width = check_float("calib_width", calib_width, low=0.0)
        self.rounding = None if rounding is None else check_rounding("rounding", rounding)
        if self.rounding is not None:
            self.sample_quantizer.with_rounding(self.rounding)  # fails here for a template without it

    @staticmethod
    def _compile(pattern, what):
        try:
            return re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{what} entry {pattern!r} is neither a site name nor a valid regex: {err}") from None

    @classmethod
    def _site_map(cls, what: str, value, of: str) -> dict:
        """``value`` (None or a mapping keyed by site names or regexes) as a dict, its keys checked."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TypeError(f"{what} must be a mapping {{site name or regex: {of}}}, got {type(value).__name__}")
        for key in value:
            check_type(f"{what} key", key, str)
            cls._compile(key, what)
        return dict(value)

    # -- matching -------------------------------------------------------------------
    @staticmethod
    def _lookup(keys, name):
        if name in keys:
            return name
        for key in keys:
            if re.fullmatch(key, name):
                return key
        return None

    def check_sites(self, sites: Iterable[str]) -> None:
        """Raise ValueError if a ``site_bits`` key or ``skip`` entry matches no site."""
        sites = list(sites)
        for what, keys in (("site_bits", list(self.site_bits)), ("site_quantizers", list(self.site_quantizers)),
                           ("skip", self.skip)):
            for key in keys:
                if key not in sites and not any(re.fullmatch(key, s) for s in sites):
                    raise ValueError(f"{what} entry {key!r} matches no site; the guide's sites are {sites}")

    def skipped(self, name: str) -> bool:
        return self._lookup(self.skip, name) is not None

    def bits_for(self, name: str, quantity: str):
        """The resolved bits (int or tensor) of ``quantity`` at site ``name``."""
        key = self._lookup(list(self.site_bits), name)
        if key is not None:
            value = self.site_bits[key]
            if isinstance(value, dict):
                if quantity in value:
                    return value[quantity]
            else:
                return value
        return self.quantity_bits.get(quantity, self.bits)

    def quantizes(self, quantity: str) -> bool:
        return {"float": False, "vpq": quantity in ("loc", "scale"), "spq": quantity == "sample",
                "jq": True}[self.mode]

    # -- the extension point ---------------------------------------------------------
    def configure_site(self, name: str, shape: torch.Size) -> SiteQuantizers:
        """Uncalibrated quantizers of site ``name`` (``None`` for a float quantity)."""
        if self.skipped(name):
            return SiteQuantizers()
        out = {}
        for quantity in QUANTITIES:
            if not self.quantizes(quantity):
                continue
            bits = self.bits_for(name, quantity)
            key = self._lookup(list(self.site_quantizers), name)
            template = self.site_quantizers[key].get(quantity) if key is not None else None
            template = template if template is not None else getattr(self, f"{quantity}_quantizer")
            if isinstance(bits, torch.Tensor):
                try:
                    torch.broadcast_shapes(bits.shape, tuple(shape))
                except RuntimeError:
                    raise ValueError(f"bits tensor for site {name!r} ({quantity}) has shape {tuple(bits.shape)}, "
                                     f"which does not broadcast to the site's shape {tuple(shape)}") from None
            out[quantity] = template.with_bits(bits)
            if quantity == "sample" and self.rounding is not None:
                out[quantity] = out[quantity].with_rounding(self.rounding)
        return SiteQuantizers(**out)

    def __repr__(self) -> str:
        extra = []
        if self.quantity_bits:
            extra.append(", ".join(f"{k}_bits={v if isinstance(v, int) else 'tensor'}" for k, v in self.quantity_bits.items()))
        if self.site_bits:
            extra.append(f"site_bits={len(self.site_bits)} entries")
        if self.site_quantizers:
            extra.append(f"site_quantizers={len(self.site_quantizers)} entries")
        if self.skip:
            extra.append(f"skip={self.skip}")
        if self.rounding is not None:
            extra.append(f"rounding={self.rounding!r}")
        return f"{type(self).__name__}({self.bits}{''.join(', ' + e for e in extra)})"


class FloatPolicy(Policy):
    """No quantization: the float baseline (``quantize`` still returns a copy); ``bits`` is not used.

    Usage::

        baseline = quantize(guide, FloatPolicy())
    """

    mode = "float"


class VPQ(Policy):
    """Variational parameter quantization: ``loc`` uniform, ``scale`` log2; float sampling.

    Usage::

        qguide = quantize(guide, VPQ(4))
    """

    mode = "vpq"


class SPQ(Policy):
    """Sampled parameter quantization: float parameters, every sampled weight quantized.

    Usage::

        qguide = quantize(guide, SPQ(4))
    """

    mode = "spq"


class JQ(Policy):
    """Joint quantization: VPQ plus quantized samples.

    Usage::

        qguide = quantize(guide, JQ(4, skip=["net.conv1.weight"]))
    """

    mode = "jq"


_BY_MODE = {"float": FloatPolicy, "vpq": VPQ, "spq": SPQ, "jq": JQ}


def make_policy(mode: str, bits: int = 8, **kwargs) -> Policy:
    """A policy from its mode name (``"float"``, ``"vpq"``, ``"spq"``, ``"jq"``; case-insensitive),
    then the arguments every policy takes, in the same order: ``bits``, then keywords.

    Usage::

        policy = make_policy("jq", 4, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers)
        sr = make_policy("spq", 2, rounding="stochastic")
    """
    if not isinstance(mode, str) or mode.lower() not in _BY_MODE:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    return _BY_MODE[mode.lower()](bits, **kwargs)


def end_sites(site_names: Iterable[str]) -> list[str]:
    """The sites of the first and the last layer, in the network's order of ``site_names``:
    every name whose module (the name up to its last dot) is the first or the last name's module.

    Low-bit studies often keep these layers at higher precision, e.g. with
    ``site_bits={name: 8 for name in end_sites(guide.sites)}``.

    :raises ValueError: for an empty ``site_names``.
    :raises TypeError: for a name that is not a string.

    Usage::

        end_sites(["net.conv1.weight", "net.conv2.weight", "net.fc.weight", "net.fc.bias"])
        # ['net.conv1.weight', 'net.fc.weight', 'net.fc.bias']
        policy = JQ(4, site_bits={name: 8 for name in end_sites(guide.sites)})
    """
    names = list(site_names)
    if not names:
        raise ValueError("site_names is empty: pass the guide's sites (e.g. guide.sites) after set-up")
    for name in names:
        check_type("site_names entry", name, str)
    ends = {names[0].rsplit(".", 1)[0], names[-1].rsplit(".", 1)[0]}
    return [name for name in names if name.rsplit(".", 1)[0] in ends]


def end_site_bits(site_names: Iterable[str], ends_bits: Optional[int], bits: int) -> Optional[dict]:
    """``{site: ends_bits}`` for the :func:`end_sites` when ``ends_bits`` is more than the row's
    ``bits``, else ``None`` (every layer at ``bits``): the ``site_bits`` of a policy that keeps the
    first and the last layer at higher precision.

    Usage::

        policy = JQ(3, site_bits=end_site_bits(guide.sites, 8, 3))
    """
    if ends_bits is None or ends_bits <= bits:
        return None
    return {name: ends_bits for name in end_sites(site_names)}
