""":func:`quantize`: a trained guide plus a policy gives a new, quantized guide."""

from __future__ import annotations

import torch

from .policies import Policy, SiteQuantizers
from .quantizers import Log2Quantizer

__all__ = ["quantize", "calibrate_site"]


def calibrate_site(policy: Policy, name: str, loc: torch.Tensor, scale: torch.Tensor, *,
                   native_scale=None) -> SiteQuantizers:
    """Calibrated quantizers of one site, as ``policy`` configures them.

    ``loc`` is calibrated on itself, ``scale`` on itself, and the sample
    quantizer on the envelope ``loc +- policy.calib_width * scale`` of the
    (already quantized, for JQ) posterior. ``native_scale``: a calibrated
    :class:`Log2Quantizer` of a guide whose scales already live on a log2 grid
    (:class:`~pyro_bq.guides.logquant.AutoLogQuantNormal`); it is used instead
    of a new calibration when the policy asks for a log2 scale grid of the same bits.
    """
    spec = policy.configure_site(name, loc.shape)
    if not isinstance(spec, SiteQuantizers):
        raise TypeError(f"{type(policy).__name__}.configure_site must return SiteQuantizers, got {type(spec).__name__}")
    out = SiteQuantizers()
    with torch.no_grad():
        loc, scale = loc.detach(), scale.detach()
        if spec.loc is not None:
            out.loc = spec.loc.calibrate(loc)
            loc = out.loc.quantize(loc)
        if spec.scale is not None:
            if (native_scale is not None and isinstance(spec.scale, Log2Quantizer)
                    and isinstance(spec.scale.bits, int) and spec.scale.bits == native_scale.bits):
                out.scale = native_scale
            else:
                out.scale = spec.scale.calibrate(scale)
            scale = out.scale.quantize(scale)
        if spec.sample is not None:
            width = policy.calib_width * scale
            out.sample = spec.sample.calibrate(loc - width, loc + width)
    return out


def quantize(guide, policy: Policy):
    """Return a new :class:`~pyro_bq.guides.quantized.QuantizedGuide`; ``guide`` is left untouched.

    :param guide: a trained (set-up) :class:`~pyro_bq.guides.AutoGaussianSites` guide. A
        :class:`~pyro_bq.guides.quantized.QuantizedGuide` is re-quantized from its
        wrapped float parameters (e.g. after fine-tuning), not quantized twice.
    :param policy: a :class:`~pyro_bq.quant.policies.Policy` (:class:`VPQ`,
        :class:`SPQ`, :class:`JQ` or :class:`FloatPolicy`).
    :raises TypeError: for a guide or policy of the wrong type.
    :raises ValueError: for a guide without parameters, or a policy entry
        (``site_bits`` key, ``skip`` entry, bits tensor) that fits no site.

    Usage::

        qguide = quantize(guide, JQ(4, skip=["net.conv1.weight", "net.fc3.weight"]))
        Predictive(model, guide=qguide, num_samples=32)(x)
    """
    from pyro_bq.guides.base import AutoGaussianSites
    from pyro_bq.guides.quantized import QuantizedGuide

    if not isinstance(guide, AutoGaussianSites):
        raise TypeError(f"guide must be a pyro_bq AutoGaussianSites guide (e.g. AutoMeanFieldNormal), "
                        f"got {type(guide).__name__}")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a pyro_bq Policy (VPQ, SPQ, JQ, FloatPolicy), got {type(policy).__name__}")
    if guide.prototype_trace is None:
        raise ValueError("guide has no parameters yet: train it, or call it once with example inputs, first")
    if isinstance(guide, QuantizedGuide):
        guide = guide.base
    policy.check_sites(guide.sites)
    quantizers = {}
    with torch.no_grad():
        for name in guide.sites:
            loc, scale = guide.get_loc_scale(name)
            native = guide.scale_quantizer(name) if hasattr(guide, "scale_quantizer") else None
            quantizers[name] = calibrate_site(policy, name, loc, scale, native_scale=native)
    return QuantizedGuide(guide, quantizers, policy=policy)
