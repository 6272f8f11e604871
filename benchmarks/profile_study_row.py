"""Where one row of the default study spends its time: build (quantize), evaluate, ArviZ export, memory report.

Reproduces the work of one post-hoc row of ``pyro-bq study`` with its default
sizes (LeNet-5, 20 draws over three test sets of 2,000 images; 50 draws over
500 images for the ArviZ file) on random inputs and a freshly initialised
guide, so it runs in a minute without the data or the training. Prints the
seconds of each stage (wall and process CPU) and the top functions of each
under cProfile.

Usage::

    python benchmarks/profile_study_row.py                       # JQ at 4 bits
    python benchmarks/profile_study_row.py --policy float --top 8
    python benchmarks/profile_study_row.py --policy float --act-bits 8 --threads 1
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch

from pyro_bq.guides import AutoMeanFieldNormal, quantize
from pyro_bq.io import memory_report
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.priors import LayerwiseNormal
from pyro_bq.quant import make_policy, quantize_activations
from pyro_bq.uncertainty import evaluate_details, to_arviz


def stage(name: str, fn, top: int):
    pr = cProfile.Profile()
    w, c = time.perf_counter(), time.process_time()
    pr.enable()
    out = fn()
    pr.disable()
    w, c = time.perf_counter() - w, time.process_time() - c
    print(f"## {name}: {w:.2f} s wall, {c:.2f} s cpu")
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip() and not ln.startswith(("   Ordered", "   List"))]
    print("\n".join(lines[-top - 1:]) + "\n")
    return out, w


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="jq", help="float, or a post-hoc policy (vpq, spq, jq)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=None, help="also quantize activations (the study's +act8 rows)")
    p.add_argument("--num-samples", type=int, default=20)
    p.add_argument("--eval-limit", type=int, default=2000)
    p.add_argument("--arviz-samples", type=int, default=50)
    p.add_argument("--arviz-limit", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# one study row ({args.policy}{'' if args.policy == 'float' else f' {args.bits} bits'}), "
          f"load average {os.getloadavg()[0]:.1f}\n")
    torch.manual_seed(0)
    model = BayesianClassifier(LeNet5(), LayerwiseNormal(1.0), 80_000)
    g = torch.Generator().manual_seed(1)
    sets = {k: (torch.rand(args.eval_limit, 1, 28, 28, generator=g), torch.randint(0, 10, (args.eval_limit,), generator=g))
            for k in ("mnist", "fashion", "ambiguous")}
    guide = AutoMeanFieldNormal(model, init_scale=1e-2).setup(sets["mnist"][0][:2], sets["mnist"][1][:2])
    total = {}
    if args.act_bits is not None:  # calibrated on 512 rows, as the study does
        model, total["activations"] = stage("build: quantize_activations", lambda: quantize_activations(
            model, args.act_bits, guide=guide, data=sets["mnist"][0][:512], seed=0), args.top)
    if args.policy != "float":
        guide, total["build"] = stage("build: quantize", lambda: quantize(guide, make_policy(args.policy, args.bits)),
                                      args.top)
    _, total["evaluate"] = stage("evaluate_details (3 sets)", lambda: evaluate_details(
        model, guide, sets["mnist"], sets["fashion"], ambiguous_data=sets["ambiguous"], num_samples=args.num_samples,
        seed=0), args.top)
    _, total["memory"] = stage("memory_report", lambda: memory_report(guide), args.top)
    n = args.arviz_limit
    _, total["arviz"] = stage("to_arviz", lambda: to_arviz(model, guide, sets["mnist"][0][:n], sets["mnist"][1][:n],
                                                           num_samples=args.arviz_samples, seed=0), args.top)
    whole = sum(total.values())
    print("| stage | seconds | share |\n|---|---:|---:|")
    for k, v in total.items():
        print(f"| {k} | {v:.2f} | {v / whole:.0%} |")


if __name__ == "__main__":
    main()
