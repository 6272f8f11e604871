"""Weight priors and :func:`bq_priors`, which turns any ``torch.nn.Module`` into a
Bayesian :class:`~pyro.nn.PyroModule` with a prior on each chosen parameter.

A prior is a small object with one method, :meth:`Prior.distribution`, that
returns the distribution of one parameter; :func:`bq_priors` takes care of the
shape, the event dimensions and the Pyro site.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional, Union

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn

from ._validation import check_module, check_positive, check_probability
from .distributions import ConstNormal

__all__ = ["Prior", "IIDNormal", "LayerwiseNormal", "ScaleMixtureNormal", "PretrainedNormal", "bq_priors",
           "default_expose", "prior_sites"]

#: Layer types whose ``weight`` and ``bias`` get a prior by default.
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Prior:
    """Base class of weight priors: override :meth:`distribution`.

    :func:`bq_priors` calls ``prior.distribution(module, module_name, param_name, param)``
    once per selected parameter: ``module`` is the plain ``nn.Module`` that owns it
    (read its other parameters there, e.g. a bias's fan-in), ``module_name`` its
    dotted name (``""`` for the network itself), ``param_name`` e.g. ``"weight"``,
    ``param`` the value. It returns a Pyro distribution whose ``batch_shape +
    event_shape`` is ``param.shape``, and keeps no state about the network.

    Usage::

        class Laplace(Prior):
            def distribution(self, module, module_name, param_name, param):
                return dist.Laplace(torch.zeros_like(param), 0.1)

        bnn = bq_priors(net, Laplace())
    """

    def distribution(self, module: nn.Module, module_name: str, param_name: str, param: torch.Tensor):
        """The prior of ``module_name.param_name``, a parameter of ``module``; its shape must match ``param``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class IIDNormal(Prior):
    """The same zero-mean Normal(0, ``scale``) for every weight.

    Usage::

        bnn = bq_priors(net, IIDNormal(1.0))
    """

    def __init__(self, scale: float = 1.0):
        self.scale = check_positive("scale", scale)

    def distribution(self, module, module_name, param_name, param):
        return ConstNormal(0.0, self.scale, param)


class LayerwiseNormal(Prior):
    """Zero-mean Normal with variance ``gain**2 / fan_in`` per layer (He-style).

    Biases use the fan-in of their layer's weight.

    Usage::

        bnn = bq_priors(net, LayerwiseNormal(gain=1.0))
    """

    def __init__(self, gain: float = 1.0):
        self.gain = check_positive("gain", gain)

    def distribution(self, module, module_name, param_name, param):
        weight = getattr(module, "weight", None)
        ref = weight if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else param
        fan_in = ref[0].numel() if ref.dim() >= 2 else ref.numel()
        return ConstNormal(0.0, self.gain / fan_in**0.5, param)


class ScaleMixtureNormal(Prior):
    """Blundell et al.'s mixture ``pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2)``.

    Usage::

        bnn = bq_priors(net, ScaleMixtureNormal(0.5, 1.0, 2.0 ** -6))
    """

    def __init__(self, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = 2.0**-6):
        self.pi = check_probability("pi", pi, open_interval=True)
        self.sigma1 = check_positive("sigma1", sigma1)
        self.sigma2 = check_positive("sigma2", sigma2)

    def distribution(self, module, module_name, param_name, param):
        mix = dist.Categorical(probs=param.new_tensor([self.pi, 1.0 - self.pi]))
        scales = param.new_tensor([self.sigma1, self.sigma2])
        comp = dist.Normal(torch.zeros((), dtype=param.dtype, device=param.device), scales)
        # MixtureSameFamily is scalar per weight: expand it to the parameter's shape.
        return dist.MixtureSameFamily(mix, comp).expand(param.shape)


class PretrainedNormal(Prior):
    """Normal prior centred at a pretrained network's weights (empirical Bayes).

    ``net`` must have the same parameter names and shapes as the network that
    :func:`bq_priors` converts.

    Usage::

        bnn = bq_priors(net, PretrainedNormal(trained_net, scale=0.1))
    """

    def __init__(self, net: nn.Module, scale: float = 0.1):
        check_module("net", net)
        self.scale = check_positive("scale", scale)
        self._state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def distribution(self, module, module_name, param_name, param):
        key = _qualified(module_name, param_name)
        if key not in self._state:
            raise ValueError(
                f"PretrainedNormal: the pretrained net has no parameter {key!r}; "
                "pass the trained version of the same architecture"
            )
        loc = self._state[key].to(device=param.device, dtype=param.dtype)
        if loc.shape != param.shape:
            raise ValueError(
                f"PretrainedNormal: pretrained {key!r} has shape {tuple(loc.shape)} but the "
                f"network's parameter has shape {tuple(param.shape)}"
            )
        return dist.Normal(loc, torch.full_like(loc, self.scale))


def default_expose(module_name: str, param_name: str, module: Optional[nn.Module] = None) -> bool:
    """Default selection: ``weight`` and ``bias`` of Linear and Conv layers.

    Normalisation layers (BatchNorm, LayerNorm, ...) stay deterministic.
    """
    return isinstance(module, WEIGHT_LAYERS) and param_name in ("weight", "bias")


def _qualified(module_name: str, param_name: str) -> str:
    """The dotted name of a parameter (``param_name`` alone in the root module)."""
    return f"{module_name}.{param_name}" if module_name else param_name


def _candidate_params(net: nn.Module):
    for module_name, module in net.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            yield module_name, module, param_name, param


def _expose_predicate(net: nn.Module, expose) -> Callable:
    """``expose`` as a predicate ``(module_name, param_name, module) -> bool`` (see :func:`bq_priors`)."""
    if expose is None:
        return default_expose
    if callable(expose):
        return lambda module_name, param_name, module: bool(expose(module_name, param_name))
    if isinstance(expose, str) or not isinstance(expose, Iterable):
        raise TypeError(
            "expose must be a callable (module_name, param_name) -> bool or a collection "
            f"of parameter names, got {type(expose).__name__}"
        )
    wanted = set(expose)
    known = {_qualified(m, p) for m, _, p, _ in _candidate_params(net)}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"expose names unknown parameters {unknown}; known parameters are {sorted(known)}")
    return lambda m, p, module: _qualified(m, p) in wanted


def _prior_of(prior: Prior, module: nn.Module, module_name: str, param_name: str, param: torch.Tensor):
    """``prior.distribution(...)`` for one parameter, checked and with the parameter's shape as event shape."""
    fn = prior.distribution(module, module_name, param_name, param)
    if not isinstance(fn, dist.torch_distribution.TorchDistributionMixin):
        raise TypeError(f"{type(prior).__name__}.distribution must return a pyro distribution, got {type(fn).__name__}")
    if tuple(fn.batch_shape) + tuple(fn.event_shape) != tuple(param.shape):
        raise ValueError(
            f"{type(prior).__name__} gave shape {tuple(fn.batch_shape + fn.event_shape)} for "
            f"{module_name}.{param_name}, expected {tuple(param.shape)}"
        )
    return fn.to_event(len(fn.batch_shape)) if fn.batch_shape else fn


def bq_priors(
    net: nn.Module,
    prior: Prior,
    *,
    expose: Optional[Union[Callable[[str, str], bool], Iterable[str]]] = None,
) -> PyroModule:
    """Return a Bayesian copy of ``net`` with a prior on each selected parameter.

    ``net`` is left untouched: the result is a deep copy converted to a
    :class:`~pyro.nn.PyroModule` in which every parameter selected by
    ``expose(module_name, param_name)`` is a :class:`~pyro.nn.PyroSample` from
    ``prior.distribution(module, module_name, param_name, param)`` (see
    :class:`Prior`) with the parameter's shape as event shape.
    The Pyro site of ``conv1.weight`` is named ``conv1.weight`` (prefixed by
    the attribute name under which the result is stored in a parent module).

    :param net: any ``torch.nn.Module``.
    :param prior: a :class:`Prior`.
    :param expose: optional predicate ``expose(module_name, param_name) -> bool``,
        or a collection of parameter names such as ``{"fc1.weight", "fc1.bias"}``;
        by default all weights and biases of Linear/Conv layers.
    :raises TypeError: if ``net`` is not a Module, ``prior`` not a :class:`Prior`,
        or ``expose`` not callable.
    :raises ValueError: if ``expose`` selects nothing, or a prior's shape is wrong.

    Usage::

        bnn = bq_priors(LeNet5(), IIDNormal(1.0))
        guide = AutoMeanFieldNormal(bnn)
    """
    check_module("net", net)
    if isinstance(net, PyroModule) and getattr(net, "_pyro_samples", None):
        raise ValueError("net already has priors (PyroSample attributes); pass the plain network")
    if not isinstance(prior, Prior):
        raise TypeError(
            f"prior must be a pyro_bq Prior (IIDNormal, LayerwiseNormal, ScaleMixtureNormal, "
            f"PretrainedNormal or a subclass of Prior), got {type(prior).__name__}"
        )
    chosen = _expose_predicate(net, expose)
    new = copy.deepcopy(net)
    # every prior is built before the conversion, so each sees plain modules and tensors
    selected = [
        (module_name, param_name, _prior_of(prior, module, module_name, param_name, param.detach()))
        for module_name, module, param_name, param in _candidate_params(new)
        if chosen(module_name, param_name, module)
    ]
    if not selected:
        raise ValueError(
            "expose selected no parameter of net; names look like "
            f"{[_qualified(m, p) for m, _, p, _ in list(_candidate_params(new))[:4]]}"
        )
    to_pyro_module_(new)
    modules = dict(new.named_modules())
    for module_name, param_name, fn in selected:
        setattr(modules[module_name], param_name, PyroSample(fn))
    return new


def prior_sites(net: PyroModule) -> list[str]:
    """Names (relative to ``net``) of the parameters that carry a prior."""
    return [_qualified(module_name, param_name)
            for module_name, module in net.named_modules() for param_name in getattr(module, "_pyro_samples", {})]
