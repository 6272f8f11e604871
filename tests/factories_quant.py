"""Quantized guides (every policy, the log-quantized guide) in the shared guide contract."""

import torch
from guide_contract import GuideCase, float_guide, packed_reload, tiny_classifier

from pyro_bq.guides import AutoLogQuantNormal, quantize
from pyro_bq.quant import JQ, SPQ, VPQ, FloatPolicy


def _quantized(policy_fn, net="mlp"):
    def make():
        model, guide, x, y = float_guide(net)
        return model, quantize(guide, policy_fn()), x, y

    return make


def _logquant(net="mlp", bits=3):
    def make():
        model, x, y = tiny_classifier(net)
        guide = AutoLogQuantNormal(model, bits=bits, init_scale=0.05)
        guide(x, y)
        return model, guide, x, y

    return make


def _mixed_bits():
    # a per-parameter bit map for one site (as SMOL produces) and a per-site int map
    g = torch.Generator().manual_seed(0)
    return JQ(3, site_bits={"net.1.weight": torch.randint(1, 7, (16, 784), generator=g), "net.3.bias": 8})


FACTORIES = [
    GuideCase("quant-float-mlp", _quantized(FloatPolicy), reload=packed_reload),
    GuideCase("quant-vpq4-mlp", _quantized(lambda: VPQ(4)), reload=packed_reload),
    GuideCase("quant-spq4-mlp", _quantized(lambda: SPQ(4)), reload=packed_reload),
    GuideCase("quant-jq4-mlp", _quantized(lambda: JQ(4)), reload=packed_reload),
    GuideCase("quant-jq2-lenet", _quantized(lambda: JQ(2), "lenet"), reload=packed_reload),
    GuideCase("quant-jq3-mixed-bits-mlp", _quantized(_mixed_bits), reload=packed_reload),
    GuideCase("quant-spq3-stochastic-mlp", _quantized(lambda: SPQ(3, rounding="stochastic")), reload=packed_reload),
    GuideCase("quant-jq2-matched-or-nearest-lenet",
              _quantized(lambda: JQ(2, rounding="stochastic-matched-or-nearest"), "lenet"), reload=packed_reload),
    GuideCase("logquant-mlp", _logquant()),
    GuideCase("logquant-mlp-packed", _logquant(bits=4), reload=packed_reload),
]
