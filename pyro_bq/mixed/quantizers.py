"""The allocators' own grids as :class:`pyro_bq.quant.Quantizer` subclasses, so a
:class:`~pyro_bq.mixed.informativeness.BitAllocation` plugs into any
quantization policy (VPQ, SPQ, JQ) through :func:`allocation_policy`.

* :class:`GaussianLloydQuantizer` -- QINU: a Normal fitted to the tensor,
  Gaussian-quantile levels refined by the median iteration.
* :class:`IntervalQuantizer` -- Random Bits: ``2**b`` uniform levels on a
  fixed interval ``[lo, hi]`` (the learned boundaries).
* :class:`SignedGridQuantizer` -- SMOL: odd multiples of ``scale * 2**(1-b)``
  (``b`` signed bits, per element).
* :class:`PercentileIntervalQuantizer` -- QIU: ``2**b`` evenly spaced levels
  from the 5th to the 95th percentile of the tensor, ``alpha + s * k`` with
  ``s = (beta - alpha) / (2**b - 1)`` and no zero point: the grid ``Q`` of the
  Quantile Inform paper (Section 3.2), the one :func:`quantize_means` uses.
  (``UniformQuantizer(symmetric=False, range="percentile")`` is a different
  grid: it widens the range to include 0 and puts 0 on a level.)

Packing: each class declares its packed format (``packed_type``,
``packed_keys``, ``packed_layout``; see
:func:`pyro_bq.quant.quantizers.register_quantizer`), so
:func:`pyro_bq.quant.save_packed`, :func:`pyro_bq.quant.load_packed` and
:func:`pyro_bq.quant.memory_report` handle every policy of
:func:`allocation_policy`. The calibration data are float64 values (bit-exact
in the file, so a loaded guide predicts exactly what the saved one did):

* :class:`GaussianLloydQuantizer`: type ``"gaussian-lloyd"``, state ``mean``, ``std`` (128 bits);
* :class:`IntervalQuantizer`: type ``"interval"``, state ``interval`` = ``(lo, hi)`` (128 bits);
* :class:`SignedGridQuantizer`: type ``"signed"``, state ``scale`` (64 bits);
* :class:`PercentileIntervalQuantizer`: type ``"percentile-interval"``, state
  ``interval`` = ``(alpha, beta)`` (128 bits).

Per-element bits (SMOL) go to the file's bit map, as for any quantizer.

Usage::

    policy = allocation_policy(alloc, "vpq")      # any allocator, any mode
    qguide = quantize(guide, policy)
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from pyro_bq._validation import check_choice, check_float, check_int
from pyro_bq.quant.policies import JQ, Policy, SPQ, VPQ
from pyro_bq.quant.quantizers import Quantizer, _bits_repr

from .informativeness import BitAllocation
from .lloyd_max import percentile_interval
from .quantile_inform import gaussian_levels

__all__ = [
    "GaussianLloydQuantizer",
    "IntervalQuantizer",
    "SignedGridQuantizer",
    "PercentileIntervalQuantizer",
    "allocation_policy",
]


def _finite_values(state: dict, key: str, count: int) -> list[float]:
    """``count`` finite floats from ``state[key]`` (a packed state tensor); ValueError otherwise."""
    t = state[key]
    if not isinstance(t, torch.Tensor) or t.numel() != count:
        raise ValueError(f"state {key!r} must hold {count} value(s)")
    values = [float(v) for v in t.detach().double().reshape(-1)]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"state {key!r} must be finite, got {values}")
    return values


class GaussianLloydQuantizer(Quantizer):
    """``2**bits`` levels for a Normal fitted (mean, std) to the calibration tensor.

    Usage::

        q = GaussianLloydQuantizer(3).calibrate(loc)
        loc_q = q.quantize(loc)
    """

    kind = "gaussian-lloyd"
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
        self._require()
        return gaussian_levels(int(self.bits), float(self.mean), float(self.std), max_iter=self.max_iter)

    def encode(self, x):
        lv = self.levels().to(x.dtype)
        return torch.bucketize(x.contiguous(), 0.5 * (lv[:-1] + lv[1:]))

    def decode(self, codes, dtype=torch.float32):
        return self.levels().to(dtype)[codes]

    def config(self) -> dict:
        return {"type": self.packed_type, "max_iter": self.max_iter}

    def state(self):
        self._require()
        return {"mean": self.mean.double().reshape(1), "std": self.std.double().reshape(1)}

    def _set_state(self, state):
        (mean,), (std,) = _finite_values(state, "mean", 1), _finite_values(state, "std", 1)
        if not std > 0:
            raise ValueError(f"state 'std' must be > 0, got {std}")
        self.mean = torch.tensor(mean, dtype=torch.float64)
        self.std = torch.tensor(std, dtype=torch.float64)


class IntervalQuantizer(Quantizer):
    """``2**bits`` evenly spaced levels from ``lo`` to ``hi`` (fixed, not calibrated).

    Usage::

        q = IntervalQuantizer(3, lo=-0.1, hi=0.1).calibrate(loc)
    """

    kind = "interval"
    _tensor_bits_ok = True
    packed_type = "interval"
    packed_keys = frozenset()  # the interval is state (one configuration for all sites)

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        return [("interval", "f64", [2])]

    def __init__(self, bits=4, *, lo: float = -1.0, hi: float = 1.0):
        super().__init__(bits)
        self.lo = check_float("lo", lo)
        self.hi = check_float("hi", hi)
        if not self.hi > self.lo:
            raise ValueError(f"hi must be > lo, got lo={lo}, hi={hi}")

    def _calibrate(self, tensors):
        pass

    def _geometry(self, like):
        b = torch.as_tensor(self.bits, dtype=like.dtype, device=like.device)
        lm = torch.exp2(b) - 1
        return (self.hi - self.lo) / lm, lm

    def encode(self, x):
        step, lm = self._geometry(x)
        return torch.minimum(torch.round((x - self.lo) / step).clamp(min=0), lm).to(torch.int64)

    def decode(self, codes, dtype=torch.float32):
        step, _ = self._geometry(torch.zeros((), dtype=dtype))
        return (self.lo + step * codes.to(dtype)).to(dtype)

    def config(self) -> dict:
        return {"type": self.packed_type}

    def state(self):
        return {"interval": torch.tensor([self.lo, self.hi], dtype=torch.float64)}

    def _set_state(self, state):
        lo, hi = _finite_values(state, "interval", 2)
        if not hi > lo:
            raise ValueError(f"state 'interval' must have hi > lo, got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={_bits_repr(self.bits)}, lo={self.lo!r}, hi={self.hi!r})"


class SignedGridQuantizer(Quantizer):
    """``b`` signed bits: values ``scale * (2k + 1) * 2**(1-b)`` of magnitude below ``2 * scale``.

    ``scale`` defaults to ``max|x| / 2`` at calibration. ``bits`` may be a
    per-element integer tensor.

    Usage::

        q = SignedGridQuantizer(bits_tensor, scale=c).calibrate(loc)
    """

    kind = "signed"
    _tensor_bits_ok = True
    packed_type = "signed"
    packed_keys = frozenset()

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        return [("scale", "f64", [1])]

    def __init__(self, bits=4, *, scale: Optional[float] = None):
        super().__init__(bits)
        self.fixed_scale = None if scale is None else check_float("scale", scale, low=0.0, low_open=True)
        self._reset()

    def _reset(self):
        self.scale = self.fixed_scale

    def _calibrate(self, tensors):
        if self.fixed_scale is None:
            m = max(float(t.abs().max()) for t in tensors)
            self.scale = m / 2 if m > 0 else 1.0

    def _geometry(self, like):
        b = torch.as_tensor(self.bits, dtype=like.dtype, device=like.device)
        return torch.exp2(1.0 - b), torch.exp2(b)

    def encode(self, x):
        half, n = self._geometry(x)
        k = torch.floor(x / self.scale / (2 * half)) + n / 2
        return torch.minimum(k.clamp(min=0), n - 1).to(torch.int64)

    def decode(self, codes, dtype=torch.float32):
        half, n = self._geometry(torch.zeros((), dtype=dtype))
        return (self.scale * (2 * codes.to(dtype) - n + 1) * half).to(dtype)

    def config(self) -> dict:
        return {"type": self.packed_type}

    def state(self):
        self._require()
        return {"scale": torch.tensor([float(self.scale)], dtype=torch.float64)}

    def _set_state(self, state):
        (scale,) = _finite_values(state, "scale", 1)
        if not scale > 0:
            raise ValueError(f"state 'scale' must be > 0, got {scale}")
        self.scale = scale

    def __repr__(self) -> str:
        scale = "None" if self.fixed_scale is None else repr(self.fixed_scale)
        return f"{type(self).__name__}(bits={_bits_repr(self.bits)}, scale={scale})"


class PercentileIntervalQuantizer(Quantizer):
    """QIU's grid: ``2**bits`` levels ``alpha + s * k`` (``k = 0 .. 2**bits - 1``) from
    ``alpha`` = the 5th to ``beta`` = the 95th percentile of the calibration tensor.

    Values are rounded to the nearest level and clamped to ``[alpha, beta]``;
    there is no zero point, so 0 is a level only by chance. The percentiles
    are :func:`~pyro_bq.mixed.lloyd_max.percentile_interval`'s (linear
    interpolation, as :func:`torch.quantile`), so for the same tensor and bits
    the quantized values equal those of :func:`~pyro_bq.mixed.quantize_means`
    for a QIU allocation exactly. One interval per tensor (a site).

    Its calibration data is the interval ``(alpha, beta)``: two float64 values
    in a packed file (packed type ``"percentile-interval"``), which reads back
    as this class with the same levels. Limits: ``bits`` is one int from 1 to
    16 per site.

    :param bits: an int from 1 to 16.
    :param low, high: the percentiles (in ``[0, 100]``, ``low < high``); the paper's 5 and 95.

    Usage::

        q = PercentileIntervalQuantizer(3).calibrate(loc)
        loc_q = q.quantize(loc)          # == quantize_means(...) for a 3-bit QIU site
        lo, hi = q.interval()            # (5th, 95th) percentile of loc
    """

    kind = "percentile-interval"
    packed_type = "percentile-interval"
    packed_keys = frozenset({"low", "high"})

    @classmethod
    def packed_layout(cls, config, shape, k=None):
        return [("interval", "f64", [2])]

    def __init__(self, bits=4, *, low: float = 5.0, high: float = 95.0):
        super().__init__(bits)
        low = check_float("low", low, low=0.0, high=100.0)
        high = check_float("high", high, low=0.0, high=100.0)
        if not low < high:
            raise ValueError(f"low must be < high (percentiles in [0, 100]), got low={low}, high={high}")
        self.percentiles = (low, high)
        self._reset()

    def _reset(self):
        self.lo = None
        self.hi = None

    def interval(self) -> tuple[float, float]:
        """``(alpha, beta)``: the lowest and the highest level."""
        self._require()
        return self.lo, self.hi

    def levels(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``2**bits`` levels, ascending, in ``dtype`` (the values :meth:`decode` gives)."""
        self._require()
        lo, step, lm = self._step(dtype)
        return lo + step * torch.arange(int(lm) + 1, dtype=dtype)

    @property
    def codebook(self) -> torch.Tensor:
        """The levels as float32 (:meth:`levels`)."""
        return self.levels()

    def _step(self, dtype, device=None):
        # the same float operations as quantize_uniform, so the levels agree bit for bit
        lo = torch.tensor(self.lo, dtype=dtype, device=device)
        hi = torch.tensor(self.hi, dtype=dtype, device=device)
        lm = torch.pow(2.0, torch.tensor(float(self.bits), dtype=dtype, device=device)) - 1
        step = (hi - lo) / lm
        return lo, torch.where(step > 0, step, torch.ones_like(step)), lm

    def _calibrate(self, tensors) -> None:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.lo, self.hi = percentile_interval(flat, self.percentiles[0] / 100, self.percentiles[1] / 100)

    def encode(self, x):
        self._require()
        lo, step, lm = self._step(x.dtype, x.device)
        k = torch.clamp(torch.round((x.detach() - lo) / step), torch.zeros_like(lm), lm)
        return k.to(torch.int64)

    def decode(self, codes, dtype=torch.float32):
        self._require()
        lo, step, _ = self._step(dtype, codes.device)
        return lo + step * codes.to(dtype)

    def config(self) -> dict:
        return {"type": self.packed_type, "low": self.percentiles[0], "high": self.percentiles[1]}

    def state(self):
        self._require()
        return {"interval": torch.tensor([self.lo, self.hi], dtype=torch.float64)}

    def _set_state(self, state):
        lo, hi = _finite_values(state, "interval", 2)
        if not hi > lo:
            raise ValueError(f"state 'interval' must have beta > alpha, got {lo}, {hi}")
        self.lo, self.hi = lo, hi

    def __repr__(self) -> str:
        low, high = self.percentiles
        return f"{type(self).__name__}(bits={self.bits}, low={low:g}, high={high:g})"


class _AllocationMixin:
    """Swaps in the allocation's per-site loc quantizer (the policy's extension point)."""

    _loc_templates: dict

    def configure_site(self, name, shape):
        spec = super().configure_site(name, shape)
        template = self._loc_templates.get(name)
        if spec.loc is not None and template is not None:
            spec.loc = template.with_bits(self.bits_for(name, "loc"))
        return spec


_MODES = {"vpq": VPQ, "spq": SPQ, "jq": JQ}  # a float policy would not use the allocation


def allocation_policy(allocation: BitAllocation, mode: str = "vpq", **kwargs) -> Policy:
    """A :mod:`pyro_bq.quant` policy that quantizes with the allocation's widths.

    The allocation's bits go to ``loc`` (VPQ, JQ) and ``sample`` (SPQ, JQ);
    ``loc`` uses the allocator's grid (QIU: :class:`PercentileIntervalQuantizer`,
    the paper's uniform grid on the 5th-95th percentiles, the same values as
    :func:`~pyro_bq.mixed.quantize_means`; QINU:
    Gaussian Lloyd levels; RB: the learned interval; SMOL: its signed grid and
    scale). Other keyword arguments go to the policy (e.g. ``scale_bits``).

    :param allocation: a :class:`BitAllocation`.
    :param mode: ``"vpq"``, ``"spq"`` or ``"jq"``.
    :raises TypeError: if ``allocation`` is not a :class:`BitAllocation`.
    :raises ValueError: for another ``mode`` or a ``site_bits`` keyword.

    Usage::

        qguide = quantize(guide, allocation_policy(alloc, "jq", scale_bits=4))
    """
    if not isinstance(allocation, BitAllocation):
        raise TypeError(f"allocation must be a BitAllocation, got {type(allocation).__name__}")
    check_choice("mode", mode, tuple(_MODES))
    base = _MODES[mode]
    if "site_bits" in kwargs:
        raise ValueError("site_bits comes from the allocation; pass the other policy options only")
    quantities = [q for q in ("loc", "sample") if base(8).quantizes(q)]
    site_bits = {name: {q: bits for q in quantities} for name, bits in allocation.items()} if quantities else {}
    templates = {}
    if allocation.grid == "uniform-percentile":
        kwargs.setdefault("loc_quantizer", PercentileIntervalQuantizer(8))
    elif allocation.grid == "gaussian-lloyd":
        kwargs.setdefault("loc_quantizer", GaussianLloydQuantizer(8))
    elif allocation.grid == "uniform-interval":
        for name in allocation:
            templates[name] = IntervalQuantizer(8, lo=allocation.info["alpha"][name], hi=allocation.info["beta"][name])
    elif allocation.grid == "signed":
        for name in allocation:
            templates[name] = SignedGridQuantizer(8, scale=allocation.info["scales"][name])
    cls = type(f"Allocation{base.__name__}", (_AllocationMixin, base), {})
    policy = cls(8, site_bits=site_bits, **kwargs)
    policy._loc_templates = templates
    policy.allocation = allocation
    return policy
