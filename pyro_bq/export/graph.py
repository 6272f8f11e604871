"""ONNX graph building: a small node/initializer writer and the lowering of a network's layers.

:class:`GraphWriter` collects nodes and initializers under unique names.
:func:`lower_network` traces a network with ``torch.fx`` and writes its layers
as ONNX nodes for ``S`` weight draws at once. Every tensor it writes carries
one of three layouts:

* ``"plain"``: the input's own shape ``(N, ...)``, before any weight was applied;
* ``"conv"``: ``(N, S*C, H, W)``: the draws folded into the channels, so one
  grouped ``Conv`` (``group=S``) applies ``S`` different kernels;
* ``"dense"``: ``(S, N, F)``: one batched ``MatMul`` applies ``S`` weight matrices.

Supported layers: ``Linear``, ``Conv2d`` (zero padding, ``groups=1``),
``BatchNorm2d`` (eval mode, no prior on its parameters), ``ReLU``, ``ReLU6``,
``Hardtanh``, ``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``MaxPool2d``/``max_pool2d``,
``adaptive_avg_pool2d`` to 1x1, ``Flatten``/``flatten``, residual ``+``, and
:class:`~pyro_bq.quant.activation.FakeQuantActivation` around a supported
activation. Anything else raises a ``ValueError`` naming the layer.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from pyro_bq.quant.activation import FakeQuantActivation
from pyro_bq.quant.grids import interval_grid

__all__ = ["GraphWriter", "lower_network", "check_model", "round_to_grid", "OPSET"]

#: the ONNX opset the graphs use (ReduceMean/ReduceSum with an ``axes`` attribute or input as below)
OPSET = 17


class GraphWriter:
    """Nodes and initializers of one ONNX graph, with unique names.

    Usage::

        g = GraphWriter()
        y = g.op("Relu", "x")
        g.const("w", np.ones(3, np.float32))
    """

    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self._names: set = set()

    def name(self, base: str) -> str:
        base = base.replace(".", "_")
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def const(self, base: str, value) -> str:
        """An initializer holding ``value`` (a numpy array or tensor; kept at its dtype)."""
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, base: str, values) -> str:
        return self.const(base, np.asarray(values, dtype=np.int64))

    def floats(self, base: str, values) -> str:
        return self.const(base, np.asarray(values, dtype=np.float32))

    def op(self, kind: str, *inputs: str, out: Optional[str] = None, **attrs) -> str:
        out = out or self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out


# -- layers ------------------------------------------------------------------------------------
_SIMPLE = {nn.ReLU: "Relu", nn.Tanh: "Tanh", nn.Sigmoid: "Sigmoid"}
_FUNCTIONS = {F.relu: "Relu", torch.relu: "Relu", torch.tanh: "Tanh", torch.sigmoid: "Sigmoid"}


def _activation(g: GraphWriter, module: nn.Module, x: str, where: str) -> str:
    """An elementwise activation module (layout unchanged)."""
    for cls, kind in _SIMPLE.items():
        if type(module) is cls:
            return g.op(kind, x)
    if isinstance(module, nn.Hardtanh):  # ReLU6 included
        return g.op("Clip", x, g.floats("lo", float(module.min_val)), g.floats("hi", float(module.max_val)))
    if type(module) is nn.LeakyReLU:
        return g.op("LeakyRelu", x, alpha=float(module.negative_slope))
    raise ValueError(f"{where}: the activation {type(module).__name__} cannot be exported to ONNX; supported: "
                     "ReLU, ReLU6, Hardtanh, LeakyReLU, Tanh, Sigmoid")


def _fake_quant(g: GraphWriter, module: FakeQuantActivation, state: dict, call: int, x: str, where: str) -> str:
    """The activation, then its ``bits``-bit grid over the range of this call (as the module computes it);
    ``state`` holds the module's buffers ``lo``, ``hi`` and ``ready``."""
    y = _activation(g, module.activation, x, f"{where} (inside activation quantization)")
    lo, hi, ready = state["lo"], state["hi"], state["ready"]
    if call >= lo.numel() or not bool(ready[call]):
        raise ValueError(f"{where}: activation quantization call {call} has no calibrated range; "
                         "run calibrate_activations_ first")
    step, zp, qmax = interval_grid(lo[call].float(), hi[call].float(), module.bits)
    return round_to_grid(g, y, g.const("act_step", step.reshape(())), g.const("act_zp", zp.reshape(())),
                          g.const("act_qmax", qmax.reshape(())))


def round_to_grid(g: GraphWriter, x: str, step: str, zp: str, qmax: str) -> str:
    """``(clamp(round(x / step + zp), 0, qmax) - zp) * step``: the uniform grid's rounding rule
    (:func:`pyro_bq.quant.grids.uniform_quantize`) as graph ops; ``Round`` rounds half to even, as torch does.

    Usage::

        y = round_to_grid(g, "w", g.floats("step", 0.1), g.floats("zp", 7.0), g.floats("qmax", 14.0))
    """
    codes = g.op("Round", g.op("Add", g.op("Div", x, step), zp))
    codes = g.op("Min", g.op("Max", codes, g.floats("zero", 0.0)), qmax)
    return g.op("Mul", g.op("Sub", codes, zp), step)


class _Lowering:
    """Writes a traced network's nodes for ``S`` draws; ``weight(param_name)`` gives each weight as a
    tensor name of shape ``(S, *shape)`` (a Pyro site) or ``None`` (a deterministic parameter)."""

    def __init__(self, g: GraphWriter, net: nn.Module, num_samples: int, weight: Callable, shared: dict):
        self.g, self.net, self.S = g, net, num_samples
        self.weight, self.shared = weight, shared
        self.modules = dict(net.named_modules())
        self.calls: dict = {}

    def param(self, prefix: str, key: str, where: str) -> Optional[str]:
        """The draws ``(S, *shape)`` of parameter ``prefix.key``; a deterministic one is broadcast."""
        name = f"{prefix}.{key}" if prefix else key
        drawn = self.weight(name)
        if drawn is not None:
            return drawn
        value = self.shared.get(name)
        if value is None:
            return None
        g = self.g
        const = g.const(name, value.detach().float().unsqueeze(0))
        return g.op("Expand", const, g.ints("shape", [self.S, *value.shape]))

    def linear(self, m: nn.Linear, prefix: str, x, layout: str):
        g, where = self.g, f"layer {prefix!r} (Linear)"
        if layout == "conv":
            raise ValueError(f"{where}: a Linear layer applied to a 4-D feature map cannot be exported; flatten first")
        w = self.param(prefix, "weight", where)
        y = g.op("MatMul", x, g.op("Transpose", w, perm=[0, 2, 1]))  # (S, N, out)
        if m.bias is not None:
            b = self.param(prefix, "bias", where)
            y = g.op("Add", y, g.op("Unsqueeze", b, g.ints("axis", [1])))
        return y, "dense"

    def conv(self, m: nn.Conv2d, prefix: str, x, layout: str):
        g, where = self.g, f"layer {prefix!r} (Conv2d)"
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"{where}: only groups=1 with numeric zero padding can be exported, got groups={m.groups}, "
                             f"padding={m.padding!r}, padding_mode={m.padding_mode!r}")
        if layout == "dense":
            raise ValueError(f"{where}: a convolution after a flatten cannot be exported")
        w = self.param(prefix, "weight", where)
        out, cin, kh, kw = m.weight.shape
        w = g.op("Reshape", w, g.ints("shape", [self.S * out, cin, kh, kw]))
        inputs = [x, w]
        if m.bias is not None:
            inputs.append(g.op("Reshape", self.param(prefix, "bias", where), g.ints("shape", [self.S * out])))
        ph, pw = m.padding
        y = g.op("Conv", *inputs, kernel_shape=[kh, kw], strides=list(m.stride), dilations=list(m.dilation),
                 pads=[ph, pw, ph, pw], group=self.S if layout == "conv" else 1)
        return y, "conv"

    def batchnorm(self, m: nn.BatchNorm2d, prefix: str, x, layout: str):
        where = f"layer {prefix!r} (BatchNorm2d)"
        if any(self.weight(f"{prefix}.{k}") is not None for k in ("weight", "bias")):
            raise ValueError(f"{where}: a BatchNorm with a prior on its parameters cannot be exported")
        if layout != "conv":
            raise ValueError(f"{where}: BatchNorm2d must follow a convolution to be exported")
        mean, var = self.shared[f"{prefix}.running_mean"].float(), self.shared[f"{prefix}.running_var"].float()
        gamma = self.shared.get(f"{prefix}.weight", torch.ones_like(mean)).float()
        beta = self.shared.get(f"{prefix}.bias", torch.zeros_like(mean)).float()
        a = gamma / torch.sqrt(var + m.eps)
        b = beta - mean * a
        g = self.g
        shape = [1, self.S * mean.numel(), 1, 1]
        y = g.op("Mul", x, g.const(f"{prefix}.a", a.repeat(self.S).reshape(shape).detach()))
        return g.op("Add", y, g.const(f"{prefix}.b", b.repeat(self.S).reshape(shape).detach())), "conv"

    def flatten(self, x, layout: str, start: int, where: str):
        g = self.g
        if layout == "dense":
            return x, layout
        if layout == "plain":
            return g.op("Flatten", x, axis=1), "plain"
        if start not in (1, -3):
            raise ValueError(f"{where}: only a flatten of (C, H, W) can be exported, got start_dim={start}")
        y = g.op("Reshape", x, g.ints("shape", [0, self.S, -1]))
        return g.op("Transpose", y, perm=[1, 0, 2]), "dense"

    def maxpool(self, x, layout: str, kernel, stride, padding, where: str, dilation=1, ceil_mode=False):
        pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]  # noqa: E731
        if layout == "dense" or dilation not in (1, (1, 1)) or ceil_mode:
            raise ValueError(f"{where}: only a 2-D max pool without dilation or ceil_mode can be exported")
        k, p = pair(kernel), pair(padding)
        s = pair(stride) if stride not in (None, []) else k
        return self.g.op("MaxPool", x, kernel_shape=k, strides=s, pads=[p[0], p[1], p[0], p[1]]), layout


def lower_network(g: GraphWriter, net: nn.Module, x: str, num_samples: int, weight: Callable,
                  shared: dict) -> tuple[str, str]:
    """Write ``net``'s layers for ``num_samples`` draws on the graph input ``x``.

    :param weight: ``weight(param_name)``: the tensor name of that parameter's draws ``(S, *shape)``,
        or ``None`` for a parameter without a prior (taken from ``shared``).
    :param shared: the network's deterministic parameters and buffers by name.
    :returns: ``(output name, layout)``.
    :raises ValueError: naming the first layer or operation that cannot be exported.

    Usage::

        out, layout = lower_network(g, template, "x", 32, weight_of, shared)
    """
    graph = _trace(net)
    low = _Lowering(g, net, num_samples, weight, shared)
    env: dict = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node.name] = (x, "plain")
        elif node.op == "output":
            return env[node.args[0].name]
        elif node.op == "call_module":
            env[node.name] = _module_node(low, node, env)
        elif node.op in ("call_function", "call_method"):
            env[node.name] = _function_node(low, node, env)
        else:
            raise ValueError(f"operation {node.op} {node.target!r} of the network cannot be exported to ONNX")
    raise ValueError("the traced network has no output")


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, FakeQuantActivation) or super().is_leaf_module(m, qualname)


def _trace(net: nn.Module) -> torch.fx.Graph:
    try:
        return _Tracer().trace(net)
    except Exception as err:  # fx raises many kinds for data-dependent control flow
        raise ValueError(f"the network {type(net).__name__} cannot be traced for ONNX export "
                         f"({type(err).__name__}: {err})") from err


def _arg(env: dict, node, i: int = 0):
    return env[node.args[i].name]


def _module_node(low: _Lowering, node, env):
    m, prefix = low.modules[node.target], node.target
    x, layout = _arg(env, node)
    where = f"layer {prefix!r} ({type(m).__name__})"
    if isinstance(m, nn.Linear):
        return low.linear(m, prefix, x, layout)
    if isinstance(m, nn.Conv2d):
        return low.conv(m, prefix, x, layout)
    if isinstance(m, nn.BatchNorm2d):
        return low.batchnorm(m, prefix, x, layout)
    if isinstance(m, nn.Flatten):
        if m.end_dim != -1:
            raise ValueError(f"{where}: only a flatten to the last dimension can be exported")
        return low.flatten(x, layout, m.start_dim, where)
    if isinstance(m, nn.MaxPool2d):
        return low.maxpool(x, layout, m.kernel_size, m.stride, m.padding, where, m.dilation, m.ceil_mode)
    if isinstance(m, FakeQuantActivation):
        call = low.calls.get(prefix, 0)
        low.calls[prefix] = call + 1
        state = {k: low.shared[f"{prefix}.{k}"] for k in ("lo", "hi", "ready")}
        return _fake_quant(low.g, m, state, call, x, where), layout
    return _activation(low.g, m, x, where), layout


def _function_node(low: _Lowering, node, env):
    g, target = low.g, node.target
    where = f"operation {getattr(target, '__name__', target)!r} ({node.name})"
    if target in _FUNCTIONS or target == "relu":
        x, layout = _arg(env, node)
        return g.op(_FUNCTIONS.get(target, "Relu"), x), layout
    if target in (F.max_pool2d, torch.max_pool2d):
        x, layout = _arg(env, node)
        kw = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), node.args[1:]))
        kw.update(node.kwargs)
        return low.maxpool(x, layout, kw["kernel_size"], kw.get("stride"), kw.get("padding", 0), where,
                           kw.get("dilation", 1), kw.get("ceil_mode", False))
    if target in ("flatten", torch.flatten):
        x, layout = _arg(env, node)
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return low.flatten(x, layout, start, where)
    if target in (operator.add, torch.add) and len(node.args) == 2:
        (a, la), (b, lb) = _arg(env, node, 0), _arg(env, node, 1)
        if la != lb:
            raise ValueError(f"{where}: cannot add tensors of different layouts ({la}, {lb})")
        return g.op("Add", a, b), la
    if target is F.adaptive_avg_pool2d and node.args[1] in (1, (1, 1)):
        x, layout = _arg(env, node)
        return g.op("GlobalAveragePool", x), layout
    raise ValueError(f"{where} of the network cannot be exported to ONNX; supported layers: Linear, Conv2d, "
                     "BatchNorm2d, ReLU/ReLU6/Hardtanh/LeakyReLU/Tanh/Sigmoid, max pooling, global average "
                     "pooling, flatten and residual addition")


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with full shape inference.

    Usage::

        check_model(onnx.load("lenet-jq4.onnx"))
    """
    onnx.checker.check_model(model, full_check=True)

