"""The allocators' own grids as :class:`pyro_bq.quant.Quantizer` subclasses, so a
:class:`~pyro_bq.mixed.informativeness.BitAllocation` plugs into any
quantization policy (VPQ, SPQ, JQ) through :func:`allocation_policy`.

* :class:`GaussianLloydQuantizer` -- QINU: a Normal fitted to the tensor,
  Gaussian-quantile levels refined by the median iteration.
* :class:`IntervalQuantizer` -- Random Bits: ``2**b`` uniform levels on a
  fixed interval ``[lo, hi]`` (the learned boundaries).
* :class:`SignedGridQuantizer` -- SMOL: odd multiples of ``scale * 2**(1-b)``
  (``b`` signed bits, per element).

QIU needs no new class: it is ``UniformQuantizer(b, symmetric=False,
range="percentile")`` (5th-95th percentiles).

Usage::

    policy = allocation_policy(alloc, "vpq")      # any allocator, any mode
    qguide = quantize(guide, policy)
"""

from __future__ import annotations

from typing import Optional

import torch

from pyro_bq._validation import check_choice, check_float, check_int
from pyro_bq.quant.policies import FloatPolicy, JQ, Policy, SPQ, VPQ
from pyro_bq.quant.quantizers import Quantizer, UniformQuantizer

from .informativeness import BitAllocation
from .quantile_inform import gaussian_levels

__all__ = ["GaussianLloydQuantizer", "IntervalQuantizer", "SignedGridQuantizer", "allocation_policy"]


class GaussianLloydQuantizer(Quantizer):
    """``2**bits`` levels for a Normal fitted (mean, std) to the calibration tensor.

    Usage::

        q = GaussianLloydQuantizer(3).calibrate(loc)
        loc_q = q.quantize(loc)
    """

    kind = "gaussian-lloyd"

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

    def metadata_bits(self) -> int:
        return 64

    def config(self) -> dict:
        return {"type": "GaussianLloydQuantizer", "max_iter": self.max_iter}

    def state(self):
        return {"mean": self.mean.float().reshape(1), "std": self.std.float().reshape(1)}

    def _set_state(self, state):
        self.mean = state["mean"].double().reshape(())
        self.std = state["std"].double().reshape(())


class IntervalQuantizer(Quantizer):
    """``2**bits`` evenly spaced levels from ``lo`` to ``hi`` (fixed, not calibrated).

    Usage::

        q = IntervalQuantizer(3, lo=-0.1, hi=0.1).calibrate(loc)
    """

    kind = "interval"
    _tensor_bits_ok = True

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

    def metadata_bits(self) -> int:
        return 64

    def config(self) -> dict:
        return {"type": "IntervalQuantizer", "lo": self.lo, "hi": self.hi}

    def state(self):
        return {"interval": torch.tensor([self.lo, self.hi])}

    def _set_state(self, state):
        self.lo, self.hi = (float(v) for v in state["interval"])


class SignedGridQuantizer(Quantizer):
    """``b`` signed bits: values ``scale * (2k + 1) * 2**(1-b)`` of magnitude below ``2 * scale``.

    ``scale`` defaults to ``max|x| / 2`` at calibration. ``bits`` may be a
    per-element integer tensor.

    Usage::

        q = SignedGridQuantizer(bits_tensor, scale=c).calibrate(loc)
    """

    kind = "signed"
    _tensor_bits_ok = True

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

    def metadata_bits(self) -> int:
        return 32

    def config(self) -> dict:
        return {"type": "SignedGridQuantizer"}

    def state(self):
        return {"scale": torch.tensor([float(self.scale)])}

    def _set_state(self, state):
        self.scale = float(state["scale"][0])


class _AllocationMixin:
    """Swaps in the allocation's per-site loc quantizer (the policy's extension point)."""

    _loc_templates: dict

    def configure_site(self, name, shape):
        spec = super().configure_site(name, shape)
        template = self._loc_templates.get(name)
        if spec.loc is not None and template is not None:
            spec.loc = template.with_bits(self.bits_for(name, "loc"))
        return spec


_MODES = {"vpq": VPQ, "spq": SPQ, "jq": JQ, "float": FloatPolicy}


def allocation_policy(allocation: BitAllocation, mode: str = "vpq", **kwargs) -> Policy:
    """A :mod:`pyro_bq.quant` policy that quantizes with the allocation's widths.

    The allocation's bits go to ``loc`` (VPQ, JQ) and ``sample`` (SPQ, JQ);
    ``loc`` uses the allocator's grid (QIU: 5th-95th percentile uniform; QINU:
    Gaussian Lloyd levels; RB: the learned interval; SMOL: its signed grid and
    scale). Other keyword arguments go to the policy (e.g. ``scale_bits``).

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
        kwargs.setdefault("loc_quantizer", UniformQuantizer(8, symmetric=False, per_channel=False, range="percentile"))
    elif allocation.grid == "gaussian-lloyd":
        kwargs.setdefault("loc_quantizer", GaussianLloydQuantizer(8))
    elif allocation.grid == "uniform-interval":
        for name in allocation:
            templates[name] = IntervalQuantizer(8, lo=allocation.info["alpha"][name], hi=allocation.info["beta"][name])
    elif allocation.grid == "signed":
        for name in allocation:
            templates[name] = SignedGridQuantizer(8, scale=allocation.info["scales"][name])
    cls = type(f"Allocation{base.__name__}", (_AllocationMixin, base), {})
    policy = cls(site_bits=site_bits, **kwargs) if base is FloatPolicy else cls(8, site_bits=site_bits, **kwargs)
    policy._loc_templates = templates
    policy.allocation = allocation
    return policy
