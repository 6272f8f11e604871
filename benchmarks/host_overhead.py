"""How much of an SVI step is host (Python) time rather than kernel time, on the CPU.

On a GPU the kernels of a small network are quick and the step's time is set by
the Python work around them (Pyro's trace messengers, site checks, the
optimizer's bookkeeping). Without a GPU the host share is measured two ways:

* (a) :mod:`torch.profiler`: the self time of all ``aten::`` operators
  (kernels and their dispatch) against the step's total time under the
  profiler, both wall-clock; the rest is host time (the profiler's own
  per-operator cost lands in it too, so this share is an upper bound);
* (b) batch 1, where the network's kernels are nearly free: the step's CPU time
  next to the plain PyTorch step of the same network at batch 1.

Rows, each at batch 1 and at ``--batch``, timed round-robin in one process
(CPU time, ``time.process_time``, medians of ``--reps``):

* ``plain``       plain PyTorch step (cross-entropy, ``torch.optim.Adam``);
* ``naive``       stock Pyro: ``PyroSample`` priors + ``AutoNormal`` + ``TraceMeanField_ELBO``
  + ``pyro.optim.Adam`` through ``SVI.step``;
* ``bq-before``   pyro_bq's guarded step (what :func:`~pyro_bq.inference.fit_svi` runs) with
  the gradient guard's element-wise finite test (``torch.isfinite(g).all()``);
* ``bq``          the same step as it is now;
* ``bq-compiled`` (``--compile BACKEND``) the same with the network compiled by
  :func:`~pyro_bq.inference.train.compile_network_`.

Usage::

    python benchmarks/host_overhead.py --nets lenet,mlp --reps 30
    python benchmarks/host_overhead.py --nets lenet --reps 10 --no-profile
"""

import argparse
import contextlib
import os
import statistics
import sys
import time

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import DATASET_SIZE, INIT_SCALE, LR, PRIOR_SCALE, data, det_step, make_net, naive_pyro_model  # noqa: E402

from pyro_bq import IIDNormal  # noqa: E402
from pyro_bq.guides import AutoMeanFieldNormal  # noqa: E402
from pyro_bq.inference import MeanFieldELBO, default_optim  # noqa: E402
from pyro_bq.inference import train  # noqa: E402
from pyro_bq.inference.train import compile_network_  # noqa: E402
from pyro_bq.models import BayesianClassifier  # noqa: E402


_BUILT = {}


def _built(kind, net_name, make):
    """One model and guide per kind and network, shared by the batch sizes (one param store, no shadowing)."""
    if (kind, net_name) not in _BUILT:
        _BUILT[kind, net_name] = make()
    return _BUILT[kind, net_name]


def naive_step(net_name, batch):
    def make():
        model = naive_pyro_model(net_name)
        guide = AutoNormal(model, init_scale=INIT_SCALE)
        return SVI(model, guide, pyro.optim.Adam({"lr": LR}), TraceMeanField_ELBO())

    svi = _built("naive", net_name, make)
    x, y = data(batch, 0, net_name)
    svi.step(x, y)
    return lambda: svi.step(x, y)


@contextlib.contextmanager
def _elementwise_guard():
    """The gradient guard's finite test as it was: one ``isfinite`` pass and one ``all`` per gradient."""
    fast = train._all_finite
    train._all_finite = lambda g: bool(torch.isfinite(g).all())
    try:
        yield
    finally:
        train._all_finite = fast


def bq_step(net_name, batch, before=False, compile_backend=None):
    def make():
        model = BayesianClassifier(make_net(net_name), IIDNormal(PRIOR_SCALE), DATASET_SIZE)
        return model, AutoMeanFieldNormal(model, init_scale=INIT_SCALE)

    model, guide = _built("bq", net_name, make)  # one guide (one param store entry) for every bq row
    if compile_backend is not None:
        model = _built(f"bq-{compile_backend}", net_name, lambda: compile_network_(
            BayesianClassifier(make_net(net_name), IIDNormal(PRIOR_SCALE), DATASET_SIZE), backend=compile_backend))
    x, y = data(batch, 0, net_name)
    guide(x, y)
    optim, elbo = default_optim(LR), MeanFieldELBO()

    def step():
        with _elementwise_guard() if before else contextlib.nullcontext():
            train._svi_step(model, guide, optim, elbo, (x, y), {}, "raise", 0)

    step()
    return step


def cpu_times(steps: dict, reps: int, warmup: int) -> dict:
    """Per-row CPU seconds of one call, round-robin, ``reps`` rounds after ``warmup``."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, step in steps.items():
            t = time.process_time()
            step()
            times[k].append(time.process_time() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def aten_share(step, n: int) -> tuple:
    """``(aten self time, total time)`` seconds per step under torch.profiler, both wall-clock (the
    profiler's clock), so that time the process spends preempted inflates both alike."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(n):
            step()
        total = time.perf_counter() - t
    aten = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) * 1e-6
    return aten / n, total / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", default="lenet,mlp")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler measurement (a)")
    p.add_argument("--compile", default=None, metavar="BACKEND",
                   help="add a row bq-compiled: the bq step with compile_network_(backend=BACKEND), e.g. aot_eager")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.enable_validation(True)
    for net in args.nets.split(","):
        pyro.clear_param_store()  # the guides of the networks have the same parameter names
        _BUILT.clear()
        print(f"\n== {net}, {args.threads} thread(s), CPU ms per step (median of {args.reps})")
        med = {}
        for batch in (1, args.batch):
            steps = {"plain": det_step(net, batch), "naive": naive_step(net, batch),
                     "bq-before": bq_step(net, batch, before=True), "bq": bq_step(net, batch)}
            if args.compile:
                steps["bq-compiled"] = bq_step(net, batch, compile_backend=args.compile)
            for k, v in cpu_times(steps, args.reps, args.warmup).items():
                med[k, batch] = v
            if not args.no_profile:
                for k in ("plain", "bq"):
                    aten, total = aten_share(steps[k], args.profile_steps)
                    print(f"  (a) {k:>5} batch {batch:>3}: aten self {aten * 1e3:7.2f} of {total * 1e3:7.2f} ms "
                          f"(wall, profiled); host share {1 - aten / total:5.1%}")
        print(f"  {'row':>10} {'batch 1':>9} {'batch ' + str(args.batch):>10}")
        for k in ("plain", "naive", "bq-before", "bq") + (("bq-compiled",) if args.compile else ()):
            print(f"  {k:>10} {med[k, 1] * 1e3:9.2f} {med[k, args.batch] * 1e3:10.2f}")
        b1 = med["bq", 1]
        print(f"  (b) bq - plain at batch 1: {(b1 - med['plain', 1]) * 1e3:.2f} ms "
              f"({(b1 - med['plain', 1]) / b1:.1%} of the bq step)")
        for batch in (1, args.batch):
            print(f"  batch {batch:>3}: bq-before/bq {med['bq-before', batch] / med['bq', batch]:5.3f}x, "
                  f"naive/bq {med['naive', batch] / med['bq', batch]:5.2f}x, "
                  f"bq/plain {med['bq', batch] / med['plain', batch]:5.2f}x"
                  + (f", bq-compiled/bq {med['bq-compiled', batch] / med['bq', batch]:5.2f}x" if args.compile else ""))


if __name__ == "__main__":
    main()
