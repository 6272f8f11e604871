"""Where one row of the default study spends its time, and what the evaluation shortcuts save.

Reproduces the work of one post-hoc row of ``pyro-bq study`` with its default
sizes (LeNet-5, 50 draws over three test sets of 2,000 images; 50 draws over
500 images for the ArviZ file) on random inputs and a freshly initialised
guide, so it runs in a minute without the data or the training. The row runs
twice in one process:

* ``long way``: LeNet-5 pooling through ``F.max_pool2d``, the fake-quantized
  activations through the straight-through path (seven temporary tensors), and
  the ArviZ export predicting its draws again;
* ``study``: what the study does now (:func:`pyro_bq.models.nets.max_pool_2x2`,
  :func:`pyro_bq.quant.activation.round_to_grid`, the evaluation's logits
  handed to :func:`~pyro_bq.uncertainty.to_arviz` where they are the same).

It prints the seconds (wall and process CPU) of each stage, checks that both
ways give the same numbers bit for bit, and prints the CPU ratio. ``--profile``
adds the top functions of each stage under cProfile (which slows Python-heavy
code, so the seconds are then not comparable).

Usage::

    python benchmarks/profile_study_row.py --threads 1                    # JQ at 4 bits
    python benchmarks/profile_study_row.py --policy float --act-bits 8 --threads 1
    python benchmarks/profile_study_row.py --policy float --profile --top 8
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import sys
import time
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from pyro_bq.guides import AutoMeanFieldNormal, quantize
from pyro_bq.io import memory_report
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.priors import LayerwiseNormal
from pyro_bq.quant import activation as activation_module
from pyro_bq.quant import make_policy, quantize_activations
from pyro_bq.quant.grids import ste, uniform_quantize
from pyro_bq.study import StudyConfig
from pyro_bq.study.runner import EVAL_BATCH, _arviz_logits
from pyro_bq.uncertainty import evaluate_details, to_arviz


def stage(name: str, fn, top: int, profile: bool):
    pr = cProfile.Profile() if profile else None
    w, c = time.perf_counter(), time.process_time()
    if pr:
        pr.enable()
    out = fn()
    if pr:
        pr.disable()
    w, c = time.perf_counter() - w, time.process_time() - c
    print(f"## {name}: {w:.2f} s wall, {c:.2f} s cpu")
    if pr:
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip() and not ln.startswith(("   Ordered", "   List"))]
        print("\n".join(lines[-top - 1:]) + "\n")
    return out, c


@contextlib.contextmanager
def long_way():
    """The row's evaluation without the shortcuts: ``F.max_pool2d`` and the straight-through rounding."""
    nets = sys.modules[LeNet5.__module__]
    with mock.patch.object(nets, "max_pool_2x2", lambda x: F.max_pool2d(x, 2)), \
            mock.patch.object(activation_module, "round_to_grid",
                              lambda y, *grid: ste(y, uniform_quantize(y.detach(), *grid))):
        yield


def run_row(args, model, guide, sets, shortcuts: bool) -> tuple[dict, dict]:
    """``({stage: cpu seconds}, {name: array})`` of one row; the arrays are compared between the ways."""
    total, out = {}, {}
    if args.act_bits is not None:  # calibrated on 512 rows, as the study does
        model, total["activations"] = stage("build: quantize_activations", lambda: quantize_activations(
            model, args.act_bits, guide=guide, data=sets["mnist"][0][:512], seed=0), args.top, args.profile)
    if args.policy != "float":
        guide, total["build"] = stage("build: quantize", lambda: quantize(guide, make_policy(args.policy, args.bits)),
                                      args.top, args.profile)
    (record, details), total["evaluate"] = stage("evaluate_details (3 sets)", lambda: evaluate_details(
        model, guide, sets["mnist"], sets["fashion"], ambiguous_data=sets["ambiguous"], num_samples=args.num_samples,
        seed=0, batch_size=EVAL_BATCH, keep_logits=True), args.top, args.profile)
    _, total["memory"] = stage("memory_report", lambda: memory_report(guide), args.top, args.profile)
    cfg = StudyConfig(num_samples=args.num_samples, arviz_samples=args.arviz_samples, arviz_limit=args.arviz_limit)
    logits = _arviz_logits(cfg, details, {"mnist": sets["mnist"][0]}) if shortcuts else None
    n = min(args.arviz_limit, args.eval_limit)
    idata, total["arviz"] = stage(f"to_arviz ({'evaluation logits' if logits is not None else 'predicting'})",
                                  lambda: to_arviz(model, guide, sets["mnist"][0][:n], sets["mnist"][1][:n],
                                                   num_samples=args.arviz_samples, seed=0, batch_size=EVAL_BATCH,
                                                   logits=logits), args.top, args.profile)
    for key, parts in details.items():
        for part in ("logits", "aleatoric", "epistemic"):
            out[f"{key}.{part}"] = parts[part].numpy()
    out["record"] = np.array([v for v in record.values() if isinstance(v, float)])
    for group in idata.groups():
        for name, var in getattr(idata, group).data_vars.items():
            out[f"arviz.{group}.{name}"] = np.asarray(var.values)
    return total, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="jq", help="float, or a post-hoc policy (vpq, spq, jq)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=None, help="also quantize activations (the study's +act8 rows)")
    p.add_argument("--num-samples", type=int, default=50)
    p.add_argument("--eval-limit", type=int, default=2000)
    p.add_argument("--arviz-samples", type=int, default=50)
    p.add_argument("--arviz-limit", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="cProfile each stage")
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# one study row ({args.policy}{'' if args.policy == 'float' else f' {args.bits} bits'}"
          f"{'' if args.act_bits is None else f', activations {args.act_bits} bits'}), {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}\n")
    torch.manual_seed(0)
    model = BayesianClassifier(LeNet5(), LayerwiseNormal(1.0), 80_000)
    g = torch.Generator().manual_seed(1)
    sets = {k: (torch.rand(args.eval_limit, 1, 28, 28, generator=g), torch.randint(0, 10, (args.eval_limit,), generator=g))
            for k in ("mnist", "fashion", "ambiguous")}
    guide = AutoMeanFieldNormal(model, init_scale=1e-2).setup(sets["mnist"][0][:2], sets["mnist"][1][:2])
    print("### long way")
    with long_way():
        slow, slow_out = run_row(args, model, guide, sets, shortcuts=False)
    print("### study")
    fast, fast_out = run_row(args, model, guide, sets, shortcuts=True)
    same = slow_out.keys() == fast_out.keys() and all(np.array_equal(slow_out[k], fast_out[k], equal_nan=True)
                                                      for k in slow_out)
    print("| stage | long way (cpu s) | study (cpu s) | ratio |\n|---|---:|---:|---:|")
    for k in slow:
        print(f"| {k} | {slow[k]:.2f} | {fast[k]:.2f} | {fast[k] / max(slow[k], 1e-9):.2f} |")
    a, b = sum(slow.values()), sum(fast.values())
    print(f"| **row** | {a:.2f} | {b:.2f} | **{b / a:.2f}** |")
    print(f"\nsame numbers bit for bit: {same}")


if __name__ == "__main__":
    main()
