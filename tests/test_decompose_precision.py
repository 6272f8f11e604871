"""The mutual information of decompose against an independent float64 reference, where float32 loses it."""

import torch

from pyro_bq.uncertainty import decompose


def _reference_mi(probs: torch.Tensor) -> torch.Tensor:
    """``H(mean) - mean H`` of the same probabilities, in float64 (cancellation costs ~1e-16 absolute there)."""
    p = probs.double()
    ent = lambda t: -torch.special.xlogy(t, t).sum(-1)  # noqa: E731
    return ent(p.mean(0)) - ent(p).mean(0)


def _near_agreeing_draws(spread: float, n: int = 400, s: int = 32, c: int = 10, seed: int = 0) -> torch.Tensor:
    """float32 probabilities of ``s`` draws whose logits differ by about ``spread`` around a common centre."""
    gen = torch.Generator().manual_seed(seed)
    centre = 2 * torch.randn(1, n, c, generator=gen, dtype=torch.float64)
    logits = centre + spread * torch.randn(s, n, c, generator=gen, dtype=torch.float64)
    return logits.softmax(-1).float()


def test_mutual_information_of_nearly_agreeing_draws_matches_float64():
    probs = _near_agreeing_draws(spread=5e-3)
    ref = _reference_mi(probs)
    assert 1e-6 < ref.median() < 1e-4  # the regime under test: MI about 1e-5 nats
    mi = decompose(probs)["epistemic"]
    assert mi.dtype == torch.float32 and bool((mi >= 0).all())
    assert not bool(((mi == 0) & (ref > 0)).any())
    rel = (mi.double() - ref).abs() / ref
    assert rel.max() < 1e-3, f"worst relative error {rel.max():.2e}, median {rel.median():.2e}"


def test_mutual_information_far_below_float32_resolution_stays_positive():
    probs = _near_agreeing_draws(spread=1e-5, seed=1)
    ref = _reference_mi(probs)
    mi = decompose(probs)["epistemic"]
    assert bool((mi >= 0).all()) and not bool(((mi == 0) & (ref > 0)).any())


def test_mutual_information_is_exactly_zero_when_draws_agree_and_handles_zero_probabilities():
    probs = _near_agreeing_draws(spread=0.0)
    assert bool((decompose(probs)["epistemic"] == 0).all())
    onehot = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]])
    parts = decompose(onehot)
    assert torch.allclose(parts["epistemic"], torch.tensor([torch.log(torch.tensor(2.0)), 0.0]))
    assert torch.isfinite(parts["total"]).all() and torch.isfinite(parts["aleatoric"]).all()


def test_decompose_keeps_float64_inputs_in_float64():
    probs = _near_agreeing_draws(spread=1e-2).double()
    parts = decompose(probs)
    assert all(parts[k].dtype == torch.float64 for k in ("mean_probs", "total", "aleatoric", "epistemic"))
    assert torch.allclose(parts["epistemic"], _reference_mi(probs), rtol=1e-9, atol=0)


def test_mutual_information_is_finite_when_a_draw_is_far_below_the_mean():
    # one draw gives a class 1e-20, the others about 0.5: p/q - 1 rounds to -1 in float64
    probs = torch.tensor([[[1e-20, 1.0]], [[0.5, 0.5]], [[0.5, 0.5]]], dtype=torch.float32)
    probs = probs / probs.sum(-1, keepdim=True)
    mi = decompose(probs)["epistemic"]
    assert bool(torch.isfinite(mi).all())
    assert torch.allclose(mi.double(), _reference_mi(probs), rtol=1e-5)
