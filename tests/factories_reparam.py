"""Guide + handler combinations in the shared guide contract (see guide_contract.py).

Each case runs the mean-field guide and its model under a local
reparameterization or Flipout handler (the same handler instance for both),
through SVI with both ELBOs, Predictive, vectorized samples and save/reload.
"""

from guide_contract import GuideCase, float_guide

from pyro_bq.inference.reparam import Flipout, Handled, LocalReparameterization


def _make(handler_cls, net="mlp", **kwargs):
    def make():
        model, guide, x, y = float_guide(net)
        handler = handler_cls(**kwargs)
        return Handled(model, handler), Handled(guide, handler), x, y

    return make


FACTORIES = [
    GuideCase("meanfield+localreparam-mlp", _make(LocalReparameterization), tags={"reparam"}),
    GuideCase("meanfield+localreparam-lenet", _make(LocalReparameterization, "lenet"), tags={"reparam"}),
    GuideCase(
        "meanfield+localreparam(linear)-lenet",
        _make(LocalReparameterization, "lenet", layers=("linear",)),
        tags={"reparam"},
    ),
    GuideCase("meanfield+flipout-mlp", _make(Flipout), tags={"reparam"}),
    GuideCase("meanfield+flipout-lenet", _make(Flipout, "lenet"), tags={"reparam"}),
]
