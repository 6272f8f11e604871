"""Bayesian classifier and regressor models: stock Pyro models over a network with priors.

Both are :class:`~pyro.nn.PyroModule`s whose ``forward(x, y=None)`` is the Pyro
model. The likelihood sits in ``pyro.plate("data", dataset_size,
subsample_size=len(x))``, so the log likelihood of a minibatch is scaled to the
whole dataset and a minibatch ELBO is an unbiased estimate of the full one.
The weight sites are named after the network's parameters with the prefix
``net.``, e.g. ``net.conv1.weight``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Mapping, Optional, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.func import functional_call, vmap

from pyro_bq._validation import check_int, check_module, check_positive
from pyro_bq.priors import Prior, bq_priors, prior_sites
from pyro_bq.inference.folded import FoldedNet, NotFoldable

__all__ = ["BayesianModel", "BayesianClassifier", "BayesianRegressor"]

#: ways :meth:`BayesianModel.batched_forward` evaluates many weight samples
_STRATEGIES = ("auto", "folded", "vmap", "loop")


class BayesianModel(PyroModule):
    """Shared machinery: priors on ``net``, minibatch scaling, batched prediction.

    Subclasses define the likelihood in :meth:`forward`.
    """

    def __init__(self, net: nn.Module, prior: Prior, dataset_size: int, *, expose=None):
        super().__init__()
        check_module("net", net)
        self.dataset_size = check_int("dataset_size", dataset_size, low=1)
        self.net = bq_priors(net, prior, expose=expose)
        self.prior = prior
        # A parameter-free twin of the network for vectorized prediction with
        # torch.func; every tensor it uses is supplied at call time.
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
    def _check_inputs(self, x, y=None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[0] < 1:
            raise ValueError(f"x must have shape (batch, ...features) with batch >= 1, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
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
    def _shape_errors(self, x: torch.Tensor):
        """Turn torch's shape/size RuntimeErrors from the network into a ValueError naming ``x``."""
        try:
            yield
        except RuntimeError as err:
            if "shape" in str(err) or "size" in str(err):
                raise ValueError(
                    f"x has shape {tuple(x.shape)}, which {type(self._template).__name__} cannot take: {err}"
                ) from err
            raise

    def _run_net(self, x: torch.Tensor) -> torch.Tensor:
        with self._shape_errors(x):
            return self.net(x)

    def _check_samples(self, samples, sites: list[str]) -> None:
        """Check ``samples`` of :meth:`batched_forward`: shapes and dtypes only (no pass over the values)."""
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

    # -- vectorized prediction ---------------------------------------------------------
    def _memo(self, name: str) -> dict:
        """A dict kept on this model (outside the module's state) for values remembered per input shape."""
        memo = self.__dict__.get(name)
        if memo is None:
            memo = {}
            object.__setattr__(self, name, memo)
        return memo

    def _folded_net(self):
        """The network traced for folded evaluation, or ``None`` where it uses unsupported operations."""
        folded = self.__dict__.get("_folded")
        if folded is None:
            try:
                folded = FoldedNet(self._template)
            except NotFoldable:
                folded = False
            object.__setattr__(self, "_folded", folded)
        return folded or None

    def batched_forward(self, samples: Mapping[str, torch.Tensor], x: torch.Tensor, *,
                        strategy: str = "auto") -> torch.Tensor:
        """Network outputs for ``S`` weight samples at once: shape ``(S, N, ...)``.

        ``samples`` maps every weight site to a tensor with a leading sample
        dimension ``S``. Deterministic parameters and buffers (e.g. BatchNorm)
        are shared across samples. The network runs in eval mode. Three ways to
        evaluate, all giving the same outputs up to float rounding (tested), and
        a default that picks one:

        * ``"folded"``: all samples in one pass with the samples folded into the
          tensors (:class:`~pyro_bq.inference.folded.FoldedNet`: grouped
          convolutions, stacked Linear weights), where the network's operations allow it;
        * ``"vmap"``: one :func:`torch.func.vmap` call over the samples;
        * ``"loop"``: one ordinary network pass per sample, with its weights swapped in;
        * ``"auto"`` (default): the faster of ``folded`` (or ``vmap`` where the
          network cannot be folded) and ``loop`` for this input shape and ``S``,
          timed on the first call with them (each twice) and remembered; ``loop``,
          which holds one sample's activations at a time, unless the other is
          more than 5% faster. Which one wins
          depends on the CPU and its BLAS/oneDNN kernels: on one 2-core machine
          the folded LeNet-5 pass of 32 samples was 1.09x the time of 32
          deterministic passes, on another 1.3x to 1.5x while the loop was 0.98x.

        :raises ValueError: for an unknown ``strategy``, or ``"folded"`` on a network that cannot be folded.
        """
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        self._check_inputs(x)
        sites = self.weight_sites
        self._check_samples(samples, sites)
        shared = {**dict(self.net.named_parameters()), **dict(self.net.named_buffers())}
        batched = {name[len("net."):]: samples[name] for name in sites}
        num = next(iter(batched.values())).shape[0]
        with self._shape_errors(x):
            if strategy == "auto":
                if num == 1:
                    return self._forward_loop(batched, shared, x)
                return self._forward_auto(batched, shared, x, num)
            if strategy == "folded":
                if self._folded_net() is None:
                    raise ValueError(f"strategy='folded': {type(self._template).__name__} uses operations the "
                                     "folded pass does not handle; use strategy='vmap' or 'auto'")
                return self._forward_folded(batched, shared, x)
            if strategy == "loop":
                return self._forward_loop(batched, shared, x)
            return self._forward_vmap(batched, shared, x)

    def _forward_vmap(self, batched, shared, x):
        return vmap(lambda params: functional_call(self._template, {**shared, **params}, (x,)))(batched)

    def _forward_folded(self, batched, shared, x):
        folded = self._folded_net()
        if folded is not None:
            try:
                return folded(batched, {k: v for k, v in shared.items() if k not in batched}, x)
            except NotFoldable:  # an operation only seen at run time: use vmap from now on
                object.__setattr__(self, "_folded", False)
        return self._forward_vmap(batched, shared, x)

    def _forward_loop(self, batched, shared, x):
        num = next(iter(batched.values())).shape[0]
        outs = [functional_call(self._template, {**shared, **{k: v[i] for k, v in batched.items()}}, (x,))
                for i in range(num)]
        return torch.stack(outs)

    def _forward_auto(self, batched, shared, x, num):
        key = (tuple(x.shape), x.dtype, x.device, num, torch.is_grad_enabled(), torch.get_num_threads())
        cache = self._memo("_strategies")
        chosen = cache.get(key)
        one_pass = "folded" if self._folded_net() is not None else "vmap"
        runners = {"loop": self._forward_loop, one_pass: self._forward_folded}
        if chosen is not None:
            return runners[chosen](batched, shared, x)
        # each twice (a first call pays one-off set-up costs), in the order a b b a; the
        # one-pass way holds all samples' activations at once, so it must win by 5%
        times, outs = {}, {}
        for name in ("loop", one_pass, one_pass, "loop"):
            start = time.perf_counter()
            outs[name] = runners[name](batched, shared, x)
            times[name] = min(times.get(name, math.inf), time.perf_counter() - start)
        chosen = cache[key] = one_pass if times[one_pass] < 0.95 * times["loop"] else "loop"
        return outs[chosen]


class BayesianClassifier(BayesianModel):
    """Bayesian classifier with a categorical likelihood over ``net``'s logits.

    :param net: a ``torch.nn.Module`` that maps ``x`` to logits ``(N, C)``.
    :param prior: a :class:`~pyro_bq.priors.Prior` for the weights.
    :param dataset_size: number of training examples; minibatch likelihoods are
        scaled by ``dataset_size / len(x)``.
    :param expose: which parameters get priors, as in :func:`~pyro_bq.bq_priors`.

    Sites: the weights ``net.*``, ``logits`` (deterministic) and ``obs``.

    Usage::

        model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=60000)
        guide = AutoMeanFieldNormal(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
        svi.step(x, y)
    """

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

    Sites: the weights ``net.*``, ``loc`` (deterministic) and ``obs``.
    The network's output of shape ``(N,)`` or ``(N, 1)`` is the mean.

    Usage::

        model = BayesianRegressor(nn.Linear(3, 1), IIDNormal(1.0), dataset_size=100, noise=0.1)
    """

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
        if loc.dim() == 2 and loc.shape[-1] == 1:
            loc = loc.squeeze(-1)
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

    def batched_forward(self, samples, x, *, strategy: str = "auto"):
        out = super().batched_forward(samples, x, strategy=strategy)
        return out.squeeze(-1) if out.dim() == 3 and out.shape[-1] == 1 else out

    def noise_scale(self) -> torch.Tensor:
        """The observation noise scale (a detached scalar tensor)."""
        return self.noise.detach() if isinstance(self.noise, torch.Tensor) else torch.as_tensor(self.noise)
