"""ONNX export of (quantized) Bayesian classifiers, run with onnxruntime."""

import onnx
import onnxruntime as ort
import pyro
import pytest
import torch
from guide_contract import float_guide
from torch import nn

from pyro_bq import IIDNormal
from pyro_bq.export import OUTPUTS, to_onnx, to_onnx_point, weights_from_eps
from pyro_bq.guides import AutoMeanFieldNormal, quantize
from pyro_bq.io import save_packed
from pyro_bq.models import BayesianClassifier, ResNet20
from pyro_bq.quant import JQ, SPQ, VPQ, CodebookQuantizer, GaussianLloydQuantizer
from pyro_bq.quant.activation import quantize_activations
from pyro_bq.uncertainty import decompose, predictive_logits


def _run(path, sess=None, **feeds):
    sess = sess or ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, (torch.from_numpy(v) for v in sess.run(None, {k: v.numpy() for k, v in feeds.items()}))))


def _num_weights(guide):
    return sum(info.numel for info in guide.sites.values())


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


POLICIES = {"jq4": lambda: JQ(4), "vpq4": lambda: VPQ(4), "spq4": lambda: SPQ(4), "float": lambda: None,
            "codebook": lambda: VPQ(4, loc_quantizer=CodebookQuantizer(3))}


@pytest.mark.parametrize("net", ["mlp", "lenet"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_eps_input_gives_pyro_bq_logits_for_the_same_draws(net, policy, tmp_path):
    pyro.clear_param_store()
    model, guide, x, _ = float_guide(net)
    pol = POLICIES[policy]()
    q = quantize(guide, pol) if pol is not None else guide
    path = tmp_path / "m.onnx"
    to_onnx(model, q, path, num_samples=5, example_input=x[:1], noise="input")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    eps = torch.randn(5, _num_weights(q), generator=torch.Generator().manual_seed(1))
    out = _run(path, x=x, eps=eps)
    ref = predictive_logits(model, x=x, samples=weights_from_eps(q, eps))
    assert out["logits"].shape == ref.shape
    assert _rel(out["logits"], ref) <= 1e-5
    parts = decompose(torch.softmax(ref, -1))
    assert torch.allclose(out["probs"], parts["mean_probs"], atol=1e-6)
    for key in ("total", "aleatoric", "epistemic"):
        assert torch.allclose(out[key], parts[key], atol=1e-5), key


def test_quantized_weights_are_stored_as_codes(tmp_path):
    pyro.clear_param_store()
    model, guide, x, _ = float_guide("lenet")
    to_onnx(model, guide, tmp_path / "float.onnx", num_samples=2, example_input=x[:1])
    to_onnx(model, quantize(guide, JQ(4)), tmp_path / "jq4.onnx", num_samples=2, example_input=x[:1])
    graph = onnx.load(tmp_path / "jq4.onnx").graph
    codes = [t for t in graph.initializer if t.name.endswith("_codes")]
    assert codes and all(t.data_type == onnx.TensorProto.UINT8 for t in codes)
    assert (tmp_path / "jq4.onnx").stat().st_size * 3 < (tmp_path / "float.onnx").stat().st_size
    # 4-bit codes take half a byte each: the graph (nodes included) is near the size of the bit-packed .bq file
    assert (tmp_path / "jq4.onnx").stat().st_size < 1.5 * save_packed(quantize(guide, JQ(4)), tmp_path / "q.bq")


def test_in_graph_noise_agrees_with_pyro_bq_within_monte_carlo_error(tmp_path):
    """Two independent Monte Carlo estimates of the predictive mean: the graph's (its own noise) and
    pyro_bq's (its own seed). Per input and class, their difference must lie within 5 standard errors
    of a difference of two means (each from the per-draw probabilities' spread); the per-draw spread of
    the logits must agree too, so a graph that dropped or rescaled the noise fails."""
    pyro.clear_param_store()
    model, guide, x, _ = float_guide("lenet")
    q = quantize(guide, JQ(4))
    S = 200
    path = tmp_path / "m.onnx"
    to_onnx(model, q, path, num_samples=S, example_input=x[:1], noise="graph")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = _run(path, sess, x=x)
    ref = predictive_logits(model, q, x, num_samples=S, seed=3)
    p_onnx, p_ref = torch.softmax(out["logits"], -1), torch.softmax(ref, -1)
    assert torch.allclose(out["probs"], p_onnx.mean(0), atol=1e-6)
    se = ((p_onnx.var(0) + p_ref.var(0)) / S).sqrt()
    assert ((out["probs"] - p_ref.mean(0)).abs() <= 5 * se + 1e-6).all()
    spread_onnx, spread_ref = out["logits"].std(0).mean(), ref.std(0).mean()
    assert spread_ref > 0.05
    assert 0.8 < float(spread_onnx / spread_ref) < 1.25
    again = _run(path, sess, x=x)
    assert not torch.equal(again["logits"], out["logits"])  # fresh noise on every run of a session


def test_point_network_is_the_median_network(tmp_path):
    pyro.clear_param_store()
    model, guide, x, _ = float_guide("lenet")
    q = quantize(guide, JQ(4))
    to_onnx_point(model, q, tmp_path / "p.onnx", example_input=x[:1])
    out = _run(tmp_path / "p.onnx", x=x)
    ref = predictive_logits(model, x=x, samples={k: v.unsqueeze(0) for k, v in q.median().items()})[0]
    assert _rel(out["logits"], ref) <= 1e-5
    assert [i.name for i in onnx.load(tmp_path / "p.onnx").graph.input] == ["x"]


def test_resnet20_and_activation_quantization_export(tmp_path):
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = BayesianClassifier(ResNet20(blocks_per_stage=1), IIDNormal(1.0), dataset_size=100)
    x = torch.randn(3, 3, 32, 32)
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    guide(x)
    q = quantize(guide, JQ(4))
    to_onnx(model, q, tmp_path / "r.onnx", num_samples=2, example_input=x[:1], noise="input")
    eps = torch.randn(2, _num_weights(q))
    ref = predictive_logits(model, x=x, samples=weights_from_eps(q, eps))
    assert _rel(_run(tmp_path / "r.onnx", x=x, eps=eps)["logits"], ref) <= 1e-5

    pyro.clear_param_store()
    model, guide, x, _ = float_guide("lenet")
    qmodel = quantize_activations(model, 4, activation="relu6", range="natural")
    q = quantize(guide, JQ(4))
    to_onnx(qmodel, q, tmp_path / "a.onnx", num_samples=2, example_input=x[:1], noise="input")
    eps = torch.randn(2, _num_weights(q))
    ref = predictive_logits(qmodel, x=x, samples=weights_from_eps(q, eps))
    assert _rel(_run(tmp_path / "a.onnx", x=x, eps=eps)["logits"], ref) <= 1e-5


class _WithGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.odd = nn.GELU()

    def forward(self, x):
        return self.odd(self.fc(x.flatten(1)))


def test_unexportable_layers_and_sites_are_named(tmp_path):
    pyro.clear_param_store()
    model = BayesianClassifier(_WithGelu(), IIDNormal(1.0), dataset_size=10)
    x = torch.randn(2, 1, 28, 28)
    guide = AutoMeanFieldNormal(model)
    guide(x)
    with pytest.raises(ValueError, match="layer 'odd'.*GELU"):
        to_onnx(model, guide, tmp_path / "m.onnx", example_input=x)

    pyro.clear_param_store()
    model, guide, x, _ = float_guide("lenet")
    qmodel = quantize_activations(model, 4, activation=nn.GELU)
    with pytest.raises(ValueError, match="layer 'act'.*GELU"):
        to_onnx(qmodel, guide, tmp_path / "m.onnx", example_input=x[:1])

    q = quantize(guide, VPQ(4, loc_quantizer=GaussianLloydQuantizer(3), skip=["net.conv1.bias"]))
    with pytest.raises(ValueError, match=r"site 'net.conv1.weight' loc.*GaussianLloydQuantizer"):
        to_onnx(model, q, tmp_path / "m.onnx", example_input=x[:1])
    with pytest.raises(ValueError, match="noise"):
        to_onnx(model, guide, tmp_path / "m.onnx", example_input=x[:1], noise="gaussian")
    assert not (tmp_path / "m.onnx").exists()
    assert OUTPUTS[0] == "logits"
