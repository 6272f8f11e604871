"""The shortcuts of the study's row evaluation give the numbers of the long way, bit for bit."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.models.nets import max_pool_2x2
from pyro_bq.priors import LayerwiseNormal
from pyro_bq.quant import quantize_activations
from pyro_bq.quant.activation import FakeQuantActivation, round_to_grid
from pyro_bq.quant.grids import interval_grid, ste, uniform_quantize
from pyro_bq.study import StudyConfig
from pyro_bq.study.runner import EVAL_BATCH, _arviz_logits
from pyro_bq.uncertainty import evaluate_details, predictive_logits, to_arviz

pytestmark = pytest.mark.usefixtures("one_thread")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# -- pooling ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 6, 28, 28), (2, 16, 10, 10), (5, 4, 6), (1, 2, 3, 2, 4)])
def test_max_pool_2x2_is_max_pool2d_to_the_last_bit(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, shape, generator=g).float() * 0.5  # many ties, zeros of both signs
    x[x == 0] = torch.where(torch.rand(int((x == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    x.view(-1)[::7] = float("nan")
    flat = x.reshape(-1, *shape[-3:]) if x.dim() > 4 else x
    ref = F.max_pool2d(flat, 2).reshape(*shape[:-2], shape[-2] // 2, shape[-1] // 2)
    out = max_pool_2x2(x)
    assert out.shape == ref.shape
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(_bits(out.nan_to_num()), _bits(ref.nan_to_num()))


def test_max_pool_2x2_keeps_max_pool2d_for_odd_sizes_gradients_and_tracing():
    x = torch.rand(2, 3, 7, 9)
    assert torch.equal(max_pool_2x2(x), F.max_pool2d(x, 2))
    w = torch.rand(2, 3, 8, 8, requires_grad=True)
    max_pool_2x2(w).sum().backward()
    ref = w.detach().clone().requires_grad_(True)
    F.max_pool2d(ref, 2).sum().backward()
    assert torch.equal(w.grad, ref.grad)
    targets = [n.target for n in fx.symbolic_trace(LeNet5()).graph.nodes if n.op == "call_function"]
    assert targets.count(F.max_pool2d) == 2


def test_lenet5_forward_without_gradient_equals_the_max_pool2d_network():
    torch.manual_seed(0)
    net = LeNet5().eval()
    x = torch.randn(64, 1, 28, 28)

    def reference(x):
        x = F.max_pool2d(net.act(net.conv1(x)), 2)
        x = F.max_pool2d(net.act(net.conv2(x)), 2).flatten(-3)
        return net.fc3(net.act(net.fc2(net.act(net.fc1(x)))))

    with torch.no_grad():
        assert torch.equal(_bits(net(x)), _bits(reference(x)))


# -- activation quantization --------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_to_grid_is_uniform_quantize_to_the_last_bit(bits):
    y = torch.randn(4, 6, 12, 12) * 3
    y_before = y.clone()
    grid = interval_grid(torch.tensor(-0.7), torch.tensor(4.1), bits)
    out = round_to_grid(y, *grid)
    assert torch.equal(_bits(out), _bits(uniform_quantize(y, *grid)))
    assert torch.equal(y, y_before)  # the input is not overwritten


def test_fake_quant_activation_without_gradient_gives_the_straight_through_values():
    act = FakeQuantActivation(nn.ReLU6(), bits=8, range="natural")
    x = torch.randn(3, 5, 7) * 4
    with torch.no_grad():
        fast = act(x)
    slow = act(x.clone().requires_grad_(True))
    assert slow.requires_grad
    expected = ste(F.relu6(x), uniform_quantize(F.relu6(x), *interval_grid(act.lo[0], act.hi[0], 8)))
    assert torch.equal(_bits(fast), _bits(slow.detach())) and torch.equal(_bits(fast), _bits(expected))


# -- the ArviZ export reuses the evaluation's logits ---------------------------------------------------
@pytest.fixture(scope="module")
def lenet_rows():
    torch.manual_seed(0)
    model = BayesianClassifier(LeNet5(), LayerwiseNormal(1.0), 1000)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2 * EVAL_BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2 * EVAL_BATCH,), generator=g)
    guide = AutoMeanFieldNormal(model, init_scale=0.05).setup(x[:2], y[:2])
    return model, guide, x, y


def _arrays(idata) -> dict:
    return {f"{group}/{name}": np.asarray(var.values) for group in idata.groups()
            for name, var in getattr(idata, group).data_vars.items()}


@pytest.mark.parametrize("act_bits", [None, 8])
def test_to_arviz_with_the_evaluations_logits_equals_predicting_again(lenet_rows, act_bits):
    model, guide, x, y = lenet_rows
    if act_bits is not None:
        model = quantize_activations(model, act_bits, guide=guide, data=x[:64], seed=0)
    record, details = evaluate_details(model, guide, (x, y), x.flip(0), num_samples=3, seed=5,
                                       batch_size=EVAL_BATCH, keep_logits=True)
    n = EVAL_BATCH
    fresh = to_arviz(model, guide, x[:n], y[:n], num_samples=3, seed=5, batch_size=EVAL_BATCH)
    handed = to_arviz(model, guide, x[:n], y[:n], num_samples=3, seed=5, batch_size=EVAL_BATCH,
                      logits=details["in"]["logits"][:, :n])
    a, b = _arrays(fresh), _arrays(handed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_evaluate_details_draws_the_same_weights_for_every_set(lenet_rows):
    model, guide, x, y = lenet_rows
    _, details = evaluate_details(model, guide, (x[:100], y[:100]), x[100:200], ambiguous_data=x[200:300],
                                  num_samples=3, seed=2, keep_logits=True)
    for key, rows in (("in", slice(0, 100)), ("ood", slice(100, 200)), ("ambiguous", slice(200, 300))):
        alone = predictive_logits(model, guide, x[rows], num_samples=3, seed=2)
        assert torch.equal(details[key]["logits"], alone)


def test_to_arviz_refuses_logits_of_another_shape(lenet_rows):
    model, guide, x, y = lenet_rows
    with pytest.raises(ValueError, match="logits must have shape"):
        to_arviz(model, guide, x[:10], y[:10], num_samples=3, logits=torch.zeros(2, 10, 10))
    with pytest.raises(TypeError, match="logits must be a tensor"):
        to_arviz(model, guide, x[:10], y[:10], num_samples=3, logits=[[0.0]])


class _Set:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("samples, limit, size, reused", [
    (4, 500, 1000, True),      # the first batch of the evaluation
    (4, 1000, 2000, True),     # two whole batches
    (4, 600, 600, True),       # the whole set, whatever its size
    (4, 300, 1000, False),     # part of a batch: another pass shape
    (5, 500, 1000, False),     # other draws
])
def test_the_study_hands_over_logits_only_where_they_are_the_arviz_ones(samples, limit, size, reused):
    cfg = StudyConfig(num_samples=4, arviz_samples=samples, arviz_limit=limit)
    logits = torch.rand(4, size, 10)
    got = _arviz_logits(cfg, {"in": {"logits": logits}}, {"mnist": _Set(size)})
    if reused:
        assert torch.equal(got, logits[:, :min(limit, size)])
    else:
        assert got is None
