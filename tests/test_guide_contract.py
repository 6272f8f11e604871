"""Every guide through one parametrized contract (see guide_contract.py)."""

import importlib
import pathlib

import pyro
import pytest
import torch
from pyro.poutine.util import site_is_subsample
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO

from guide_contract import GuideCase
from pyro_bq.inference import MeanFieldELBO, batched_forward

CASES: list[GuideCase] = []
for path in sorted(pathlib.Path(__file__).parent.glob("factories_*.py")):
    CASES.extend(importlib.import_module(path.stem).FACTORIES)
IDS = [c.name for c in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


def test_sites_median_and_quantiles_have_the_site_shapes(case):
    model, guide, x, y = case.make()
    trace = pyro.poutine.trace(model).get_trace(x, y)
    latent = {
        n: s["value"].shape for n, s in trace.iter_stochastic_nodes() if not site_is_subsample(s)
    }
    median = guide.median()
    assert set(median) == set(latent)
    for name, shape in latent.items():
        assert median[name].shape == shape
    q = guide.quantiles([0.05, 0.5, 0.95])
    for name, shape in latent.items():
        assert q[name].shape == (3,) + tuple(shape)
        assert bool((q[name][0] <= q[name][1] + 1e-6).all() & (q[name][1] <= q[name][2] + 1e-6).all())
        if case.exact_median:
            torch.testing.assert_close(q[name][1], median[name], rtol=1e-4, atol=1e-5)


def test_samples_vectorized_and_guide_trace_agree_on_shapes(case):
    model, guide, x, y = case.make()
    samples = guide.sample_latents(5)
    trace = pyro.poutine.trace(guide).get_trace(x, y)
    for name, value in samples.items():
        assert value.shape == (5,) + tuple(trace.nodes[name]["value"].shape)
        assert torch.isfinite(value).all()
    out = batched_forward(model, samples, x)
    assert out.shape[:2] == (5, x.shape[0])


def test_predictive_runs_and_is_seeded(case):
    model, guide, x, y = case.make()
    pyro.set_rng_seed(1)
    a = Predictive(model, guide=guide, num_samples=3, return_sites=["logits", "obs"])(x)
    pyro.set_rng_seed(1)
    b = Predictive(model, guide=guide, num_samples=3, return_sites=["logits", "obs"])(x)
    assert a["logits"].shape == (3, x.shape[0], 10)
    torch.testing.assert_close(a["logits"], b["logits"])


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO, MeanFieldELBO])
def test_svi_step_updates_parameters(case, elbo):
    if not case.trainable:
        pytest.skip(f"{case.name} is a post-hoc guide")
    if elbo is TraceMeanField_ELBO and not case.mean_field_kl:
        pytest.skip(f"{case.name} has no closed-form KL")
    model, guide, x, y = case.make()
    before = {k: v.detach().clone() for k, v in guide.state_dict().items() if v.is_floating_point()}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo())
    losses = [svi.step(x, y) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    after = guide.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_save_and_reload_gives_identical_predictions(case, tmp_path):
    model, guide, x, y = case.make()
    if case.reload is not None:
        reloaded = case.reload(guide, tmp_path / "guide")
    else:
        path = tmp_path / "guide.pt"
        torch.save(guide.state_dict(), path)
        _, reloaded, _, _ = case.make()
        reloaded.load_state_dict(torch.load(path, weights_only=True))
    pyro.set_rng_seed(3)
    a = Predictive(model, guide=guide, num_samples=4, return_sites=["logits"])(x)["logits"]
    pyro.set_rng_seed(3)
    b = Predictive(model, guide=reloaded, num_samples=4, return_sites=["logits"])(x)["logits"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_conjugate_posterior_is_exact(case):
    if case.conjugate is None:
        pytest.skip(f"{case.name}: no exact conjugate posterior in this family")
    case.conjugate()
