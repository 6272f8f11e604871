"""Export weight draws and predictions of a model under a guide to ArviZ."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import arviz as az
import pyro.distributions as dist
import torch

from pyro_bq._validation import check_int

from .predict import _check_num_samples, _seeded, as_inputs, is_batch_source, predict_with_labels, sample_weights

__all__ = ["to_arviz", "DEFAULT_MAX_SITE_SIZE"]

#: With ``sites=None``, :func:`to_arviz` keeps the weight sites with at most this many scalars.
DEFAULT_MAX_SITE_SIZE = 1000


def _choose_sites(draws: dict, sites, max_site_size: int) -> list[str]:
    available = list(draws)
    if sites is None:
        chosen = [s for s in available if draws[s][0].numel() <= max_site_size]
        if not chosen:  # keep the smallest one rather than none
            chosen = [min(available, key=lambda s: draws[s][0].numel())]
        return chosen
    if isinstance(sites, str):
        sites = [sites]
    if not isinstance(sites, Iterable):
        raise TypeError(f"sites must be None, a site name or a list of site names, got {type(sites).__name__}")
    sites = list(sites)
    unknown = [s for s in sites if s not in draws]
    if unknown:
        raise ValueError(f"sites names unknown sites {unknown}; the guide's latent sites are {available}")
    if not sites:
        raise ValueError(f"sites must name at least one site; the guide's latent sites are {available}")
    return sites


def to_arviz(
    model,
    guide,
    x,
    y: torch.Tensor,
    num_samples: int = 100,
    sites: Optional[Union[str, Iterable[str]]] = None,
    *,
    max_site_size: int = DEFAULT_MAX_SITE_SIZE,
    max_values: int = 10_000_000,
    batch_size: int = 500,
    sample_chunk: Optional[int] = None,
    seed: int = 0,
    method: str = "auto",
    device=None,
    logits: Optional[torch.Tensor] = None,
):
    """An :class:`arviz.InferenceData` of ``num_samples`` weight draws and their predictions.

    Groups (one chain, ``num_samples`` draws):

    * ``posterior``: the weight draws of ``sites`` (default: every site with at
      most ``max_site_size`` scalars, e.g. the biases), dims ``<site>_dim_<i>``;
    * ``posterior_predictive``: ``obs``, labels (or targets) drawn from the
      likelihood under each weight draw, dims ``("obs_id",)``;
    * ``log_likelihood``: ``obs``, ``log p(y_n | w_s)`` per draw and input, so
      :func:`arviz.loo` and :func:`arviz.waic` run;
    * ``observed_data``: ``obs`` = ``y``.

    Classification models give class labels; regression models (with
    ``noise_scale()``) give real targets with a Normal likelihood.

    :param x: inputs ``(N, ...)``, an ``InMemoryDataset`` (then ``y`` may be None), or a DataLoader /
        re-iterable of ``(x, y)`` batches (then ``y`` is None: the labels come with the batches).
    :param y: labels ``(N,)``.
    :param device: where the network runs (default: the guide's device); everything in the result is
        moved to the CPU (ArviZ holds numpy arrays).
    :param sites: site name(s) to keep in ``posterior``.
    :param max_values: upper bound on ``num_samples * (scalars in sites)``.
    :param logits: the network outputs ``(num_samples, N, ...)`` of these very draws on ``x``,
        computed elsewhere (e.g. ``details["in"]["logits"][:, :N]`` of
        :func:`~pyro_bq.uncertainty.evaluate_details` with ``keep_logits=True``, the same
        ``seed`` and ``num_samples`` and ``x`` the first ``N`` rows of its ``in_data``): the
        network is then not run again. The caller vouches that they belong to the draws of
        ``seed``; only their shape is checked. ``x`` must then be a tensor or a dataset.
    :raises ValueError: unknown sites, ``num_samples < 1``, mismatched ``y``,
        or a posterior larger than ``max_values``.

    Usage::

        idata = to_arviz(model, guide, test.x[:500], test.y[:500], num_samples=200)
        az.summary(idata, var_names=["net.fc3.bias"]); az.loo(idata)
    """
    streamed = is_batch_source(x)
    if streamed and y is not None:
        raise ValueError("y must be None when x is a DataLoader or a source of (x, y) batches: the labels come "
                         "with the batches")
    if y is None and isinstance(getattr(x, "y", None), torch.Tensor):
        y = x.y
    x = x if streamed else as_inputs("x", x)
    num_samples = _check_num_samples(num_samples)
    max_site_size = check_int("max_site_size", max_site_size, low=1)
    max_values = check_int("max_values", max_values, low=1)
    if not streamed:
        _check_labels(y, x.shape[0])
    regression = hasattr(model, "noise_scale")

    draws = sample_weights(model, guide, num_samples, x, seed=seed)
    chosen = _choose_sites(draws, sites, max_site_size)
    size = num_samples * sum(draws[s][0].numel() for s in chosen)
    if size > max_values:
        raise ValueError(
            f"the posterior of sites {chosen} would hold {size} values, more than max_values={max_values}; "
            "choose fewer sites, fewer num_samples, or raise max_values"
        )
    if logits is None:
        out, read = predict_with_labels(model, guide, x, samples=draws, batch_size=batch_size,
                                        sample_chunk=sample_chunk, method=method,
                                        site="loc" if regression else "logits", device=device)
    else:
        out, read = _given_outputs(logits, x, num_samples, streamed), None
    out, y = out.cpu(), (y if y is not None else read).cpu()
    _check_labels(y, out.shape[1])
    draws = {s: draws[s].cpu() for s in chosen}
    log_lik, predicted = _likelihood(model, out, y, regression, seed + 1)

    posterior, coords, dims = _posterior_layout(draws, chosen, num_samples, y.shape[0])
    return az.from_dict(
        posterior=posterior,
        posterior_predictive={"obs": _chain(predicted)},
        log_likelihood={"obs": _chain(log_lik)},
        observed_data={"obs": y.detach().cpu().numpy()},
        coords=coords,
        dims=dims,
        attrs={"inference_library": "pyro", "creation_library": "pyro_bq", "num_weight_draws": num_samples},
    )


def _given_outputs(logits, x, num_samples: int, streamed: bool) -> torch.Tensor:
    """``logits`` checked as the outputs of ``num_samples`` draws on the inputs ``x``."""
    if streamed:
        raise ValueError("logits= needs x as a tensor or a dataset (a source of batches has no known length)")
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        raise TypeError(f"logits must be a tensor of network outputs (num_samples, N, ...), got "
                        f"{type(logits).__name__ if not isinstance(logits, torch.Tensor) else tuple(logits.shape)}")
    if tuple(logits.shape[:2]) != (num_samples, x.shape[0]):
        raise ValueError(f"logits must have shape ({num_samples}, {x.shape[0]}, ...) for num_samples={num_samples} "
                         f"draws on the {x.shape[0]} inputs of x, got {tuple(logits.shape)}")
    return logits.detach().contiguous()


def _check_labels(y, n: int) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor of labels or targets, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"y must have shape ({n},) to match x, got {tuple(y.shape)}")


def _chain(t: torch.Tensor):
    """``t`` as a numpy array with a leading chain dimension of 1."""
    return t.detach().cpu().numpy()[None]


def _likelihood(model, out: torch.Tensor, y: torch.Tensor, regression: bool, seed: int):
    """``(log p(y | w_s) per draw and input, outcomes drawn from the likelihood)`` under ``seed``."""
    with _seeded(seed), torch.no_grad():
        if regression:
            if not y.is_floating_point():
                raise TypeError(f"y must hold real targets for a regression model, got dtype {y.dtype}")
            lik = dist.Normal(out, model.noise_scale().to(out))
            log_lik = lik.log_prob(y.to(out))
        else:
            if y.is_floating_point():
                raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
            num_classes = out.shape[-1]
            if int(y.min()) < 0 or int(y.max()) >= num_classes:
                raise ValueError(f"y must hold class labels in [0, {num_classes - 1}]")
            lik = dist.Categorical(logits=out)
            log_lik = lik.log_prob(y.long())
        return log_lik, lik.sample()


def _posterior_layout(draws: dict, chosen: list, num_samples: int, num_obs: int):
    """``(posterior arrays, coords, dims)`` of the chosen sites for :func:`arviz.from_dict`."""
    posterior = {s: _chain(draws[s].reshape(num_samples, *draws[s].shape[1:])) for s in chosen}
    dims = {s: [f"{s}_dim_{i}" for i in range(draws[s].dim() - 1)] for s in chosen}
    dims["obs"] = ["obs_id"]
    coords = {"obs_id": list(range(num_obs))}
    for s in chosen:
        for i, n in enumerate(draws[s].shape[1:]):
            coords[f"{s}_dim_{i}"] = list(range(n))
    return posterior, coords, dims
