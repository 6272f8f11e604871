"""Parallel-stream standard-normal draws: distribution, independence, reproducibility, fork safety."""

import multiprocessing as mp

import pyro
import pytest
import torch
from pyro import poutine

from pyro_bq import IIDNormal
from pyro_bq._rng import CHUNK, MIN_PARALLEL, standard_normal
from pyro_bq.guides import AutoMeanFieldNormal
from pyro_bq.models import MLP, BayesianClassifier


def _ks_statistic(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the sample ``z`` from Normal(0, 1)."""
    z, _ = z.double().sort()
    n = z.numel()
    cdf = torch.distributions.Normal(0.0, 1.0).cdf(z)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def test_draws_are_standard_normal_and_chunks_independent():
    torch.manual_seed(0)
    z = standard_normal((4 * CHUNK + 123,))
    assert z.shape == (4 * CHUNK + 123,) and z.dtype == torch.get_default_dtype()
    assert abs(float(z.mean())) < 0.005 and abs(float(z.std()) - 1) < 0.005
    # KS test: sqrt(n) * D exceeds 1.95 with probability 0.001 under the null
    assert _ks_statistic(z) * z.numel() ** 0.5 < 1.95
    assert _ks_statistic(z.abs()) * z.numel() ** 0.5 > 1.95  # (the test does reject a wrong distribution)
    chunks = z[: 4 * CHUNK].view(4, CHUNK)
    corr = torch.corrcoef(chunks)
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert float(off_diagonal.abs().max()) < 0.02  # no two chunks share (or mirror) a stream
    # neighbouring values within and across chunk borders are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1])) < 0.01


def test_same_seed_same_draws_on_any_number_of_threads():
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(5)
        a = standard_normal((3, MIN_PARALLEL))
        torch.set_num_threads(1)
        torch.manual_seed(5)
        b = standard_normal((3, MIN_PARALLEL))
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(6)
    c = standard_normal((3, MIN_PARALLEL))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_small_tensors_are_plain_randn_and_dtype_is_kept():
    torch.manual_seed(1)
    a = standard_normal((MIN_PARALLEL - 1,))
    torch.manual_seed(1)
    assert torch.equal(a, torch.randn(MIN_PARALLEL - 1))
    assert standard_normal((MIN_PARALLEL,), dtype=torch.float64).dtype == torch.float64


def _child(queue):
    # only this module's own threads: torch's OpenMP pool is not usable in a forked child
    # once the parent has used it (a torch limitation), so the statistics are taken in numpy
    queue.put(float(standard_normal((MIN_PARALLEL * 2,)).numpy().std()))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_works_in_a_forked_child_after_use_in_the_parent():
    standard_normal((MIN_PARALLEL * 2,))  # the parent's thread pool exists now
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0, "the forked child hung or failed"
    assert abs(queue.get(timeout=5) - 1) < 0.01


@pytest.mark.parametrize("width", [8, 400], ids=["small", "chunked"])
def test_many_draws_at_once_equal_as_many_guide_draws(width):
    """``sample_latents(S)`` gives exactly the guide's next ``S`` draws (with and without chunked streams)."""
    pyro.clear_param_store()
    model = BayesianClassifier(MLP((784, width, width, 10)), IIDNormal(1.0), dataset_size=100)
    guide = AutoMeanFieldNormal(model, init_scale=0.1)
    x = torch.randn(2, 1, 28, 28)
    guide(x)
    assert (guide.num_params >= MIN_PARALLEL) == (width == 400)
    torch.manual_seed(3)
    many = guide.sample_latents(3)
    torch.manual_seed(3)
    with torch.no_grad():
        singles = [poutine.trace(guide).get_trace(x) for _ in range(3)]
    for name in guide.sites:
        assert torch.equal(many[name], torch.stack([t.nodes[name]["value"] for t in singles]))
    assert not torch.equal(many[name][0], many[name][1])
