"""Deployment: a (quantized) Bayesian classifier as an ONNX graph that onnxruntime runs.

:func:`to_onnx` writes one graph that returns the per-draw logits, the mean
probabilities and the aleatoric, epistemic and total uncertainty, with the
weights stored as quantized codes and drawn in the graph (or from an ``eps``
input); :func:`to_onnx_point` writes the median-weight point network.
Needs the ``export`` extra (``pip install pyro-bq[export]``: onnx, onnxruntime).

Usage::

    from pyro_bq.export import to_onnx

    to_onnx(model, quantize(guide, JQ(4)), "lenet-jq4.onnx", num_samples=32, example_input=x[:1])
"""

from .onnx_export import OUTPUTS, to_onnx, to_onnx_point
from .weights import weights_from_eps

__all__ = ["to_onnx", "to_onnx_point", "weights_from_eps", "OUTPUTS"]
