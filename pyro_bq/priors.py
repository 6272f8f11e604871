"""Weight priors and :func:`bq_priors`, which turns any ``torch.nn.Module`` into a
Bayesian :class:`~pyro.nn.PyroModule` with a prior on each chosen parameter.

A prior is a small object with one method, :meth:`Prior.distribution`, that
returns the distribution of one parameter; :func:`bq_priors` takes care of the
shape, the event dimensions and the Pyro site.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Optional, Union

import pyro.distributions as dist
import torch
import torch.distributions as tdist
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn

from ._validation import check_module, check_positive, check_probability

__all__ = [
    "Prior",
    "IIDNormal",
    "LayerwiseNormal",
    "ScaleMixtureNormal",
    "PretrainedNormal",
    "bq_priors",
    "default_expose",
    "prior_sites",
]

#: Layer types whose ``weight`` and ``bias`` get a prior by default.
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _ConstNormal(dist.Normal):
    """``Normal(loc0, scale0)`` with Python-number parameters, broadcast to a shape.

    Same distribution as ``dist.Normal(torch.full(shape, loc0), torch.full(shape, scale0))``;
    its ``log_prob`` and its KL divergence from a Normal guide use the scalar
    parameters directly (fewer full-size operations in every SVI step), and it
    does not re-validate the whole weight tensor at every step.
    """

    _bq_exact_gaussian = True  # its samples are exactly loc + scale * eps (see inference.reparam)

    def __init__(self, loc0: float, scale0: float, like: torch.Tensor):
        self._loc0, self._scale0 = float(loc0), float(scale0)
        loc = torch.full((), self._loc0, dtype=like.dtype, device=like.device).expand(like.shape)
        scale = torch.full((), self._scale0, dtype=like.dtype, device=like.device).expand(like.shape)
        super().__init__(loc, scale, validate_args=False)

    def log_prob(self, value):
        z = value - self._loc0 if self._loc0 else value
        out = z.square().mul_(-0.5 / self._scale0**2).sub_(math.log(self._scale0) + 0.5 * math.log(2 * math.pi))
        return out if out.shape == self.batch_shape else out.expand(torch.broadcast_shapes(out.shape, self.batch_shape))

    def expand(self, batch_shape, _instance=None):
        return dist.Normal(self.loc, self.scale, validate_args=False).expand(batch_shape, _instance)


def _centered(loc, loc0):
    """``loc - loc0`` (no pass when ``loc0`` is the number 0)."""
    return loc - loc0 if isinstance(loc0, torch.Tensor) or loc0 else loc


def _save(ctx, loc, scale, loc0, c) -> None:
    ctx.save_for_backward(loc, scale)
    ctx.loc0, ctx.c = loc0, c


def _restore(ctx):
    """``(z, scale, c)`` saved by :func:`_save`, with ``z = loc - loc0``."""
    loc, scale = ctx.saved_tensors
    return _centered(loc, ctx.loc0), scale, ctx.c


def _kl_grads_times(needs, z, scale, c, g):
    """``g`` times the gradients of ``KL(Normal(loc, scale) || Normal(loc0, scale0))``:
    ``c*g*z`` and ``c*g*scale - g/scale`` (``z = loc - loc0``, ``c = 1/scale0**2``, ``g`` one number)."""
    cg = c * g
    return (z * cg if needs[0] else None), (torch.addcdiv(scale * cg, -g, scale) if needs[1] else None)


class _KLNormalConst(torch.autograd.Function):
    """Elementwise ``KL(Normal(loc, scale) || Normal(loc0, scale0))`` with a hand-written backward.

    ``kl = (z**2 + scale**2) * c / 2 + log(scale0) - 1/2 - log(scale)`` with
    ``z = loc - loc0`` and ``c = 1 / scale0**2``; ``d kl / d loc = c * z`` and
    ``d kl / d scale = c * scale - 1 / scale``. Autograd through the plain
    expression takes about eight full-size passes for the backward; this takes
    three when the incoming gradient is one number broadcast over the tensor
    (the KL is summed, as in every ELBO), five otherwise.
    """

    @staticmethod
    def forward(ctx, loc, scale, loc0: float, scale0: float):
        c = 1.0 / scale0**2
        z = _centered(loc, loc0)
        out = torch.mul(z, z).addcmul_(scale, scale).mul_(0.5 * c).add_(math.log(scale0) - 0.5).sub_(scale.log())
        _save(ctx, loc, scale, loc0, c)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, scale, c = _restore(ctx)
        grad_loc = grad_scale = None
        uniform = grad.dim() > 0 and all(st == 0 for st in grad.stride())
        if uniform:  # one value broadcast: fold it into the constants
            g = grad.reshape(-1)[0]
            grad_loc, grad_scale = _kl_grads_times(ctx.needs_input_grad, z, scale, c, g)
        else:
            if ctx.needs_input_grad[0]:
                grad_loc = torch.mul(z, grad).mul_(c)
            if ctx.needs_input_grad[1]:
                grad_scale = torch.reciprocal(scale).mul_(-1.0).add_(scale, alpha=c).mul_(grad)
        return grad_loc, grad_scale, None, None


@tdist.kl.register_kl(tdist.Normal, _ConstNormal)
def _kl_normal_const(q, p):
    return _KLNormalConst.apply(q.loc, q.scale, p._loc0, p._scale0)


class _KLNormalConstSum(torch.autograd.Function):
    """``sum_j KL(Normal(loc_j, scale_j) || Normal(loc0_j, scale0_j))`` over flat 1-D vectors, as one number.

    The KL of many weight sites at once (those of one flat guide draw, see
    :class:`pyro_bq.inference.MeanFieldELBO`): no per-site views in the graph, so
    their gradients need not be concatenated back into the flat parameters.
    ``loc0`` and ``c = 1 / scale0**2`` are Python numbers (one prior for all) or
    vectors like ``loc``; ``const = sum_j (log(scale0_j) - 1/2)``. The sum is
    ``c/2 * (z.z + scale.scale) - sum(log scale) + const`` with ``z = loc - loc0``;
    the gradients are those of :class:`_KLNormalConst`, times the incoming number.
    """

    @staticmethod
    def forward(ctx, loc, scale, loc0, c, const: float):
        z = _centered(loc, loc0)
        if isinstance(c, torch.Tensor):
            quad = torch.dot(z * c, z) + torch.dot(scale * c, scale)
        else:
            quad = (torch.dot(z, z) + torch.dot(scale, scale)) * c
        _save(ctx, loc, scale, loc0, c)
        return quad.mul(0.5).sub_(scale.log().sum()).add_(const)

    @staticmethod
    def backward(ctx, grad):
        z, scale, c = _restore(ctx)
        return (*_kl_grads_times(ctx.needs_input_grad, z, scale, c, grad), None, None, None)


def _flat_prior_constants(loc0s, scale0s, numels, like: torch.Tensor):
    """``(loc0, c, const)`` of :class:`_KLNormalConstSum` for consecutive segments of ``numels``
    weights with the scalar priors ``Normal(loc0s[i], scale0s[i])``: numbers where every
    segment has the same prior, else vectors of ``sum(numels)`` values like ``like``."""
    const = sum(n * (math.log(s) - 0.5) for n, s in zip(numels, scale0s))

    def flat(values):
        if len(set(values)) == 1:
            return values[0]
        counts = torch.tensor(numels, device=like.device)
        return torch.tensor(values, dtype=like.dtype, device=like.device).repeat_interleave(counts)

    # c from the exact numbers, as the per-site KL computes it (same rounding, same gradients)
    return flat([float(m) for m in loc0s]), flat([1.0 / float(s) ** 2 for s in scale0s]), const


class Prior:
    """Base class of weight priors: override :meth:`distribution`.

    Usage::

        class Laplace(Prior):
            def distribution(self, module_name, param_name, param):
                return dist.Laplace(torch.zeros_like(param), 0.1)
    """

    def distribution(self, module_name: str, param_name: str, param: torch.Tensor):
        """Return the prior of ``module_name.param_name``; its shape must match ``param``."""
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

    def distribution(self, module_name, param_name, param):
        return _ConstNormal(0.0, self.scale, param)


class LayerwiseNormal(Prior):
    """Zero-mean Normal with variance ``gain**2 / fan_in`` per layer (He-style).

    Biases use the fan-in of their layer's weight.

    Usage::

        bnn = bq_priors(net, LayerwiseNormal(gain=1.0))
    """

    def __init__(self, gain: float = 1.0):
        self.gain = check_positive("gain", gain)
        self._fan_in: dict[str, int] = {}

    def _bind(self, net: nn.Module) -> None:
        for name, module in net.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
                self._fan_in[name] = weight[0].numel()

    def distribution(self, module_name, param_name, param):
        fan_in = self._fan_in.get(module_name, param[0].numel() if param.dim() >= 2 else param.numel())
        return _ConstNormal(0.0, self.gain / fan_in**0.5, param)


class ScaleMixtureNormal(Prior):
    """Blundell et al.'s mixture ``pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2)``.

    Usage::

        bnn = bq_priors(net, ScaleMixtureNormal(0.5, 1.0, 2.0 ** -6))
    """

    def __init__(self, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = 2.0**-6):
        self.pi = check_probability("pi", pi, open_interval=True)
        self.sigma1 = check_positive("sigma1", sigma1)
        self.sigma2 = check_positive("sigma2", sigma2)

    def distribution(self, module_name, param_name, param):
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

    def distribution(self, module_name, param_name, param):
        key = f"{module_name}.{param_name}" if module_name else param_name
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


def _candidate_params(net: nn.Module):
    for module_name, module in net.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            yield module_name, module, param_name, param


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
    ``prior.distribution(...)`` with the parameter's shape as event shape.
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
    if expose is not None and not callable(expose):
        if isinstance(expose, str) or not isinstance(expose, Iterable):
            raise TypeError(
                "expose must be a callable (module_name, param_name) -> bool or a collection "
                f"of parameter names, got {type(expose).__name__}"
            )
        wanted = set(expose)
        known = {f"{m}.{p}" if m else p for m, _, p, _ in _candidate_params(net)}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(
                f"expose names unknown parameters {unknown}; known parameters are {sorted(known)}"
            )
        expose = lambda module_name, param_name: (  # noqa: E731
            f"{module_name}.{param_name}" if module_name else param_name
        ) in wanted

    new = copy.deepcopy(net)
    if isinstance(prior, LayerwiseNormal):
        prior._bind(new)
    selected = []
    for module_name, module, param_name, param in _candidate_params(new):
        chosen = default_expose(module_name, param_name, module) if expose is None else bool(expose(module_name, param_name))
        if chosen:
            selected.append((module_name, param_name, param.detach()))
    if not selected:
        raise ValueError(
            "expose selected no parameter of net; names look like "
            f"{[f'{m}.{p}' if m else p for m, _, p, _ in list(_candidate_params(new))[:4]]}"
        )

    to_pyro_module_(new)
    modules = dict(new.named_modules())
    for module_name, param_name, param in selected:
        fn = prior.distribution(module_name, param_name, param)
        if not isinstance(fn, dist.torch_distribution.TorchDistributionMixin):
            raise TypeError(f"{type(prior).__name__}.distribution must return a pyro distribution, got {type(fn).__name__}")
        if tuple(fn.batch_shape) + tuple(fn.event_shape) != tuple(param.shape):
            raise ValueError(
                f"{type(prior).__name__} gave shape {tuple(fn.batch_shape + fn.event_shape)} for "
                f"{module_name}.{param_name}, expected {tuple(param.shape)}"
            )
        fn = fn.to_event(len(fn.batch_shape)) if fn.batch_shape else fn
        setattr(modules[module_name], param_name, PyroSample(fn))
    return new


def prior_sites(net: PyroModule) -> list[str]:
    """Names (relative to ``net``) of the parameters that carry a prior."""
    names = []
    for module_name, module in net.named_modules():
        for param_name in getattr(module, "_pyro_samples", {}):
            names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names
