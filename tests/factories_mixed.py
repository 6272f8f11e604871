"""Guides quantized with the mixed-precision allocations (QIU, QINU, RB, SMOL) and the
PWFN codebook export, in the shared guide contract."""

import torch
from guide_contract import GuideCase, float_guide, packed_reload

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoPWFN, init_to_pretrained, quantize
from pyro_bq.mixed import BitAllocation, quantile_inform, random_bits
from pyro_bq.models import MLP, BayesianClassifier
from pyro_bq.pwfn import ClusterConfig, cluster_guide_, codebook_policy
from pyro_bq.quant import SignedGridQuantizer, make_policy


def _allocated(kind, mode):
    def make():
        model, guide, x, y = float_guide()
        if kind == "qiu":
            alloc = quantile_inform(guide, 4.0)
        elif kind == "qinu":
            alloc = quantile_inform(guide, 4.0, grid="gaussian")
        elif kind == "rb":
            alloc = random_bits(guide, 4.0, num_steps=60)
        else:  # a SMOL-style per-parameter map on the signed grid
            g = torch.Generator().manual_seed(0)
            bits = {name: torch.randint(2, 6, info.shape, generator=g) for name, info in guide.sites.items()}
            scales = {name: float(guide.median()[name].abs().max()) / 2 + 1e-3 for name in guide.sites}
            grids = {name: {"loc": SignedGridQuantizer(bits[name], scale=scales[name])} for name in guide.sites}
            sizes = {name: info.numel for name, info in guide.sites.items()}
            alloc = BitAllocation(bits, sizes=sizes, method="SMOL", grid="signed", site_quantizers=grids)
        policy = make_policy(mode, 8, site_bits=alloc.site_bits, site_quantizers=alloc.site_quantizers)
        return model, quantize(guide, policy), x, y

    return make


def _pwfn_codebook():
    torch.manual_seed(0)
    net = MLP((784, 16, 10))
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=100)
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    guide.setup(x, y)
    cluster_guide_(guide, 1.0, ClusterConfig(b=6, tau=1.0))
    return model, quantize(guide, codebook_policy(guide)), x, y


FACTORIES = [
    GuideCase(f"mixed-{kind}-{mode}-mlp", _allocated(kind, mode), reload=packed_reload)
    for kind, mode in (("qiu", "vpq"), ("qinu", "jq"), ("rb", "jq"), ("smol", "vpq"), ("qiu", "spq"))
] + [GuideCase("pwfn-codebook-export-mlp", _pwfn_codebook, reload=packed_reload, trainable=False)]  # all weights fixed
