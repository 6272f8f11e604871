"""Big-model paths at ResNet-50 size (25M weights): PWFN clustering, the allocators, quantize + pack, load + predict.

Every figure is printed with a baseline measured in the same run:

* PWFN: one clustering round (the first 20% of the weights fixed, as a PWFN
  round does) against one ``torch.sort`` of as many floats;
* allocators: Quantile Inform and Random Bits (``--rb-steps`` Adam steps) on a
  mean-field guide of that size, against the same sort;
* JQ(``--bits``): ``quantize`` + ``save_packed`` against ``torch.save`` of the
  float guide's state dict; ``load_packed`` + one prediction (``--draws``
  weight draws over ``--images`` inputs) against ``torch.load`` of that state
  dict plus the same prediction from the float guide.

Acceptance floors (2-core CPU): a clustering round < 8 s, JQ(4) quantize + pack < 3 s.
CPU timings on a shared machine are noisy: each step runs ``--repeat`` times and
the median is printed, with the load average.

Usage::

    python benchmarks/big_model.py                      # 25M weights, 2 threads
    python benchmarks/big_model.py --n 2000000 --repeat 1 --skip-allocators
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pyro_bq.guides import quantize
from pyro_bq.guides.pwfn import pwfn_sigma_init
from pyro_bq.inference.prediction import predict_batched
from pyro_bq.io import load_packed, save_packed
from pyro_bq.mixed import quantile_inform, random_bits
from pyro_bq.pwfn.clustering import ClusterConfig, pwfn_cluster
from pyro_bq.quant import make_policy
from quantize import build_guide  # noqa: E402  (sibling script: an MLP guide of a given size)


#: median process CPU seconds of the last :func:`median_time` (all threads together): on a loaded
#: machine the wall clock mostly measures the other processes, the CPU time does not
LAST_CPU = [0.0]


def median_time(fn, repeat: int):
    """Median wall seconds of ``repeat`` calls of ``fn`` and the last call's result (CPU seconds in ``LAST_CPU``)."""
    times, cpu, out = [], [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    LAST_CPU[0] = statistics.median(cpu)
    return statistics.median(times), out


def cpu_note() -> str:
    return f"[cpu {LAST_CPU[0]:.2f} s]"


def make_weights(n: int, seed: int):
    """Laplace means with a per-layer-like scale mix and PWFN-initialised scales (as ``pwfn_cluster.py``),
    the uniform draw kept off the end point where the Laplace inverse CDF is infinite (at 25M draws it is hit)."""
    g = torch.Generator().manual_seed(seed)
    layer_scale = torch.tensor([0.2, 0.08, 0.04, 0.02, 0.01])
    which = torch.randint(0, len(layer_scale), (n,), generator=g)
    u = torch.rand(n, generator=g).clamp(1e-7, 1 - 1e-7) - 0.5
    mu = -layer_scale[which] * torch.sign(u) * torch.log1p(-2 * u.abs())
    sigma = pwfn_sigma_init(mu) * torch.exp(0.5 * torch.randn(n, generator=g)) + 1e-3 * torch.rand(n, generator=g)
    return mu, sigma.clamp(2.0**-30, 0.05)


def sort_baseline(n: int, repeat: int) -> float:
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    return median_time(lambda: torch.sort(x), repeat)[0]


def pwfn_round(n: int, repeat: int, t_sort: float) -> dict:
    mu, sigma = make_weights(n, 0)
    fixed, loc, scale = torch.zeros(n, dtype=torch.bool), torch.zeros(n), torch.ones(n)
    target = int(0.2 * n)
    t, res = median_time(lambda: pwfn_cluster(mu, sigma, fixed, loc, scale, target, ClusterConfig()), repeat)
    print(f"PWFN clustering round (0 -> 20% fixed, {len(res.groups)} groups): {t:7.2f} s {cpu_note()} "
          f"({t / t_sort:5.1f}x the sort)  floor < 8 s: {'ok' if t < 8 else 'MISSED'}")
    return {"pwfn_round": t}


def allocators(guide, repeat: int, rb_steps: int, t_sort: float) -> dict:
    t_qi, _ = median_time(lambda: quantile_inform(guide, 4.0), repeat)
    print(f"Quantile Inform (4.0 mean bits): {t_qi:7.2f} s {cpu_note()} ({t_qi / t_sort:5.1f}x the sort)")
    t_rb, _ = median_time(lambda: random_bits(guide, 4.0, num_steps=rb_steps), repeat)
    print(f"Random Bits ({rb_steps} steps, 4.0 mean bits): {t_rb:7.2f} s {cpu_note()} ({t_rb / t_sort:5.1f}x the sort)")
    return {"quantile_inform": t_qi, "random_bits": t_rb}


def pack_and_load(model, guide, args, folder: Path) -> dict:
    policy = make_policy("jq", args.bits)
    float_path, packed_path = folder / "float.pt", folder / "q.bq"
    t_save, _ = median_time(lambda: torch.save(guide.state_dict(), float_path), args.repeat)
    c_save = LAST_CPU[0]
    t_q, q = median_time(lambda: quantize(guide, policy), args.repeat)
    c_q = LAST_CPU[0]
    t_p, _ = median_time(lambda: save_packed(q, packed_path), args.repeat)
    tq = t_q + t_p
    print(f"baseline torch.save(float state_dict): {t_save:7.2f} s [cpu {c_save:.2f} s] "
          f"{os.path.getsize(float_path) / 1e6:8.1f} MB")
    print(f"JQ({args.bits}) quantize: {t_q:7.2f} s [cpu {c_q:.2f} s]  save_packed: {t_p:7.2f} s {cpu_note()} "
          f"{os.path.getsize(packed_path) / 1e6:8.1f} MB")
    print(f"JQ({args.bits}) quantize + pack: {tq:7.2f} s  ({tq / t_save:5.2f}x torch.save)  "
          f"floor < 3 s: {'ok' if tq < 3 else 'MISSED'}")
    out = {"torch_save": t_save, "quantize": t_q, "save_packed": t_p}
    if args.skip_predict:
        return out
    x = torch.randn(args.images, *guide.input_shape) if hasattr(guide, "input_shape") else None
    if x is None:
        x = torch.randn(args.images, model.net[1].in_features)
    t_load, _ = median_time(lambda: torch.load(float_path, weights_only=True), args.repeat)
    t_fpred, _ = median_time(lambda: predict_batched(model, guide, x, num_samples=args.draws), args.repeat)
    t_qload, qg = median_time(lambda: load_packed(packed_path, model), args.repeat)
    t_qpred, _ = median_time(lambda: predict_batched(model, qg, x, num_samples=args.draws), args.repeat)
    base = t_load + t_fpred
    print(f"baseline torch.load + float predict ({args.draws} draws x {args.images}): "
          f"{t_load:7.2f} + {t_fpred:7.2f} s")
    print(f"load_packed + predict: {t_qload:7.2f} + {t_qpred:7.2f} s  ({(t_qload + t_qpred) / base:5.2f}x baseline)")
    return {**out, "torch_load": t_load, "float_predict": t_fpred, "load_packed": t_qload,
            "quantized_predict": t_qpred}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=25_000_000, help="number of weights (ResNet-50: 25M)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rb-steps", type=int, default=100)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--skip-pwfn", action="store_true")
    p.add_argument("--skip-allocators", action="store_true")
    p.add_argument("--skip-pack", action="store_true")
    p.add_argument("--skip-predict", action="store_true", help="quantize + pack only, no load + predict")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# big-model paths: {args.n / 1e6:.1f}M weights, {args.threads} threads, median of {args.repeat}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    t_sort = sort_baseline(args.n, args.repeat)
    print(f"baseline torch.sort of {args.n:,} floats: {t_sort:7.2f} s")
    out = {"sort": t_sort}
    if not args.skip_pwfn:
        out.update(pwfn_round(args.n, args.repeat, t_sort))
    if not (args.skip_allocators and args.skip_pack):
        model, guide = build_guide(args.n)
        print(f"guide: {guide.num_params / 1e6:.2f}M weights")
        if not args.skip_allocators:
            out.update(allocators(guide, args.repeat, args.rb_steps, t_sort))
        if not args.skip_pack:
            folder = Path(tempfile.mkdtemp(prefix="bq-big-"))
            try:
                out.update(pack_and_load(model, guide, args, folder))
            finally:
                for f in folder.iterdir():
                    f.unlink()
                folder.rmdir()
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    return out


if __name__ == "__main__":
    main()
