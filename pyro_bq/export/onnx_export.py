"""ONNX export of a (quantized) Bayesian classifier: :func:`to_onnx` and :func:`to_onnx_point`.

:func:`to_onnx` writes one graph that, for a batch ``x``, returns the ``S``
per-draw logits, the mean class probabilities and the total, aleatoric and
epistemic uncertainty (nats, as :func:`pyro_bq.uncertainty.decompose`
computes them). The weights are stored as quantized codes plus their
calibration (:mod:`pyro_bq.export.weights`); the noise of the weight draws is
drawn in the graph (``noise="graph"``: ``RandomNormal``) or fed as the input
``eps`` (``noise="input"``: reproducible, and equal to pyro_bq's draws for the
same noise, see :func:`~pyro_bq.export.weights.weights_from_eps`).

:func:`to_onnx_point` writes the deterministic point network (the guide's
median weights, e.g. PWFN's fixed codebook values) as a plain ONNX graph.

Both check the graph with ``onnx.checker`` and write it atomically. The
graphs use opset :data:`~pyro_bq.export.graph.OPSET` and run in onnxruntime.

Readings of the paper
---------------------
The papers evaluate the predictive distribution by Monte Carlo over weight
draws; the graph does the same with a fixed number of draws ``S`` chosen at
export time (the noise's shape is static).
"""

from __future__ import annotations

import os
from typing import Optional

import onnx
import torch
from onnx import TensorProto, helper

from pyro_bq._validation import check_choice, check_int, check_tensor
from pyro_bq.guides.base import AutoGaussianSites
from pyro_bq.io.container import atomic_write_bytes
from pyro_bq.quant.policies import SiteQuantizers

from .graph import OPSET, GraphWriter, check_model, lower_network
from .weights import guide_parts, site_draws

__all__ = ["to_onnx", "to_onnx_point", "OUTPUTS"]

#: the outputs of :func:`to_onnx`'s graph, in order
OUTPUTS = ("logits", "probs", "total", "aleatoric", "epistemic")
#: the smallest probability whose logarithm the entropies take (``0 log 0 = 0``)
_TINY = 1e-38


def _check_classifier(model) -> None:
    if not callable(getattr(model, "functional_net", None)) or getattr(model, "output_site", None) != "logits":
        raise ValueError(f"model must be a pyro_bq BayesianClassifier (a model whose output site is 'logits' and "
                         f"which has functional_net), got {type(model).__name__}")


def _check_guide(guide) -> None:
    if not isinstance(guide, AutoGaussianSites):
        raise TypeError(f"guide must be a pyro_bq guide (a QuantizedGuide or another AutoGaussianSites guide), "
                        f"got {type(guide).__name__}")
    if guide.prototype_trace is None:
        raise ValueError("guide has no parameters yet: train it, or call guide.setup(x), first")


def _network(model, guide, x: torch.Tensor):
    """The model's parameter-free network and its deterministic tensors, for the guide's sites."""
    median = {name: value.unsqueeze(0) for name, value in guide.median().items()}
    net, _, shared = model.functional_net(median, x)
    return net, {k: v.detach() for k, v in shared.items()}


def _check_common(model, guide, path, example_input) -> torch.Tensor:
    _check_classifier(model)
    _check_guide(guide)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    check_tensor("example_input", example_input)
    if example_input.dim() < 2 or example_input.shape[0] < 1 or not example_input.is_floating_point():
        raise ValueError(f"example_input must be a floating-point tensor (N, ...features), got "
                         f"{tuple(example_input.shape)} of {example_input.dtype}")
    return example_input[:1].detach().float().cpu()


def _input(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _finish(g: GraphWriter, inputs: list, outputs: list, path, doc: str) -> int:
    graph = helper.make_graph(g.nodes, "pyro_bq", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pyro_bq",
                              doc_string=doc)
    model.ir_version = 8  # readable by onnxruntime releases back to 1.10
    check_model(model)
    data = model.SerializeToString()
    atomic_write_bytes(path, [data])
    return len(data)


def _entropy(g: GraphWriter, probs: str) -> str:
    """``-sum p log p`` over the last axis (``0 log 0 = 0``)."""
    plogp = g.op("Mul", probs, g.op("Log", g.op("Max", probs, g.floats("tiny", _TINY))))
    return g.op("Neg", g.op("ReduceSum", plogp, g.ints("axes", [-1]), keepdims=0))


def _uncertainty_outputs(g: GraphWriter, logits: str) -> None:
    """Mean probabilities, total, aleatoric and epistemic uncertainty from the per-draw logits."""
    probs = g.op("Softmax", logits, axis=-1)
    g.op("ReduceMean", probs, axes=[0], keepdims=0, out="probs")
    total = _entropy(g, "probs")
    g.op("Identity", total, out="total")
    aleatoric = g.op("ReduceMean", _entropy(g, probs), axes=[0], keepdims=0, out="aleatoric")
    g.op("Max", g.op("Sub", total, aleatoric), g.floats("zero", 0.0), out="epistemic")


def to_onnx(model, guide, path: os.PathLike, *, num_samples: int = 32, example_input: torch.Tensor,
            noise: str = "graph", seed: Optional[int] = None) -> int:
    """Write ``guide``'s Bayesian network as one ONNX graph that predicts with its uncertainty.

    :param model: the :class:`~pyro_bq.models.BayesianClassifier` the guide was trained for.
    :param guide: a :class:`~pyro_bq.guides.quantized.QuantizedGuide` (VPQ, SPQ, JQ) or a float guide.
    :param path: the ``.onnx`` file to write.
    :param num_samples: the number of weight draws ``S`` per prediction.
    :param example_input: one or more inputs ``(N, ...)`` (the graph takes any ``N``).
    :param noise: ``"graph"``: the noise is drawn in the graph (``RandomNormal``, with ``seed`` if given);
        ``"input"``: it is the graph input ``eps`` of shape ``(S, P)``, ``P`` the number of weights.
    :returns: the file size in bytes.
    :raises ValueError: naming the site or layer that cannot be exported (an unsupported layer or
        quantizer, activation quantization around an unknown activation).

    With ``noise="graph"`` every run of an onnxruntime session draws fresh noise; onnxruntime starts
    every new session from the same default seed (set ``seed`` to give a deployment its own stream).

    The graph's inputs are ``x`` (and ``eps``); its outputs :data:`OUTPUTS`: ``logits`` ``(S, N, C)``,
    ``probs`` ``(N, C)``, and ``total``, ``aleatoric``, ``epistemic`` ``(N,)``.

    Usage::

        to_onnx(model, quantize(guide, JQ(4)), "lenet-jq4.onnx", num_samples=32, example_input=x[:1])
    """
    x = _check_common(model, guide, path, example_input)
    num_samples = check_int("num_samples", num_samples, low=1)
    noise = check_choice("noise", noise, ("graph", "input"))
    if seed is not None:
        seed = check_int("seed", seed)
    net, shared = _network(model, guide, x)
    _, quantizers = guide_parts(guide)
    total = sum(info.numel for info in guide.sites.values())
    g = GraphWriter()
    g.name("x")
    inputs = [_input("x", ["N", *x.shape[1:]])]
    if noise == "input":
        eps = g.name("eps")
        inputs.append(_input("eps", [num_samples, total]))
    else:
        extra = {"seed": float(seed)} if seed is not None else {}
        eps = g.op("RandomNormal", shape=[num_samples, total], dtype=TensorProto.FLOAT, **extra)
    draws: dict = {}

    def weight(param: str) -> Optional[str]:
        site = f"net.{param}"
        if site not in guide.sites:
            return None
        if site not in draws:
            loc, scale = guide_parts(guide)[0].get_loc_scale(site)
            draws[site] = site_draws(g, site, guide.sites[site], quantizers.get(site) or SiteQuantizers(),
                                     loc.detach(), scale.detach(), eps, num_samples)
        return draws[site]

    with torch.no_grad():
        out, layout = lower_network(g, net, "x", num_samples, weight, shared)
    _check_output(out, layout, draws, guide)
    g.op("Identity", out, out="logits")
    _uncertainty_outputs(g, "logits")
    outputs = [_input(name, shape) for name, shape in zip(OUTPUTS, ([num_samples, "N", "C"], ["N", "C"], ["N"],
                                                                    ["N"], ["N"]))]
    return _finish(g, inputs, outputs, path, f"pyro_bq Bayesian classifier, {num_samples} weight draws, noise={noise}")


def _check_output(out: str, layout: str, draws: dict, guide) -> None:
    if layout != "dense":
        raise ValueError(f"the network's output has layout {layout!r}; only networks ending in a Linear layer "
                         "(logits (N, C)) can be exported")
    unused = [site for site in guide.sites if site not in draws]
    if unused:
        raise ValueError(f"the guide's sites {unused} are not weights of any exported layer")


def to_onnx_point(model, guide, path: os.PathLike, *, example_input: torch.Tensor) -> int:
    """Write the deterministic point network (the guide's median weights, quantized where the guide is)
    as a plain ONNX graph: input ``x`` ``(N, ...)``, outputs ``logits`` and ``probs`` ``(N, C)``.

    :returns: the file size in bytes.
    :raises ValueError: naming the layer that cannot be exported.

    Usage::

        to_onnx_point(model, qguide, "lenet-point.onnx", example_input=x[:1])
    """
    x = _check_common(model, guide, path, example_input)
    net, shared = _network(model, guide, x)
    median = guide.median()
    g = GraphWriter()
    g.name("x")
    used: dict = {}

    def weight(param: str) -> Optional[str]:
        site = f"net.{param}"
        if site not in median:
            return None
        used[site] = g.const(site, median[site].detach().float().unsqueeze(0))
        return used[site]

    with torch.no_grad():
        out, layout = lower_network(g, net, "x", 1, weight, shared)
    _check_output(out, layout, used, guide)
    logits = g.op("Squeeze", out, g.ints("axis", [0]), out="logits")
    g.op("Softmax", logits, axis=-1, out="probs")
    outputs = [_input("logits", ["N", "C"]), _input("probs", ["N", "C"])]
    return _finish(g, [_input("x", ["N", *x.shape[1:]])], outputs, path, "pyro_bq point network (median weights)")
