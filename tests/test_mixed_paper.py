"""The mixed-precision allocators as the Quantile Inform / Random Bits paper defines them, and honest counts.

Accuracy at the quantized means next to the sampled accuracy; Step 4's choice
among threshold trials by accuracy on held-out training data; a layer as a
module's weight and bias; the unclipped QIU grid; exact Random Bits site
sizes and widths checked at allocation; no thread settings changed by the library.
"""

import pytest
import torch

from pyro_bq import IIDNormal
from pyro_bq.data import InMemoryDataset
from pyro_bq.guides import AutoMeanFieldNormal, softplus_inverse
from pyro_bq.mixed import (
    evaluate_allocation,
    evaluate_float,
    quantile_inform,
    quantize_means,
    random_bits,
)
from pyro_bq.mixed.random_bits import RandomBitsProblem
from pyro_bq.mixed.report import accuracy_at_means
from pyro_bq.models import MLP, BayesianClassifier


@pytest.fixture(scope="module")
def classifier():
    """A small MLP BNN whose means fit a learnable rule, with a held-out split of its training data."""
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    y = (x[:, :3].sum(-1) > 0).long() + (x[:, 3] > 1).long()
    net = MLP((8, 16, 3))
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(net(x[:300]), y[:300])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=300)
    guide = AutoMeanFieldNormal(model, init_scale=0.02)
    guide.setup(x[:2])
    with torch.no_grad():  # means at the trained weights, scales that vary by weight
        for name, info in guide.sites.items():
            w = dict(net.named_parameters())[name.removeprefix("net.")]
            guide.loc[info.offset:info.offset + info.numel] = w.detach().flatten()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        scale = torch.rand(guide.scale_raw.shape, generator=g) * 0.1 + 0.01
        guide.scale_raw.copy_(softplus_inverse(scale))
    return model, guide, InMemoryDataset(x[300:350], y[300:350]), InMemoryDataset(x[350:], y[350:])


def test_records_give_accuracy_at_the_means_and_sampled_accuracy(classifier):
    model, guide, _, test = classifier
    alloc = quantile_inform(guide, 3.0, candidate_bits=range(2, 6))
    rec = evaluate_allocation(model, guide, alloc, test, num_samples=4)
    assert rec["accuracy_at_means"] == accuracy_at_means(model, quantize_means(guide, alloc), test)
    assert rec["accuracy_sampled"] == rec["accuracy"]
    assert "accuracy_mean" not in rec
    assert (rec["code_bits"], rec["storage_bits"], rec["training"]) == (alloc.code_bits, alloc.storage_bits,
                                                                        "data-free")
    base = evaluate_float(model, guide, test, num_samples=4)
    assert base["accuracy_at_means"] == accuracy_at_means(model, guide.median(), test)


def test_step_4_keeps_the_trial_most_accurate_on_the_validation_split(classifier):
    model, guide, val, _ = classifier
    target = 3.5
    alloc = quantile_inform(guide, target, candidate_bits=range(2, 7), validation=(model, val))
    trials = alloc.info["validation_trials"]
    assert len(trials) >= 2 and all(m <= target + 1e-9 for m, _ in trials)
    assert alloc.code_bits <= target + 1e-9
    chosen = accuracy_at_means(model, quantize_means(guide, alloc), val)
    assert chosen == max(acc for _, acc in trials)
    with pytest.raises(TypeError, match="validation"):
        quantile_inform(guide, target, validation=val)


def _with_bias_outlier(classifier):
    _, guide, _, _ = classifier
    params = {name: tuple(t.detach().clone() for t in guide.get_loc_scale(name)) for name in guide.sites}
    params["net.1.bias"][0][0] = 3.0  # one extreme bias entry
    return params


def test_a_module_layer_shares_one_width_and_one_interval(classifier):
    params = _with_bias_outlier(classifier)
    groups = {}
    for name in params:
        groups.setdefault(name.rsplit(".", 1)[0], []).append(name)
    assert any(len(v) == 2 for v in groups.values())
    for alloc in (quantile_inform(params, 3.0, candidate_bits=range(2, 6), layers="module"),
                  random_bits(params, 3.0, candidate_bits=range(2, 6), num_steps=50, layers="module")):
        assert list(alloc) == list(params)
        for members in groups.values():
            assert len({alloc[m] for m in members}) == 1
            intervals = {alloc.site_quantizers[m]["loc"].calibrate(params[m][0]).interval() for m in members}
            assert len(intervals) == 1
    # QIU: the layer's interval is the 5th-95th percentile of all its means, weight and bias together
    alloc = quantile_inform(params, 3.0, candidate_bits=range(2, 6), layers="module")
    joint = torch.cat([params["net.1.weight"][0].flatten(), params["net.1.bias"][0]]).double()
    lo, hi = alloc.site_quantizers["net.1.bias"]["loc"].calibrate(params["net.1.bias"][0]).interval()
    assert (lo, hi) == pytest.approx((float(torch.quantile(joint, 0.05)), float(torch.quantile(joint, 0.95))))


def test_the_unclipped_qiu_grid_keeps_every_mean_within_half_a_step(classifier):
    params = _with_bias_outlier(classifier)
    clipped = quantize_means(params, quantile_inform(params, 4.0, candidate_bits=range(2, 7)))
    alloc = quantile_inform(params, 4.0, candidate_bits=range(2, 7), clip=False)
    assert alloc.method == "QIU-minmax"
    unclipped = quantize_means(params, alloc)
    for name, (loc, _) in params.items():
        lo, hi = float(loc.min()), float(loc.max())
        step = (hi - lo) / (2 ** alloc[name] - 1)
        assert float((unclipped[name] - loc).abs().max()) <= step / 2 + 1e-6
    bias = "net.1.bias"
    assert float((clipped[bias] - params[bias][0]).abs().max()) > 1.0  # the clip moves the outlier a lot


def test_random_bits_counts_a_site_of_2_24_plus_1_weights_exactly():
    n = 2 ** 24 + 1
    g = torch.Generator().manual_seed(0)
    params = {"big": (torch.randn(n, generator=g) * 0.1, torch.full((n,), 0.05)),
              "small": (torch.randn(7, generator=g), torch.full((7,), 0.05))}
    alloc = random_bits(params, 2.5, candidate_bits=(2, 3), num_steps=1, boundary_steps=0)
    assert alloc.sizes == {"big": n, "small": 7}
    expected = (alloc["big"] * n + alloc["small"] * 7) / (n + 7)
    assert alloc.code_bits == expected
    assert RandomBitsProblem(params, [2, 3]).sizes == [n, 7]


@pytest.mark.parametrize("bad", [(2, 17), (2, 32), (2, 3.7), (3.0,)])
@pytest.mark.parametrize("allocator", ["qi", "rb"])
def test_widths_a_packed_file_cannot_hold_are_refused_at_allocation(bad, allocator):
    params = {"a": (torch.randn(20), torch.full((20,), 0.1))}
    run = quantile_inform if allocator == "qi" else random_bits
    with pytest.raises(ValueError, match="candidate_bits"):
        run(params, 2.0, candidate_bits=bad)


def test_the_library_never_sets_torch_threads(classifier, monkeypatch):
    model, guide, val, _ = classifier
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    quantile_inform(guide, 3.0, candidate_bits=range(2, 6))
    quantile_inform(guide, 3.0, candidate_bits=range(2, 6), validation=(model, val))
    random_bits(guide, 3.0, candidate_bits=range(2, 6), num_steps=30)
    assert calls == []


def test_random_bits_at_most_rounding_keeps_the_papers_bound(classifier):
    _, guide, _, _ = classifier
    for target in (2.6, 3.2, 4.4):
        alloc = random_bits(guide, target, candidate_bits=range(2, 7), num_steps=60, rounding="at_most")
        assert alloc.code_bits <= target + 1e-12


def test_the_study_records_both_bit_counts_of_an_allocation_row(classifier, tmp_path):
    from pyro_bq.study.config import RowSpec, StudyConfig
    from pyro_bq.study.runner import RowContext, _row_allocation

    model, guide, val, _ = classifier
    ctx = RowContext(cfg=StudyConfig(mixed_bits=3.2, out_dir=str(tmp_path)), model=model, guide=guide, train=val, folder=tmp_path)
    for family in ("qi", "rb"):
        _, extra = _row_allocation(ctx, RowSpec(family))
        alloc = quantile_inform(guide, 3.2) if family == "qi" else None
        assert extra["training"] == "data-free"
        assert 1.0 <= extra["code_bits"] == extra["mean_bits"] < extra["storage_bits"]
        if alloc is not None:
            assert (extra["code_bits"], extra["storage_bits"]) == (alloc.code_bits, alloc.storage_bits)
