"""Bayesian classifier and regressor models: stock Pyro models over a network with priors.

Both are :class:`~pyro.nn.PyroModule`s whose ``forward(x, y=None)`` is the Pyro
model. The likelihood sits in ``pyro.plate("data", dataset_size,
subsample_size=len(x))``, so the log likelihood of a minibatch is scaled to the
whole dataset and a minibatch ELBO is an unbiased estimate of the full one.
The weight sites are named after the network's parameters with the prefix
``net.``, e.g. ``net.conv1.weight``. :meth:`BayesianModel.functional_net` gives the
network as a function of its weights, which :mod:`pyro_bq.inference.prediction`
evaluates for many weight samples at once.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Mapping, Optional, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule, PyroParam
from torch import nn

from pyro_bq._validation import check_int, check_module, check_positive
from pyro_bq.priors import Prior, bq_priors, prior_sites

__all__ = ["BayesianModel", "BayesianClassifier", "BayesianRegressor", "check_inputs"]


def check_inputs(name: str, x) -> torch.Tensor:
    """``x`` checked as network inputs: a floating-point tensor ``(N, ...features)`` with ``N >= 1``.

    :raises TypeError, ValueError: naming ``name``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, ...features) with N >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


class BayesianModel(PyroModule):
    """Shared machinery: priors on ``net``, minibatch scaling, the network as a function of its weights.

    Subclasses define the likelihood in :meth:`forward` and name its deterministic
    output site in :attr:`output_site`.
    """

    #: the deterministic site holding the network's output (``"logits"``, ``"loc"``)
    output_site: str

    def __init__(self, net: nn.Module, prior: Prior, dataset_size: int, *, expose=None):
        super().__init__()
        check_module("net", net)
        self.dataset_size = check_int("dataset_size", dataset_size, low=1)
        self.net = bq_priors(net, prior, expose=expose)
        self.prior = prior
        # A parameter-free twin of the network for functional_net; every tensor
        # it uses is supplied at call time.
        object.__setattr__(self, "_template", copy.deepcopy(net).to("meta").eval())
        object.__setattr__(
            self, "_initial_params", {f"net.{k}": v.detach().clone() for k, v in net.named_parameters()}
        )

    # -- sites -----------------------------------------------------------------
    @property
    def weight_sites(self) -> list[str]:
        """Names of the latent weight sites, e.g. ``['net.conv1.weight', ...]``."""
        return [f"net.{name}" for name in prior_sites(self.net)]

    def initial_params(self) -> dict[str, torch.Tensor]:
        """The network's weights as given to the constructor, keyed by site name."""
        return {k: v for k, v in self._initial_params.items() if k in set(self.weight_sites)}

    # -- input checks ------------------------------------------------------------
    def _weight_dtype(self) -> Optional[torch.dtype]:
        """The dtype of the network's weights: its deterministic tensors' now, else its weights' at construction."""
        for t in (*self.net.parameters(), *self.net.buffers(), *self._initial_params.values()):
            if t.is_floating_point():
                return t.dtype
        return None

    def _check_inputs(self, x, y=None, dtype: Optional[torch.dtype] = None) -> None:
        """Check ``x`` (and ``y``); ``x`` must have ``dtype`` (default: the network's weight dtype)."""
        check_inputs("x", x)
        dtype = dtype or self._weight_dtype()
        if dtype is not None and x.dtype != dtype:
            raise TypeError(f"x has dtype {x.dtype} but the network's weights are {dtype}: pass x.to({dtype}), "
                            f"or build the model from a network converted with net.to({x.dtype})")
        if y is not None:
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"y must be a torch.Tensor or None, got {type(y).__name__}")
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has {y.shape[0]} rows but x has {x.shape[0]}; they must match")

    def _data_plate(self, x: torch.Tensor) -> pyro.plate:
        """The minibatch plate, scaled by ``dataset_size / len(x)``.

        The minibatch *is* the subsample, so its indices are given explicitly
        (``arange``) instead of drawing a random permutation of the whole
        dataset at every step (which the model never uses).
        """
        n = x.shape[0]
        if n > self.dataset_size:
            return pyro.plate("data", size=self.dataset_size, subsample_size=n)
        return pyro.plate("data", size=self.dataset_size, subsample=torch.arange(n, device=x.device))

    @contextlib.contextmanager
    def shape_errors(self, x: torch.Tensor):
        """Turn torch's shape/size/dim RuntimeErrors from the network into a ValueError naming ``x``."""
        try:
            yield
        except RuntimeError as err:
            if any(word in str(err) for word in ("shape", "size", "dim")):
                raise ValueError(
                    f"x has shape {tuple(x.shape)}, which {type(self._template).__name__} cannot take: {err}"
                ) from err
            raise

    def _run_net(self, x: torch.Tensor) -> torch.Tensor:
        with self.shape_errors(x):
            return self.net_output(self.net(x))

    def net_output(self, out: torch.Tensor, sample_dims: int = 0) -> torch.Tensor:
        """The value of :attr:`output_site` from the network's output ``out`` with ``sample_dims`` leading
        sample dimensions: ``out`` itself here; a subclass may reshape it."""
        return out

    def _check_samples(self, samples, sites: list[str]) -> None:
        """Check ``samples`` of :meth:`functional_net`: shapes and dtypes only (no pass over the values)."""
        if not isinstance(samples, Mapping):
            raise TypeError(f"samples must be a dict {{site name: tensor of shape (S, *site_shape)}}, "
                            f"got {type(samples).__name__}")
        missing = [s for s in sites if s not in samples]
        if missing:
            raise ValueError(f"samples lacks weight sites {missing}; it must hold every site of {sites}")
        draws = None
        for name in sites:
            value = samples[name]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"samples[{name!r}] must be a floating-point tensor of shape (S, *site_shape), "
                                f"got {type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}")
            known = self._initial_params.get(name)
            shape = tuple(known.shape) if known is not None else tuple(value.shape[1:])
            if value.dim() != len(shape) + 1 or tuple(value.shape[1:]) != shape:
                raise ValueError(f"samples[{name!r}] must have shape (S, *{shape}), got {tuple(value.shape)}")
            if draws is None:
                draws = value.shape[0]
            elif value.shape[0] != draws:
                raise ValueError(f"every entry of samples must have the same number of draws S; "
                                 f"samples[{name!r}] has {value.shape[0]}, an earlier one {draws}")
        if not draws:
            raise ValueError("samples must hold at least one draw (S >= 1)")

    def functional_net(self, samples: Mapping[str, torch.Tensor], x: torch.Tensor):
        """The network as a function of its weights, for evaluation with :mod:`torch.func`.

        :param samples: weight draws ``{site: (S, *site_shape)}`` holding every weight site.
        :param x: inputs ``(N, ...)``.
        :returns: ``(net, sampled, shared)``: a parameter-free copy of ``net`` in eval mode
            (on the meta device: every tensor is supplied at call time), the draws keyed by
            the network's parameter names, and the network's other parameters and buffers.
        :raises TypeError, ValueError: for ``x`` or ``samples`` of the wrong type or shape.

        Usage::

            net, sampled, shared = model.functional_net(draws, x)
            out = functional_call(net, {**shared, **{k: v[0] for k, v in sampled.items()}}, (x,))
        """
        sites = self.weight_sites
        self._check_samples(samples, sites)
        self._check_inputs(x, dtype=samples[sites[0]].dtype)
        shared = {**dict(self.net.named_parameters()), **dict(self.net.named_buffers())}
        return self._template, {name[len("net."):]: samples[name] for name in sites}, shared


class BayesianClassifier(BayesianModel):
    """Bayesian classifier with a categorical likelihood over ``net``'s logits.

    :param net: a ``torch.nn.Module`` that maps ``x`` to logits ``(N, C)``.
    :param prior: a :class:`~pyro_bq.priors.Prior` for the weights.
    :param dataset_size: number of training examples; minibatch likelihoods are
        scaled by ``dataset_size / len(x)``.
    :param expose: which parameters get priors, as in :func:`~pyro_bq.bq_priors`.

    Sites: the weights ``net.*``, ``logits`` (deterministic, :attr:`output_site`) and ``obs``.

    Usage::

        model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=60000)
        guide = AutoMeanFieldNormal(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
        svi.step(x, y)
    """

    output_site = "logits"

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_inputs(x, y)
        logits = self._run_net(x)
        if logits.dim() != 2:
            raise ValueError(f"net must return logits of shape (N, C), got {tuple(logits.shape)}")
        if y is not None:
            if y.dtype not in (torch.int64, torch.int32, torch.uint8):
                raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
            if y.dim() != 1:
                raise ValueError(f"y must be a vector of class labels, got shape {tuple(y.shape)}")
            if is_validation_enabled():  # one small reduction; off with pyro.enable_validation(False), like Pyro's own checks
                lo, hi = (int(v) for v in torch.aminmax(y))
                if lo < 0 or hi >= logits.shape[-1]:
                    raise ValueError(f"y must hold class labels in [0, {logits.shape[-1]}) for the network's "
                                     f"{logits.shape[-1]} classes, got labels in [{lo}, {hi}]")
        with self._data_plate(x):
            pyro.deterministic("logits", logits, event_dim=1)
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


class BayesianRegressor(BayesianModel):
    """Bayesian regressor with a Gaussian likelihood.

    :param noise: a positive float for fixed observation noise, or ``"learned"``
        for a noise scale learned as a point estimate (a positive ``PyroParam``
        named ``noise``).
    :param noise_init: starting value of a learned noise scale.

    Sites: the weights ``net.*``, ``loc`` (deterministic, :attr:`output_site`) and ``obs``.
    The network's output of shape ``(N,)`` or ``(N, 1)`` is the mean.

    Usage::

        model = BayesianRegressor(nn.Linear(3, 1), IIDNormal(1.0), dataset_size=100, noise=0.1)
    """

    output_site = "loc"

    def __init__(
        self,
        net: nn.Module,
        prior: Prior,
        dataset_size: int,
        noise: Union[float, str] = "learned",
        *,
        noise_init: float = 1.0,
        expose=None,
    ):
        super().__init__(net, prior, dataset_size, expose=expose)
        noise_init = check_positive("noise_init", noise_init)  # checked even when unused (noise fixed)
        if isinstance(noise, str):
            if noise != "learned":
                raise ValueError(f"noise must be a positive float or 'learned', got {noise!r}")
            self.noise = PyroParam(torch.tensor(noise_init), constraints.positive)
            self.learned_noise = True
        else:
            self.register_buffer("noise", torch.tensor(check_positive("noise", noise)))
            self.learned_noise = False

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_inputs(x, y)
        loc = self._run_net(x)
        if loc.dim() != 1:
            raise ValueError(f"net must return one output per example, got shape {tuple(loc.shape)}")
        if y is not None:
            if not y.is_floating_point():
                raise TypeError(f"y must be a floating-point tensor of targets, got dtype {y.dtype}")
            if y.shape != loc.shape and y.shape != (*loc.shape, 1):
                raise ValueError(f"y must hold one target per example, shape ({loc.shape[0]},) or "
                                 f"({loc.shape[0]}, 1), got {tuple(y.shape)}")
            y = y.reshape(loc.shape)
        noise = self.noise
        with self._data_plate(x):
            pyro.deterministic("loc", loc)
            pyro.sample("obs", dist.Normal(loc, noise), obs=y)
        return loc

    def net_output(self, out: torch.Tensor, sample_dims: int = 0) -> torch.Tensor:
        """The mean ``loc``: the network's output ``(*samples, N)``, or ``(*samples, N, 1)`` squeezed."""
        return out.squeeze(-1) if out.dim() == sample_dims + 2 and out.shape[-1] == 1 else out

    def noise_scale(self) -> torch.Tensor:
        """The observation noise scale (a detached scalar tensor)."""
        return self.noise.detach() if isinstance(self.noise, torch.Tensor) else torch.as_tensor(self.noise)
