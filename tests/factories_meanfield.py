from guide_contract import GuideCase, float_guide
from test_conjugate import check_meanfield_conjugate

from pyro_bq.guides import AutoMeanFieldNormal


def _conjugate():
    check_meanfield_conjugate(lambda model: AutoMeanFieldNormal(model, init_scale=0.1))


FACTORIES = [
    GuideCase("meanfield-mlp", float_guide, conjugate=_conjugate),
    GuideCase("meanfield-lenet", lambda: float_guide("lenet")),
]
