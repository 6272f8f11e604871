"""Quantizers: small validated objects that calibrate on a tensor, then apply.

A quantizer is first a *specification* (bits, symmetric or not, per tensor or
per output channel, how the range is found). :meth:`Quantizer.calibrate`
returns a *calibrated copy* (the specification is left untouched) that maps
values to integer codes (:meth:`~Quantizer.encode`), codes back to values
(:meth:`~Quantizer.decode`), and values straight to grid values with a
straight-through estimator (calling the quantizer), so it can be used during
training: the forward value is the grid value, the gradient is the identity.

Three families:

* :class:`UniformQuantizer` -- an evenly spaced grid, symmetric or
  asymmetric (with a zero point), per tensor or per output channel; the range
  comes from min/max, from percentiles (5th/95th by default, as in the
  Quantile-Inform paper) or from a small search minimising the squared error.
  ``bits`` may also be an integer tensor broadcastable to the calibrated
  tensor (per-parameter precision, e.g. from SMOL).
* :class:`Log2Quantizer` -- powers of two ``2**e`` for integer ``e`` in a
  calibrated window of ``2**bits`` exponents, for positive quantities such as
  posterior scales. Rounding happens in the log domain, so the relative error
  is at most ``sqrt(2) - 1`` inside the window.
* :class:`CodebookQuantizer` -- nearest entry of a power-of-two or additive
  power-of-two codebook (:mod:`pyro_bq.quant.codebook`) times a calibrated
  scale, or of any user codebook.

Every quantizer works on tensors with extra *leading* dimensions (Monte Carlo
samples): its calibrated range has the calibrated tensor's number of
dimensions and broadcasts from the right.

Packed files (:func:`pyro_bq.quant.save_packed`) learn a quantizer class from
one declaration on the class itself: ``packed_type`` (the name its
:meth:`~Quantizer.config` carries as ``"type"``), ``packed_keys`` (the other
config keys) and the classmethod ``packed_layout(config, shape, k)`` (its
state tensors: name, stream and shape). A subclass that sets ``packed_type``
is registered when it is defined (:func:`register_quantizer`);
:func:`quantizer_from_state` and the packed-file reader look the type up with
:func:`quantizer_class`. See :class:`Quantizer` for the optional hooks.
"""

from __future__ import annotations

import copy
import importlib
import math
import numbers
from typing import ClassVar, Optional, Sequence, Union

import torch

from pyro_bq._validation import check_choice, check_float, check_int, check_type

from .codebook import nearest_code_index, pow2_codebook

__all__ = [
    "Quantizer",
    "UniformQuantizer",
    "Log2Quantizer",
    "CodebookQuantizer",
    "check_bits",
    "ste",
    "quantizer_from_state",
    "register_quantizer",
    "quantizer_class",
    "packed_types",
    "channel_range_shape",
    "STATE_STREAMS",
]

MAX_BITS = 16
_RANGES = ("minmax", "percentile", "mse", "auto")
#: percentiles used by range="auto" below 4 bits
AUTO_PERCENTILES = (0.5, 99.5)
#: the streams a packed state tensor can use, and the bits of one value in each: float32, int16, and
#: float64 (stored bit-exact as four little-endian int16 words in the int16 stream)
STATE_STREAMS = {"f32": 32, "i16": 16, "f64": 64}


def check_bits(name: str, bits, *, allow_tensor: bool = True):
    """Validate a bit width: an int in ``[1, 16]`` or (if allowed) an integer tensor of such values.

    Any other value raises :class:`ValueError` naming ``name`` and the allowed values.
    """
    if isinstance(bits, torch.Tensor) and allow_tensor:
        if bits.is_floating_point() or bits.is_complex() or bits.dtype == torch.bool:
            raise ValueError(f"{name} must be an int from 1 to {MAX_BITS} or an integer tensor of such values, "
                             f"got a tensor of dtype {bits.dtype}")
        if bits.numel() == 0 or int(bits.min()) < 1 or int(bits.max()) > MAX_BITS:
            raise ValueError(f"{name} must hold integers from 1 to {MAX_BITS}, got values in "
                             f"[{int(bits.min()) if bits.numel() else '-'}, {int(bits.max()) if bits.numel() else '-'}]")
        return bits.detach().to(torch.int64)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= int(bits) <= MAX_BITS:
        allowed = f"an int from 1 to {MAX_BITS}" + (" or an integer tensor of such values" if allow_tensor else "")
        raise ValueError(f"{name} must be {allowed}, got {bits!r}")
    return int(bits)


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``q``, the gradient of ``x``.

    Written as ``q + (x - x.detach())`` so the forward value is *exactly* ``q``.
    """
    if not x.requires_grad:
        return q.detach()
    return q.detach() + (x - x.detach())


def _bits_repr(bits) -> str:
    return f"tensor{tuple(bits.shape)}" if isinstance(bits, torch.Tensor) else str(bits)


class Quantizer:
    """Base class: a bit width, calibration, encode/decode and a straight-through call.

    Subclasses implement :meth:`_calibrate`, :meth:`encode`, :meth:`decode`,
    :meth:`state` and :meth:`metadata_bits`.

    Usage::

        q = UniformQuantizer(4, per_channel=True).calibrate(weight)
        w_q = q(weight)             # on the grid, gradient passes straight through
        codes = q.encode(weight)    # integers in [0, 2**4)
    """

    kind = "base"

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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the grid, with a straight-through gradient."""
        return ste(x, self.quantize(x))

    # -- accounting and storage ---------------------------------------------------------
    def code_bits(self) -> Union[int, torch.Tensor]:
        """Bits of each code: an int, or a tensor of per-element bits."""
        return self.bits

    def metadata_bits(self) -> int:
        """Bits of calibration data a packed file must hold (ranges, zero points, codebooks).

        The default counts the tensors of :meth:`packed_layout`.
        """
        self._require()
        layout = type(self).packed_layout(self.config(), list(self.shape), self.packed_size())
        return sum(STATE_STREAMS[stream] * math.prod(shape) for _, stream, shape in layout)

    def config(self) -> dict:
        """JSON-able specification (without bits tensors and calibration)."""
        raise NotImplementedError

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
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}(bits={_bits_repr(self.bits)}, {cfg})"


# -- the registry of packable quantizer classes ------------------------------------------------
_REGISTRY: dict[str, type] = {}
#: modules outside pyro_bq.quant that define packable quantizers; imported when a type is not known yet
#: (so a file of mixed-precision quantizers loads without importing pyro_bq.mixed first)
_PROVIDERS = ["pyro_bq.mixed.quantizers"]


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


def _load_providers() -> None:
    while _PROVIDERS:
        importlib.import_module(_PROVIDERS.pop(0))


def packed_types() -> list[str]:
    """The registered packed quantizer types, sorted."""
    _load_providers()
    return sorted(_REGISTRY)


def quantizer_class(name) -> type:
    """The quantizer class registered under the packed type ``name``.

    :raises ValueError: for a name no class is registered under (the message lists the known ones).
    """
    if isinstance(name, str) and name not in _REGISTRY:
        _load_providers()
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


class _RangeMixin:
    """Shared range handling: per tensor or per channel; min/max, percentiles or MSE search."""

    search_size = 2**18

    def _init_range(self, per_channel, channel_dim, range, percentiles, search_steps):
        self.per_channel = check_type("per_channel", per_channel, bool)
        self.channel_dim = check_int("channel_dim", channel_dim)
        self.range = check_choice("range", range, _RANGES)
        if not isinstance(percentiles, (tuple, list)) or len(percentiles) != 2:
            raise ValueError(f"percentiles must be a pair (low, high) of numbers in [0, 100], got {percentiles!r}")
        lo = check_float("percentiles[0]", percentiles[0], low=0.0, high=100.0)
        hi = check_float("percentiles[1]", percentiles[1], low=0.0, high=100.0)
        if lo >= hi:
            raise ValueError(f"percentiles must satisfy low < high, got {percentiles!r}")
        self.percentiles = (lo, hi)
        self.search_steps = check_int("search_steps", search_steps, low=2, high=200)

    def _channelwise(self, ndim: int) -> bool:
        return self.per_channel and ndim >= 2

    def _flat(self, tensors) -> torch.Tensor:
        """Tensors as ``[C, M]`` (per channel) or ``[1, M]`` (per tensor)."""
        x = tensors[0]
        if self._channelwise(x.dim()):
            d = self.channel_dim % x.dim()
            return torch.cat([t.movedim(d, 0).reshape(t.shape[d], -1) for t in tensors], dim=1)
        return torch.cat([t.reshape(1, -1) for t in tensors], dim=1)

    def _keep_shape(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """A ``[C]`` or ``[1]`` vector reshaped to broadcast against a tensor of ``ndim`` dims."""
        if self._channelwise(ndim):
            d = self.channel_dim % ndim
            shape = [1] * ndim
            shape[d] = values.numel()
            return values.reshape(shape)
        return values.reshape([1] * ndim) if ndim else values.reshape(())

    def _subsample(self, flat: torch.Tensor) -> torch.Tensor:
        """Evenly strided values of each row (about ``search_size`` in all, at least 64 per row)
        for the MSE range search."""
        m = flat.shape[1]
        cap = max(64, self.search_size // flat.shape[0])
        if m <= cap:
            return flat
        return flat[:, :: -(-m // cap)]

    def _mean_bits(self) -> float:
        return float(self.bits.float().mean()) if isinstance(self.bits, torch.Tensor) else float(self.bits)

    def _low_high(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.range == "auto":
            if self._mean_bits() >= 4:
                return flat.amin(dim=1), flat.amax(dim=1)
            saved = self.range, self.percentiles
            self.range, self.percentiles = "percentile", AUTO_PERCENTILES
            try:
                return self._low_high(flat)
            finally:
                self.range, self.percentiles = saved
        if self.range == "percentile":
            m = flat.shape[1]
            k_lo = min(max(1, int(math.ceil(self.percentiles[0] / 100 * m))), m)
            k_hi = min(max(1, int(math.ceil(self.percentiles[1] / 100 * m))), m)
            lo = flat.kthvalue(k_lo, dim=1).values
            hi = flat.kthvalue(k_hi, dim=1).values
            return lo, hi
        return flat.amin(dim=1), flat.amax(dim=1)


class UniformQuantizer(_RangeMixin, Quantizer):
    """Uniform grid quantizer.

    * ``symmetric=True``: levels ``step * k`` for ``k = -(2**(b-1) - 1) .. 2**(b-1) - 1``
      (zero is a level; one code is unused) with ``step = max|x| / (2**(b-1) - 1)``;
      for ``b = 1`` the two levels ``-max|x|`` and ``+max|x|``.
    * ``symmetric=False``: ``2**b`` levels ``step * (k - z)``, ``k = 0 .. 2**b - 1``,
      over ``[min(x, 0), max(x, 0)]`` with an integer zero point ``z`` (zero is exact).

    :param bits: an int from 1 to 16, or an integer tensor broadcastable to the
        calibrated tensor (per-element precision).
    :param symmetric: symmetric grid around zero, or asymmetric with a zero point.
    :param per_channel: one range per slice along ``channel_dim`` (the output
        channel of Linear/Conv weights); tensors with fewer than 2 dims use one range.
    :param range: ``"minmax"``, ``"percentile"`` (``percentiles``, default the
        5th and 95th), ``"auto"`` (min/max at 4 bits and more, the 0.5th and
        99.5th percentiles below: at 2-3 bits clipping the rare largest weights
        buys resolution for all others) or ``"mse"`` (the clipping of the min/max range, among
        ``search_steps`` candidates, with the least squared error, per channel,
        measured on about 2**18 evenly strided values of the tensor).

    Usage::

        q = UniformQuantizer(4, symmetric=True, per_channel=True).calibrate(w)
        w_q = q(w)
    """

    kind = "uniform"
    _tensor_bits_ok = True
    packed_type = "uniform"
    packed_keys = frozenset({"symmetric", "per_channel", "channel_dim", "range", "percentiles", "search_steps"})

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        rs = channel_range_shape(config, shape)
        return [("hi", "f32", rs)] if config["symmetric"] else [("lo", "f32", rs), ("hi", "f32", rs)]

    def __init__(self, bits=8, *, symmetric: bool = True, per_channel: bool = False, channel_dim: int = 0,
                 range: str = "minmax", percentiles: Sequence[float] = (5.0, 95.0), search_steps: int = 16):
        super().__init__(bits)
        self.symmetric = check_type("symmetric", symmetric, bool)
        self._init_range(per_channel, channel_dim, range, percentiles, search_steps)
        self._reset()

    def _reset(self):
        self.lo = None
        self.hi = None

    # grid geometry from the range and the bits (cheap; recomputed on use)
    def _geometry(self, like: torch.Tensor):
        lo = self.lo.to(device=like.device, dtype=like.dtype)
        hi = self.hi.to(device=like.device, dtype=like.dtype)
        bits = self.bits
        if isinstance(bits, torch.Tensor):
            b = bits.to(device=like.device, dtype=like.dtype)
        else:
            b = torch.tensor(float(bits), device=like.device, dtype=like.dtype)
        if self.symmetric:
            qmax = torch.where(b == 1, torch.ones_like(b), torch.exp2(b) - 2)
            zp = qmax / 2
            step = hi / zp
        else:
            qmax = torch.exp2(b) - 1
            step = (hi - lo) / qmax
            step = torch.where(step > 0, step, torch.ones_like(step))
            zp = torch.clamp(torch.floor(-lo / step + 0.5), min=torch.zeros_like(qmax), max=qmax)
        step = torch.where(step > 0, step, torch.ones_like(step))
        return step, zp, qmax

    def _fit(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._low_high(flat)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi)
            return -amax, amax
        return lo, hi

    def _calibrate(self, tensors) -> None:
        x = tensors[0]
        flat = self._flat(tensors).float()
        lo, hi = self._fit(flat)
        if self.range == "mse":
            lo, hi = self._search(flat, lo, hi, x.dim())
        self.lo = self._keep_shape(lo, x.dim()).float()
        self.hi = self._keep_shape(hi, x.dim()).float()

    def _search(self, flat, lo, hi, ndim):
        """Shrink the range by the factor (per channel) that minimises the squared error."""
        flat = self._subsample(flat)
        best_err = torch.full_like(hi, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        bits = self.bits
        saved = (self.lo, self.hi, self.bits, self.per_channel)
        if isinstance(bits, torch.Tensor):  # search with the mean precision; ranges stay per channel
            self.bits = max(1, int(round(float(bits.float().mean()))))
        for ratio in torch.linspace(1.0, 0.2, self.search_steps).tolist():
            self.lo = (lo * ratio).unsqueeze(1)
            self.hi = (hi * ratio).unsqueeze(1)
            step, zp, qmax = self._geometry(flat)
            q = (torch.clamp(torch.floor(flat / step + zp + 0.5), min=0, max=qmax) - zp) * step
            err = (q - flat).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo * ratio, best_lo)
            best_hi = torch.where(better, hi * ratio, best_hi)
        self.lo, self.hi, self.bits, self.per_channel = saved
        return best_lo, best_hi

    def encode(self, x):
        self._require()
        step, zp, qmax = self._geometry(x)
        return torch.clamp(torch.floor(x.detach() / step + zp + 0.5), min=torch.zeros_like(qmax), max=qmax).to(torch.int64)

    def decode(self, codes, dtype=torch.float32):
        self._require()
        like = torch.empty((), dtype=dtype, device=codes.device)
        step, zp, _ = self._geometry(like)
        return (codes.to(dtype) - zp) * step

    def grid_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest and largest level (per channel), shaped to broadcast against the tensor."""
        self._require()
        step, zp, qmax = self._geometry(self.hi)
        return (0 - zp) * step, (qmax - zp) * step

    def step(self) -> torch.Tensor:
        """The grid step, shaped to broadcast against the tensor."""
        self._require()
        return self._geometry(self.hi)[0]

    def metadata_bits(self) -> int:
        self._require()
        # symmetric: one float32 range per channel; asymmetric: two (low and high)
        return 32 * self.hi.numel() * (1 if self.symmetric else 2)

    def config(self):
        return {"type": self.packed_type, "symmetric": self.symmetric, "per_channel": self.per_channel,
                "channel_dim": self.channel_dim, "range": self.range, "percentiles": list(self.percentiles),
                "search_steps": self.search_steps}

    def state(self):
        self._require()
        return {"hi": self.hi} if self.symmetric else {"lo": self.lo, "hi": self.hi}

    def _set_state(self, state):
        self.hi = state["hi"].float()
        self.lo = -self.hi if self.symmetric else state["lo"].float()


class Log2Quantizer(_RangeMixin, Quantizer):
    """Logarithmic (base 2) quantizer for positive quantities such as posterior scales.

    Levels are ``2**e`` for the ``2**bits`` integers ``e`` in the window
    ``[top - 2**bits + 1, top]``; ``top`` is the rounded ``log2`` of the largest
    value (``range="minmax"``) or of the upper percentile (``"percentile"``),
    per tensor or per channel. Values are rounded in the log domain, so inside
    the window the relative error is at most ``sqrt(2) - 1``; values below the
    window (and non-positive values) go to its lowest level.

    Usage::

        q = Log2Quantizer(4).calibrate(scale)
        scale_q = q(scale)          # powers of two
    """

    kind = "log2"
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
        x = tensors[0]
        flat = self._flat(tensors).float()
        _, hi = self._low_high(flat)
        hi = torch.where(hi > 0, hi, torch.full_like(hi, 2.0**-126))
        top = torch.floor(torch.log2(hi) + 0.5).clamp(-140, 127)
        self.top = self._keep_shape(top, x.dim()).to(torch.int16)

    def _window(self, like):
        top = self.top.to(device=like.device, dtype=torch.float32)
        levels = torch.exp2(self.bits.to(like.device).float()) if isinstance(self.bits, torch.Tensor) \
            else torch.tensor(2.0**self.bits, device=like.device)
        return top - (levels - 1), top

    def encode(self, x):
        self._require()
        low, top = self._window(x)
        e = torch.floor(torch.log2(x.detach().float()) + 0.5)
        e = torch.nan_to_num(e, nan=-1e9, neginf=-1e9)
        return (torch.clamp(e, min=low, max=top) - low).to(torch.int64)

    def decode(self, codes, dtype=torch.float32):
        self._require()
        low, _ = self._window(codes)
        return torch.exp2(codes.float() + low).to(dtype)

    def window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Lowest and highest exponent of the grid (per channel)."""
        self._require()
        return self._window(self.top)

    def metadata_bits(self) -> int:
        self._require()
        return 16 * self.top.numel()  # one int16 exponent per window

    def config(self):
        return {"type": self.packed_type, "per_channel": self.per_channel, "channel_dim": self.channel_dim,
                "range": self.range, "percentiles": list(self.percentiles)}

    def state(self):
        self._require()
        return {"top": self.top}

    def _set_state(self, state):
        self.top = state["top"].to(torch.int16)


def _pow2_family(bits: int, family: str) -> torch.Tensor:
    """The largest signed power-of-two (``r=1``) or additive (``r=2``) codebook with at most ``2**bits`` codes,
    normalised so its largest magnitude is 1."""
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


class CodebookQuantizer(_RangeMixin, Quantizer):
    """Nearest-entry quantizer on a codebook scaled by a calibrated factor.

    ``bits``: an int from 1 to 16, or ``"auto"``: 4 for the power-of-two
    families, the bits needed to index a custom ``codebook``.
    ``family="pot"``: zero and signed powers of two; ``"apot"``: zero and signed
    sums of at most two powers of two (built with
    :func:`pyro_bq.quant.codebook.pow2_codebook`), the largest such set with
    at most ``2**bits`` codes. Or pass any sorted ``codebook`` (``bits`` then
    defaults to the bits needed to index it). The scale factor maps the
    codebook's largest magnitude onto the range's largest magnitude (per tensor
    or channel; ``range="mse"`` searches a smaller factor); ``range="fixed"``
    keeps the factor at 1, so values snap onto the codebook itself (for a
    network whose weights already lie on a codebook, such as a PWFN guide).

    Usage::

        q = CodebookQuantizer(4, family="apot", per_channel=True).calibrate(w)
        w_q = q(w)                  # alpha * (sums of powers of two)
        exact = CodebookQuantizer(codebook=torch.tensor([-0.5, 0.0, 0.25]), range="fixed")
    """

    kind = "codebook"
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
            self._codebook = codebook.detach().float().clone()
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
            self._codebook = _pow2_family(self.bits, self.family).float()
        return self._codebook

    def _calibrate(self, tensors) -> None:
        x = tensors[0]
        flat = self._flat(tensors).float()
        if self.range == "fixed":
            self.alpha = self._keep_shape(torch.ones(flat.shape[0]), x.dim())
            return
        lo, hi = self._low_high(flat)
        cb = self.codebook
        amax = torch.maximum(lo.abs(), hi.abs())
        alpha = amax / cb.abs().max()
        alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        if self.range == "mse":
            flat = self._subsample(flat)
            best_err = torch.full_like(alpha, float("inf"))
            best = alpha.clone()
            for ratio in torch.linspace(1.0, 0.2, self.search_steps).tolist():
                a = (alpha * ratio).unsqueeze(1)
                q = cb[nearest_code_index(flat / a, cb)] * a
                err = (q - flat).pow(2).sum(dim=1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, alpha * ratio, best)
            alpha = best
        self.alpha = self._keep_shape(alpha, x.dim()).float()

    def encode(self, x):
        self._require()
        a = self.alpha.to(device=x.device, dtype=x.dtype)
        return nearest_code_index(x.detach() / a, self.codebook.to(device=x.device, dtype=x.dtype))

    def decode(self, codes, dtype=torch.float32):
        self._require()
        cb = self.codebook.to(device=codes.device, dtype=dtype)
        return cb[codes] * self.alpha.to(device=codes.device, dtype=dtype)

    def metadata_bits(self) -> int:
        self._require()
        return 32 * self.alpha.numel() + 32 * self.codebook.numel()

    def config(self):
        return {"type": self.packed_type, "family": self.family, "per_channel": self.per_channel,
                "channel_dim": self.channel_dim, "range": self.range, "percentiles": list(self.percentiles),
                "search_steps": self.search_steps}

    def state(self):
        self._require()
        return {"alpha": self.alpha, "codebook": self.codebook}

    def _set_state(self, state):
        self.alpha = state["alpha"].float()
        self._codebook = state["codebook"].float()


def quantizer_from_state(config: dict, bits, state: dict[str, torch.Tensor], shape) -> Quantizer:
    """Rebuild a calibrated quantizer from :meth:`Quantizer.config`, its bits and :meth:`Quantizer.state`.

    The class is the one registered under ``config["type"]`` (see :func:`register_quantizer`).
    """
    cls = quantizer_class(config.get("type"))
    return cls.from_config(config, bits, state).load_state(state, shape)
