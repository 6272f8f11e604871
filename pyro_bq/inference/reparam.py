"""Local reparameterization and Flipout as Pyro effect handlers.

Both handlers change *how a layer's output is sampled*, never *what is
sampled at a site*: every weight site is still drawn from the guide and its
value still enters the log-density (or KL) terms of the ELBO, so Pyro's
estimators stay unbiased. What changes is the likelihood term:

* :class:`LocalReparameterization` (Kingma et al. 2015): a ``Linear`` or
  ``Conv2d`` layer whose weight has a Gaussian guide ``Normal(mu, sigma)``
  outputs ``mean + sqrt(var) * eps`` with ``mean = layer(x; mu)`` and
  ``var = layer(x**2; sigma**2)`` and a fresh ``eps`` per example and unit.
  Each example's pre-activations have exactly the distribution they have under
  weight sampling, but the noise is independent across the examples of a
  minibatch, which lowers the variance of the gradient. It costs two
  matrix products (or convolutions) per layer instead of one.
* :class:`Flipout` (Wen et al. 2018): the layer outputs
  ``layer(x; mu) + layer(x * s_in; w - mu) * s_out`` with random signs
  ``s_in``, ``s_out`` per example, where ``w`` is the sampled weight. Each
  example sees a weight perturbation with the same (symmetric) distribution,
  pseudo-independent across examples. Also two products per layer.

How it works: while a handler is active it tags each freshly sampled weight
value with the ``(loc, scale)`` of the Gaussian it was drawn from (in SVI and
``Predictive`` the guide draws it and the model replays it), and
``nn.Linear.forward`` / ``nn.Conv2d.forward`` use the tag when their weight
carries one. Outside a handler nothing changes.

Supported: :class:`~pyro_bq.models.BayesianClassifier` /
:class:`~pyro_bq.models.BayesianRegressor` (any model built with
:func:`~pyro_bq.bq_priors`), guides whose site distribution is a plain
``Normal`` (:class:`~pyro_bq.guides.AutoMeanFieldNormal`, any
:class:`~pyro_bq.guides.AutoGaussianSites` that does not override
``get_posterior``, Pyro's ``AutoNormal`` is *not* one: it samples through
auxiliary Delta sites), ``Trace_ELBO`` and ``TraceMeanField_ELBO``, ``Predictive``.

Fallbacks (documented, never a wrong answer):

* a guide site that is not a plain Normal (e.g. a quantized guide whose samples
  lie on a grid, a Laplace, a Delta): local reparameterization and Flipout are
  not valid for it (its pre-activations are not Gaussian / its perturbation is
  not sign-symmetric around ``loc``); that layer uses the sampled weight as
  usual and the handler warns once per site (or raises with ``strict=True``);
* layer types other than ``nn.Linear`` and ``nn.Conv2d`` (or a subclass that
  overrides ``forward``, or a network calling ``F.linear`` directly) use the
  sampled weight;
* a layer whose weight sample is used a second time within the same
  activation of the handler (weight sharing) raises :class:`ValueError`:
  independent noise per use would be wrong there.

Usage::

    model = BayesianClassifier(LeNet5(), IIDNormal(1.0), dataset_size=60000)
    guide = AutoMeanFieldNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    with LocalReparameterization():
        svi.step(x, y)
    # or wrap both once (the same handler instance must see model and guide):
    lr = LocalReparameterization()
    svi = SVI(lr(model), lr(guide), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    # Handled keeps the wrapped object's attributes (median, state_dict, functional_net, ...):
    svi = SVI(Handled(model, lr), Handled(guide, lr), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())

Measured cost (``benchmarks/harness.py --reps 30 --threads 2``, 2 CPU cores,
batch 128, median ms per SVI step): LeNet-5 13.9 with weight sampling, 28.1
with local reparameterization, 16.0 with it on Linear layers only, 24.7 with
flipout; the 784-400-400-10 MLP 14.6, 19.1 and 23.8. Both handlers cost more
per step than weight sampling (two products per layer instead of one, most
on convolutions), so weight sampling (no handler) is pyro_bq's default for
every layer type; use a handler for its lower gradient variance (measured
about 0.15x the gradient variance of weight sampling for local
reparameterization, 0.3x for flipout, in ``tests/test_reparam.py``), and
``layers=("linear",)`` on convolutional nets.
"""

from __future__ import annotations

import threading
import warnings
from typing import Iterable, NamedTuple, Optional

import pyro.distributions as dist
import torch
import torch.distributions as tdist
import torch.nn.functional as F
from pyro.poutine.messenger import Messenger
from torch import nn

from pyro_bq.distributions import ConstNormal, FusedNormal

__all__ = ["LocalReparameterization", "Flipout", "Handled", "GaussianTag", "GAUSSIAN_TYPES", "gaussian_tag"]

#: Distribution classes whose samples are exactly ``loc + scale * eps``; a
#: subclass is *not* trusted (it may change what a sample is) unless added here.
GAUSSIAN_TYPES: set = {dist.Normal, tdist.Normal, ConstNormal, FusedNormal}

_TAG = "_bq_gaussian"
_TOKEN = "_bq_fresh"


class GaussianTag(NamedTuple):
    """What a handler attaches to a weight sample: the Gaussian it came from."""

    loc: torch.Tensor
    scale: torch.Tensor
    uses: list  # one-element counter, mutable


class _NotGaussian(NamedTuple):
    name: str
    fn: str


def _describe(fn) -> str:
    base = fn.base_dist if isinstance(fn, tdist.Independent) else fn
    return type(base).__name__


def gaussian_tag(value: torch.Tensor) -> Optional[GaussianTag]:
    """The :class:`GaussianTag` of a sampled weight, or ``None``."""
    tag = getattr(value, _TAG, None)
    return tag if isinstance(tag, GaussianTag) else None


def _gaussian_params(fn) -> Optional[tuple]:
    """``(loc, scale)`` if ``fn`` is a plain Normal with no batch dims, else None."""
    if isinstance(fn, tdist.Independent):
        if len(fn.batch_shape) != 0:  # plate dims (e.g. vectorized particles): not a layer weight
            return None
        fn = fn.base_dist
    if type(fn) not in GAUSSIAN_TYPES:
        return None
    return fn.loc, fn.scale


# -- the layer overrides --------------------------------------------------------------
_STATE = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_COUNT = 0
_ORIGINAL = {}


def _active():
    stack = getattr(_STATE, "stack", None)
    return stack[-1] if stack else None


def _override(cls, product):
    """The ``forward`` of layer type ``cls`` while patched: ``product(layer)`` is its
    ``(input, weight, bias) -> output`` operation (``F.linear``, a conv's ``_conv_forward``)."""

    def forward(self, input):
        handler = _active()
        if handler is None or not handler._covers(self):
            return _ORIGINAL[cls](self, input)
        weight, bias, op = self.weight, self.bias, product(self)
        out = handler._layer(input, weight, bias, op, self)
        return op(input, weight, bias) if out is None else out

    return forward


_OVERRIDES = {nn.Linear: _override(nn.Linear, lambda layer: F.linear),
              nn.Conv2d: _override(nn.Conv2d, lambda layer: layer._conv_forward)}


def _patch():
    global _PATCH_COUNT
    with _PATCH_LOCK:
        if _PATCH_COUNT == 0:
            for cls, fwd in _OVERRIDES.items():
                _ORIGINAL.setdefault(cls, cls.forward)
                cls.forward = fwd
        _PATCH_COUNT += 1


def _unpatch():
    global _PATCH_COUNT
    with _PATCH_LOCK:
        _PATCH_COUNT -= 1
        if _PATCH_COUNT == 0:
            for cls in _OVERRIDES:
                cls.forward = _ORIGINAL[cls]


_LAYER_NAMES = {"linear": nn.Linear, "conv2d": nn.Conv2d}


class _WeightNoiseMessenger(Messenger):
    """Shared machinery of :class:`LocalReparameterization` and :class:`Flipout`."""

    def __init__(self, layers: Iterable = ("linear", "conv2d"), *, strict: bool = False):
        super().__init__()
        if isinstance(layers, (str, type)) or not isinstance(layers, Iterable):
            raise TypeError(
                f"layers must be a collection drawn from 'linear', 'conv2d' (or nn.Linear, nn.Conv2d), "
                f"got {layers!r}"
            )
        chosen = []
        for item in layers:
            cls = _LAYER_NAMES.get(item) if isinstance(item, str) else item
            if cls not in _OVERRIDES:
                raise ValueError(
                    f"layers: {item!r} is not supported; choose from 'linear', 'conv2d' "
                    "(other layer types always use the sampled weight)"
                )
            chosen.append(cls)
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.layers = tuple(dict.fromkeys(chosen))
        self.strict = strict
        self._warned: set = set()

    def __repr__(self) -> str:
        names = [k for k, v in _LAYER_NAMES.items() if v in self.layers]
        return f"{type(self).__name__}(layers={tuple(names)!r}, strict={self.strict})"

    # -- activation ------------------------------------------------------------------
    def __enter__(self):
        out = super().__enter__()
        _patch()
        vars(_STATE).setdefault("stack", []).append(self)  # this thread's stack of active handlers
        return out

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            stack = _STATE.stack
            innermost = [i for i, handler in enumerate(stack) if handler is self][-1:]
            for i in innermost:
                del stack[i]
        finally:
            _unpatch()
        return super().__exit__(exc_type, exc_value, traceback)

    def _covers(self, module) -> bool:
        return isinstance(module, self.layers)

    # -- tagging fresh samples ------------------------------------------------------
    def _pyro_sample(self, msg) -> None:
        # A value that is None now is sampled from msg["fn"] unless a handler
        # processed later (e.g. replay) fills it in; replay replaces
        # msg["infer"], which drops the token, so only truly fresh samples are tagged.
        if msg["value"] is None and not msg["is_observed"]:
            token = object()
            msg["infer"] = dict(msg["infer"], **{_TOKEN: token})
            msg[_TOKEN] = token

    def _pyro_post_sample(self, msg) -> None:
        token = msg.pop(_TOKEN, None)
        fresh = token is not None and msg["infer"].get(_TOKEN) is token
        if fresh:
            msg["infer"].pop(_TOKEN, None)
        value = msg["value"]
        if not fresh or msg["is_observed"] or not isinstance(value, torch.Tensor):
            return
        if hasattr(value, _TAG) or not value.is_floating_point():
            return
        params = _gaussian_params(msg["fn"])
        if params is not None:
            try:
                setattr(value, _TAG, GaussianTag(params[0].expand(value.shape), params[1].expand(value.shape), [0]))
                return
            except RuntimeError:
                pass
        # remembered so that a layer using this sample can warn (or raise)
        setattr(value, _TAG, _NotGaussian(msg["name"], _describe(msg["fn"])))

    def _not_gaussian(self, info: "_NotGaussian") -> None:
        text = (
            f"{type(self).__name__}: site {info.name!r} is sampled from {info.fn}, "
            "not a plain Normal, so its pre-activations are not Gaussian (or its perturbation not "
            "sign-symmetric); the layer uses the sampled weight instead (weight sampling)"
        )
        if self.strict:
            raise ValueError(text + "; strict=True forbids this fallback")
        if info.name not in self._warned:
            self._warned.add(info.name)
            warnings.warn(text, UserWarning, stacklevel=3)

    # -- the layer ---------------------------------------------------------------------
    def _layer(self, x, weight, bias, op, module):
        """The layer output under the handler, or None to use the sampled weight."""
        tag = getattr(weight, _TAG, None)
        if tag is None or not isinstance(x, torch.Tensor):
            return None
        if isinstance(tag, _NotGaussian):
            self._not_gaussian(tag)
            return None
        tag.uses[0] += 1
        if tag.uses[0] > 1:
            raise ValueError(
                f"{type(self).__name__}: the weight sample of {type(module).__name__} "
                f"{tuple(weight.shape)} is used twice in one forward pass (a shared layer); "
                "independent noise per use would give a wrong answer. Run that model "
                "without the handler (weight sampling)."
            )
        btag = getattr(bias, _TAG, None) if bias is not None else None
        if isinstance(btag, _NotGaussian):
            btag = None  # a non-Gaussian bias sample is simply added as sampled
        return self._noisy(x, weight, tag, bias, btag, op)

    def _noisy(self, x, weight, tag, bias, btag, op):
        raise NotImplementedError


class LocalReparameterization(_WeightNoiseMessenger):
    """Effect handler: sample pre-activations of Linear/Conv2d layers, not weights.

    :param layers: which layer types to reparameterize: any of ``"linear"``,
        ``"conv2d"`` (default both). Measured on 2 CPU cores (see
        ``benchmarks/harness.py``), local reparameterization costs more than
        weight sampling for convolutions; ``layers=("linear",)`` keeps the
        convolutions on weight sampling.
    :param strict: raise ``ValueError`` instead of warning when a weight's guide
        is not a plain Normal.
    :raises TypeError, ValueError: for a bad ``layers`` or ``strict``.

    Activate it around *both* the guide and the model (a ``with`` block around
    ``svi.step``/``Predictive``, or the same instance as decorator on both).

    Usage::

        with LocalReparameterization():
            loss = svi.step(x, y)
    """

    def _noisy(self, x, weight, tag, bias, btag, op):
        mean_b = btag.loc if btag is not None else bias
        var_b = btag.scale.square() if btag is not None else None
        mean = op(x, tag.loc, mean_b)
        var = op(x.square(), tag.scale.square(), var_b)
        # clamp: zero-variance outputs (e.g. dead ReLU inputs) must not give inf gradients
        return torch.addcmul(mean, var.clamp_min(1e-30).sqrt(), torch.randn_like(mean))


def _signs(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(0.5).mul_(2).sub_(1)


class Flipout(_WeightNoiseMessenger):
    """Effect handler: Flipout weight perturbations, pseudo-independent per example.

    The weight sample ``w = mu + delta`` is used as ``mu`` for all examples plus
    ``delta`` with its rows and columns sign-flipped at random per example
    (for ``Conv2d``: per input and output channel). Valid because a Gaussian
    ``delta`` is symmetric; a non-Gaussian guide falls back to weight sampling.

    :param layers: as for :class:`LocalReparameterization`.
    :param strict: as for :class:`LocalReparameterization`.

    Usage::

        with Flipout():
            loss = svi.step(x, y)
    """

    def _noisy(self, x, weight, tag, bias, btag, op):
        mean_b = btag.loc if btag is not None else bias
        mean = op(x, tag.loc, mean_b)
        conv = op is not F.linear
        batch = x.shape[:-2] + (1, 1) if conv else x.shape
        s_in = _signs(batch, x)
        pert = op(x * s_in, weight - tag.loc, (bias - btag.loc) if btag is not None else None)
        s_out = _signs(mean.shape[:-2] + (1, 1) if conv else mean.shape, mean)
        return torch.addcmul(mean, pert, s_out)


class Handled:
    """A model or guide that runs under a handler, with its attributes intact.

    ``Handled(guide, handler)(*args)`` runs ``guide(*args)`` inside ``handler``;
    every other attribute (``median``, ``state_dict``, ``functional_net``,
    ``setup``, ...) is the wrapped object's own. Use the *same* handler
    instance for the model and the guide. Note: the wrapper is not an
    ``nn.Module``; save and load the wrapped object (``.wrapped``).

    Usage::

        lr = LocalReparameterization()
        model_lr, guide_lr = Handled(model, lr), Handled(guide, lr)
        svi = SVI(model_lr, guide_lr, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    """

    def __init__(self, wrapped, handler: _WeightNoiseMessenger):
        if not callable(wrapped):
            raise TypeError(f"wrapped must be a callable model or guide, got {type(wrapped).__name__}")
        if not isinstance(handler, _WeightNoiseMessenger):
            raise TypeError(
                f"handler must be a LocalReparameterization or Flipout instance, got {type(handler).__name__}"
            )
        self.__dict__["wrapped"] = wrapped
        self.__dict__["handler"] = handler

    def __call__(self, *args, **kwargs):
        with self.handler:
            return self.wrapped(*args, **kwargs)

    def __getattr__(self, name):
        wrapped = self.__dict__.get("wrapped")
        if wrapped is None:
            raise AttributeError(name)
        return getattr(wrapped, name)

    def __repr__(self) -> str:
        return f"Handled({type(self.wrapped).__name__}, {self.handler!r})"
