"""Quantization of Bayesian neural network guides (VPQ, SPQ, JQ), activations, memory and packed export.

Usage::

    from pyro_bq.quant import JQ, quantize, memory_report, save_packed, load_packed

    qguide = quantize(guide, JQ(4, skip=["net.conv1.weight"]))   # a new guide; `guide` is untouched
    print(memory_report(qguide).bits_per_param)
    save_packed(qguide, "guide-jq4.bq")
    same = load_packed("guide-jq4.bq", model)
"""

from .codebook import nearest_code, nearest_code_index, pow2_codebook
from .memory import MemoryReport, SiteMemory, memory_report
from .packed import load_packed, pack_bits, save_packed, unpack_bits
from .policies import JQ, QUANTITIES, SPQ, VPQ, FloatPolicy, Policy, SiteQuantizers, make_policy
from .quantize import calibrate_site, quantize
from .quantizers import (
    CodebookQuantizer,
    Log2Quantizer,
    Quantizer,
    UniformQuantizer,
    check_bits,
    packed_types,
    quantizer_class,
    register_quantizer,
    ste,
)

__all__ = [
    "Quantizer",
    "UniformQuantizer",
    "Log2Quantizer",
    "CodebookQuantizer",
    "check_bits",
    "register_quantizer",
    "quantizer_class",
    "packed_types",
    "ste",
    "Policy",
    "VPQ",
    "SPQ",
    "JQ",
    "FloatPolicy",
    "SiteQuantizers",
    "QUANTITIES",
    "make_policy",
    "quantize",
    "calibrate_site",
    "memory_report",
    "MemoryReport",
    "SiteMemory",
    "save_packed",
    "load_packed",
    "pack_bits",
    "unpack_bits",
    "pow2_codebook",
    "nearest_code",
    "nearest_code_index",
    # imported lazily (they live in pyro_bq.guides / pyro_bq.quant.activation):
    "QuantizedGuide",
    "QuantizedNormal",
    "AutoLogQuantNormal",
    "FakeQuantActivation",
    "quantize_activations",
    "calibrate_activations",
    "calibrate_activations_",
    "PackedNormalBase",
]

_LAZY = {
    "QuantizedGuide": ("pyro_bq.guides.quantized", "QuantizedGuide"),
    "QuantizedNormal": ("pyro_bq.guides.quantized", "QuantizedNormal"),
    "AutoLogQuantNormal": ("pyro_bq.guides.logquant", "AutoLogQuantNormal"),
    "FakeQuantActivation": ("pyro_bq.quant.activation", "FakeQuantActivation"),
    "quantize_activations": ("pyro_bq.quant.activation", "quantize_activations"),
    "calibrate_activations": ("pyro_bq.quant.activation", "calibrate_activations"),
    "calibrate_activations_": ("pyro_bq.quant.activation", "calibrate_activations_"),
    "PackedNormalBase": ("pyro_bq.guides.quantized", "PackedNormalBase"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'pyro_bq.quant' has no attribute {name!r}")
