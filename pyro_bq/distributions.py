"""The Normal distributions behind the fast mean-field KL, and the KL itself.

:class:`ConstNormal` is a prior ``Normal(loc0, scale0)`` with Python-number
parameters; :class:`FusedNormal` is a guide site's ``Normal(loc, scale)`` cut
from one flat draw of all sites (a :class:`FlatDraw`). :func:`kl_normal_const`
is their per-site KL (registered with ``torch.distributions.kl``) and
:class:`KLNormalConstSum` the KL of a whole flat draw in one pass, with the
constants of :func:`flat_prior_constants`. :class:`~pyro_bq.inference.MeanFieldELBO`
reads exactly these names and the attributes documented on them.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import pyro.distributions as dist
import torch
import torch.distributions as tdist

__all__ = ["ConstNormal", "FusedNormal", "FlatDraw", "kl_normal_const", "KLNormalConstSum", "flat_prior_constants"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class ConstNormal(dist.Normal):
    """``Normal(loc0, scale0)`` with Python-number parameters, broadcast to the shape of ``like``.

    Same distribution as ``dist.Normal(torch.full(shape, loc0), torch.full(shape, scale0))``;
    its ``log_prob`` and its KL divergence from a Normal guide use the scalar
    parameters directly (fewer full-size operations in every SVI step), and it
    does not re-validate the whole weight tensor at every step.

    :ivar float loc0: the prior mean, one number for every element.
    :ivar float scale0: the prior standard deviation, one number for every element.

    Usage::

        prior = ConstNormal(0.0, 0.1, like=layer.weight)
    """

    def __init__(self, loc0: float, scale0: float, like: torch.Tensor):
        self.loc0, self.scale0 = float(loc0), float(scale0)
        loc = torch.full((), self.loc0, dtype=like.dtype, device=like.device).expand(like.shape)
        scale = torch.full((), self.scale0, dtype=like.dtype, device=like.device).expand(like.shape)
        super().__init__(loc, scale, validate_args=False)

    def log_prob(self, value):
        z = value - self.loc0 if self.loc0 else value
        out = z.square().mul_(-0.5 / self.scale0**2).sub_(math.log(self.scale0) + _HALF_LOG_2PI)
        return out if out.shape == self.batch_shape else out.expand(torch.broadcast_shapes(out.shape, self.batch_shape))

    def expand(self, batch_shape, _instance=None):
        return dist.Normal(self.loc, self.scale, validate_args=False).expand(batch_shape, _instance)


class FlatDraw(NamedTuple):
    """The flat ``loc`` and ``scale`` of all sites of one fused guide draw (shared by their :class:`FusedNormal`)."""

    loc: torch.Tensor
    scale: torch.Tensor


class FusedNormal(dist.Normal):
    """A plain ``Normal(loc, scale)`` whose one draw was made ahead of time.

    The fused guide path draws all sites' weights in one flat operation
    (``value = loc + scale * eps``) and hands each site its view through this
    class: the first ``rsample()`` returns the prepared draw, every other call
    draws afresh, and ``log_prob`` of the prepared draw is computed from ``eps``
    (same value and gradient as ``Normal.log_prob``, fewer full-size operations).

    :ivar flat: the :class:`FlatDraw` whose vectors ``loc`` and ``scale`` are views of, or ``None``.
    :ivar int offset: where this site starts in ``flat``; an ELBO sums the KL of all
        sites of one draw in one pass over the flat vectors with them.

    Usage::

        fn = FusedNormal(loc[a:b], scale[a:b], value[a:b], eps[a:b], FlatDraw(loc, scale), offset=a)
    """

    def __init__(self, loc, scale, value, eps, flat: Optional[FlatDraw] = None, offset: int = 0):
        super().__init__(loc, scale, validate_args=False)
        self._pending, self._value, self._eps = value, value, eps
        self.flat, self.offset = flat, offset

    def rsample(self, sample_shape=torch.Size()):
        if self._pending is not None and not sample_shape:
            value, self._pending = self._pending, None
            return value
        return super().rsample(sample_shape)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape).detach()

    def log_prob(self, value):
        if value is self._value:
            return self._eps.square().mul_(-0.5).sub_(_HALF_LOG_2PI) - self.scale.log()
        return super().log_prob(value)

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
        if grad.dim() > 0 and all(st == 0 for st in grad.stride()):  # one value broadcast: fold it into c
            return (*_kl_grads_times(ctx.needs_input_grad, z, scale, c, grad.reshape(-1)[0]), None, None)
        needs = ctx.needs_input_grad
        grad_loc = torch.mul(z, grad).mul_(c) if needs[0] else None
        grad_scale = torch.reciprocal(scale).mul_(-1.0).add_(scale, alpha=c).mul_(grad) if needs[1] else None
        return grad_loc, grad_scale, None, None


@tdist.kl.register_kl(tdist.Normal, ConstNormal)
def kl_normal_const(q: tdist.Normal, p: ConstNormal) -> torch.Tensor:
    """Elementwise ``KL(q || p)``: ``torch.distributions.kl_divergence`` dispatches here for these types.

    Usage::

        kl = kl_normal_const(dist.Normal(loc, scale), ConstNormal(0.0, 1.0, like=loc))
    """
    return _KLNormalConst.apply(q.loc, q.scale, p.loc0, p.scale0)


class KLNormalConstSum(torch.autograd.Function):
    """``sum_j KL(Normal(loc_j, scale_j) || Normal(loc0_j, scale0_j))`` over flat 1-D vectors, as one number.

    The KL of many weight sites at once (those of one :class:`FlatDraw`): no
    per-site views in the graph, so their gradients need not be concatenated
    back into the flat parameters. ``loc0`` and ``c = 1 / scale0**2`` are Python
    numbers (one prior for all) or vectors like ``loc``; ``const = sum_j
    (log(scale0_j) - 1/2)``; :func:`flat_prior_constants` gives all three. The
    sum is ``c/2 * (z.z + scale.scale) - sum(log scale) + const`` with
    ``z = loc - loc0``; the gradients are those of :func:`kl_normal_const`, summed.

    Usage::

        total = KLNormalConstSum.apply(draw.loc, draw.scale, loc0, c, const)
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


def flat_prior_constants(loc0s, scale0s, numels, like: torch.Tensor) -> tuple:
    """``(loc0, c, const)`` of :class:`KLNormalConstSum` for consecutive segments of ``numels``
    weights with the scalar priors ``Normal(loc0s[i], scale0s[i])``: numbers where every
    segment has the same prior, else vectors of ``sum(numels)`` values like ``like``.

    Usage::

        loc0, c, const = flat_prior_constants([0.0, 0.0], [0.5, 0.1], [120, 10], draw.loc)
    """
    const = sum(n * (math.log(s) - 0.5) for n, s in zip(numels, scale0s))

    def flat(values):
        if len(set(values)) == 1:
            return values[0]
        counts = torch.tensor(numels, device=like.device)
        return torch.tensor(values, dtype=like.dtype, device=like.device).repeat_interleave(counts)

    # c from the exact numbers, as the per-site KL computes it (same rounding, same gradients)
    return flat([float(m) for m in loc0s]), flat([1.0 / float(s) ** 2 for s in scale0s]), const
