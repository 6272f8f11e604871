from guide_contract import GuideCase, tiny_classifier
from test_conjugate import check_meanfield_conjugate

from pyro_bq.guides import AutoMeanFieldNormal


def _make(net="mlp"):
    model, x, y = tiny_classifier(net)
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    guide(x, y)
    return model, guide, x, y


def _conjugate():
    check_meanfield_conjugate(lambda model: AutoMeanFieldNormal(model, init_scale=0.1))


FACTORIES = [
    GuideCase("meanfield-mlp", _make, conjugate=_conjugate),
    GuideCase("meanfield-lenet", lambda: _make("lenet")),
]
