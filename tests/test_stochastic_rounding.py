"""Stochastic rounding of sampled weights: unbiasedness, the variance it adds, the variance-matched rule,
straight-through gradients, reproducible draws, packed files, memory accounting and the ONNX refusal."""

import dataclasses
import warnings

import pyro
import pytest
import torch
from guide_contract import spread_guide
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import Predictive

from pyro_bq.guides import DeterministicDrawsWarning, QuantizedNormal, quantize, varying_fraction
from pyro_bq.inference.prediction import batched_forward
from pyro_bq.io import load_packed, memory_report, save_packed
from pyro_bq.io.packed import _upgrade_cfg
from pyro_bq.quant import JQ, SPQ, IntervalQuantizer, Log2Quantizer, SignedGridQuantizer, UniformQuantizer, make_policy
from pyro_bq.quant.grids import matchable, matched_noise_scale, rounding_variance, stochastic_round

GRIDS = {
    "uniform-asym": lambda b: UniformQuantizer(b, symmetric=False, rounding="stochastic"),
    "uniform-sym": lambda b: UniformQuantizer(b, symmetric=True, per_channel=True, rounding="stochastic"),
    "interval": lambda b: IntervalQuantizer(b, percentiles=(10.0, 90.0), rounding="stochastic"),
    "signed": lambda b: SignedGridQuantizer(b, rounding="stochastic"),
}


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(sorted(GRIDS)), bits=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_stochastic_rounding_is_unbiased_inside_the_grid_and_clips_outside(kind, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    calib = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    q = GRIDS[kind](bits).calibrate(calib)
    step, zp, qmax = q._grid(torch.float64, calib.device)
    lo, hi = (0 - zp) * step, (qmax - zp) * step
    x = lo + (hi - lo) * torch.rand(4, 8, generator=gen, dtype=torch.float64) * 1.4 - 0.2 * (hi - lo)
    n = 4000
    torch.manual_seed(seed)
    draws = q.quantize_draw(x.expand(n, 4, 8))
    assert torch.allclose(q.quantize(draws), draws)  # every draw is a level
    expected = torch.minimum(torch.maximum(x, lo), hi)  # the draw itself, clipped at the outer levels
    frac = ((expected / step + zp) - torch.floor(expected / step + zp))
    sd = (frac * (1 - frac)).sqrt() * step / n**0.5
    assert ((draws.mean(0) - expected).abs() <= 5 * sd + 1e-9).all()
    assert torch.allclose(draws.var(0), frac * (1 - frac) * step**2, atol=float(0.3 * step.max() ** 2))


def test_the_rounding_variance_formula_and_its_smoothed_form():
    t = torch.tensor([0.0, 0.5, 0.25, 3.9], dtype=torch.float64)
    assert torch.allclose(rounding_variance(t), torch.tensor([0.0, 0.25, 0.1875, 0.09], dtype=torch.float64))
    torch.manual_seed(0)
    for pos, noise in ((0.3, 0.1), (0.0, 0.2), (0.5, 0.8)):
        x = pos + noise * torch.randn(200_000, dtype=torch.float64)
        total = stochastic_round(x).var()
        predicted = noise**2 + rounding_variance(torch.tensor(pos, dtype=torch.float64), noise)
        assert abs(float(total - predicted)) < 0.01
    # small noise near a level: the smoothed variance is E[f (1 - f)] itself (about 0.8 noise on a level),
    # which a truncated Fourier series cannot resolve
    for pos, noise in ((0.0, 0.001), (0.0, 0.01), (0.97, 0.05), (0.5, 0.24), (0.5, 0.26)):
        x = pos + noise * torch.randn(1_000_000, dtype=torch.float64)
        frac = x - torch.floor(x)
        expected = float((frac * (1 - frac)).mean())
        predicted = float(rounding_variance(torch.tensor(pos, dtype=torch.float64), noise))
        assert predicted == pytest.approx(expected, rel=0.02)


def test_the_matched_noise_keeps_the_total_variance_where_sigma_allows_it():
    t = torch.tensor([0.3, 0.0, 0.5, 0.3], dtype=torch.float64)
    sigma = torch.tensor([0.2, 0.6, 1.0, 0.7], dtype=torch.float64)
    s = matched_noise_scale(t, sigma)
    assert float(s[0]) == 0.0  # sigma**2 = 0.04 is below the rounding variance 0.21 of the mean alone
    assert ((s[1:] > 0) & (s[1:] < sigma[1:])).all()
    torch.manual_seed(1)
    for i in range(1, 4):
        x = t[i] + s[i] * torch.randn(200_000, dtype=torch.float64)
        assert abs(float(stochastic_round(x).var() / sigma[i] ** 2) - 1) < 0.03
    # a mean on a level with a sigma of a few hundredths of a step: rare jumps, still the posterior's variance
    on_level = torch.tensor([1.0, 1.0], dtype=torch.float64)
    small = torch.tensor([0.03, 0.06], dtype=torch.float64)
    s = matched_noise_scale(on_level, small)
    assert (s > 0).all() and (s < small).all()
    for i in range(2):
        x = on_level[i] + s[i] * torch.randn(4_000_000, dtype=torch.float64)
        assert abs(float(stochastic_round(x).var() / small[i] ** 2) - 1) < 0.1


def test_matched_or_nearest_matches_mean_and_variance_where_it_can_and_rounds_to_nearest_elsewhere():
    q = UniformQuantizer(2, symmetric=False, rounding="stochastic-matched-or-nearest").calibrate(
        torch.linspace(0.0, 3.0, 13, dtype=torch.float64))
    assert float(q.step()) == 1.0  # grid positions are the values themselves: levels 0, 1, 2, 3
    loc = torch.tensor([1.3, 1.0, 1.5, 1.3, 2.0], dtype=torch.float64)
    scale = torch.tensor([0.2, 0.1, 0.6, 0.7, 0.0], dtype=torch.float64)
    mask = q.stochastic_mask(loc, scale)
    # 1.3 with sigma 0.2: rounding the mean alone adds 0.21 > 0.04, more than the posterior's variance
    assert mask.tolist() == [False, True, True, True, False]
    assert torch.equal(mask, matchable(loc, scale))
    n = 200_000
    pyro.set_rng_seed(4)
    draws = QuantizedNormal(loc, scale, q, validate_args=False).rsample((n,))
    pyro.set_rng_seed(4)
    nearest = QuantizedNormal(loc, scale, q.with_rounding("nearest"), validate_args=False).rsample((n,))
    assert torch.equal(draws[:, ~mask], nearest[:, ~mask])  # the same Gaussian draw, rounded to nearest
    assert torch.allclose(draws[:, mask].mean(0), loc[mask], atol=5 * float(scale.max()) / n**0.5)
    assert torch.allclose(draws[:, mask].var(0) / scale[mask] ** 2, torch.ones(3, dtype=torch.float64), atol=0.03)
    assert torch.allclose(q.noise_scale(loc, scale)[~mask], scale[~mask])
    with pytest.raises(ValueError, match="stochastic_mask"):
        q(loc)  # the rule decides per weight from the posterior, which a bare value does not carry
    assert q.with_rounding("stochastic").stochastic_mask(loc, scale) is None


def test_the_guide_solves_the_matched_noise_once_and_again_after_the_parameters_change():
    model, guide, x, y = spread_guide(0.12)
    qguide = quantize(guide, JQ(2, rounding="stochastic-matched-or-nearest"))
    name = next(iter(guide.sites))
    first = qguide.get_posterior(name).base_dist.rule
    assert qguide.get_posterior(name).base_dist.rule is first  # a prediction reuses it
    loc, scale = qguide.get_loc_scale(name)
    expected = qguide.quantizers[name].sample.draw_rule(loc, scale)
    assert all(torch.equal(a, b) for a, b in zip(first, expected))
    with torch.no_grad():
        qguide.base.loc.data.mul_(0.5)  # any in-place change, even one that bypasses autograd's version counter
    loc, scale = qguide.get_loc_scale(name)
    again = qguide.get_posterior(name).base_dist.rule
    assert again is not first
    assert all(torch.equal(a, b) for a, b in zip(again, qguide.quantizers[name].sample.draw_rule(loc, scale)))
    assert not torch.equal(again[1], first[1])


def test_stochastic_rounding_keeps_tiny_scale_draws_varying_where_nearest_collapses():
    model, guide, x, y = spread_guide(1e-4)
    with pytest.warns(DeterministicDrawsWarning):
        nearest = quantize(guide, SPQ(2, calib_width=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeterministicDrawsWarning)
        sr = quantize(guide, SPQ(2, calib_width=1.0, rounding="stochastic"))
    assert max(varying_fraction(nearest).values()) < 0.01
    assert min(varying_fraction(sr).values()) > 0.5
    # the mean of the draws is the (quantized) mean of the posterior, not the level nearest to it
    name = next(iter(guide.sites))
    loc = sr.get_loc_scale(name)[0]
    pyro.set_rng_seed(0)
    draws = sr.sample_latents(2000)[name]
    step = sr.quantizers[name].sample.step()
    lo, hi = sr.quantizers[name].sample.grid_range()
    inside = (loc > lo) & (loc < hi)
    assert ((draws.mean(0) - loc).abs()[inside] < 0.1 * step.expand_as(loc)[inside]).all()


def test_the_straight_through_gradient_is_one_inside_the_range():
    q = UniformQuantizer(2, symmetric=False, rounding="stochastic").calibrate(torch.linspace(-1, 1, 50))
    w = torch.linspace(-0.9, 0.9, 200, requires_grad=True)
    torch.manual_seed(0)
    (q(w) * torch.arange(200.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(200.0))
    # through a sampled guide site: d w / d loc = 1 and d w / d scale = eps, as for round to nearest
    model, guide, x, y = spread_guide(0.05)
    for rounding in ("nearest", "stochastic", "stochastic-matched-or-nearest"):
        qguide = quantize(guide, SPQ(3, rounding=rounding))
        name = next(iter(guide.sites))
        loc = qguide.base.loc
        loc.grad = None
        pyro.set_rng_seed(0)
        qguide.get_posterior(name).rsample((3,)).sum().backward()
        info = guide.sites[name]
        assert torch.equal(loc.grad[info.offset: info.offset + info.numel], torch.full((info.numel,), 3.0))


def test_draws_are_reproducible_under_the_seed_and_the_vectorized_path_matches_predictive():
    model, guide, x, y = spread_guide(0.02, "cnn")
    qguide = quantize(guide, JQ(2, rounding="stochastic"))
    pyro.set_rng_seed(5)
    a = qguide.sample_latents(6)
    pyro.set_rng_seed(5)
    b = qguide.sample_latents(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pyro.set_rng_seed(6)
    c = qguide.sample_latents(6)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    logits = batched_forward(model, a, x)
    assert logits.shape[0] == 6 and torch.isfinite(logits).all()


def test_a_reloaded_packed_guide_rounds_the_same_way_and_predicts_identically(tmp_path):
    model, guide, x, y = spread_guide(0.12)
    n = sum(i.numel for i in guide.sites.values())
    for rounding in ("stochastic", "stochastic-matched", "stochastic-matched-or-nearest"):
        qguide = quantize(guide, JQ(2, rounding=rounding))
        path = tmp_path / f"{rounding}.bq"
        save_packed(qguide, path)
        loaded = load_packed(path, model)
        assert {q.sample.rounding for q in loaded.quantizers.values()} == {rounding}
        uniforms = memory_report(loaded).uniforms_per_draw  # the same weights rounded stochastically
        assert uniforms == memory_report(qguide).uniforms_per_draw and 0 < uniforms <= n
        outs = []
        for g in (qguide, loaded):
            pyro.set_rng_seed(3)
            outs.append(Predictive(model, guide=g, num_samples=5, return_sites=["logits"])(x)["logits"])
        assert torch.equal(outs[0], outs[1])


def test_packed_configs_written_before_the_rounding_key_read_as_nearest():
    cfg = UniformQuantizer(3).config()
    del cfg["rounding"]
    assert _upgrade_cfg(cfg)["rounding"] == "nearest"
    assert _upgrade_cfg({"type": "percentile-interval", "low": 5.0, "high": 95.0}) == {
        "type": "interval", "percentiles": [5.0, 95.0], "rounding": "nearest"}
    assert "rounding" not in _upgrade_cfg(Log2Quantizer(3).config())


def test_memory_report_counts_the_uniform_numbers_a_device_draws():
    model, guide, x, y = spread_guide(0.05)
    plain = memory_report(quantize(guide, SPQ(3)))
    sr = memory_report(quantize(guide, SPQ(3, rounding="stochastic")))
    n = sum(i.numel for i in guide.sites.values())
    assert plain.uniforms_per_draw == 0 and plain.normals_per_draw == n
    assert sr.uniforms_per_draw == n and "uniform" in sr.table()
    assert {s.rounding for s in sr.sites} == {"stochastic"}
    # the matched-or-nearest rule: one uniform for each weight it rounds stochastically, fewer than all
    model, guide, x, y = spread_guide(0.12)
    qguide = quantize(guide, SPQ(2, rounding="stochastic-matched-or-nearest"))
    report = memory_report(qguide)
    masks = {k: q.sample.stochastic_mask(*qguide.get_loc_scale(k)) for k, q in qguide.quantizers.items()}
    assert report.uniforms_per_draw == sum(int(m.sum()) for m in masks.values())
    assert 0 < report.uniforms_per_draw < n


def test_the_variance_matched_rule_narrows_the_gaussian_noise():
    model, guide, x, y = spread_guide(0.3)
    qguide = quantize(guide, SPQ(2, rounding="stochastic-matched"))
    name = next(iter(guide.sites))
    loc, scale = qguide.get_loc_scale(name)
    s = qguide.quantizers[name].sample.noise_scale(loc, scale)
    assert (s <= scale + 1e-7).all() and (s < scale).any()
    plain = quantize(guide, SPQ(2, rounding="stochastic")).quantizers[name].sample
    assert plain.noise_scale(loc, scale) is scale


def test_rounding_is_validated_and_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="rounding"):
        UniformQuantizer(2, rounding="up")
    with pytest.raises(ValueError, match="rounding"):
        JQ(2, rounding="dither")
    with pytest.raises(ValueError, match="Log2Quantizer rounds to nearest only"):
        SPQ(2, sample_quantizer=Log2Quantizer(2), rounding="stochastic")
    policy = make_policy("spq", 2, rounding="stochastic")
    assert policy.configure_site("w", torch.Size([3, 4])).sample.rounding == "stochastic"
    assert "rounding='stochastic'" in repr(policy)
    # encode and quantize stay deterministic (round to nearest) whatever the rule
    q = UniformQuantizer(2, rounding="stochastic").calibrate(torch.linspace(-1, 1, 9))
    assert torch.equal(q.quantize(torch.full((50,), 0.2)), UniformQuantizer(2).calibrate(
        torch.linspace(-1, 1, 9)).quantize(torch.full((50,), 0.2)))


def test_onnx_export_refuses_stochastic_rounding_naming_the_site(tmp_path):
    pytest.importorskip("onnx")
    from pyro_bq.export import to_onnx, weights_from_eps

    model, guide, x, y = spread_guide(0.05)
    qguide = quantize(guide, SPQ(3, rounding="stochastic"))
    name = next(iter(guide.sites))
    with pytest.raises(ValueError, match=f"site '{name}' sample: rounding='stochastic' has no ONNX form"):
        to_onnx(model, qguide, tmp_path / "m.onnx", num_samples=2, example_input=x[:2])
    with pytest.raises(ValueError, match="no ONNX form"):
        weights_from_eps(qguide, torch.zeros(2, sum(i.numel for i in guide.sites.values())))


def test_the_study_has_stochastic_rounding_rows_next_to_round_to_nearest(tmp_path):
    from pyro_bq.study import ROW_BUILDERS, RowSpec, StudyConfig
    from pyro_bq.study.runner import RowContext

    cfg = StudyConfig(out_dir=str(tmp_path), policies=("spq", "jq", "spq-sr", "jq-sr"), bits=(3, 2), act_policies=(),
                      ends_bits=None)
    rows = cfg.rows()
    assert [r.name for r in rows] == ["float", "spq3", "spq2", "jq3", "jq2", "spq2-sr", "jq3-sr", "jq2-sr"]
    assert {r.training for r in rows} == {"data-free"}
    model, guide, x, y = spread_guide(0.05)
    ctx = RowContext(cfg, model, guide, None, tmp_path)
    qguide, extra = ROW_BUILDERS["jq-sr"](ctx, RowSpec("jq-sr", 2))
    assert extra["rounding"] == "stochastic-matched-or-nearest" and qguide.policy.mode == "jq"
    assert {q.sample.rounding for q in qguide.quantizers.values()} == {"stochastic-matched-or-nearest"}
    plain_ctx = RowContext(dataclasses.replace(cfg, sr_rounding="stochastic"), model, guide, None, tmp_path)
    qguide, extra = ROW_BUILDERS["jq-sr"](plain_ctx, RowSpec("jq-sr", 2))
    assert extra["rounding"] == "stochastic"
    assert {q.sample.rounding for q in qguide.quantizers.values()} == {"stochastic"}
    assert cfg.eval_fingerprint() != plain_ctx.cfg.eval_fingerprint()
    with pytest.raises(ValueError, match="sr_rounding"):
        dataclasses.replace(cfg, sr_rounding="nearest")
    plain, extra = ROW_BUILDERS["jq"](ctx, RowSpec("jq", 2))
    assert "rounding" not in extra and {q.sample.rounding for q in plain.quantizers.values()} == {"nearest"}
