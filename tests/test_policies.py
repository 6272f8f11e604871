"""Policies (VPQ, SPQ, JQ, float), quantize(), fine-tuning, the log-quantized guide, activations."""

import pyro
import pytest
import torch
from guide_contract import tiny_classifier
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO

from pyro_bq import IIDNormal
from pyro_bq.guides import AutoLogQuantNormal, AutoMeanFieldNormal, QuantizedGuide, QuantizedNormal, quantize
from pyro_bq.inference import batched_forward
from pyro_bq.io import memory_report
from pyro_bq.models import BayesianClassifier, ResNet20
from pyro_bq.quant import (
    JQ,
    SPQ,
    VPQ,
    CodebookQuantizer,
    FakeQuantActivation,
    FloatPolicy,
    IntervalQuantizer,
    Log2Quantizer,
    UniformQuantizer,
    calibrate_activations_,
    default_loc_quantizer,
    default_sample_quantizer,
    end_site_bits,
    end_sites,
    make_policy,
    quantize_activations,
)


@pytest.fixture
def trained():
    """A tiny MLP classifier and a mean-field guide after a few SVI steps."""
    model, x, y = tiny_classifier("mlp", n=64)
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for _ in range(5):
        svi.step(x, y)
    return model, guide, x, y


def _on_uniform_grid(q, v):
    k = v / q.step()
    return torch.allclose(k, torch.round(k), atol=1e-3)


def _is_pow2(v):
    e = torch.log2(v)
    return torch.equal(e, torch.round(e))


def test_end_sites_are_the_first_and_the_last_layer_of_a_real_resnet():
    model = BayesianClassifier(ResNet20(num_classes=10, in_channels=1, blocks_per_stage=1), IIDNormal(1.0),
                               dataset_size=100)
    guide = AutoMeanFieldNormal(model)
    guide(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    ends = end_sites(guide.sites)
    assert ends == ["net.conv1.weight", "net.linear.weight", "net.linear.bias"]
    # a policy built from them keeps those sites at 8 bits and every other at 4
    qguide = quantize(guide, JQ(4, site_bits={name: 8 for name in ends}))
    assert {name for name in guide.sites if qguide.quantizers[name].loc.bits == 8} == set(ends)
    assert end_sites(["a.w", "b.w", "b.b"]) == ["a.w", "b.w", "b.b"]
    with pytest.raises(ValueError, match="site_names is empty"):
        end_sites([])
    with pytest.raises(TypeError, match="site_names entry"):
        end_sites(["a.w", 3])


def test_end_site_bits_raise_only_the_ends_and_only_above_the_row_bits():
    names = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight", "net.fc.bias"]
    assert end_site_bits(names, 8, 4) == {"net.conv1.weight": 8, "net.fc.weight": 8, "net.fc.bias": 8}
    assert end_site_bits(names, 8, 8) is None and end_site_bits(names, None, 2) is None


def test_the_default_grids_take_a_range_and_mse_clips_outliers():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 500, generator=gen)
    w[:, 0] = 8.0  # one outlier per channel stretches the min/max range
    err = {}
    for rng in ("auto", "mse"):
        q = default_loc_quantizer(rng).with_bits(4).calibrate(w)
        err[rng] = float((q.quantize(w) - w).pow(2).mean())
    assert err["mse"] < 0.9 * err["auto"]
    assert default_loc_quantizer().range == "auto" and default_sample_quantizer("mse").range == "mse"
    with pytest.raises(ValueError, match="range"):
        default_loc_quantizer("best")


def test_vpq_quantizes_loc_and_scale_and_samples_stay_float(trained):
    model, guide, x, y = trained
    q = quantize(guide, VPQ(3))
    for name in guide.sites:
        loc, scale = q.get_loc_scale(name)
        sq = q.quantizers[name]
        assert isinstance(sq.loc, UniformQuantizer) and isinstance(sq.scale, Log2Quantizer) and sq.sample is None
        assert _on_uniform_grid(sq.loc, loc) and _is_pow2(scale)
        assert not isinstance(q.get_posterior(name).base_dist, QuantizedNormal)
    draws = q.sample_latents(4)
    w = draws["net.1.weight"]
    assert w.unique().numel() > 1000  # continuous draws


def test_spq_keeps_float_parameters_and_quantizes_every_sample(trained):
    model, guide, x, y = trained
    q = quantize(guide, SPQ(2))
    for name in guide.sites:
        loc, scale = q.get_loc_scale(name)
        f_loc, f_scale = guide.get_loc_scale(name)
        assert torch.equal(loc, f_loc) and torch.equal(scale, f_scale)
    draws = q.sample_latents(6)
    for name, w in draws.items():
        sq = q.quantizers[name].sample
        assert _on_uniform_grid(sq, w)
        # an asymmetric 2-bit grid has 4 levels per output channel
        rows = w.transpose(0, 1).reshape(w.shape[1], -1) if w.dim() > 2 else w.reshape(1, -1)
        assert max(r.unique().numel() for r in rows) <= 4
    # median is the quantized median
    med = q.median()
    assert torch.equal(med["net.1.weight"], q.quantizers["net.1.weight"].sample.quantize(guide.median()["net.1.weight"]))


def test_jq_quantizes_both(trained):
    model, guide, x, y = trained
    q = quantize(guide, JQ(4))
    name = "net.3.weight"
    loc, scale = q.get_loc_scale(name)
    sq = q.quantizers[name]
    assert _on_uniform_grid(sq.loc, loc) and _is_pow2(scale)
    assert _on_uniform_grid(sq.sample, q.sample_latents(3)[name])


def test_float_policy_predicts_like_the_original(trained):
    model, guide, x, y = trained
    q = quantize(guide, FloatPolicy())
    pyro.set_rng_seed(5)
    a = Predictive(model, guide=guide, num_samples=3, return_sites=["logits"])(x)["logits"]
    pyro.set_rng_seed(5)
    b = Predictive(model, guide=q, num_samples=3, return_sites=["logits"])(x)["logits"]
    # the same draws; softplus of per-site slices may differ from the flat one in the last bit
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_quantize_returns_a_new_guide_and_leaves_the_original_untouched(trained):
    model, guide, x, y = trained
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    q = quantize(guide, JQ(2))
    assert isinstance(q, QuantizedGuide) and q is not guide and q.base is not guide
    assert guide.model is model  # Pyro's deepcopy drops the model reference; quantize restores it
    svi = SVI(model, q, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    svi.step(x, y)
    for k, v in guide.state_dict().items():
        assert torch.equal(v, before[k])
    guide(x, y)  # the original still runs


def test_bits_per_site_regex_quantity_and_skip(trained):
    model, guide, x, y = trained
    policy = JQ(
        4,
        scale_bits=2,
        site_bits={"net.1.weight": 8, r"net\.3\..*": {"loc": 3}},
        skip=["net.1.bias"],
    )
    q = quantize(guide, policy)
    assert q.quantizers["net.1.weight"].loc.bits == 8 and q.quantizers["net.1.weight"].scale.bits == 8
    assert q.quantizers["net.3.weight"].loc.bits == 3 and q.quantizers["net.3.weight"].scale.bits == 2
    assert q.quantizers["net.3.bias"].sample.bits == 4
    assert q.quantizers["net.1.bias"].is_float
    assert torch.equal(q.get_loc_scale("net.1.bias")[0], guide.get_loc_scale("net.1.bias")[0])


def test_per_site_quantizer_templates_replace_the_policy_wide_ones(trained):
    model, guide, x, y = trained
    policy = JQ(4, site_bits={"net.1.weight": {"loc": 3}},
                site_quantizers={"net.1.weight": {"loc": IntervalQuantizer(8)},
                                 r"net\.3\..*": {"scale": Log2Quantizer(8, per_channel=True),
                                                  "sample": CodebookQuantizer(8, family="apot")}})
    q = quantize(guide, policy)
    sq = q.quantizers["net.1.weight"]
    assert isinstance(sq.loc, IntervalQuantizer) and sq.loc.bits == 3  # the template, at the resolved bits
    assert isinstance(sq.sample, UniformQuantizer) and sq.scale.per_channel  # the policy's own elsewhere
    for name in ("net.3.weight", "net.3.bias"):
        sq = q.quantizers[name]
        assert isinstance(sq.loc, UniformQuantizer) and isinstance(sq.sample, CodebookQuantizer)
        assert sq.scale.bits == 4 and sq.sample.bits == 4
    with pytest.raises(ValueError, match="matches no site"):
        quantize(guide, VPQ(4, site_quantizers={"net.9.weight": {"loc": IntervalQuantizer(4)}}))
    with pytest.raises(ValueError, match="quantities"):
        VPQ(4, site_quantizers={"net.1.weight": {"mean": IntervalQuantizer(4)}})
    with pytest.raises(TypeError, match=r"site_quantizers\['net.1.weight'\]\['loc'\]"):
        VPQ(4, site_quantizers={"net.1.weight": {"loc": "interval"}})
    with pytest.raises(TypeError, match="site_quantizers must be a mapping"):
        VPQ(4, site_quantizers=[IntervalQuantizer(4)])


def test_every_policy_takes_bits_first(trained):
    model, guide, x, y = trained
    for mode, cls in (("float", FloatPolicy), ("vpq", VPQ), ("spq", SPQ), ("jq", JQ)):
        policy = make_policy(mode, 3, skip=["net.1.bias"])
        assert type(policy) is cls and policy.bits == 3 and cls(3).bits == 3 and policy.skip == ["net.1.bias"]


def test_mixed_precision_maps_plug_in(trained):
    model, guide, x, y = trained
    site_map = {"net.1.weight": 2, "net.1.bias": 8, "net.3.weight": 4, "net.3.bias": 8}
    q = quantize(guide, VPQ(16, site_bits=site_map))
    assert {n: q.quantizers[n].loc.bits for n in site_map} == site_map
    per_param = torch.randint(1, 5, (16, 784), generator=torch.Generator().manual_seed(0))
    qp = quantize(guide, JQ(8, site_bits={"net.1.weight": per_param}))
    assert torch.equal(qp.quantizers["net.1.weight"].loc.bits, per_param)
    report = memory_report(qp)
    row = next(s for s in report.sites if s.name == "net.1.weight")
    # loc and scale codes at the per-parameter bits, plus a 4-bit map per quantity
    assert row.code_bits == 2 * int(per_param.sum())
    with pytest.raises(ValueError, match="broadcast"):
        quantize(guide, JQ(4, site_bits={"net.1.weight": torch.ones(3, 3, dtype=torch.long)}))


def test_bad_policies_are_rejected(trained):
    model, guide, x, y = trained
    with pytest.raises(ValueError, match="bits"):
        JQ(0)
    with pytest.raises(ValueError, match="bits"):
        VPQ(4, site_bits={"net.1.weight": 17})
    with pytest.raises(ValueError, match="quantities"):
        VPQ(4, site_bits={"net.1.weight": {"mean": 4}})
    with pytest.raises(ValueError, match="matches no site"):
        quantize(guide, JQ(4, skip=["net.conv9.weight"]))
    with pytest.raises(TypeError, match="Policy"):
        quantize(guide, "jq")
    with pytest.raises(TypeError, match="guide"):
        quantize(model, JQ(4))
    with pytest.raises(ValueError, match="mode"):
        make_policy("xq", 4)
    with pytest.raises(TypeError, match="loc_quantizer"):
        JQ(4, loc_quantizer="uniform")


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_quantization_aware_fine_tuning_lowers_the_loss(trained, elbo):
    model, guide, x, y = trained
    q = quantize(guide, JQ(2))
    pyro.clear_param_store()
    svi = SVI(model, q, pyro.optim.Adam({"lr": 2e-2}), elbo())
    pyro.set_rng_seed(0)
    losses = [svi.step(x, y) for _ in range(40)]  # Trace_ELBO is noisy: compare means of ten steps
    assert sum(losses[-10:]) < sum(losses[:10])
    q.recalibrate_()
    for name in q.sites:
        assert _on_uniform_grid(q.quantizers[name].loc, q.get_loc_scale(name)[0])


def test_log_quantized_guide_keeps_scales_on_its_grid_while_training():
    model, x, y = tiny_classifier("mlp", n=64)
    guide = AutoLogQuantNormal(model, bits=3, init_scale=0.05)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    before = guide(x, y) and guide.log2_scale.detach().clone()
    for _ in range(10):
        svi.step(x, y)
        for name in guide.sites:
            e = torch.log2(guide.get_loc_scale(name)[1])
            assert torch.equal(e, torch.round(e))
            assert e.max() - e.min() <= 2**3 - 1
    assert not torch.equal(before, guide.log2_scale.detach())
    # quantize() reuses the guide's own grid: no post-hoc change to the scales
    q = quantize(guide, VPQ(3))
    for name in guide.sites:
        assert torch.equal(q.get_loc_scale(name)[1], guide.get_loc_scale(name)[1])
    with pytest.raises(ValueError, match="bits"):
        AutoLogQuantNormal(model, bits=0)


def test_activation_quantization_keeps_sites_and_puts_activations_on_a_grid():
    model, x, y = tiny_classifier("lenet")
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    guide(x, y)
    qm = quantize_activations(model, 8, guide=guide, data=x, num_samples=2)
    assert qm is not model and qm.weight_sites == model.weight_sites
    assert not any(isinstance(m, FakeQuantActivation) for m in model.net.modules())
    act = qm.net.act
    assert bool(act.ready[:4].all()) and not bool(act.ready[4:].any())  # LeNet-5 uses its activation 4 times
    draws = {k: v[None] for k, v in guide.median().items()}  # weights seen during calibration
    a, b = batched_forward(model, draws, x), batched_forward(qm, draws, x)
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # 8 bits: close to float
    low = quantize_activations(model, 2, guide=guide, data=x, num_samples=2)
    assert (batched_forward(low, draws, x) - a).abs().max() > (b - a).abs().max()
    # activations land on the grid: capture them with a hook on the module's output
    seen = []
    handle = qm.net.act.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    pyro.poutine.condition(qm, data=guide.median())(x)
    handle.remove()
    for k, out in enumerate(seen):
        step = (act.hi[k] - act.lo[k]) / 255
        idx = (out - act.lo[k]) / step
        assert torch.allclose(idx, torch.round(idx), atol=1e-3)
    pyro.set_rng_seed(0)
    assert Predictive(qm, guide=guide, num_samples=2, return_sites=["logits"])(x)["logits"].shape == (2, 32, 10)


def test_bounded_activations_use_their_natural_range():
    model, x, y = tiny_classifier("mlp")
    guide = AutoMeanFieldNormal(model, init_scale=0.05)
    guide(x, y)
    qm = quantize_activations(model, 4, activation="relu6", range="natural")
    fq = [m for m in qm.net.modules() if isinstance(m, FakeQuantActivation)]
    assert len(fq) == 1 and isinstance(fq[0].activation, torch.nn.ReLU6)
    assert fq[0].lo[0].item() == 0.0 and fq[0].hi[0].item() == 6.0
    out = batched_forward(qm, guide.sample_latents(2), x)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="natural"):
        quantize_activations(model, 4, activation="relu", range="natural")
    with pytest.raises(ValueError, match="activation"):
        quantize_activations(model, 4, activation="swish")
    from pyro_bq import IIDNormal
    from pyro_bq.models import BayesianClassifier, ResNet20

    resnet = BayesianClassifier(ResNet20(in_channels=1), IIDNormal(1.0), dataset_size=10)
    with pytest.raises(ValueError, match="no activation modules"):
        quantize_activations(resnet, 4)
    calibrate_activations_(qm, guide, x, num_samples=1)  # natural ranges are kept
    assert fq[0].hi[0].item() == 6.0


def test_quantizing_a_quantized_guide_starts_from_its_float_parameters(trained):
    model, guide, x, y = trained
    q4 = quantize(guide, JQ(4))
    q2 = quantize(q4, VPQ(2))
    assert isinstance(q2.base, AutoMeanFieldNormal)
    direct = quantize(guide, VPQ(2))
    for name in guide.sites:
        assert torch.equal(q2.get_loc_scale(name)[0], direct.get_loc_scale(name)[0])
    pyro.set_rng_seed(0)
    assert Predictive(model, guide=q2, num_samples=2, return_sites=["logits"])(x)["logits"].shape == (2, 64, 10)
