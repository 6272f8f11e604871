"""Quantizers: small validated objects that calibrate on a tensor, then apply.

A quantizer is first a *specification* (bits, the grid, how its range is
found). :meth:`Quantizer.calibrate` returns a *calibrated copy* (the
specification is left untouched) that maps values to integer codes
(:meth:`~Quantizer.encode`), codes back to values (:meth:`~Quantizer.decode`),
and values straight to grid values with a straight-through estimator (calling
the quantizer), so it can be used during training: the forward value is the
grid value, the gradient is the identity. Every grid comes from
:mod:`pyro_bq.quant.grids` (one rounding rule: half to even).

* :class:`UniformQuantizer` -- an evenly spaced grid on which 0 is a level,
  symmetric or with a zero point, per tensor or per output channel; the range
  comes from min/max, percentiles or a small squared-error search. ``bits``
  may be an integer tensor broadcastable to the tensor (per-element precision).
* :class:`IntervalQuantizer` -- ``2**bits`` levels from ``lo`` to ``hi``
  without a zero point: a fixed interval (Random Bits) or the 5th to 95th
  percentile of the tensor (Quantile Inform's QIU grid).
* :class:`Log2Quantizer` -- powers of two ``2**e`` in a calibrated window of
  ``2**bits`` exponents, for positive quantities such as posterior scales.
* :class:`CodebookQuantizer` -- nearest entry of a power-of-two or additive
  power-of-two codebook (:mod:`pyro_bq.quant.codebook`) times a calibrated
  scale, or of any user codebook.
* :class:`GaussianLloydQuantizer` -- Gaussian-quantile levels refined by the
  median iteration for a Normal fitted to the tensor (QINU).
* :class:`SignedGridQuantizer` -- signed bits: odd multiples of
  ``scale * 2**(1 - bits)`` (SMOL).

Every quantizer works on tensors with extra *leading* dimensions (Monte Carlo
samples): its calibrated range has the calibrated tensor's number of
dimensions and broadcasts from the right.

Packed files (:func:`pyro_bq.io.save_packed`) learn a quantizer class from
one declaration on the class itself: ``packed_type`` (the name its
:meth:`~Quantizer.config` carries as ``"type"``), ``packed_keys`` (the other
config keys) and the classmethod ``packed_layout(config, shape, k)`` (its
state tensors: name, stream and shape), which is also what
:meth:`~Quantizer.metadata_bits` counts. A subclass that sets ``packed_type``
is registered when it is defined (:func:`register_quantizer`);
:func:`quantizer_from_state` and the packed-file reader look the type up with
:func:`quantizer_class`. See :class:`Quantizer` for the optional hooks.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar, Optional, Sequence, Union

import torch

from pyro_bq._validation import check_choice, check_float, check_int, check_type

from .codebook import pow2_family
from .grids import (
    MATCHED_OR_NEAREST,
    MATCHED_ROUNDINGS,
    check_bits,
    check_rounding,
    interval_grid,
    log2_top,
    log2_window,
    matchable,
    matched_noise_scale,
    minmax_range,
    nearest_code_index,
    percentile_range,
    signed_grid,
    ste,
    uniform_codes,
    uniform_codes_stochastic,
    uniform_decode,
    uniform_quantize,
    widen_empty,
    zero_point_grid,
)
from .lloyd_max import gaussian_levels

__all__ = [
    "channel_range_shape",
    "CodebookQuantizer",
    "GaussianLloydQuantizer",
    "IntervalQuantizer",
    "Log2Quantizer",
    "packed_types",
    "Quantizer",
    "quantizer_class",
    "quantizer_from_state",
    "register_quantizer",
    "SignedGridQuantizer",
    "STATE_STREAMS",
    "UniformQuantizer",
]

_RANGES = ("minmax", "percentile", "mse", "auto")
#: percentiles used by range="auto" below 4 bits
AUTO_PERCENTILES = (0.5, 99.5)
#: the streams a packed state tensor can use, and the bits of one value in each: float32, int16, and
#: float64 (stored bit-exact as four little-endian int16 words in the int16 stream)
STATE_STREAMS = {"f32": 32, "i16": 16, "f64": 64}


class Quantizer:
    """Base class: a bit width, calibration, encode/decode and a straight-through call.

    Subclasses implement :meth:`_calibrate`, :meth:`encode`, :meth:`decode`,
    :meth:`state` and :meth:`_set_state` (and :meth:`config` where the
    attributes named by ``packed_keys`` do not say it), and build their grids
    with :mod:`pyro_bq.quant.grids`.

    Usage::

        q = UniformQuantizer(4, per_channel=True).calibrate(weight)
        w_q = q(weight)             # on the grid, gradient passes straight through
        codes = q.encode(weight)    # integers in [0, 2**4)
    """

    # -- the packed format: one declaration per class ---------------------------------
    #: the name of this class in packed files (what :meth:`config` writes as ``"type"``). A subclass
    #: that sets it is registered when defined (:func:`register_quantizer`); ``None``: not packable.
    packed_type: ClassVar[Optional[str]] = None
    #: the keys of :meth:`config` besides ``"type"`` (a packed header must hold exactly these)
    packed_keys: ClassVar[frozenset] = frozenset()
    #: True if the layout depends on a per-site size ``k`` (a codebook's length) that the header
    #: stores with the bits; :meth:`packed_size` gives it, :meth:`check_packed_size` validates it
    packed_sized: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("packed_type") is not None:
            register_quantizer(cls)

    @classmethod
    def packed_layout(cls, config: dict, shape, k: Optional[int] = None) -> list:
        """The state tensors of a packed site: ``[(name, stream, shape), ...]`` in file order.

        ``stream`` is a key of :data:`STATE_STREAMS` (``"f32"``, ``"i16"`` or ``"f64"``); ``shape``
        (a list of ints) follows from ``config`` (a :meth:`config` dict), the site's ``shape``
        and, for :attr:`packed_sized` classes, ``k``. :meth:`state` must return these tensors.
        """
        raise NotImplementedError(f"{cls.__name__} declares no packed layout")

    @classmethod
    def from_config(cls, config: dict, bits, state: Optional[dict] = None) -> "Quantizer":
        """An uncalibrated quantizer from a :meth:`config` dict (``"type"`` is ignored) and ``bits``.

        The default passes the other keys to the constructor (lists as tuples). ``state`` (the
        packed state, or ``None`` when only the configuration is being checked) is there for
        classes whose constructor needs part of it (a custom codebook).
        """
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k != "type"}
        return cls(bits, **kwargs)

    @classmethod
    def check_packed_size(cls, bits: int, k) -> Optional[str]:
        """A problem with the size ``k`` a header gives at ``bits`` (a message), or ``None``."""
        return None

    def packed_size(self) -> Optional[int]:
        """The size ``k`` of :meth:`packed_layout` (for :attr:`packed_sized` classes), else ``None``."""
        return None

    def code_count(self) -> Optional[int]:
        """How many codes decode to a value, if fewer than ``2**bits`` (a codebook's length), else ``None``."""
        return None

    def __init__(self, bits):
        self.bits = check_bits("bits", bits, allow_tensor=self._tensor_bits_ok)
        self._calibrated = False

    #: whether ``bits`` may be a per-element integer tensor
    _tensor_bits_ok = False

    # -- calibration --------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return self._calibrated

    def with_bits(self, bits) -> "Quantizer":
        """An uncalibrated copy of this specification with another bit width."""
        new = copy.copy(self)
        new.bits = check_bits("bits", bits, allow_tensor=self._tensor_bits_ok)
        new._calibrated = False
        new._reset()
        return new

    def calibrate(self, x: torch.Tensor, *more: torch.Tensor) -> "Quantizer":
        """Return a calibrated copy whose range covers ``x`` (and ``more`` tensors of the same shape).

        ``self`` is not modified.
        """
        tensors = (x,) + more
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"calibrate: argument {i} must be a floating-point torch.Tensor")
            if t.shape != x.shape:
                raise ValueError(f"calibrate: all tensors must have the shape {tuple(x.shape)}, got {tuple(t.shape)}")
            if t.numel() == 0:
                raise ValueError("calibrate: cannot calibrate on an empty tensor")
        if isinstance(self.bits, torch.Tensor):
            try:
                torch.broadcast_shapes(self.bits.shape, x.shape)
            except RuntimeError:
                raise ValueError(f"bits tensor of shape {tuple(self.bits.shape)} does not broadcast to the "
                                 f"calibrated tensor's shape {tuple(x.shape)}") from None
        new = copy.copy(self)
        new._reset()
        with torch.no_grad():
            new._calibrate([t.detach() for t in tensors])
        new._calibrated = True
        new.shape = tuple(x.shape)
        return new

    def _reset(self) -> None:
        pass

    def _calibrate(self, tensors) -> None:
        raise NotImplementedError

    def _bits_on(self, device):
        """``bits`` (an int, or the tensor on ``device``)."""
        return self.bits.to(device) if isinstance(self.bits, torch.Tensor) else self.bits

    def _require(self) -> None:
        if not self._calibrated:
            raise RuntimeError(f"{type(self).__name__} is not calibrated: use q = q.calibrate(tensor) first")

    # -- application ----------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (``torch.int64``) of ``x``, in ``[0, 2**bits)``."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Grid values of integer ``codes``."""
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Grid values of ``x`` (no gradient)."""
        self._require()
        with torch.no_grad():
            return self.decode(self.encode(x), dtype=x.dtype)

    #: how weight draws are rounded (:data:`~pyro_bq.quant.grids.ROUNDINGS`); only uniform-grid
    #: quantizers take anything but ``"nearest"``
    rounding = "nearest"

    def quantize_draw(self, x: torch.Tensor, stochastic: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Grid values of the weight draws ``x`` under :attr:`rounding` (no gradient).

        ``"nearest"``: :meth:`quantize`. The stochastic rules draw one uniform number per
        element of ``x`` from the global torch generator. ``stochastic``: a bool tensor that
        broadcasts to ``x``, the weights rounded stochastically (the others to nearest); the rule
        ``"stochastic-matched-or-nearest"`` needs it (:meth:`stochastic_mask`), the other
        rules round every element by their rule when it is ``None``.

        Usage::

            w = q.quantize_draw(loc + scale * eps)                                   # "stochastic"
            w = q.quantize_draw(draws, stochastic=q.stochastic_mask(loc, scale))     # any rule
        """
        self._require()
        if self.rounding == "nearest":
            return self.quantize(x)
        if stochastic is None and self.rounding == MATCHED_OR_NEAREST:
            raise ValueError("stochastic is None: rounding='stochastic-matched-or-nearest' chooses per weight from the "
                             "posterior; pass stochastic=quantizer.stochastic_mask(loc, scale) (QuantizedNormal does)")
        with torch.no_grad():
            values = self._stochastic_values(x.detach())
            return values if stochastic is None else torch.where(stochastic, values, self.quantize(x))

    def _stochastic_values(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no stochastic rounding; use a uniform-grid quantizer "
                         "(UniformQuantizer, IntervalQuantizer, SignedGridQuantizer)")

    def draw_rule(self, loc: torch.Tensor,
                  scale: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(noise_ratio, stochastic)``: how this quantizer's rounding rule draws from the posterior
        ``Normal(loc, scale)``, fixed per weight. The Gaussian noise has the standard deviation
        ``scale * noise_ratio`` (``None``: ``scale``); ``stochastic`` is :meth:`stochastic_mask`.

        ``"stochastic-matched"``: the ratio of the smaller noise for which noise plus stochastic
        rounding has the variance ``scale**2``, ``0`` where the rounding variance of ``loc`` alone
        exceeds it. ``"stochastic-matched-or-nearest"``: that ratio where ``stochastic`` holds,
        ``1`` at the weights rounded to nearest. Both are ``None`` for the other rules.

        Usage::

            ratio, stochastic = q.draw_rule(loc, scale)   # (None, None) for "nearest" and "stochastic"
            w = q(loc + q.noise_scale(loc, scale) * eps, stochastic=stochastic)
        """
        if self.rounding not in MATCHED_ROUNDINGS:
            return None, None
        self._require()
        ratio = self._matched_ratio(loc.detach(), scale.detach())
        stochastic = self.stochastic_mask(loc, scale)
        if stochastic is not None:
            ratio = torch.where(stochastic, ratio, torch.ones_like(ratio))
        return ratio, stochastic

    def noise_scale(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The standard deviation of the Gaussian noise added to ``loc`` before this quantizer rounds
        it: ``scale`` times the ratio of :meth:`draw_rule` (``scale`` itself for the rules without
        one). The gradient flows through ``scale`` times the (constant) ratio.

        Usage::

            s = q.noise_scale(loc, scale)     # loc + s * eps, then q(..., stochastic=q.stochastic_mask(loc, scale))
        """
        ratio = self.draw_rule(loc, scale)[0]
        return scale if ratio is None else scale * ratio

    def stochastic_mask(self, loc: torch.Tensor, scale: torch.Tensor) -> Optional[torch.Tensor]:
        """The weights of the posterior ``Normal(loc, scale)`` whose draws this quantizer rounds
        stochastically, as a bool tensor of their shape; ``None`` where the rule decides alone
        (every weight for ``"stochastic"`` and ``"stochastic-matched"``, none for ``"nearest"``).

        ``"stochastic-matched-or-nearest"``: the weights for which the variance-matched rule
        gives the posterior's variance (:func:`~pyro_bq.quant.grids.matchable`); the others
        are rounded to nearest.

        Usage::

            mask = q.stochastic_mask(loc, scale)
            w = q(loc + q.noise_scale(loc, scale) * eps, stochastic=mask)
        """
        if self.rounding != MATCHED_OR_NEAREST:
            return None
        self._require()
        return self._matchable(loc.detach(), scale.detach())

    def _matched_ratio(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no stochastic rounding")

    def _matchable(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no stochastic rounding")

    def with_rounding(self, rounding: str) -> "Quantizer":
        """A copy of this quantizer that rounds weight draws by ``rounding``
        (:data:`~pyro_bq.quant.grids.ROUNDINGS`); ValueError for a quantizer without stochastic rounding.

        Usage::

            q = UniformQuantizer(2, symmetric=False).with_rounding("stochastic")
        """
        rounding = check_rounding("rounding", rounding)
        if rounding != "nearest" and "rounding" not in self.packed_keys:
            raise ValueError(f"rounding={rounding!r}: {type(self).__name__} rounds to nearest only; stochastic "
                             "rounding needs a uniform-grid quantizer (UniformQuantizer, IntervalQuantizer, "
                             "SignedGridQuantizer)")
        new = copy.copy(self)
        new.rounding = rounding
        return new

    def __call__(self, x: torch.Tensor, stochastic: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` on the grid (rounded by :attr:`rounding`; ``stochastic`` as in :meth:`quantize_draw`),
        with a straight-through gradient."""
        return ste(x, self.quantize_draw(x, stochastic))

    # -- accounting and storage ---------------------------------------------------------
    def code_bits(self) -> Union[int, torch.Tensor]:
        """Bits of each code: an int, or a tensor of per-element bits."""
        return self.bits

    def metadata_bits(self) -> int:
        """Bits of calibration data a packed file must hold (ranges, zero points, codebooks):
        the tensors of :meth:`packed_layout`, the one source of a file's size."""
        self._require()
        layout = type(self).packed_layout(self.config(), list(self.shape), self.packed_size())
        return sum(STATE_STREAMS[stream] * math.prod(shape) for _, stream, shape in layout)

    def config(self) -> dict:
        """JSON-able specification (without bits and calibration): ``"type"`` (:attr:`packed_type`) and
        the attributes that :attr:`packed_keys` names (tuples as lists)."""
        values = {key: getattr(self, key) for key in sorted(self.packed_keys)}
        return {"type": self.packed_type, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}

    def state(self) -> dict[str, torch.Tensor]:
        """The calibration tensors (what :meth:`metadata_bits` counts)."""
        raise NotImplementedError

    def load_state(self, state: dict[str, torch.Tensor], shape) -> "Quantizer":
        """A calibrated copy from :meth:`state` (inverse of :meth:`state`)."""
        new = copy.copy(self)
        new._set_state(state)
        new._calibrated = True
        new.shape = tuple(shape)
        return new

    def _set_state(self, state) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        bits = f"tensor{tuple(self.bits.shape)}" if isinstance(self.bits, torch.Tensor) else str(self.bits)
        cfg = "".join(f", {k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}(bits={bits}{cfg})"


# -- the registry of packable quantizer classes ------------------------------------------------
_REGISTRY: dict[str, type] = {}


def register_quantizer(cls: type) -> type:
    """Register ``cls`` (a :class:`Quantizer` subclass) for packed files under ``cls.packed_type``.

    Subclasses that set ``packed_type`` are registered when they are defined, so this is only
    needed for a class made otherwise; it can be used as a class decorator. The class must also
    define ``packed_layout`` and may set ``packed_keys``, ``packed_sized`` and the hooks of
    :class:`Quantizer` (``from_config``, ``check_packed_size``, ``packed_size``, ``code_count``).

    :raises TypeError: if ``cls`` is not a Quantizer subclass, its ``packed_type`` is not a
        non-empty str, its ``packed_keys`` are not strs or it has no ``packed_layout``.
    :raises ValueError: if another class is registered under the same name, or ``packed_keys``
        holds ``"type"``.
    """
    if not isinstance(cls, type) or not issubclass(cls, Quantizer):
        raise TypeError(f"register_quantizer takes a Quantizer subclass, got {cls!r}")
    name = cls.packed_type
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}.packed_type must be a non-empty str, got {name!r}")
    keys = cls.packed_keys
    if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"{cls.__name__}.packed_keys must be a set of config keys (strs), got {keys!r}")
    if "type" in keys:
        raise ValueError(f"{cls.__name__}.packed_keys must not hold 'type' (it is always there)")
    cls.packed_keys = frozenset(keys)
    if cls.packed_layout.__func__ is Quantizer.packed_layout.__func__:
        raise TypeError(f"{cls.__name__} sets packed_type={name!r} but defines no packed_layout classmethod")
    old = _REGISTRY.get(name)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"packed quantizer type {name!r} is already registered for "
                         f"{old.__module__}.{old.__qualname__}; choose another packed_type for {cls.__name__}")
    _REGISTRY[name] = cls  # a re-definition of the same class (a module reload) replaces it
    return cls


def packed_types() -> list[str]:
    """The registered packed quantizer types, sorted."""
    return sorted(_REGISTRY)


def quantizer_class(name) -> type:
    """The quantizer class registered under the packed type ``name``.

    :raises ValueError: for a name no class is registered under (the message lists the known ones).
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown quantizer type {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def channel_range_shape(config: dict, shape) -> list[int]:
    """The shape of a per-tensor or per-channel range (``config["per_channel"]``, ``config["channel_dim"]``)
    of a tensor of ``shape``: all ones, except the channel dimension of a per-channel range."""
    ndim = len(shape)
    rs = [1] * ndim
    if config.get("per_channel") and ndim >= 2:
        d = config.get("channel_dim", 0) % ndim
        rs[d] = int(shape[d])
    return rs


def _check_percentiles(percentiles) -> tuple[float, float]:
    """A pair ``(low, high)`` of numbers in ``[0, 100]`` with ``low < high``."""
    if not isinstance(percentiles, (tuple, list)) or len(percentiles) != 2:
        raise ValueError(f"percentiles must be a pair (low, high) of numbers in [0, 100], got {percentiles!r}")
    lo = check_float("percentiles[0]", percentiles[0], low=0.0, high=100.0)
    hi = check_float("percentiles[1]", percentiles[1], low=0.0, high=100.0)
    if lo >= hi:
        raise ValueError(f"percentiles must satisfy low < high, got {percentiles!r}")
    return lo, hi


def _finite_values(state: dict, key: str, count: int) -> list[float]:
    """``count`` finite floats from ``state[key]`` (a packed state tensor); ValueError otherwise."""
    t = state[key]
    if not isinstance(t, torch.Tensor) or t.numel() != count:
        raise ValueError(f"state {key!r} must hold {count} value(s)")
    values = [float(v) for v in t.detach().double().reshape(-1)]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"state {key!r} must be finite, got {values}")
    return values


def _least_error_shrink(steps: int, error) -> torch.Tensor:
    """Per row, the factor ``r`` among ``steps`` values from 1 down to 0.2 with the least ``error(r)`` (a ``[C]`` tensor)."""
    best_err, best = None, None
    for r in torch.linspace(1.0, 0.2, steps).tolist():
        err = error(r)
        if best is None:
            best_err, best = err, torch.full_like(err, r)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


class _RangeMixin:
    """Shared range handling: per tensor or per channel; min/max, percentiles or a squared-error search."""

    search_size = 2**18

    def _init_range(self, per_channel, channel_dim, range, percentiles, search_steps):
        self.per_channel = check_type("per_channel", per_channel, bool)
        self.channel_dim = check_int("channel_dim", channel_dim)
        self.range = check_choice("range", range, _RANGES)
        self.percentiles = _check_percentiles(percentiles)
        self.search_steps = check_int("search_steps", search_steps, low=2, high=200)

    def _channelwise(self, ndim: int) -> bool:
        return self.per_channel and ndim >= 2

    def _flat(self, tensors) -> torch.Tensor:
        """Tensors as ``[C, M]`` (per channel) or ``[1, M]`` (per tensor), float32."""
        x = tensors[0]
        if self._channelwise(x.dim()):
            d = self.channel_dim % x.dim()
            return torch.cat([t.movedim(d, 0).reshape(t.shape[d], -1) for t in tensors], dim=1).float()
        return torch.cat([t.reshape(1, -1) for t in tensors], dim=1).float()

    def _keep_shape(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """A ``[C]`` or ``[1]`` vector reshaped to broadcast against a tensor of ``ndim`` dims."""
        if self._channelwise(ndim):
            shape = [1] * ndim
            shape[self.channel_dim % ndim] = values.numel()
            return values.reshape(shape)
        return values.reshape([1] * ndim) if ndim else values.reshape(())

    def _subsample(self, flat: torch.Tensor) -> torch.Tensor:
        """Evenly strided values of each row (about ``search_size`` in all, at least 64 per row)
        for the squared-error range search."""
        m = flat.shape[1]
        cap = max(64, self.search_size // flat.shape[0])
        return flat if m <= cap else flat[:, :: -(-m // cap)]

    def _mean_bits(self) -> float:
        return float(self.bits.float().mean()) if isinstance(self.bits, torch.Tensor) else float(self.bits)

    def _low_high(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.range == "percentile":
            return percentile_range(flat, *self.percentiles)
        if self.range == "auto" and self._mean_bits() < 4:
            return percentile_range(flat, *AUTO_PERCENTILES)
        return minmax_range(flat)


class _OnUniformGrid:
    """Encode and decode on the uniform grid ``(step, zp, qmax)`` that ``self._grid(dtype, device)`` gives;
    stochastic rounding of weight draws (``rounding``, a packed key of these classes)."""

    def _init_rounding(self, rounding):
        self.rounding = check_rounding("rounding", rounding)

    def _stochastic_values(self, x):
        step, zp, qmax = self._grid(x.dtype, x.device)
        return uniform_decode(uniform_codes_stochastic(x, step, zp, qmax), step, zp)

    def _matched_ratio(self, loc, scale):
        step, zp, _ = self._grid(loc.dtype, loc.device)
        sigma = scale / step
        s = matched_noise_scale(loc / step + zp, sigma)
        return torch.where(sigma > 0, s / sigma.clamp(min=torch.finfo(sigma.dtype).tiny), torch.ones_like(s))

    def _matchable(self, loc, scale):
        step, zp, _ = self._grid(loc.dtype, loc.device)
        return matchable(loc / step + zp, scale / step)

    def encode(self, x):
        self._require()
        return uniform_codes(x.detach(), *self._grid(x.dtype, x.device)).to(torch.int64)

    def quantize(self, x):
        # decode(encode(x)) without the int64 codes, in one buffer: uniform_codes then uniform_decode,
        # step by step in place (the grid is in x's dtype, so no step changes a dtype). The floating
        # codes are integers, which the int64 round trip keeps, except a code of -0.0 (from rounding
        # a small negative value), which it makes +0.0; adding 0.0 does the same: the same bits
        self._require()
        with torch.no_grad():
            step, zp, qmax = self._grid(x.dtype, x.device)
            q = torch.div(x.detach(), step)
            if q.dtype != step.dtype or q.dtype != zp.dtype or q.dtype != qmax.dtype:
                return uniform_decode(uniform_codes(x.detach(), step, zp, qmax).add_(0.0), step, zp)
            q.add_(zp).round_().clamp_(min=0)
            torch.minimum(q, qmax, out=q)
            return q.add_(0.0).sub_(zp).mul_(step)

    def decode(self, codes, dtype=torch.float32):
        self._require()
        step, zp, _ = self._grid(dtype, codes.device)
        return uniform_decode(codes.to(dtype), step, zp)


class UniformQuantizer(_OnUniformGrid, _RangeMixin, Quantizer):
    """Uniform grid quantizer on which 0 is a level (:func:`~pyro_bq.quant.grids.zero_point_grid`).

    * ``symmetric=True``: levels ``step * k`` for ``k = -(2**(b-1) - 1) .. 2**(b-1) - 1``
      (one code is unused) with ``step = max|x| / (2**(b-1) - 1)``;
      for ``b = 1`` the two levels ``-max|x|`` and ``+max|x|``.
    * ``symmetric=False``: ``2**b`` levels ``step * (k - z)``, ``k = 0 .. 2**b - 1``,
      over ``[min(x, 0), max(x, 0)]`` with an integer zero point ``z`` (zero is exact).

    :param bits: an int from 1 to 16, or an integer tensor broadcastable to the
        calibrated tensor (per-element precision).
    :param symmetric: symmetric grid around zero, or asymmetric with a zero point.
    :param per_channel: one range per slice along ``channel_dim`` (the output
        channel of Linear/Conv weights); tensors with fewer than 2 dims use one range.
    :param range: ``"minmax"``, ``"percentile"`` (``percentiles``, default the
        5th and 95th, linear interpolation), ``"auto"`` (min/max at 4 bits and
        more, the 0.5th and 99.5th percentiles below: at 2-3 bits clipping the
        rare largest weights buys resolution for all others) or ``"mse"`` (the
        clipping of the min/max range, among ``search_steps`` candidates, with
        the least squared error, per channel, measured on about 2**18 evenly
        strided values of the tensor).
    :param rounding: how the call rounds weight draws: ``"nearest"``, ``"stochastic"``
        (unbiased inside the grid; adds ``f (1 - f) step**2`` of variance, at most
        ``step**2 / 4``), ``"stochastic-matched"`` (also shrinks the Gaussian noise,
        :meth:`~Quantizer.noise_scale`, so the total variance stays ``scale**2`` where it can)
        or ``"stochastic-matched-or-nearest"`` (the matched rule where it gives the variance
        ``scale**2``, round to nearest for the other weights: :meth:`~Quantizer.stochastic_mask`).
        :meth:`encode` and :meth:`quantize` round to nearest whatever the rule.

    Usage::

        q = UniformQuantizer(4, symmetric=True, per_channel=True).calibrate(w)
        w_q = q(w)
    """

    _tensor_bits_ok = True
    packed_type = "uniform"
    packed_keys = frozenset({"symmetric", "per_channel", "channel_dim", "range", "percentiles", "search_steps",
                             "rounding"})

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        rs = channel_range_shape(config, shape)
        return [("hi", "f32", rs)] if config["symmetric"] else [("lo", "f32", rs), ("hi", "f32", rs)]

    def __init__(self, bits=8, *, symmetric: bool = True, per_channel: bool = False, channel_dim: int = 0,
                 range: str = "minmax", percentiles: Sequence[float] = (5.0, 95.0), search_steps: int = 16,
                 rounding: str = "nearest"):
        super().__init__(bits)
        self._init_rounding(rounding)
        self.symmetric = check_type("symmetric", symmetric, bool)
        self._init_range(per_channel, channel_dim, range, percentiles, search_steps)
        self._reset()

    def _reset(self):
        self.lo = None
        self.hi = None

    def _grid(self, dtype, device):
        lo, hi = (t.to(device=device, dtype=dtype) for t in (self.lo, self.hi))
        return zero_point_grid(lo, hi, self._bits_on(device), symmetric=self.symmetric)

    def _calibrate(self, tensors) -> None:
        ndim = tensors[0].dim()
        flat = self._flat(tensors)
        lo, hi = self._low_high(flat)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        if self.symmetric:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        if self.range == "mse":
            sub = self._subsample(flat)
            # per-element bits: search with the mean precision (the ranges stay per channel)
            bits = self.bits if isinstance(self.bits, int) else max(1, round(self._mean_bits()))

            def error(r):
                grid = zero_point_grid((lo * r).unsqueeze(1), (hi * r).unsqueeze(1), bits, symmetric=self.symmetric)
                return (uniform_quantize(sub, *grid) - sub).pow(2).sum(dim=1)

            best = _least_error_shrink(self.search_steps, error)
            lo, hi = lo * best, hi * best
        self.lo = self._keep_shape(lo, ndim)
        self.hi = self._keep_shape(hi, ndim)

    def grid_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest and largest level (per channel), shaped to broadcast against the tensor."""
        self._require()
        step, zp, qmax = self._grid(self.hi.dtype, self.hi.device)
        return uniform_decode(torch.zeros_like(qmax), step, zp), uniform_decode(qmax, step, zp)

    def step(self) -> torch.Tensor:
        """The grid step, shaped to broadcast against the tensor."""
        self._require()
        return self._grid(self.hi.dtype, self.hi.device)[0]

    def state(self):
        self._require()
        return {"hi": self.hi} if self.symmetric else {"lo": self.lo, "hi": self.hi}

    def _set_state(self, state):
        self.hi = state["hi"].float()
        self.lo = -self.hi if self.symmetric else state["lo"].float()


class IntervalQuantizer(_OnUniformGrid, Quantizer):
    """``2**bits`` evenly spaced levels from ``lo`` to ``hi``, without a zero point
    (:func:`~pyro_bq.quant.grids.interval_grid`): values are rounded to the nearest
    level and clamped to ``[lo, hi]``, so 0 is a level only by chance.

    * ``interval=(lo, hi)``: a fixed interval that calibration keeps (Random
      Bits' learned boundaries);
    * otherwise ``lo`` and ``hi`` are the ``percentiles`` of the calibration
      tensor, by linear interpolation as :func:`torch.quantile` (default the
      5th and 95th: the grid ``Q`` of the Quantile Inform paper, Section 3.2);
      an empty interval is widened slightly. One interval per tensor.

    Its calibration data is the interval: two float64 values in a packed file
    (packed type ``"interval"``), bit-exact, so a loaded guide predicts exactly
    what the saved one did.

    :param bits: an int from 1 to 16, or an integer tensor of per-element widths.
    :param interval: a fixed ``(lo, hi)`` of finite numbers with ``lo < hi``.
    :param percentiles: ``(low, high)`` in ``[0, 100]`` with ``low < high`` (without ``interval``).
    :param rounding: how the call rounds weight draws (see :class:`UniformQuantizer`).

    Usage::

        q = IntervalQuantizer(3).calibrate(loc)              # QIU: the 5th to the 95th percentile
        lo, hi = q.interval()
        fixed = IntervalQuantizer(3, interval=(-0.1, 0.1))   # Random Bits
    """

    _tensor_bits_ok = True
    packed_type = "interval"
    packed_keys = frozenset({"percentiles", "rounding"})  # percentiles: None for a fixed interval (state)

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        return [("interval", "f64", [2])]

    @classmethod
    def from_config(cls, config, bits, state=None):
        pct, rounding = config["percentiles"], config["rounding"]
        if pct is None:  # the interval is the state: a placeholder until load_state
            return cls(bits, interval=(0.0, 1.0), rounding=rounding)
        return cls(bits, percentiles=tuple(pct) if isinstance(pct, list) else pct, rounding=rounding)

    def __init__(self, bits=4, *, interval: Optional[Sequence[float]] = None,
                 percentiles: Sequence[float] = (5.0, 95.0), rounding: str = "nearest"):
        super().__init__(bits)
        self._init_rounding(rounding)
        self.fixed, self.percentiles = None, None
        if interval is None:
            self.percentiles = _check_percentiles(percentiles)
        else:
            if not isinstance(interval, (tuple, list)) or len(interval) != 2:
                raise ValueError(f"interval must be a pair (lo, hi) of finite numbers, got {interval!r}")
            lo, hi = check_float("interval[0]", interval[0]), check_float("interval[1]", interval[1])
            if not hi > lo:
                raise ValueError(f"interval must have lo < hi, got {interval!r}")
            self.fixed = (lo, hi)
        self._reset()

    def _reset(self):
        self.lo, self.hi = self.fixed if self.fixed is not None else (None, None)

    def _calibrate(self, tensors) -> None:
        if self.fixed is None:
            flat = torch.cat([t.reshape(1, -1) for t in tensors], dim=1).double()
            lo, hi = widen_empty(*percentile_range(flat, *self.percentiles))
            self.lo, self.hi = float(lo), float(hi)

    def interval(self) -> tuple[float, float]:
        """``(lo, hi)``: the lowest and the highest level."""
        self._require()
        return self.lo, self.hi

    def _grid(self, dtype, device):
        lo, hi = (torch.tensor(v, dtype=dtype, device=device) for v in (self.lo, self.hi))
        return interval_grid(lo, hi, self._bits_on(device))

    def levels(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``2**bits`` levels, ascending (one int ``bits`` only)."""
        return self.decode(torch.arange(2 ** int(self.bits)), dtype)

    def state(self):
        self._require()
        return {"interval": torch.tensor([self.lo, self.hi], dtype=torch.float64)}

    def _set_state(self, state):
        lo, hi = _finite_values(state, "interval", 2)
        if not hi > lo:
            raise ValueError(f"state 'interval' must have hi > lo, got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi

    def __repr__(self) -> str:
        if self.fixed is None:
            return super().__repr__()
        bits = self.bits if isinstance(self.bits, int) else 'tensor'
        return f"{type(self).__name__}(bits={bits}, interval={self.fixed!r}, rounding={self.rounding!r})"


class Log2Quantizer(_RangeMixin, Quantizer):
    """Logarithmic (base 2) quantizer for positive quantities such as posterior scales.

    Levels are ``2**e`` for the ``2**bits`` integers ``e`` in the window
    ``[top - 2**bits + 1, top]``; ``top`` is the rounded ``log2`` of the largest
    value (``range="minmax"``) or of the upper percentile (``"percentile"``),
    per tensor or per channel (:func:`~pyro_bq.quant.grids.log2_window`).
    Values are rounded in the log domain, so inside the window the relative
    error is at most ``sqrt(2) - 1``; values below the window (and
    non-positive values) go to its lowest level.

    Usage::

        q = Log2Quantizer(4).calibrate(scale)
        scale_q = q(scale)          # powers of two
    """

    _tensor_bits_ok = True
    packed_type = "log2"
    packed_keys = frozenset({"per_channel", "channel_dim", "range", "percentiles"})

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        return [("top", "i16", channel_range_shape(config, shape))]

    def __init__(self, bits=4, *, per_channel: bool = False, channel_dim: int = 0, range: str = "minmax",
                 percentiles: Sequence[float] = (0.0, 99.0)):
        super().__init__(bits)
        if range in ("mse", "auto"):
            raise ValueError(f"range must be one of 'minmax', 'percentile' for Log2Quantizer; got {range!r}")
        self._init_range(per_channel, channel_dim, range, percentiles, 2)
        self._reset()

    def _reset(self):
        self.top = None

    def _calibrate(self, tensors) -> None:
        _, hi = self._low_high(self._flat(tensors))
        self.top = self._keep_shape(log2_top(torch.log2(hi)), tensors[0].dim()).to(torch.int16)

    def _window(self, like):
        return log2_window(self.top.to(device=like.device, dtype=torch.float32), self._bits_on(like.device))

    def encode(self, x):
        self._require()
        low, top = self._window(x)
        return self._exponents(x, low, top).sub_(low).to(torch.int64)

    @staticmethod
    def _exponents(x, low, top):
        """:func:`~pyro_bq.quant.grids.log2_exponents` of ``log2(x)`` (zero, negative and NaN at the
        bottom), computed in one new float32 buffer."""
        e = torch.log2(x.detach().float()).nan_to_num_(nan=-1e9, neginf=-1e9)
        return torch.clamp(e.round_(), min=low, max=top, out=e)

    def decode(self, codes, dtype=torch.float32):
        self._require()
        low, _ = self._window(codes)
        return torch.exp2(codes.float() + low).to(dtype)

    def quantize(self, x):
        # decode(encode(x)) without the integer codes: exponent - low + low is exact for these small
        # integers, so the values are the same bits
        self._require()
        with torch.no_grad():
            low, top = self._window(x)
            return self._exponents(x, low, top).exp2_().to(x.dtype)

    def window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Lowest and highest exponent of the grid (per channel)."""
        self._require()
        return self._window(self.top)

    def state(self):
        self._require()
        return {"top": self.top}

    def _set_state(self, state):
        self.top = state["top"].to(torch.int16)


class CodebookQuantizer(_RangeMixin, Quantizer):
    """Nearest-entry quantizer on a codebook scaled by a calibrated factor.

    ``bits``: an int from 1 to 16, or ``"auto"``: 4 for the power-of-two
    families, the bits needed to index a custom ``codebook``.
    ``family="pot"``: zero and signed powers of two; ``"apot"``: zero and signed
    sums of at most two powers of two (:func:`pyro_bq.quant.codebook.pow2_family`),
    the largest such set with at most ``2**bits`` codes. Or pass any sorted
    ``codebook`` (``bits`` then defaults to the bits needed to index it). The
    scale factor maps the codebook's largest magnitude onto the range's largest
    magnitude (per tensor or channel; ``range="mse"`` searches a smaller
    factor); ``range="fixed"`` keeps the factor at 1, so values snap onto the
    codebook itself (for a network whose weights already lie on a codebook,
    such as a PWFN guide). Rounding: :func:`~pyro_bq.quant.grids.nearest_code_index`.

    Usage::

        q = CodebookQuantizer(4, family="apot", per_channel=True).calibrate(w)
        w_q = q(w)                  # alpha * (sums of powers of two)
        exact = CodebookQuantizer(codebook=torch.tensor([-0.5, 0.0, 0.25]), range="fixed")
    """

    packed_type = "codebook"
    packed_keys = frozenset({"family", "per_channel", "channel_dim", "range", "percentiles", "search_steps"})
    packed_sized = True  # the header stores the codebook's length

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        return [("alpha", "f32", channel_range_shape(config, shape)), ("codebook", "f32", [int(k)])]

    @classmethod
    def from_config(cls, config, bits, state=None):
        cfg = {key: tuple(v) if isinstance(v, list) else v for key, v in config.items() if key != "type"}
        family = cfg.pop("family", None)
        if family == "custom":  # the codebook is state; a placeholder when only the config is checked
            codebook = state["codebook"] if state is not None else torch.tensor([0.0, 1.0])
            return cls(bits, codebook=codebook, **cfg)
        return cls(bits, family=family, **cfg)

    @classmethod
    def check_packed_size(cls, bits, k):
        if not (isinstance(k, int) and not isinstance(k, bool)) or not 2 <= k <= 2**bits:
            return f"the codebook size must be an int in [2, 2**bits = {2**bits}], got {k!r}"
        return None

    def packed_size(self):
        return int(self.codebook.numel())

    def code_count(self):
        return int(self.codebook.numel())

    def __init__(self, bits="auto", *, family: str = "pot", codebook: Optional[torch.Tensor] = None,
                 per_channel: bool = False, channel_dim: int = 0, range: str = "minmax",
                 percentiles: Sequence[float] = (5.0, 95.0), search_steps: int = 16):
        self.family = check_choice("family", family, ("pot", "apot", "custom"))
        if codebook is not None:
            if not isinstance(codebook, torch.Tensor) or codebook.dim() != 1 or not codebook.is_floating_point():
                raise TypeError("codebook must be a 1-D floating-point torch.Tensor")
            if codebook.numel() < 2 or not bool((codebook[1:] > codebook[:-1]).all()):
                raise ValueError("codebook must hold at least 2 strictly ascending values")
            need = max(1, math.ceil(math.log2(codebook.numel())))
            bits = need if isinstance(bits, str) and bits == "auto" else bits
            super().__init__(bits)
            if 2**self.bits < codebook.numel():
                raise ValueError(f"bits must be at least {need} to index a codebook of {codebook.numel()} values, got {bits}")
            self.family = "custom"
            # float64 stays float64 (a float64 guide's values round-trip exactly), narrower types widen to float32
            self._codebook = codebook.detach().to(torch.promote_types(codebook.dtype, torch.float32)).clone()
        else:
            if self.family == "custom":
                raise ValueError("family='custom' needs a codebook tensor")
            super().__init__(4 if isinstance(bits, str) and bits == "auto" else bits)
            self._codebook = None
        fixed = isinstance(range, str) and range == "fixed"
        self._init_range(per_channel, channel_dim, "minmax" if fixed else range, percentiles, search_steps)
        if fixed:
            self.range = "fixed"
        self._reset()

    def _reset(self):
        self.alpha = None
        if self.family != "custom":
            self._codebook = None

    @property
    def codebook(self) -> torch.Tensor:
        """The unscaled codebook (sorted)."""
        if self._codebook is None:
            self._codebook = pow2_family(self.bits, self.family).float()
        return self._codebook

    def _calibrate(self, tensors) -> None:
        ndim = tensors[0].dim()
        flat = self._flat(tensors)
        if self.range == "fixed":
            self.alpha = self._keep_shape(torch.ones(flat.shape[0]), ndim)
            return
        lo, hi = self._low_high(flat)
        cb = self.codebook
        alpha = torch.maximum(lo.abs(), hi.abs()) / cb.abs().max()
        alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        if self.range == "mse":
            sub = self._subsample(flat)

            def error(r):
                a = (alpha * r).unsqueeze(1)
                return (cb[nearest_code_index(sub / a, cb)] * a - sub).pow(2).sum(dim=1)

            alpha = alpha * _least_error_shrink(self.search_steps, error)
        self.alpha = self._keep_shape(alpha, ndim)

    def encode(self, x):
        self._require()
        a = self.alpha.to(device=x.device, dtype=x.dtype)
        return nearest_code_index(x.detach() / a, self.codebook.to(device=x.device, dtype=x.dtype))

    def decode(self, codes, dtype=torch.float32):
        self._require()
        cb = self.codebook.to(device=codes.device, dtype=dtype)
        return cb[codes] * self.alpha.to(device=codes.device, dtype=dtype)

    def state(self):
        self._require()
        return {"alpha": self.alpha, "codebook": self.codebook}

    def _set_state(self, state):
        self.alpha = state["alpha"].float()
        self._codebook = state["codebook"].float()


class GaussianLloydQuantizer(Quantizer):
    """``2**bits`` levels for a Normal fitted (mean, std) to the calibration tensor: the
    Gaussian-quantile levels refined by ``max_iter`` median iterations
    (:func:`~pyro_bq.quant.lloyd_max.gaussian_levels`; Quantile Inform's QINU grid).
    Its calibration data are the mean and the std, float64 in a packed file.

    Usage::

        q = GaussianLloydQuantizer(3).calibrate(loc)
        loc_q = q.quantize(loc)
    """

    packed_type = "gaussian-lloyd"
    packed_keys = frozenset({"max_iter"})

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        return [("mean", "f64", [1]), ("std", "f64", [1])]

    def __init__(self, bits=4, *, max_iter: int = 200):
        super().__init__(bits)
        self.max_iter = check_int("max_iter", max_iter, low=0)
        self._reset()

    def _reset(self):
        self.mean = None
        self.std = None

    def _calibrate(self, tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors]).double()
        self.mean = flat.mean()
        std = flat.std() if flat.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        self.std = std if std > 0 else torch.tensor(max(float(flat.abs().max()), 1e-8), dtype=torch.float64)

    def levels(self) -> torch.Tensor:
        """The ``2**bits`` levels, ascending (float64)."""
        self._require()
        return gaussian_levels(int(self.bits), float(self.mean), float(self.std), max_iter=self.max_iter)

    def encode(self, x):
        return nearest_code_index(x.detach(), self.levels())

    def decode(self, codes, dtype=torch.float32):
        return self.levels().to(dtype)[codes]

    def state(self):
        self._require()
        return {"mean": self.mean.double().reshape(1), "std": self.std.double().reshape(1)}

    def _set_state(self, state):
        (mean,), (std,) = _finite_values(state, "mean", 1), _finite_values(state, "std", 1)
        if not std > 0:
            raise ValueError(f"state 'std' must be > 0, got {std}")
        self.mean = torch.tensor(mean, dtype=torch.float64)
        self.std = torch.tensor(std, dtype=torch.float64)


class SignedGridQuantizer(_OnUniformGrid, Quantizer):
    """``b`` signed bits: values ``scale * (2k + 1) * 2**(1-b)`` of magnitude below ``2 * scale``
    (:func:`~pyro_bq.quant.grids.signed_grid`; SMOL's value map).

    ``scale`` defaults to ``max|x| / 2`` at calibration (float64 in a packed
    file). ``bits`` may be a per-element integer tensor.

    Usage::

        q = SignedGridQuantizer(bits_tensor, scale=c).calibrate(loc)
    """

    _tensor_bits_ok = True
    packed_type = "signed"
    packed_keys = frozenset({"rounding"})

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        return [("scale", "f64", [1])]

    def __init__(self, bits=4, *, scale: Optional[float] = None, rounding: str = "nearest"):
        super().__init__(bits)
        self._init_rounding(rounding)
        self.fixed_scale = None if scale is None else check_float("scale", scale, low=0.0, low_open=True)
        self._reset()

    def _reset(self):
        self.scale = self.fixed_scale

    def _calibrate(self, tensors):
        if self.fixed_scale is None:
            m = max(float(t.abs().max()) for t in tensors)
            self.scale = m / 2 if m > 0 else 1.0

    def _grid(self, dtype, device):
        return signed_grid(self._bits_on(device), torch.tensor(self.scale, dtype=dtype, device=device))

    def state(self):
        self._require()
        return {"scale": torch.tensor([float(self.scale)], dtype=torch.float64)}

    def _set_state(self, state):
        (scale,) = _finite_values(state, "scale", 1)
        if not scale > 0:
            raise ValueError(f"state 'scale' must be > 0, got {scale}")
        self.scale = scale


def quantizer_from_state(config: dict, bits, state: dict[str, torch.Tensor], shape) -> Quantizer:
    """Rebuild a calibrated quantizer from :meth:`Quantizer.config`, its bits and :meth:`Quantizer.state`.

    The class is the one registered under ``config["type"]`` (see :func:`register_quantizer`).

    Usage::

        same = quantizer_from_state(q.config(), q.bits, q.state(), shape)
    """
    cls = quantizer_class(config.get("type"))
    return cls.from_config(config, bits, state).load_state(state, shape)
