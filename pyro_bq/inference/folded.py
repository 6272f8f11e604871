"""Many weight samples through one network pass, with the samples folded into the tensors.

:func:`torch.func.vmap` evaluates a network for ``S`` weight samples by
batching every operation; on the CPU its batching rules for convolutions
materialise layout copies and add the bias in a separate pass, so that ``S``
samples cost clearly more than ``S`` deterministic passes. :class:`FoldedNet`
runs the same network with the sample dimension folded into the tensors the
layers already know how to process:

* *shared* values (the input ``x``) have no sample dimension;
* *channel-folded* values ``(N, S*C, H, W)`` (sample-major) go through a
  convolution as one grouped convolution (``groups=S``, bias included), and
  through pooling and element-wise activations unchanged;
* *sample-leading* values ``(S, N, F)`` go through a Linear layer as one
  ``baddbmm``; a Linear (or convolution) layer on a shared input is one
  ordinary call with the ``S`` weight matrices stacked along the outputs.

The network is traced once with :mod:`torch.fx`. Supported: ``Conv2d``
(``groups=1``, zero padding), ``Linear``, eval-mode ``BatchNorm2d``,
element-wise activation modules and functions, ``Dropout`` (identity in eval
mode), max/avg pooling, ``flatten`` / ``nn.Flatten`` and residual ``+``. Any
other operation raises :class:`NotFoldable`, and the caller falls back to
``vmap``: the result is the same either way (a test checks it), only the
speed differs.

Usage::

    folded = FoldedNet(net)                       # raises NotFoldable if unsupported
    out = folded(params, x)                       # params: {name: (S, *shape) or shared tensor}
"""

from __future__ import annotations

import operator
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["FoldedNet", "NotFoldable"]

SHARED, CHAN, LEAD = "shared", "chan", "lead"

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU,
    nn.Softplus, nn.Identity, nn.Dropout, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.hardtanh, torch.tanh, torch.sigmoid, F.gelu, F.leaky_relu, F.elu, F.silu,
    F.softplus, F.hardswish, F.hardsigmoid, F.mish, F.dropout,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class NotFoldable(Exception):
    """The network uses an operation :class:`FoldedNet` does not handle (use ``vmap``)."""


class _Value:
    __slots__ = ("t", "layout")

    def __init__(self, t: torch.Tensor, layout: str):
        self.t, self.layout = t, layout


def _to_lead(v: _Value, S: int) -> torch.Tensor:
    """The value as ``(S, N, ...)``."""
    if v.layout == LEAD:
        return v.t
    if v.layout == SHARED:
        return v.t.unsqueeze(0).expand((S,) + tuple(v.t.shape))
    n, sc = v.t.shape[:2]
    return v.t.view((n, S, sc // S) + tuple(v.t.shape[2:])).transpose(0, 1)


def _to_chan(v: _Value, S: int) -> torch.Tensor:
    """The value as ``(N, S*C, ...)``."""
    if v.layout == CHAN:
        return v.t
    if v.layout == SHARED:
        t = v.t
        return t.unsqueeze(1).expand((t.shape[0], S) + tuple(t.shape[1:])).reshape((t.shape[0], -1) + tuple(t.shape[2:]))
    t = v.t.transpose(0, 1)
    return t.reshape((t.shape[0], -1) + tuple(t.shape[3:]))


class FoldedNet:
    """A traced network that evaluates ``S`` weight samples in one folded pass (see the module docs).

    :param net: the network (a plain ``nn.Module``; may live on the meta device:
        every tensor is supplied at call time).
    :raises NotFoldable: if tracing fails or an operation is not supported.
    """

    def __init__(self, net: nn.Module):
        try:
            self.graph = fx.symbolic_trace(net).graph
        except Exception as err:  # noqa: BLE001 - any tracing failure means "use vmap"
            raise NotFoldable(f"torch.fx cannot trace {type(net).__name__}: {err}") from err
        self.modules = dict(net.named_modules())
        for node in self.graph.nodes:
            self._check(node)

    def _check(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "output", "get_attr"):
            if node.op == "get_attr":
                raise NotFoldable(f"attribute access {node.target!r}")
            return
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, nn.Conv2d):
                if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                    raise NotFoldable(f"Conv2d {node.target!r} with groups/padding mode/string padding")
            elif isinstance(m, nn.BatchNorm2d):
                if m.running_mean is None:
                    raise NotFoldable(f"BatchNorm2d {node.target!r} without running statistics")
            elif not isinstance(m, (nn.Linear, nn.Flatten) + _ELEMENTWISE_MODULES + _POOL_MODULES):
                raise NotFoldable(f"module {node.target!r} of type {type(m).__name__}")
            return
        if node.op == "call_function":
            if node.target in _ELEMENTWISE_FUNCTIONS or node.target in _POOL_FUNCTIONS:
                return
            if node.target in (torch.flatten, operator.add):
                return
            raise NotFoldable(f"function {getattr(node.target, '__name__', node.target)}")
        if node.op == "call_method":
            if node.target in _ELEMENTWISE_METHODS or node.target == "flatten":
                return
            raise NotFoldable(f"method .{node.target}()")
        raise NotFoldable(f"node {node.op}")

    # -- evaluation ---------------------------------------------------------------------
    def __call__(self, sampled: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor],
                 x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(S, N, ...)``.

        :param sampled: ``{name: (S, *shape)}`` for the sampled parameters (names as in ``net``).
        :param shared: ``{name: tensor}`` for the other parameters and the buffers.
        :param x: inputs ``(N, ...)``, shared by all samples.
        """
        S = next(iter(sampled.values())).shape[0]
        params = _Params(sampled, shared, S)
        env: dict = {}

        def arg(a):
            return env[a.name] if isinstance(a, fx.Node) else a

        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = _Value(x, SHARED)
            elif node.op == "output":
                out = arg(node.args[0])
                return _to_lead(out, S)
            elif node.op == "call_module":
                env[node.name] = self._module(node, self.modules[node.target], params, arg(node.args[0]), S)
            elif node.op == "call_function":
                env[node.name] = self._function(node, arg, S)
            else:  # call_method
                v = arg(node.args[0])
                if node.target == "flatten":
                    env[node.name] = self._flatten(v, *node.args[1:], S=S, **node.kwargs)
                else:
                    env[node.name] = _Value(getattr(v.t, node.target)(), v.layout)
        raise RuntimeError("internal: the traced graph has no output")

    def _module(self, node, m, params, v: _Value, S: int) -> _Value:
        prefix = node.target
        if isinstance(m, nn.Conv2d):
            w = params.stacked(f"{prefix}.weight")
            b = params.stacked(f"{prefix}.bias") if m.bias is not None else None
            o = w.shape[1]
            wf = w.reshape((S * o,) + tuple(w.shape[2:]))
            bf = b.reshape(S * o) if b is not None else None
            if v.layout == SHARED:
                out = F.conv2d(v.t, wf, bf, m.stride, m.padding, m.dilation)
            else:
                out = F.conv2d(_to_chan(v, S), wf, bf, m.stride, m.padding, m.dilation, groups=S)
            return _Value(out, CHAN)
        if isinstance(m, nn.Linear):
            w = params.stacked(f"{prefix}.weight")
            b = params.stacked(f"{prefix}.bias") if m.bias is not None else None
            if v.layout == SHARED and v.t.dim() == 2:
                n, o = v.t.shape[0], w.shape[1]
                out = F.linear(v.t, w.reshape(S * o, -1), b.reshape(S * o) if b is not None else None)
                return _Value(out.view(n, S, o).transpose(0, 1), LEAD)
            t = _to_lead(v, S)
            if t.dim() != 3:
                raise NotFoldable("Linear on inputs with more than one feature dimension")
            if b is None:
                return _Value(torch.bmm(t, w.transpose(1, 2)), LEAD)
            return _Value(torch.baddbmm(b.unsqueeze(1), t, w.transpose(1, 2)), LEAD)
        if isinstance(m, nn.BatchNorm2d):
            if any(f"{prefix}.{k}" in params.sampled for k in ("weight", "bias")):
                raise NotFoldable(f"BatchNorm2d {prefix!r} with sampled parameters")
            names = [f"{prefix}.{k}" for k in ("running_mean", "running_var", "weight", "bias")]
            rep = [params.shared[k].repeat(S) if k in params.shared else None for k in names]
            t = _to_chan(v, S)
            return _Value(F.batch_norm(t, rep[0], rep[1], rep[2], rep[3], False, 0.0, m.eps), CHAN)
        if isinstance(m, nn.Flatten):
            return self._flatten(v, m.start_dim, m.end_dim, S=S)
        if isinstance(m, _POOL_MODULES):
            return _pool(m, v, S)
        if isinstance(m, nn.Dropout):
            return v  # eval mode
        return _Value(m(v.t), v.layout)  # element-wise

    def _function(self, node, arg, S: int) -> _Value:
        f = node.target
        if f is operator.add:
            a, b = (arg(x) for x in node.args)
            if not isinstance(a, _Value) or not isinstance(b, _Value):
                raise NotFoldable("+ with a constant")
            if a.layout == b.layout:
                return _Value(a.t + b.t, a.layout)
            if CHAN in (a.layout, b.layout) and LEAD not in (a.layout, b.layout):
                return _Value(_to_chan(a, S) + _to_chan(b, S), CHAN)
            return _Value(_to_lead(a, S) + _to_lead(b, S), LEAD)
        v = arg(node.args[0])
        rest = [arg(a) for a in node.args[1:]]
        kwargs = {k: arg(a) for k, a in node.kwargs.items()}
        if f is torch.flatten:
            return self._flatten(v, *rest, S=S, **kwargs)
        if f is F.dropout:
            return v  # eval mode
        if f in _POOL_FUNCTIONS:
            return _pool(lambda t: f(t, *rest, **kwargs), v, S)
        return _Value(f(v.t, *rest, **kwargs), v.layout)

    @staticmethod
    def _flatten(v: _Value, start_dim: int = 0, end_dim: int = -1, *, S: int) -> _Value:
        if end_dim != -1:
            raise NotFoldable("flatten with end_dim != -1")
        if v.layout == SHARED:
            return _Value(torch.flatten(v.t, start_dim), SHARED)
        per_sample_dim = v.t.dim() if v.layout == CHAN else v.t.dim() - 1  # dims of one sample's tensor
        start = start_dim % per_sample_dim
        if start == 0:
            raise NotFoldable("flatten over the batch dimension")
        t = _to_lead(v, S)
        return _Value(t.reshape(tuple(t.shape[: start + 1]) + (-1,)), LEAD)


def _pool(pool, v: _Value, S: int) -> _Value:
    if v.layout in (SHARED, CHAN):
        return _Value(pool(v.t), v.layout)
    s, n = v.t.shape[:2]
    out = pool(v.t.reshape((s * n,) + tuple(v.t.shape[2:])))
    return _Value(out.view((s, n) + tuple(out.shape[1:])), LEAD)


class _Params:
    """The parameters of one call: sampled ``(S, *shape)`` and shared ones."""

    def __init__(self, sampled, shared, S):
        self.sampled, self.shared, self.S = sampled, shared, S

    def stacked(self, name: str) -> torch.Tensor:
        """Parameter ``name`` as ``(S, *shape)``: sampled ones already are; shared ones are expanded."""
        t = self.sampled.get(name)
        if t is not None:
            return t
        t = self.shared[name]
        return t.unsqueeze(0).expand((self.S,) + tuple(t.shape))
