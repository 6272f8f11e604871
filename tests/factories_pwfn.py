import torch
from guide_contract import GuideCase, tiny_classifier

from pyro_bq.guides import init_to_pretrained
from pyro_bq.guides.pwfn import AutoPWFN


def _make(net="mlp", *, pretrained=True, prior_init=True, fix=False):
    from pyro_bq.models import MLP, LeNet5

    model, x, y = tiny_classifier(net)
    init = None
    if pretrained:
        torch.manual_seed(5)  # another net of the same architecture plays the pretrained one
        init = init_to_pretrained(MLP((784, 16, 10)) if net == "mlp" else LeNet5())
    guide = AutoPWFN(model, init_loc_fn=init, prior_init=prior_init)
    guide(x, y)
    if fix:
        from pyro_bq.pwfn import ClusterConfig, cluster_guide_

        cluster_guide_(guide, 0.5, ClusterConfig(b=6, tau=1.0))
    return model, guide, x, y


FACTORIES = [
    GuideCase("pwfn-mlp", _make),
    GuideCase("pwfn-lenet", lambda: _make("lenet")),
    GuideCase("pwfn-noprior-mlp", lambda: _make(pretrained=False, prior_init=False)),
    GuideCase("pwfn-half-fixed-mlp", lambda: _make(fix=True)),
]
