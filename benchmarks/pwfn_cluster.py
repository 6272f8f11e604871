"""Time one PWFN clustering round over ResNet-18-sized weights (11.7M).

mu: heavy-tailed (Laplace) weights with a per-layer-like scale mix, sigma:
PWFN's Eq. 12-13 initialisation trained-looking (the init times a log-normal
spread, clamped to [2^-30, 0.05]). The round fixes the next 20% of the
weights (from ``--start`` to ``--start + 0.2``), as one PWFN round does.
Baseline measured in the same run: one full ``torch.sort`` of the same
number of floats (what a sort-per-centre implementation pays per centre).

    python benchmarks/pwfn_cluster.py                 # 11.7M weights, 2 threads
    python benchmarks/pwfn_cluster.py --n 1000000 --threads 1

CPU timings on a shared machine are noisy; repeat and read the ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

from pyro_bq.guides.pwfn import pwfn_sigma_init
from pyro_bq.pwfn.clustering import ClusterConfig, pwfn_cluster


def make_weights(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    layer_scale = torch.tensor([0.2, 0.08, 0.04, 0.02, 0.01])
    which = torch.randint(0, len(layer_scale), (n,), generator=g)
    u = torch.rand(n, generator=g) - 0.5
    mu = -layer_scale[which] * torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace
    sigma = pwfn_sigma_init(mu) * torch.exp(0.5 * torch.randn(n, generator=g)) + 1e-3 * torch.rand(n, generator=g)
    return mu, sigma.clamp(2.0**-30, 0.05)


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    mu, sigma = make_weights(args.n, args.seed)
    n = mu.numel()
    fixed = torch.zeros(n, dtype=torch.bool)
    loc = torch.zeros(n)
    scale = torch.ones(n)
    cfg = ClusterConfig(b=args.b, tau=args.tau, level_rule=args.level_rule)
    if args.start > 0:  # an earlier round: fix the first fraction untimed
        res = pwfn_cluster(mu, sigma, fixed, loc, scale, int(args.start * n), cfg)
        fixed, loc, scale = res.fixed, res.fixed_loc, res.fixed_scale
    target = min(n, int((args.start + args.fraction) * n))

    t = time.perf_counter()
    torch.sort(mu)
    t_sort = time.perf_counter() - t

    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        res = pwfn_cluster(mu, sigma, fixed, loc, scale, target, cfg)
        times.append(time.perf_counter() - t)
    best = min(times)
    print(f"weights: {n:,}  threads: {args.threads}  round: {args.start:g} -> {target / n:g} fixed")
    print(f"groups fixed this round: {len(res.groups)}  level after: {res.level}")
    print(f"baseline torch.sort of {n:,} floats: {t_sort:.2f} s")
    print(f"one clustering round: best {best:.2f} s of {args.repeat} ({best / t_sort:.1f}x the sort)")
    return {"n": n, "seconds": best, "sort_seconds": t_sort, "groups": len(res.groups)}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=11_689_512, help="number of weights (ResNet-18: 11.7M)")
    p.add_argument("--start", type=float, default=0.0, help="fraction already fixed")
    p.add_argument("--fraction", type=float, default=0.2, help="fraction fixed by the timed round")
    p.add_argument("--b", type=int, default=7)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--level-rule", choices=("text", "reference"), default="text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
