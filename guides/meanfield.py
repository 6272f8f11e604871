"""The mean-field Normal guide, started from a pretrained network or from the
network's own initialisation."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyro_bq._rng import standard_normal
from pyro_bq._validation import check_module, check_positive, check_tensor

from .base import AutoGaussianSites

__all__ = ["AutoMeanFieldNormal", "init_to_pretrained", "softplus_inverse"]


class _SoftplusReparam(torch.autograd.Function):
    """``scale = softplus(scale_raw)`` and ``value = loc + scale * eps`` in one node of the graph.

    Same values as the two plain operations; the backward folds the gradient
    reaching ``value`` and the one reaching ``scale`` (the KL term) into one
    pass before softplus's own backward, where autograd through the plain
    expression makes four full-size passes.
    """

    @staticmethod
    def forward(ctx, loc, scale_raw, eps):
        scale = F.softplus(scale_raw)
        ctx.save_for_backward(scale_raw, eps)
        return torch.addcmul(loc, scale, eps), scale

    @staticmethod
    def backward(ctx, grad_value, grad_scale):
        scale_raw, eps = ctx.saved_tensors
        grad_loc = grad_value if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1] or (grad_value is None and grad_scale is None):
            return grad_loc, None, None
        if grad_value is None:
            total = grad_scale
        else:
            total = grad_value * eps if grad_scale is None else torch.addcmul(grad_scale, grad_value, eps)
        return grad_loc, torch.ops.aten.softplus_backward(total, scale_raw, 1.0, 20.0), None


def _softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """:func:`softplus_inverse` without the argument checks (internal: for values known to be positive)."""
    return x + torch.log(-torch.expm1(-x))


def softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """Inverse of softplus, stable for tiny and large ``x``.

    :param x: a floating-point tensor of positive values (softplus only takes values > 0).
    :raises TypeError: if ``x`` is not a floating-point tensor.
    :raises ValueError: if some value is not > 0 (or is NaN).
    """
    check_tensor("x", x, floating=True)
    if x.numel() and not bool(x.min() > 0):  # one reduction; a NaN propagates through min and fails too
        bad = x[~(x > 0)]
        raise ValueError(f"x must hold values > 0 (softplus is positive), found {bad.numel()} that are not "
                         f"(e.g. {bad.reshape(-1)[0].item()}); clamp it first, e.g. x.clamp_min(1e-30)")
    return _softplus_inverse(x)


def init_to_pretrained(net: nn.Module) -> Callable[[dict], torch.Tensor]:
    """Init function that starts each weight site at the matching parameter of ``net``.

    A site ``net.conv1.weight`` matches the parameter ``conv1.weight`` (the
    longest dotted suffix of the site name that names a parameter of ``net``).

    Usage::

        guide = AutoMeanFieldNormal(model, init_loc_fn=init_to_pretrained(trained_net))
    """
    check_module("net", net)
    params = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def init_fn(site: dict) -> torch.Tensor:
        parts = site["name"].split(".")
        for i in range(len(parts)):
            key = ".".join(parts[i:])
            if key in params:
                value = params[key]
                if value.shape != site["value"].shape:
                    raise ValueError(
                        f"init_to_pretrained: parameter {key!r} of the pretrained net has shape "
                        f"{tuple(value.shape)} but site {site['name']!r} has shape {tuple(site['value'].shape)}"
                    )
                return value.to(site["value"])
        raise ValueError(
            f"init_to_pretrained: the pretrained net has no parameter for site {site['name']!r}; "
            "pass a network of the same architecture"
        )

    init_fn.pretrained = True  # PWFN checks this flag
    return init_fn


class AutoMeanFieldNormal(AutoGaussianSites):
    """Mean-field Normal guide: ``q(w) = prod_i Normal(w_i; loc_i, scale_i)``.

    All locs live in one flat parameter ``loc`` and all scales in one flat
    ``scale_raw`` (softplus-transformed), so the optimizer holds two
    tensors whatever the number of layers; :meth:`get_loc_scale` returns views
    shaped like each site.

    :param model: a Pyro model, usually a :class:`~pyro_bq.models.BayesianClassifier`.
    :param init_loc_fn: function ``site -> initial loc``; default: the model's
        own network weights (``model.initial_params()``) when it has them, else
        the prior mean. Use :func:`init_to_pretrained` to start from a trained net.
    :param init_scale: initial posterior scale of every weight (> 0).

    Usage::

        guide = AutoMeanFieldNormal(model, init_loc_fn=init_to_pretrained(net), init_scale=1e-3)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    """

    def __init__(
        self,
        model,
        *,
        init_loc_fn: Optional[Callable[[dict], torch.Tensor]] = None,
        init_scale: float = 1e-2,
        create_plates=None,
    ):
        if init_loc_fn is not None and not callable(init_loc_fn):
            raise TypeError(f"init_loc_fn must be callable (site -> tensor), got {type(init_loc_fn).__name__}")
        self.init_scale = check_positive("init_scale", init_scale)
        super().__init__(model, create_plates=create_plates)
        self.init_loc_fn = init_loc_fn

    @property
    def started_from_pretrained(self) -> bool:
        return bool(getattr(self.init_loc_fn, "pretrained", False))

    def _initial_loc(self, name: str, site: dict) -> torch.Tensor:
        if self.init_loc_fn is not None:
            return self.init_loc_fn(site).detach()
        initial = getattr(self.model, "initial_params", None)
        if callable(initial):
            values = initial()
            if name in values:
                return values[name].to(site["value"])
        return site["fn"].mean.detach()

    def _initial_scale(self, name: str, loc: torch.Tensor) -> torch.Tensor:
        return torch.full_like(loc, self.init_scale)

    def _initial_flat(self, trace) -> tuple[torch.Tensor, torch.Tensor]:
        """The initial ``(loc, scale)`` of all sites as two flat vectors in site order."""
        locs, scales = [], []
        for name in self.sites:
            locs.append(self._initial_loc(name, trace.nodes[name]).reshape(-1))
            scales.append(self._initial_scale(name, locs[-1]).reshape(-1))
        return torch.cat(locs), torch.cat(scales)

    def _setup_params(self, trace) -> None:
        loc, scale = self._initial_flat(trace)
        self.loc = nn.Parameter(loc)
        self.scale_raw = nn.Parameter(_softplus_inverse(scale.clamp_min(1e-30)))

    def flat_loc_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All locs and scales as two flat vectors in site order."""
        return self.loc, F.softplus(self.scale_raw)

    def site_view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """The part of a flat per-weight vector that belongs to ``name``, shaped like the site."""
        info = self._check_site(name)
        return flat[info.offset : info.offset + info.numel].view(info.shape)

    def _own_layout(self) -> bool:
        # only when this class's own loc/scale layout is in use: subclasses that
        # change get_loc_scale, flat_loc_scale or get_posterior take the per-site path
        cls = type(self)
        return (
            cls.get_loc_scale is AutoMeanFieldNormal.get_loc_scale
            and cls.flat_loc_scale is AutoMeanFieldNormal.flat_loc_scale
            and cls.get_posterior is AutoGaussianSites.get_posterior
        )

    def fused_loc_scale(self):
        return self.flat_loc_scale() if self._own_layout() else None

    def _fused_draw(self):
        if not self._own_layout():
            return None
        eps = standard_normal(self.loc.shape, dtype=self.loc.dtype, device=self.loc.device)
        value, scale = _SoftplusReparam.apply(self.loc, self.scale_raw, eps)
        return self.loc, scale, value, eps

    def get_loc_scale(self, name):
        info = self._check_site(name)
        sl = slice(info.offset, info.offset + info.numel)
        return self.loc[sl].view(info.shape), F.softplus(self.scale_raw[sl]).view(info.shape)
