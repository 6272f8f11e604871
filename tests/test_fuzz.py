"""Fuzz every public entry point with random bad arguments.

For each entry point and each of its arguments, hypothesis draws bad values
(wrong types, out-of-range numbers, NaN/inf, unknown names, wrong shapes,
dtypes and devices) and calls the entry point with every *other* argument
valid. Each call must raise ``ValueError`` or ``TypeError`` whose message
names the argument: any other exception type, or a silent success, fails.

A known gap stays here as an ``xfail(strict=True)`` case with the reason;
once the entry point is fixed the case passes, and the strict mark makes the
run fail until the mark is removed.

``PYRO_BQ_FUZZ_EXAMPLES`` sets the number of examples per (entry point,
argument), 12 by default; runs are derandomized (the same draws every run) so
the xfail marks are stable. The number of entry points, arguments and cases
run is written to ``$PYRO_BQ_FUZZ_COUNT`` when that is set.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyro
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

EXAMPLES = int(os.environ.get("PYRO_BQ_FUZZ_EXAMPLES", "12"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing value is in the message already
    suppress_health_check=list(HealthCheck),
)
DATA_ROOT = Path(os.environ.get("PYRO_BQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
_COUNT = {"cases": 0}

# -- strategies of bad values ---------------------------------------------------------------------

nan_inf = st.sampled_from([math.nan, math.inf, -math.inf])
tensors_as_scalars = st.just(torch.tensor([1.0, 2.0]))


def bad_int(low=None, high=None, *, optional=False):
    """Not an int (bool, float, str, None unless optional), or an int out of [low, high]."""
    parts = [st.booleans(), st.floats(allow_nan=True), st.text(max_size=4), st.just([1]), st.just(object())]
    if not optional:
        parts.append(st.none())
    if low is not None:
        parts.append(st.integers(max_value=low - 1).filter(lambda v: v > -(10**30)))
    if high is not None:
        parts.append(st.integers(min_value=high + 1, max_value=10**30))
    return st.one_of(*parts)


def bad_float(low=None, high=None, *, low_open=False, high_open=False, optional=False):
    """Not a real number, NaN/inf, or out of the allowed interval."""
    parts = [nan_inf, st.text(max_size=4), st.booleans(), st.just([0.5]), st.just(object()), tensors_as_scalars]
    if not optional:
        parts.append(st.none())
    if low is not None:
        parts.append(st.floats(max_value=low, exclude_max=not low_open, allow_nan=False, allow_infinity=False))
    if high is not None:
        parts.append(st.floats(min_value=high, exclude_min=not high_open, allow_nan=False, allow_infinity=False))
    return st.one_of(*parts)


def bad_choice(choices, *, optional=False):
    parts = [st.text(max_size=8).filter(lambda s: s not in choices), st.integers(), st.just(object())]
    parts += [st.sampled_from([c.upper() + " " for c in choices if isinstance(c, str)] or ["?"])]
    if not optional:
        parts.append(st.none())
    return st.one_of(*parts)


def bad_bool(*, optional=False):
    parts = [st.sampled_from(["yes", "no", "", "True", "False"]), st.integers(2, 5), st.floats(0.1, 0.9), st.just([True])]
    if not optional:
        parts.append(st.none())
    return st.one_of(*parts)


def bad_module():
    return st.one_of(st.none(), st.integers(), st.text(max_size=4), st.just(torch.zeros(3)), st.just(lambda x: x), st.just(nn.Linear))


def bad_path():
    return st.one_of(st.integers(), st.just(b"/tmp/x"), st.just(""), st.just(["a"]), st.just(3.5), st.just("a\x00b"))


def bad_tensor(*, shapes=(), dtypes=(), devices=False, optional=False):
    """Not a tensor, or a tensor of a wrong shape/dtype (drawn from the given lists)."""
    parts = [st.integers(), st.text(max_size=3), st.just([[1.0, 2.0]]), st.just(np.zeros((2, 2)))]
    if not optional:
        parts.append(st.none())
    for shape in shapes:
        parts.append(st.just(torch.zeros(shape)))
    for dtype, shape in dtypes:
        parts.append(st.just(torch.zeros(shape, dtype=dtype)))
    if devices:
        parts.append(st.just(torch.zeros(2, 2, device="meta")))
    return st.one_of(*parts)


def not_callable(optional=True):
    parts = [st.integers(), st.text(max_size=3), st.just([1])]
    if not optional:
        parts.append(st.none())
    return st.one_of(*parts)


# -- the registry ---------------------------------------------------------------------------------


@dataclass
class Entry:
    """One public entry point: how to call it validly, and bad values per argument."""

    name: str
    call: Callable[..., Any]
    valid: Callable[[], dict]
    bad: dict[str, Any]
    words: dict[str, tuple[str, ...]] = field(default_factory=dict)  # other acceptable names in messages
    xfail: dict[str, str] = field(default_factory=dict)


ENTRIES: list[Entry] = []


def entry(*args, **kwargs):
    ENTRIES.append(Entry(*args, **kwargs))


def _tiny_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _model(kind="classifier"):
    from pyro_bq import IIDNormal
    from pyro_bq.models import BayesianClassifier, BayesianRegressor

    if kind == "classifier":
        return BayesianClassifier(_tiny_net(), IIDNormal(1.0), dataset_size=10)
    return BayesianRegressor(nn.Sequential(nn.Linear(4, 1)), IIDNormal(1.0), dataset_size=10, noise=0.1)


def _guide(model=None):
    from pyro_bq.guides import AutoMeanFieldNormal

    model = model or _model()
    return AutoMeanFieldNormal(model).setup(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def _data(n=8):
    from pyro_bq.data import InMemoryDataset

    g = torch.Generator().manual_seed(0)
    return InMemoryDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))


def _register_foundation():
    from pyro_bq import IIDNormal, LayerwiseNormal, PretrainedNormal, ScaleMixtureNormal, bq_priors
    from pyro_bq.data import InMemoryDataset, load_fashion_mnist, load_mnist
    from pyro_bq.guides import AutoMeanFieldNormal, init_to_pretrained
    from pyro_bq.inference import default_optim, fit_svi, prediction, seed_everything
    from pyro_bq.io import load_checkpoint, read_container, save_checkpoint, set_rng_state, write_container
    from pyro_bq.io.checkpoint import checkpoint_path, latest_checkpoint, prune_checkpoints
    from pyro_bq.models import MLP, BayesianClassifier, BayesianRegressor, LeNet5, ResNet20

    pos = bad_float(0.0, low_open=True)
    entry("IIDNormal", IIDNormal, lambda: {"scale": 1.0}, {"scale": pos})
    entry("LayerwiseNormal", LayerwiseNormal, lambda: {"gain": 1.0}, {"gain": pos})
    entry("ScaleMixtureNormal", ScaleMixtureNormal, lambda: {"pi": 0.5, "sigma1": 1.0, "sigma2": 0.1},
          {"pi": bad_float(0.0, 1.0, low_open=True, high_open=True), "sigma1": pos, "sigma2": pos})
    entry("PretrainedNormal", PretrainedNormal, lambda: {"net": _tiny_net(), "scale": 0.1}, {"net": bad_module(), "scale": pos})
    entry("bq_priors", bq_priors, lambda: {"net": _tiny_net(), "prior": IIDNormal(1.0), "expose": None},
          {"net": bad_module(), "prior": st.one_of(st.none(), st.floats(), st.text(max_size=3), st.just(pyro.distributions.Normal(0, 1))),
           "expose": st.one_of(st.integers(), st.just("1.weight"), st.just(["nope.weight"]), st.just({"1.weight", "x"}), st.just(set()))},
          words={"expose": ("expose",)})
    model_bad = {
        "net": bad_module(),
        "prior": st.one_of(st.none(), st.floats(), st.text(max_size=3)),
        "dataset_size": bad_int(1),
        "expose": st.one_of(st.integers(), st.just(["nope.weight"]), st.just("1.weight")),
    }
    entry("BayesianClassifier", BayesianClassifier,
          lambda: {"net": _tiny_net(), "prior": IIDNormal(1.0), "dataset_size": 10, "expose": None}, model_bad)
    entry("BayesianRegressor", BayesianRegressor,
          lambda: {"net": _tiny_net(), "prior": IIDNormal(1.0), "dataset_size": 10, "noise": 0.1, "noise_init": 1.0},
          {**{k: v for k, v in model_bad.items() if k != "expose"},
           "noise": st.one_of(bad_float(0.0, low_open=True), st.sampled_from(["Learned", "fixed", ""])),
           "noise_init": bad_float(0.0, low_open=True)})

    def classifier_forward(x, y):
        return _model()(x, y)

    entry("BayesianClassifier.forward", classifier_forward,
          lambda: {"x": torch.zeros(3, 4), "y": torch.zeros(3, dtype=torch.long)},
          {"x": bad_tensor(shapes=[(3,), (0, 4), (3, 5)], dtypes=[(torch.long, (3, 4)), (torch.bool, (3, 4))], devices=False),
           "y": bad_tensor(shapes=[(2,)], dtypes=[(torch.float32, (3,)), (torch.long, (3, 1))], devices=False, optional=True)
                .filter(lambda v: not isinstance(v, (int, str)))
                | st.just(torch.tensor([0, 1, 2])) | st.just(torch.tensor([0, -1, 1]))})

    def regressor_forward(x, y):
        return _model("regressor")(x, y)

    entry("BayesianRegressor.forward", regressor_forward,
          lambda: {"x": torch.zeros(3, 4), "y": torch.zeros(3)},
          {"x": bad_tensor(shapes=[(3,), (3, 5)], dtypes=[(torch.long, (3, 4))], devices=False),
           "y": bad_tensor(shapes=[(2,), (3, 2)], dtypes=[(torch.long, (3,))], devices=False, optional=True)
                .filter(lambda v: not isinstance(v, (int, str)))})

    def batched_forward(samples, x):
        return prediction.batched_forward(_model(), samples, x)

    def good_samples():
        return {name: torch.zeros((2,) + tuple(t.shape)) for name, t in _model().initial_params().items()}

    entry("inference.batched_forward", batched_forward,
          lambda: {"samples": good_samples(), "x": torch.zeros(3, 4)},
          {"samples": st.one_of(st.none(), st.integers(), st.just({}), st.just({"net.1.weight": torch.zeros(2, 3, 4)})),
           "x": bad_tensor(shapes=[(3, 7)], dtypes=[(torch.long, (3, 4))], devices=False)})

    entry("AutoMeanFieldNormal", AutoMeanFieldNormal,
          lambda: {"model": _model(), "init_loc_fn": None, "init_scale": 0.01},
          {"init_loc_fn": not_callable(optional=True), "init_scale": bad_float(0.0, low_open=True)})
    entry("init_to_pretrained", init_to_pretrained, lambda: {"net": _tiny_net()}, {"net": bad_module()})

    def guide_quantiles(quantiles):
        return _guide().quantiles(quantiles)

    entry("AutoGaussianSites.quantiles", guide_quantiles, lambda: {"quantiles": [0.1, 0.9]},
          {"quantiles": st.one_of(st.just([]), st.just([0.0]), st.just([1.5]), st.just([math.nan]), st.just([-0.1, 0.5]),
                                   st.just(["a"]), st.none(), st.just(0.5), st.just([[0.5]]))})

    def guide_sample_latents(num_samples):
        return _guide().sample_latents(num_samples)

    entry("AutoGaussianSites.sample_latents", guide_sample_latents, lambda: {"num_samples": 2}, {"num_samples": bad_int(1)})

    def guide_get_loc_scale(name):
        return _guide().get_loc_scale(name)

    entry("AutoMeanFieldNormal.get_loc_scale", guide_get_loc_scale, lambda: {"name": "net.1.weight"},
          {"name": st.one_of(st.text(max_size=6), st.integers(), st.none())}, words={"name": ("site",)})

    mnist_bad = {
        "root": st.one_of(st.integers(), st.just(b"x"), st.just(["/tmp"])),
        "train": bad_bool(),
        "download": bad_bool(),
        "normalize": bad_bool(),
        "limit": bad_int(1, optional=True),
    }
    for label, fn in (("load_mnist", load_mnist), ("load_fashion_mnist", load_fashion_mnist)):
        entry(label, fn, lambda: {"root": str(DATA_ROOT), "train": False, "download": False, "normalize": True, "limit": 5},
              mnist_bad)

    entry("InMemoryDataset", InMemoryDataset,
          lambda: {"x": torch.zeros(4, 2), "y": torch.zeros(4), "name": "d"},
          {"x": bad_tensor(shapes=[(3, 2)], devices=False), "y": bad_tensor(shapes=[(3,)], devices=False),
           "name": st.one_of(st.integers(), st.none(), st.just(["a"]))},
          words={"x": ("x and y",), "y": ("x and y",)})
    entry("InMemoryDataset(empty)", lambda xy: InMemoryDataset(*xy), lambda: {"xy": (torch.zeros(2, 2), torch.zeros(2))},
          {"xy": st.sampled_from([(torch.zeros(0, 2), torch.zeros(0)), (torch.zeros(0), torch.zeros(0))])}, words={"xy": ("x",)})

    def ds_method(method):
        def call(**kw):
            return getattr(_data(), method)(**kw)

        return call

    def ds_batches(**kw):
        return list(_data().batches(**kw))

    entry("InMemoryDataset.subset", ds_method("subset"), lambda: {"n": 3, "seed": None},
          {"n": bad_int(1, 8), "seed": bad_int(0, optional=True)})
    entry("InMemoryDataset.epoch_order", ds_method("epoch_order"), lambda: {"epoch": 0, "seed": 0},
          {"epoch": bad_int(0), "seed": bad_int(0)})
    entry("InMemoryDataset.batches", ds_batches,
          lambda: {"batch_size": 3, "shuffle": False, "seed": 0, "epoch": 0, "drop_last": False, "indices": None},
          {"batch_size": bad_int(1), "shuffle": bad_bool(), "seed": bad_int(0), "epoch": bad_int(0), "drop_last": bad_bool(),
           "indices": st.one_of(st.just(torch.tensor([0, 99])), st.just(torch.tensor([0.5])), st.just([0, 1]), st.integers())})
    entry("InMemoryDataset.num_batches", ds_method("num_batches"), lambda: {"batch_size": 3, "drop_last": False},
          {"batch_size": bad_int(1), "drop_last": bad_bool()})

    def run_fit(**kw):
        model = _model()
        guide = AutoMeanFieldNormal(model)
        args = {"model": model, "guide": guide, "data": _data(), "progress": False}
        args.update(kw)
        return fit_svi(args.pop("model"), args.pop("guide"), args.pop("data"), **args)

    entry("fit_svi", run_fit,
          lambda: {"num_epochs": 1, "batch_size": 4, "lr": 1e-2, "seed": 0, "checkpoint_every": 5, "on_nonfinite": "raise",
                   "num_steps": None, "checkpoint_dir": None, "resume": True, "progress": False, "callback": None,
                   "step_hook": None, "optim": None, "elbo": None},
          {"data": st.one_of(st.none(), st.just((torch.zeros(2, 4), torch.zeros(2))), st.just(torch.zeros(3, 4))),
           "num_epochs": bad_int(1, optional=True).filter(lambda v: v is not None),
           "num_steps": bad_int(1, optional=True),
           "batch_size": bad_int(1), "lr": bad_float(0.0, low_open=True), "seed": bad_int(0),
           "checkpoint_every": bad_int(1), "on_nonfinite": bad_choice(("raise", "skip")),
           "checkpoint_dir": bad_path(), "resume": bad_bool(), "progress": bad_bool(),
           "callback": not_callable(), "step_hook": not_callable(),
           "optim": st.one_of(st.integers(), st.just(torch.optim.Adam), st.text(max_size=3)),
           "elbo": st.one_of(st.integers(), st.text(max_size=3), st.just(pyro.infer.TraceMeanField_ELBO))})
    entry("seed_everything", seed_everything, lambda: {"seed": 0}, {"seed": bad_int(0)})
    entry("default_optim", default_optim, lambda: {"lr": 1e-3}, {"lr": bad_float(0.0, low_open=True)})

    entry("MLP", MLP, lambda: {"sizes": (4, 3, 2)},
          {"sizes": st.one_of(st.just((4,)), st.just((4, 0, 2)), st.just((4, 2.5, 2)), st.just("42"), st.just(None), st.just(5))})
    entry("LeNet5", LeNet5, lambda: {"num_classes": 10, "in_channels": 1}, {"num_classes": bad_int(2), "in_channels": bad_int(1)})
    entry("ResNet20", ResNet20, lambda: {"num_classes": 10, "in_channels": 3, "blocks_per_stage": 1},
          {"num_classes": bad_int(2), "in_channels": bad_int(1), "blocks_per_stage": bad_int(1)})

    # -- files --
    def tmpdir():
        import tempfile

        return Path(tempfile.mkdtemp(prefix="fuzz-"))

    entry("save_checkpoint", save_checkpoint, lambda: {"path": tmpdir() / "c.bq", "state": {"a": 1}},
          {"path": bad_path(), "state": st.one_of(st.none(), st.integers(), st.just([1]), st.just({"a": object()}),
                                                   st.just({(1,): 2}), st.just({"s": {1, 2}}))})

    def saved():
        path = tmpdir() / "c.bq"
        save_checkpoint(path, {"a": 1})
        return path

    entry("load_checkpoint", load_checkpoint, lambda: {"path": saved()}, {"path": bad_path()})
    entry("latest_checkpoint", latest_checkpoint, lambda: {"folder": tmpdir(), "prefix": "ckpt"},
          {"folder": bad_path(), "prefix": st.one_of(st.integers(), st.just(""), st.just("a/b"), st.just("../x"), st.none())})
    entry("checkpoint_path", checkpoint_path, lambda: {"folder": tmpdir(), "step": 3, "prefix": "ckpt"},
          {"folder": bad_path(), "step": bad_int(0), "prefix": st.one_of(st.integers(), st.just(""), st.just("a/b"))})
    entry("prune_checkpoints", prune_checkpoints, lambda: {"folder": tmpdir(), "prefix": "ckpt", "keep": 1},
          {"folder": bad_path(), "prefix": st.one_of(st.integers(), st.just("a/b")), "keep": bad_int(1)})
    entry("set_rng_state", set_rng_state, lambda: {"state": __import__("pyro_bq.io", fromlist=["rng_state"]).rng_state()},
          {"state": st.one_of(st.none(), st.integers(), st.just({}), st.just({"torch": 1, "numpy": 2, "python": 3}))})
    entry("write_container", write_container,
          lambda: {"path": tmpdir() / "w.bq", "kind": "k", "meta": {}, "tensors": {"a": torch.zeros(2)}},
          {"path": bad_path(), "kind": st.one_of(st.integers(), st.just(""), st.none()),
           "meta": st.one_of(st.integers(), st.just([1]), st.just({"a": object()}), st.just({"a": torch.zeros(1)}),
                             st.just({"a": {1: "int keys would come back as str"}}), st.just({2: 1})),
           "tensors": st.one_of(st.integers(), st.just({"a": 1.0}), st.just({1: torch.zeros(1)}),
                                st.just({"a": torch.eye(2).to_sparse()}), st.just({"a": torch.zeros(1, device="meta")}))})

    def written():
        path = tmpdir() / "r.bq"
        write_container(path, "k", {}, {})
        return path

    entry("read_container", read_container, lambda: {"path": written(), "kind": "k"},
          {"path": bad_path(), "kind": st.one_of(st.integers(), st.just(""), st.none(), st.just("other"))},
          words={"kind": ("kind", "expected a")})


_register_foundation()


def _posterior():
    g = _guide()
    with torch.no_grad():
        g.scale_raw.fill_(-3.0)
        g.loc.copy_(torch.linspace(-1, 1, g.loc.numel()))
    return g


def _register_quant():
    from pyro_bq.guides import AutoLogQuantNormal, quantize
    from pyro_bq.io import load_packed, memory_report, pack_bits, save_packed, unpack_bits
    from pyro_bq.quant import (JQ, SPQ, VPQ, CodebookQuantizer, FakeQuantActivation, IntervalQuantizer, Log2Quantizer,
                               UniformQuantizer, check_bits, make_policy, nearest_code, pow2_codebook,
                               quantize_activations)

    bits = bad_int(1, 16)
    rng_choice = bad_choice(("minmax", "percentile", "mse"))
    pct = st.sampled_from([(95.0, 5.0), (-1.0, 50.0), (5.0, 101.0), (math.nan, 90.0), (5.0,), "5-95", None])
    entry("UniformQuantizer", UniformQuantizer,
          lambda: {"bits": 4, "symmetric": True, "per_channel": False, "channel_dim": 0, "range": "minmax",
                   "percentiles": (5.0, 95.0), "search_steps": 24},
          {"bits": bits, "symmetric": bad_bool(), "per_channel": bad_bool(), "channel_dim": bad_int(),
           "range": rng_choice, "percentiles": pct, "search_steps": bad_int(1)})
    entry("Log2Quantizer", Log2Quantizer, lambda: {"bits": 4, "per_channel": False, "range": "minmax"},
          {"bits": bits, "per_channel": bad_bool(), "range": rng_choice})
    entry("CodebookQuantizer", CodebookQuantizer, lambda: {"bits": "auto", "family": "pot", "codebook": None},
          {"bits": st.one_of(st.just("Auto"), st.just(0), st.just(2.5), st.just(None), st.just(100)),
           "family": bad_choice(("pot", "apot")),
           "codebook": st.one_of(st.just(torch.tensor([])), st.just(torch.tensor([1.0, math.nan])),
                                 st.just(torch.tensor([[1.0, 2.0]])), st.just([0.0, 1.0]), st.just(torch.tensor([1, 2])))})
    for label, cls in (("VPQ", VPQ), ("SPQ", SPQ), ("JQ", JQ)):
        entry(label, cls, lambda: {"bits": 4, "loc_bits": None, "scale_bits": None, "sample_bits": None, "skip": ()},
              {"bits": bits, "loc_bits": bad_int(1, 16, optional=True), "scale_bits": bad_int(1, 16, optional=True),
               "sample_bits": bad_int(1, 16, optional=True),
               "skip": st.one_of(st.integers(), st.just([3]), st.just("[unclosed"), st.none())})
    entry("make_policy", make_policy, lambda: {"mode": "jq", "bits": 4},
          {"mode": bad_choice(("float", "vpq", "spq", "jq")), "bits": bits})
    entry("check_bits", check_bits, lambda: {"name": "bits", "bits": 4}, {"bits": bits})
    entry("IntervalQuantizer", IntervalQuantizer, lambda: {"bits": 4, "interval": None, "percentiles": (5.0, 95.0)},
          {"bits": bits, "interval": st.sampled_from([(1.0, -1.0), (0.0, 0.0), (math.nan, 1.0), (0.0,), "0,1", 3.0]),
           "percentiles": pct})

    def quantize_with(skip=(), site_bits=None, policy=None):
        policy = policy if policy is not None else JQ(4, skip=skip, site_bits=site_bits)
        return quantize(_guide(), policy)

    entry("quantize", quantize_with, lambda: {"skip": (), "site_bits": None, "policy": None},
          {"skip": st.sampled_from([["net.9.weight"], "nope", ["net.1.weight", "no.such.site"]]),
           "site_bits": st.sampled_from([{"net.9.weight": 4}, {"net.1.weight": 0}, {"net.1.weight": 2.5},
                                         {"net.1.weight": torch.full((5, 5), 4)}, {"net.1.weight": {"lox": 3}}]),
           "policy": st.one_of(st.integers(), st.text(max_size=3), st.just(UniformQuantizer(4)))},
          words={"skip": ("skip",), "site_bits": ("site_bits", "bits tensor for site"), "policy": ("policy",)})
    entry("quantize(guide)", lambda guide: quantize(guide, JQ(4)), lambda: {"guide": _guide()},
          {"guide": st.one_of(st.none(), st.integers(), st.just(_tiny_net()), st.just({"a": 1}))})

    def tmp():
        import tempfile

        return Path(tempfile.mkdtemp(prefix="fuzz-")) / "p.bq"

    entry("save_packed", save_packed, lambda: {"guide": quantize(_guide(), JQ(4)), "path": tmp()},
          {"guide": st.one_of(st.none(), st.integers(), st.just(_tiny_net())), "path": bad_path()})

    def packed_path():
        path = tmp()
        save_packed(quantize(_guide(), JQ(4)), path)
        return path

    entry("load_packed", load_packed, lambda: {"path": packed_path(), "model": _model(), "example_input": None},
          {"path": bad_path(), "model": st.one_of(st.none(), st.integers(), st.just(_tiny_net())),
           "example_input": bad_tensor(shapes=[(2, 7)], dtypes=[(torch.long, (2, 4))], optional=True)})
    entry("memory_report", memory_report, lambda: {"guide": quantize(_guide(), JQ(4))},
          {"guide": st.one_of(st.none(), st.integers(), st.just(_tiny_net()))})
    entry("pow2_codebook", pow2_codebook, lambda: {"b": 3, "r": 1, "max_exp": 0, "signed": True, "include_zero": True},
          {"b": bad_int(0, 126), "r": bad_int(1), "max_exp": bad_int(-126, 126), "signed": bad_bool(), "include_zero": bad_bool()})
    entry("nearest_code", nearest_code, lambda: {"values": torch.randn(5), "codebook": torch.tensor([-1.0, 0.0, 1.0])},
          {"values": bad_tensor(dtypes=[(torch.long, (5,))], optional=False),
           "codebook": bad_tensor(shapes=[(0,), (2, 2)], dtypes=[(torch.long, (3,))]) | st.just(torch.tensor([1.0, 0.0, -1.0]))
                       | st.just(torch.tensor([0.0, math.nan]))})
    entry("pack_bits", pack_bits, lambda: {"codes": np.array([1, 2, 3]), "bits": 2},
          {"codes": st.sampled_from([np.array([4, 1]), np.array([-1, 0]), np.array([0.5]), np.zeros((2, 2), dtype=int), [1, 2], None]),
           "bits": st.one_of(bad_int(1, 16), st.just(np.array([2, 2])))})
    entry("unpack_bits", unpack_bits, lambda: {"buf": np.array([27], dtype=np.uint8), "count": 3, "bits": 2},
          {"buf": st.sampled_from([np.array([1.5]), [1, 2], None, np.array([-1], dtype=np.int8)]),
           "count": bad_int(0) | st.just(100), "bits": bad_int(1, 16)},
          words={"count": ("count", "buf")})
    entry("FakeQuantActivation", FakeQuantActivation,
          lambda: {"activation": nn.ReLU(), "bits": 8, "range": "calibrated", "max_calls": 16},
          {"activation": bad_module(), "bits": bits, "range": bad_choice(("calibrated", "natural")), "max_calls": bad_int(1)})
    entry("quantize_activations", quantize_activations,
          lambda: {"model": _model(), "bits": 8, "activation": None, "range": "calibrated"},
          {"model": bad_module(), "bits": bits,
           "activation": st.one_of(st.sampled_from(["relu7", "RELU", ""]), st.integers(), st.just(nn.Linear)),
           "range": bad_choice(("calibrated", "natural"))})
    entry("AutoLogQuantNormal", AutoLogQuantNormal,
          lambda: {"model": _model(), "bits": 4, "init_loc_fn": None, "init_scale": 0.01, "window_top": None},
          {"bits": bits, "init_loc_fn": not_callable(), "init_scale": bad_float(0.0, low_open=True),
           "window_top": bad_int(optional=True).filter(lambda v: not isinstance(v, int) or isinstance(v, bool))})


def _register_uncertainty():
    from pyro_bq.uncertainty import (accuracy, auroc, brier, decompose, decompose_regression, ece, entropy, evaluate,
                                     nll, plot_reliability, predictive_probs, reliability_data, sample_weights, to_arviz)

    x4 = lambda: torch.randn(6, 4, generator=torch.Generator().manual_seed(1))  # noqa: E731
    entry("predictive_probs", predictive_probs,
          lambda: {"model": _model(), "guide": _guide(), "x": x4(), "num_samples": 3, "batch_size": 4, "seed": 0,
                   "method": "auto", "sample_chunk": None},
          {"model": st.one_of(st.none(), st.integers(), st.just(_tiny_net())),
           "x": bad_tensor(shapes=[(6, 9)], dtypes=[(torch.long, (6, 4))]),
           "num_samples": bad_int(1, optional=True), "batch_size": bad_int(1), "seed": bad_int(0, optional=True),
           "method": bad_choice(("auto", "vectorized", "predictive")), "sample_chunk": bad_int(1, optional=True)})
    entry("sample_weights", sample_weights, lambda: {"model": _model(), "guide": _guide(), "num_samples": 2, "seed": None},
          {"guide": st.one_of(st.none(), st.integers(), st.just(_tiny_net())), "num_samples": bad_int(1),
           "seed": bad_int(0, optional=True)})
    probs = lambda: torch.full((3, 5, 2), 0.5)  # noqa: E731
    bad_probs = bad_tensor(shapes=[(5,)], dtypes=[(torch.long, (3, 5, 2))]) | st.sampled_from(
        [torch.full((3, 5, 2), 0.7), torch.full((3, 5, 2), -0.5), torch.full((3, 5, 2), math.nan)])
    entry("decompose", decompose, lambda: {"probs": probs()}, {"probs": bad_probs})
    entry("entropy", entropy, lambda: {"probs": probs()}, {"probs": bad_probs})
    entry("decompose_regression", decompose_regression, lambda: {"loc": torch.zeros(3, 5), "noise_scale": 0.1},
          {"loc": bad_tensor(shapes=[(5,)], dtypes=[(torch.long, (3, 5))]), "noise_scale": bad_float(0.0, low_open=True)})
    y5 = lambda: torch.tensor([0, 1, 0, 1, 1])  # noqa: E731
    p2 = lambda: torch.full((5, 2), 0.5)  # noqa: E731
    bad_y = bad_tensor(shapes=[(4,)], dtypes=[(torch.float32, (5,))]) | st.just(torch.tensor([0, 1, 2, 0, 1])) | st.just(torch.tensor([0, -1, 0, 1, 1]))
    for label, fn in (("uncertainty.accuracy", accuracy), ("uncertainty.nll", nll), ("uncertainty.brier", brier)):
        entry(label, fn, lambda: {"probs": p2(), "y": y5()}, {"probs": bad_probs, "y": bad_y})
    entry("ece", ece, lambda: {"probs": p2(), "y": y5(), "num_bins": 15}, {"probs": bad_probs, "y": bad_y, "num_bins": bad_int(1)})
    entry("reliability_data", reliability_data, lambda: {"probs": p2(), "y": y5(), "num_bins": 15},
          {"probs": bad_probs, "y": bad_y, "num_bins": bad_int(1)})
    entry("auroc", auroc, lambda: {"score_in": torch.rand(5), "score_out": torch.rand(4)},
          {"score_in": st.sampled_from([torch.zeros(0), torch.tensor([0.5, math.nan]), "abc", None]),
           "score_out": st.sampled_from([torch.zeros(0), torch.tensor([math.inf]), "abc", None])})

    def in_data():
        return _data(6)

    entry("evaluate", evaluate,
          lambda: {"model": _model(), "guide": _guide(), "in_data": in_data(), "ood_data": None, "num_samples": 3,
                   "batch_size": 4, "num_bins": 5, "seed": 0, "method": "auto"},
          {"in_data": st.one_of(st.none(), st.integers(), st.just(torch.zeros(3, 4))),
           "ood_data": st.one_of(st.integers(), st.just(torch.zeros(3, 9))),
           "num_samples": bad_int(1), "batch_size": bad_int(1), "num_bins": bad_int(1), "seed": bad_int(0, optional=True),
           "method": bad_choice(("auto", "vectorized", "predictive"))})
    entry("to_arviz", to_arviz,
          lambda: {"model": _model(), "guide": _guide(), "x": x4(), "y": torch.zeros(6, dtype=torch.long), "num_samples": 2,
                   "sites": None, "max_site_size": 1000},
          {"x": bad_tensor(shapes=[(6, 9)]), "y": bad_tensor(shapes=[(5,)]), "num_samples": bad_int(1),
           "sites": st.one_of(st.just("nope"), st.just(["net.1.bias", "zzz"]), st.integers(), st.just([])),
           "max_site_size": bad_int(1)})

    def plot(**kw):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        try:
            return plot_reliability(**kw)
        finally:
            plt.close("all")

    entry("plot_reliability", plot, lambda: {"probs": p2(), "y": y5(), "path": None, "num_bins": 5},
          {"probs": bad_probs, "y": bad_y, "path": bad_path().filter(lambda v: v != ""), "num_bins": bad_int(1)})


def _register_pwfn():
    from pyro_bq.guides import init_to_pretrained
    from pyro_bq.pwfn import (PWFN, AutoPWFN, ClusterConfig, PWFNObjective, check_schedule, cluster_guide_,
                              codebook_policy, compression_stats, prefix_within_tau, pwfn_sigma_init, quantile,
                              sigma_regularizer, weight_entropy)

    def pwfn_guide():
        net = _tiny_net()
        from pyro_bq import IIDNormal
        from pyro_bq.models import BayesianClassifier

        model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=10)
        guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net)).setup(torch.zeros(2, 4))
        return model, guide

    entry("AutoPWFN", AutoPWFN, lambda: {"model": _model(), "init_loc_fn": None, "prior_init": True, "init_scale": 0.01},
          {"init_loc_fn": not_callable(), "prior_init": bad_bool(), "init_scale": bad_float(0.0, low_open=True)})

    def run_pwfn(**kw):
        model, guide = pwfn_guide()
        args = {"model": model, "guide": guide, "train_data": _data()}
        args.update(kw)
        return PWFN(args.pop("model"), args.pop("guide"), args.pop("train_data"), **args)

    entry("PWFN", run_pwfn,
          lambda: {"schedule": (0.5, 1.0), "mode": "paper", "S": 0.05, "alpha": 0.001, "num_steps": 2, "batch_size": 4,
                   "lr": 1e-3, "scale_lr": None, "seed": 0, "checkpoint_dir": None, "eval_samples": 2, "progress": False,
                   "log": None, "test_data": None},
          {"train_data": st.one_of(st.none(), st.just(torch.zeros(3, 4))), "test_data": st.one_of(st.integers(), st.just(torch.zeros(3, 4))),
           "schedule": st.sampled_from([(), (0.5,), (0.5, 0.4, 1.0), (0.0, 1.0), (0.5, 1.5), "0.5,1", None, (math.nan, 1.0)]),
           "mode": bad_choice(("paper", "elbo")), "S": bad_float(0.0, low_open=True), "alpha": bad_float(0.0),
           "num_steps": bad_int(1, optional=True), "batch_size": bad_int(1), "lr": bad_float(0.0, low_open=True),
           "scale_lr": bad_float(0.0, low_open=True, optional=True), "seed": bad_int(0), "checkpoint_dir": bad_path(),
           "eval_samples": bad_int(1), "progress": bad_bool(), "log": not_callable()})
    entry("PWFNObjective", lambda **kw: PWFNObjective(pwfn_guide()[1], **kw),
          lambda: {"mode": "paper", "S": 0.05, "alpha": 0.001, "reg_scale": None},
          {"mode": bad_choice(("paper", "elbo")), "S": bad_float(0.0, low_open=True), "alpha": bad_float(0.0),
           "reg_scale": bad_float(0.0, optional=True)})
    entry("ClusterConfig", ClusterConfig, lambda: {"b": 7, "order": 1, "tau": 1.0, "tau_step": 1.0, "b_step": 2, "max_b": 30},
          {"b": bad_int(0, 30), "order": bad_int(1), "tau": bad_float(0.0, low_open=True), "tau_step": bad_float(0.0, low_open=True),
           "b_step": bad_int(0), "max_b": bad_int(0, 40)})
    def fixed_pwfn_guide():
        guide = pwfn_guide()[1]
        cluster_guide_(guide, 1.0, ClusterConfig(b=6))
        return guide

    entry("codebook_policy", codebook_policy, lambda: {"guide": fixed_pwfn_guide()},
          {"guide": st.one_of(st.none(), st.integers(), st.just("guide"), st.builds(lambda: pwfn_guide()[1]))})
    entry("cluster_guide_", lambda **kw: cluster_guide_(pwfn_guide()[1], **kw), lambda: {"fraction": 0.5, "config": ClusterConfig()},
          {"fraction": bad_float(0.0, 1.0), "config": st.one_of(st.none(), st.integers(), st.just({"b": 7}))})
    entry("check_schedule", check_schedule, lambda: {"schedule": (0.5, 1.0)},
          {"schedule": st.sampled_from([(), (0.5,), (0.5, 0.4, 1.0), (0.0, 1.0), (0.5, 1.5), None, 3, (math.nan, 1.0), ("a", 1.0)])})
    entry("sigma_regularizer", sigma_regularizer, lambda: {"sigma": torch.rand(5) + 0.01, "S": 0.05, "alpha": 0.001, "free": None},
          {"sigma": bad_tensor(dtypes=[(torch.long, (5,))]), "S": bad_float(0.0, low_open=True), "alpha": bad_float(0.0),
           "free": bad_tensor(shapes=[(4,)], dtypes=[(torch.float32, (5,))], optional=True)})
    entry("pwfn_sigma_init", pwfn_sigma_init, lambda: {"mu": torch.randn(5), "scale": 0.01, "q": 0.75},
          {"mu": bad_tensor(dtypes=[(torch.long, (5,))]) | st.just(torch.tensor([math.nan])),
           "scale": bad_float(0.0, low_open=True), "q": bad_float(0.0, 1.0)})
    entry("prefix_within_tau", prefix_within_tau, lambda: {"d": torch.rand(5), "tau": 1.0, "limit": None},
          {"d": bad_tensor(shapes=[(2, 2)]), "tau": bad_float(0.0, low_open=True), "limit": bad_int(0, optional=True)})
    entry("pwfn.quantile", quantile, lambda: {"x": torch.randn(5), "q": 0.5},
          {"x": bad_tensor(shapes=[(0,)], dtypes=[(torch.long, (5,))]), "q": bad_float(0.0, 1.0)})
    entry("weight_entropy", weight_entropy, lambda: {"values": torch.randn(5)},
          {"values": st.one_of(st.none(), st.integers(), st.just(torch.tensor([])), st.just("abc"))})
    entry("compression_stats", compression_stats, lambda: {"weights": {"a": torch.randn(5)}},
          {"weights": st.one_of(st.none(), st.integers(), st.just({}), st.just({"a": "x"}), st.just([torch.zeros(2)]))})


def _register_mixed():
    from pyro_bq.mixed import (BitAllocation, informativeness, layer_informativeness, mean_bits, quantile_inform,
                               random_bits, s_from_bits)
    from pyro_bq.quant import GaussianLloydQuantizer, SignedGridQuantizer, gaussian_quantile_levels, lloyd_max_median

    bad_posterior = st.one_of(st.none(), st.integers(), st.just(_tiny_net()), st.just({"a": (torch.zeros(2), -torch.ones(2))}),
                              st.just({"a": (torch.zeros(2), torch.ones(3))}))
    bad_sites = st.one_of(st.just(["nope"]), st.just("nope"), st.integers(), st.just([]))
    site_words = {"posterior": ("posterior", "site")}
    entry("quantile_inform", quantile_inform,
          lambda: {"posterior": _posterior(), "target_mean_bits": 4.0, "candidate_bits": range(2, 9), "aggregate": "mean",
                   "grid": "uniform", "mode": "nearest", "sites": None},
          {"posterior": bad_posterior, "target_mean_bits": bad_float(2.0, 8.0),
           "candidate_bits": st.sampled_from([[], [0, 2], [2.5, 4], "248", None]),
           "aggregate": bad_choice(("mean", "entropy")), "grid": bad_choice(("uniform", "gaussian")),
           "mode": bad_choice(("nearest", "at_most")), "sites": bad_sites}, words=site_words)
    entry("random_bits", random_bits,
          lambda: {"posterior": _posterior(), "target_mean_bits": 4.0, "num_steps": 3, "lr": 0.05, "penalty": 10.0,
                   "rounding": "nearest", "init_interval": "minmax", "seed": 0, "sites": None},
          {"posterior": bad_posterior, "target_mean_bits": bad_float(2.0, 8.0),
           "num_steps": bad_int(1), "lr": bad_float(0.0, low_open=True), "penalty": bad_float(0.0),
           "rounding": bad_choice(("nearest", "stochastic", "argmax")), "init_interval": bad_choice(("minmax", "percentile")),
           "seed": bad_int(0), "sites": bad_sites}, words=site_words)
    entry("informativeness", informativeness, lambda: {"loc": torch.zeros(3), "scale": torch.ones(3)},
          {"loc": bad_tensor(shapes=[(4,)], dtypes=[(torch.long, (3,))]),
           "scale": bad_tensor(shapes=[(4,)]) | st.just(torch.tensor([1.0, 0.0, 1.0])) | st.just(torch.tensor([1.0, -1.0, 1.0]))})
    entry("layer_informativeness", layer_informativeness, lambda: {"posterior": _posterior(), "aggregate": "mean", "sites": None},
          {"posterior": bad_posterior, "aggregate": bad_choice(("mean", "entropy")), "sites": bad_sites}, words=site_words)
    entry("mean_bits", mean_bits, lambda: {"bits": {"a": 4, "b": 2}, "sizes": {"a": 10, "b": 30}},
          {"bits": st.sampled_from([{"a": 0, "b": 2}, {"a": 4}, {"a": "4", "b": 2}, None, {"a": math.nan, "b": 2}]),
           "sizes": st.sampled_from([{"a": 0, "b": 30}, {"a": 10}, {"a": -1, "b": 3}, None, {"a": 2.5, "b": 3}])})
    entry("gaussian_quantile_levels", gaussian_quantile_levels, lambda: {"bits": 3, "mean": 0.0, "std": 1.0},
          {"bits": bad_int(1, 16), "mean": bad_float(), "std": bad_float(0.0, low_open=True)})
    entry("lloyd_max_median", lloyd_max_median, lambda: {"levels": torch.tensor([-1.0, 0.0, 1.0]), "max_iter": 10, "tol": 1e-10},
          {"levels": bad_tensor(shapes=[(0,), (2, 2)]) | st.just(torch.tensor([1.0, 0.0])) | st.just(torch.tensor([0.0, math.nan])),
           "max_iter": bad_int(1), "tol": bad_float(0.0, low_open=True)})
    entry("GaussianLloydQuantizer", GaussianLloydQuantizer, lambda: {"bits": 4, "max_iter": 10},
          {"bits": bad_int(1, 16), "max_iter": bad_int(1)})
    entry("SignedGridQuantizer", SignedGridQuantizer, lambda: {"bits": 4, "scale": None},
          {"bits": bad_int(1, 16).filter(lambda v: not isinstance(v, torch.Tensor)), "scale": bad_float(0.0, low_open=True, optional=True)})
    entry("s_from_bits", s_from_bits, lambda: {"bits": 4}, {"bits": st.sampled_from([0, -1, "4", None, math.nan])})

    entry("BitAllocation", BitAllocation,
          lambda: {"bits": {"a": 4}, "method": "QIU", "sizes": {"a": 10}, "grid": "uniform-percentile",
                   "site_quantizers": None},
          {"bits": st.sampled_from([None, 3, {"a": 0}, {"a": "4"}, {"b": 4}, {"a": 17}]),
           "sizes": st.sampled_from([None, {"a": 0}, {"b": 10}, {"a": -3}]),
           "site_quantizers": st.sampled_from([3, {"b": {}}, {"a": {"loc": "grid"}}, {"a": 4}])})


#: Gaps found in pyro_bq.quant/.uncertainty/.pwfn/.mixed: "entry-argument": what happens (file, function).
KNOWN_GAPS: dict[str, str] = {
    # pyro_bq/mixed
}

def _register_more():
    """The study configuration, Ambiguous-MNIST's configuration and a few helpers."""
    from pyro_bq.data import AmbiguousConfig, resolve_root
    from pyro_bq.guides import softplus_inverse
    from pyro_bq.study import StudyConfig

    def tmpdir():
        import tempfile

        return tempfile.mkdtemp(prefix="fuzz-study-")

    entry("StudyConfig", StudyConfig,
          lambda: {"out_dir": tmpdir(), "seed": 0, "policies": ("jq",), "bits": (4,), "act_bits": 8, "num_epochs": 1,
                   "batch_size": 64, "lr": 1e-3, "init_scale": 0.01, "num_samples": 4, "eval_limit": 100,
                   "amnist_source": "auto", "mixed_bits": 4.0, "progress": False, "data_dir": None},
          {"out_dir": st.one_of(st.integers(), st.none(), st.just(b"x")), "seed": bad_int(0),
           "policies": st.sampled_from([("jqq",), "float,jq", (3,), None, ("",)]),
           "bits": st.sampled_from([(), (0,), (4, 33), (4.0,), "4", None]), "act_bits": bad_int(1, 16),
           "num_epochs": bad_int(1), "batch_size": bad_int(1), "lr": bad_float(0.0, low_open=True),
           "init_scale": bad_float(0.0, low_open=True), "num_samples": bad_int(2), "eval_limit": bad_int(10, optional=True),
           "amnist_source": bad_choice(("auto", "original", "generated")), "mixed_bits": bad_float(2.0, 8.0),
           "progress": bad_bool(), "data_dir": st.one_of(st.integers(), st.just(b"x"), st.just(["a"]))},
          words={"policies": ("policies", "policy")})
    entry("AmbiguousConfig", AmbiguousConfig,
          lambda: {"seed": 0, "num_train_images": 20, "num_test_images": 5, "labels_per_image": 10, "candidate_factor": 2,
                   "interpolation_fraction": 0.75, "latent_dim": 8, "max_mi_quantile": 0.5},
          {"seed": bad_int(0), "num_train_images": bad_int(1), "num_test_images": bad_int(1), "labels_per_image": bad_int(1),
           "candidate_factor": bad_int(1), "interpolation_fraction": bad_float(0.0, 1.0), "latent_dim": bad_int(1),
           "max_mi_quantile": bad_float(0.0, 1.0)})
    entry("resolve_root", resolve_root, lambda: {"root": "/tmp"}, {"root": st.one_of(st.integers(), st.just(b"x"), st.just(["a"]))})
    entry("softplus_inverse", softplus_inverse, lambda: {"x": torch.rand(3) + 0.1},
          {"x": st.one_of(st.integers(), st.text(max_size=2), st.none(), st.just(torch.tensor([-1.0, 1.0])),
                          st.just(torch.tensor([1, 2])))})


for _register in (_register_quant, _register_uncertainty, _register_pwfn, _register_mixed, _register_more):
    _register()


for _e in ENTRIES:
    for _arg in _e.bad:
        if f"{_e.name}-{_arg}" in KNOWN_GAPS:
            _e.xfail[_arg] = KNOWN_GAPS[f"{_e.name}-{_arg}"]

CASES = [
    pytest.param(e, arg, id=f"{e.name}-{arg}",
                 marks=[pytest.mark.xfail(strict=True, reason=e.xfail[arg])] if arg in e.xfail else [])
    for e in ENTRIES
    for arg in e.bad
]


def _names_argument(message: str, arg: str, aliases: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(w)}(?![A-Za-z0-9_])", message) for w in (arg, *aliases))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("ep, arg", CASES)
def test_bad_argument_raises_a_clear_error(ep: Entry, arg: str):
    @FUZZ
    @given(value=ep.bad[arg])
    def run(value):
        _COUNT["cases"] += 1
        kwargs = ep.valid()
        kwargs[arg] = value
        pyro.clear_param_store()
        try:
            ep.call(**kwargs)
        except (ValueError, TypeError) as err:
            message = str(err)
            assert _names_argument(message, arg, ep.words.get(arg, ())), (
                f"{ep.name}({arg}={value!r}) raised {type(err).__name__} without naming {arg!r}: {message}"
            )
            return
        except Exception as err:  # noqa: BLE001 - any other type is a finding
            raise AssertionError(f"{ep.name}({arg}={value!r}) raised {type(err).__name__}: {err}") from err
        raise AssertionError(f"{ep.name}({arg}={value!r}) succeeded silently")

    run()


@pytest.mark.parametrize("ep", [pytest.param(e, id=e.name) for e in ENTRIES])
def test_the_valid_arguments_work(ep: Entry):
    """Guard: with every argument valid the entry point succeeds, so a raise above is due to the bad value."""
    pyro.clear_param_store()
    ep.call(**ep.valid())


def test_report_counts():
    """Writes the number of entry points and cases to $PYRO_BQ_FUZZ_COUNT (for the report)."""
    target = os.environ.get("PYRO_BQ_FUZZ_COUNT")
    if target:
        Path(target).write_text(f"entry_points={len(ENTRIES)} arguments={len(CASES)} cases={_COUNT['cases']}\n")
    assert len(ENTRIES) >= 30


# -- the shared helpers in pyro_bq._validation ----------------------------------------------------


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda v: __import__("pyro_bq._validation", fromlist=["x"]).check_bool("flag", v), TypeError),
        (lambda v: __import__("pyro_bq._validation", fromlist=["x"]).check_str("label", v), TypeError),
        (lambda v: __import__("pyro_bq._validation", fromlist=["x"]).check_callable("hook", v), TypeError),
        (lambda v: __import__("pyro_bq._validation", fromlist=["x"]).check_dtype("dtype", v), TypeError),
        (lambda v: __import__("pyro_bq._validation", fromlist=["x"]).check_device("device", v), TypeError),
        (lambda v: __import__("pyro_bq._validation", fromlist=["x"]).check_path("path", v), TypeError),
        (lambda v: __import__("pyro_bq.quant.grids", fromlist=["x"]).check_bits("bits", v), ValueError),
    ],
)
@FUZZ
@given(value=st.one_of(st.integers(2, 10**6).map(lambda i: [i]), st.just(object()), st.just({"a": 1}), st.just(b"raw")))
def test_helpers_refuse_wrong_types_naming_the_argument(call, exc, value):
    with pytest.raises(exc) as info:
        call(value)
    assert re.search(r"^(flag|label|hook|dtype|device|path|bits) ", str(info.value))


def test_helpers_accept_good_values_and_refuse_bad_ones():
    from pyro_bq import _validation as v

    assert v.check_bool("flag", np.bool_(True)) is True
    assert v.check_choice("bits", np.int64(4), (2, 4, 8)) == 4
    for bad in (True, 4.0, "4", np.array([4, 4]), torch.tensor([4])):
        with pytest.raises(ValueError, match="bits must be one of 2, 4, 8"):
            v.check_choice("bits", bad, (2, 4, 8))
    assert v.check_device("device", "cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:99", "cpu:x"):
        with pytest.raises(ValueError, match="device"):
            v.check_device("device", bad)
    assert v.check_dtype("dtype", torch.float16, floating=True) is torch.float16
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        v.check_dtype("dtype", torch.int8, floating=True)
    with pytest.raises(ValueError, match=r"dtype must be one of torch\.float32"):
        v.check_dtype("dtype", torch.float64, (torch.float32,))
    assert v.check_shape("x", torch.zeros(3, 4), (None, 4)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 5\), got \(3, 4\)"):
        v.check_shape("x", torch.zeros(3, 4), (None, 5))
    from pyro_bq.quant.grids import check_bits

    assert check_bits("bits", 16) == 16
    for bad in (0, 17, 33, -1):
        with pytest.raises(ValueError, match="bits must be an int from 1 to 16"):
            check_bits("bits", bad)
    assert v.check_int_sequence("sizes", [784, 10], low=1) == (784, 10)
    with pytest.raises(ValueError, match=r"sizes\[1\] must lie in"):
        v.check_int_sequence("sizes", [784, 0], low=1)
    with pytest.raises(ValueError, match="sizes must not be empty"):
        v.check_int_sequence("sizes", [])
    assert v.check_schedule("schedule", [0.2, 0.5, 1.0], low=0.0, high=1.0, monotone="increasing") == (0.2, 0.5, 1.0)
    with pytest.raises(ValueError, match="schedule must be increasing"):
        v.check_schedule("schedule", [0.5, 0.2, 1.0], monotone="increasing")
    with pytest.raises(ValueError, match=r"schedule\[1\] must be finite"):
        v.check_schedule("schedule", [0.5, math.nan])
    with pytest.raises(TypeError, match=r"schedule\[0\] must be a real number"):
        v.check_schedule("schedule", ["a"])
    with pytest.raises(ValueError, match="schedule must have 3 entries"):
        v.check_schedule("schedule", [0.5, 1.0], length=3)
    known = ["net.1.weight", "net.1.bias"]
    assert v.check_site_names("skip", "net.1.bias", known) == ["net.1.bias"]
    with pytest.raises(ValueError, match=r"skip names unknown site\(s\) \['net.9.weight'\]; known sites"):
        v.check_site_names("skip", ["net.9.weight"], known)
    with pytest.raises(TypeError, match=r"skip\[0\] must be a site name"):
        v.check_site_names("skip", [3], known)
    with pytest.raises(ValueError, match="more than once"):
        v.check_site_names("skip", ["net.1.bias", "net.1.bias"], known)
    with pytest.raises(ValueError, match="path 'definitely/missing' does not exist"):
        v.check_path("path", "definitely/missing", must_exist=True)
    with pytest.raises(ValueError, match="is not a folder"):
        v.check_path("path", __file__, kind="dir")
    assert v.check_path("path", __file__, kind="file") == Path(__file__)
    with pytest.raises(ValueError, match="label must be a non-empty str"):
        v.check_str("label", "")
