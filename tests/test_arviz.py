"""ArviZ export of a small model trained on real MNIST."""

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot  # noqa: E402

import arviz as az  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pyro_bq import IIDNormal  # noqa: E402
from pyro_bq.guides import AutoMeanFieldNormal  # noqa: E402
from pyro_bq.inference import fit_svi  # noqa: E402
from pyro_bq.models import MLP, BayesianClassifier, BayesianRegressor  # noqa: E402
from pyro_bq.uncertainty import predictive_logits, sample_weights, to_arviz  # noqa: E402


# a shared, loaded CPU: one intra-op thread avoids oversubscription stalls
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(mnist_small):
    train, test = mnist_small
    torch.manual_seed(0)
    model = BayesianClassifier(MLP((784, 32, 10)), IIDNormal(1.0), dataset_size=len(train))
    guide = AutoMeanFieldNormal(model, init_scale=1e-2)
    fit_svi(model, guide, train, num_epochs=1, batch_size=100, lr=5e-3, progress=False)
    return model, guide, test.x[:150], test.y[:150]


def test_groups_shapes_coords_and_values(trained):
    model, guide, x, y = trained
    idata = to_arviz(model, guide, x, y, num_samples=40, seed=3)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        assert hasattr(idata, group), group
    # default: sites with at most 1000 scalars (all but the 784x32 first layer)
    assert set(idata.posterior.data_vars) == {"net.1.bias", "net.3.weight", "net.3.bias"}
    w = idata.posterior["net.3.weight"]
    assert w.dims == ("chain", "draw", "net.3.weight_dim_0", "net.3.weight_dim_1")
    assert w.shape == (1, 40, 10, 32)
    ll = idata.log_likelihood["obs"]
    assert ll.dims == ("chain", "draw", "obs_id") and ll.shape == (1, 40, 150)
    assert list(idata.observed_data["obs"].coords["obs_id"].values) == list(range(150))
    np.testing.assert_array_equal(idata.observed_data["obs"].values, y.numpy())
    pp = idata.posterior_predictive["obs"].values
    assert pp.shape == (1, 40, 150) and pp.min() >= 0 and pp.max() <= 9
    # the exported draws and log likelihood are the guide's, for the same seed
    draws = sample_weights(model, guide, 40, seed=3)
    np.testing.assert_allclose(w.values[0], draws["net.3.weight"].numpy())
    logits = predictive_logits(model, guide, x, samples=draws)
    expected = logits.log_softmax(-1).gather(-1, y.expand(40, -1).unsqueeze(-1)).squeeze(-1)
    np.testing.assert_allclose(ll.values[0], expected.numpy(), rtol=1e-5, atol=1e-5)
    # a trained model predicts most held-out labels: their mean log likelihood beats chance (-log 10)
    assert ll.values.mean() > -np.log(10)


def test_summary_loo_waic_and_plot_posterior_run(trained, tmp_path):
    model, guide, x, y = trained
    idata = to_arviz(model, guide, x, y, num_samples=60, sites=["net.3.bias"])
    assert list(idata.posterior.data_vars) == ["net.3.bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one chain: ArviZ warns that r_hat needs more
        summary = az.summary(idata, var_names=["net.3.bias"])
        loo = az.loo(idata)
        waic = az.waic(idata)
        axes = az.plot_posterior(idata, var_names=["net.3.bias"], coords={"net.3.bias_dim_0": [0, 1, 2]})
    assert summary.shape[0] == 10
    assert np.isfinite(summary["mean"]).all()
    assert np.isfinite(loo.elpd_loo) and loo.elpd_loo < 0
    assert np.isfinite(waic.elpd_waic)
    fig = np.ravel(axes)[0].figure
    fig.savefig(tmp_path / "posterior.png")
    assert (tmp_path / "posterior.png").stat().st_size > 1000
    matplotlib.pyplot.close("all")
    idata.to_netcdf(str(tmp_path / "idata.nc"), engine="h5netcdf")
    back = az.from_netcdf(str(tmp_path / "idata.nc"), engine="h5netcdf")
    np.testing.assert_allclose(back.log_likelihood["obs"].values, idata.log_likelihood["obs"].values)


def test_bad_arguments(trained):
    model, guide, x, y = trained
    with pytest.raises(ValueError, match="unknown sites.*net.9.weight"):
        to_arviz(model, guide, x, y, num_samples=5, sites=["net.3.bias", "net.9.weight"])
    with pytest.raises(ValueError, match="num_samples"):
        to_arviz(model, guide, x, y, num_samples=0)
    with pytest.raises(ValueError, match="y must have shape"):
        to_arviz(model, guide, x, y[:-1], num_samples=5)
    with pytest.raises(ValueError, match="max_values"):
        to_arviz(model, guide, x, y, num_samples=10, sites="net.1.weight", max_values=1000)
    with pytest.raises(ValueError, match="class labels"):
        to_arviz(model, guide, x, y + 10, num_samples=5)


def test_regression_export():
    torch.manual_seed(0)
    model = BayesianRegressor(torch.nn.Linear(2, 1), IIDNormal(1.0), dataset_size=30, noise=0.5)
    guide = AutoMeanFieldNormal(model, init_scale=0.1)
    x, y = torch.randn(30, 2), torch.randn(30)
    guide.setup(x, y)
    idata = to_arviz(model, guide, x, y, num_samples=25)
    assert set(idata.posterior.data_vars) == {"net.weight", "net.bias"}
    assert idata.log_likelihood["obs"].shape == (1, 25, 30)
    assert idata.posterior_predictive["obs"].values.dtype.kind == "f"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isfinite(az.loo(idata).elpd_loo)
