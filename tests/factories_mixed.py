"""Guides quantized with the mixed-precision allocations (QIU, QINU, RB, SMOL) and the
PWFN codebook export, in the shared guide contract."""

import torch
from guide_contract import GuideCase, tiny_classifier

from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.mixed import BitAllocation, allocation_policy, quantile_inform, random_bits
from pyro_bq.quant import load_packed, quantize, save_packed


def _float_guide():
    model, x, y = tiny_classifier("mlp")
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    guide(x, y)
    return model, guide, x, y


def _packed_reload(guide, path):
    save_packed(guide, path)
    return load_packed(path, guide.model)


def _allocated(kind, mode):
    def make():
        model, guide, x, y = _float_guide()
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
            sizes = {name: info.numel for name, info in guide.sites.items()}
            alloc = BitAllocation(bits, sizes=sizes, method="SMOL", grid="signed", info={"scales": scales})
        return model, quantize(guide, allocation_policy(alloc, mode)), x, y

    return make


def _pwfn_codebook():
    from pyro_bq.guides import AutoPWFN, init_to_pretrained
    from pyro_bq.models import MLP, BayesianClassifier
    from pyro_bq import IIDNormal
    from pyro_bq.pwfn import ClusterConfig, cluster_guide_, codebook_policy

    torch.manual_seed(0)
    net = MLP((784, 16, 10))
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=100)
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    guide.setup(x, y)
    cluster_guide_(guide, 1.0, ClusterConfig(b=6, tau=1.0))
    return model, quantize(guide, codebook_policy(guide)), x, y


FACTORIES = [
    GuideCase(f"mixed-{kind}-{mode}-mlp", _allocated(kind, mode), reload=_packed_reload)
    for kind, mode in (("qiu", "vpq"), ("qinu", "jq"), ("rb", "jq"), ("smol", "vpq"), ("qiu", "spq"))
] + [GuideCase("pwfn-codebook-export-mlp", _pwfn_codebook, reload=_packed_reload, trainable=False)]  # all weights fixed
