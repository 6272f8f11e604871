"""Exactness: Bayesian linear regression with a Normal prior and known noise.

The exact posterior is Gaussian with precision ``L = I / s^2 + X^T X / sigma^2``
and mean ``L^-1 X^T y / sigma^2``. The optimal mean-field Gaussian has the same
mean and variances ``1 / L_ii``. A guide fitted with SVI must recover both.
"""

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

from pyro_bq import IIDNormal
from pyro_bq.models import BayesianRegressor

PRIOR_SCALE, NOISE = 1.0, 0.5


def conjugate_problem(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.tensor([[1.0, -2.0, 0.5]])
    y = (x @ w.T).squeeze(-1) + 0.3 + NOISE * torch.randn(n, generator=g)
    # design with a bias column; site order: weight (1, d), bias (1,)
    design = torch.cat([x, torch.ones(n, 1)], dim=1)
    precision = torch.eye(d + 1) / PRIOR_SCALE**2 + design.T @ design / NOISE**2
    cov = torch.linalg.inv(precision)
    mean = cov @ design.T @ y / NOISE**2
    mf_scale = precision.diagonal().rsqrt()
    return x, y, mean, mf_scale


def fit(make_guide, steps=1500, seed=0):
    x, y, mean, mf_scale = conjugate_problem()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = BayesianRegressor(nn.Linear(3, 1), IIDNormal(PRIOR_SCALE), dataset_size=len(x), noise=NOISE)
    guide = make_guide(model)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.9985}), TraceMeanField_ELBO(num_particles=4))
    for _ in range(steps):
        svi.step(x, y)
    med = guide.median()
    q = guide.quantiles([0.8413447])  # loc + 1 scale
    loc = torch.cat([med["net.weight"].reshape(-1), med["net.bias"].reshape(-1)])
    scale = torch.cat([(q["net.weight"][0] - med["net.weight"]).reshape(-1), (q["net.bias"][0] - med["net.bias"]).reshape(-1)])
    return loc, scale, mean, mf_scale


def check_meanfield_conjugate(make_guide):
    loc, scale, mean, mf_scale = fit(make_guide)
    # tolerances: posterior sd is ~0.08; means within 0.25 sd, scales within 10%
    torch.testing.assert_close(loc, mean, atol=0.02, rtol=0)
    torch.testing.assert_close(scale, mf_scale, rtol=0.10, atol=0)
