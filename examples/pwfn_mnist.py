"""PWFN on real MNIST: pretrain LeNet-5 (or load it), fix its weights onto
(additive) powers of two in rounds, print the round log and a final table.

    python examples/pwfn_mnist.py --data-dir ../shared/data                # fast preset (~15-35 min on 1-2 shared cores)
    python examples/pwfn_mnist.py --data-dir ../shared/data --preset paper # SGD, 3 epochs a round, the authors' schedule
    python examples/pwfn_mnist.py --train-limit 2000 --test-limit 1000 \\
        --pretrain-epochs 1 --num-steps 20 --schedule 0.5 1.0              # a quick look

The pretrained net is cached with ``--pretrained PATH`` (pickle-free
``pyro_bq.io`` checkpoint, written after every pretraining epoch): a later run
loads it, or resumes its pretraining.
``--checkpoint-dir`` makes the PWFN rounds resumable.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import pyro
import torch

from pyro_bq import IIDNormal
from pyro_bq._validation import resolve_device
from pyro_bq.data import load_mnist
from pyro_bq.guides import init_to_pretrained
from pyro_bq.models import BayesianClassifier, LeNet5
from pyro_bq.guides import quantize
from pyro_bq.io import save_packed
from pyro_bq.pwfn import (
    PRESETS, PWFN, AutoPWFN, ClusterConfig, codebook_policy, compression_stats, point_network_bits_per_param,
    save_point_network,
)
from pyro_bq.recipes import pretrain


#: the fast preset's nine fractions (pyro_bq.pwfn.DEFAULT_SCHEDULE) with WFN's finer tail
#: 0.99, 0.995, 0.999 inserted before 1.0: the weights fixed last are the ones that fit
#: no centre, and a round of retraining after most of them helps the accuracy.
TAIL_SCHEDULE = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999, 1.0)


@torch.no_grad()
def net_accuracy(net, data, batch_size: int = 1000) -> float:
    correct, device = 0, next(net.parameters()).device
    for xb, yb in data.batches(batch_size):
        correct += int((net(xb.to(device)).argmax(-1).cpu() == yb).sum())
    return correct / len(data)


def file_sizes(guide, out_dir=None) -> dict:
    """Bits per weight of the point-network file and of the Bayesian (mu, sigma) packed file."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        point = folder / "pwfn-point.bq"
        save_point_network(guide, point)
        qguide = quantize(guide, codebook_policy(guide))
        nbytes = save_packed(qguide, folder / "pwfn-bayes.bq")
        k = guide.codebook().numel()
        return {"point_bpp": point_network_bits_per_param(point, guide.num_params),
                "bayes_bpp": nbytes * 8 / guide.num_params, "log2k": max(1, math.ceil(math.log2(k)))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: $PYRO_BQ_DATA or ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.add_argument("--pretrained", default=None, help="pretrained LeNet-5 checkpoint: loaded if present, else written")
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--preset", choices=tuple(PRESETS), default="fast",
                   help="training setup: 'fast' (Adam, 1 epoch a round) or 'paper' (SGD momentum 0.9, lr 1e-3, "
                        "3 epochs a round, the authors' 10-fraction schedule with a short first round)")
    p.add_argument("--num-epochs", type=int, default=None, help="training epochs per PWFN round (default: the preset's)")
    p.add_argument("--num-steps", type=int, default=None, help="training steps per round (overrides --num-epochs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="learning rate of the means (default: the preset's)")
    p.add_argument("--scale-lr", type=float, default=None, help="learning rate of the scales (default: the preset's)")
    p.add_argument("--schedule", type=float, nargs="+", default=None,
                   help="fixing fractions p_t (default: fast preset: nine fractions plus a 0.99/0.995/0.999 "
                        "tail; paper preset: the authors' ten)")
    p.add_argument("--mode", choices=("paper", "elbo"), default="paper")
    p.add_argument("--no-prior", action="store_true", help="the paper's 'no prior' variant (uniform initial sigma)")
    p.add_argument("--S", type=float, default=0.05, help="regulariser target sigma")
    p.add_argument("--alpha", type=float, default=2.0**-11, help="regulariser weight")
    p.add_argument("--level-rule", choices=("text", "reference"), default="text",
                   help="how the clustering level rises (pyro_bq.pwfn.clustering)")
    p.add_argument("--b", type=int, default=None, help="starting precision 2^-b of the centres (fast 3, paper 7)")
    p.add_argument("--tau", type=float, default=None, help="starting threshold in sigmas (fast 2, paper 1)")
    p.add_argument("--max-order", type=int, default=None, help="largest order the reference rule reaches (fast 1, paper 4)")
    p.add_argument("--max-b", type=int, default=None, help="largest precision the text rule reaches (fast 5, paper 40)")
    p.add_argument("--out-dir", default=None, help="write the point-network and Bayesian packed files here")
    p.add_argument("--zero-fix", type=float, default=None)
    p.add_argument("--eval-samples", type=int, default=20, help="ensemble size")
    p.add_argument("--checkpoint-dir", default=None, help="resumable PWFN rounds")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: cuda when available)")
    return p


def main(args) -> dict:
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    train = load_mnist(args.data_dir, train=True, limit=args.train_limit)
    test = load_mnist(args.data_dir, train=False, limit=args.test_limit)

    path = Path(args.pretrained) if args.pretrained else None
    if path is not None:
        print(f"{'loading' if path.exists() else 'writing'} the pretrained LeNet-5 at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(getattr(args, "device", "auto"), name="--device")
    t0 = time.perf_counter()
    net = pretrain(LeNet5, train, epochs=args.pretrain_epochs, lr=args.pretrain_lr, batch_size=args.batch_size,
                   seed=args.seed, checkpoint=path, progress=not args.no_progress, device=device)
    print(f"pretrained LeNet-5 for {args.pretrain_epochs} epoch(s) in {time.perf_counter() - t0:.1f}s")
    base_acc = net_accuracy(net, test)
    base_stats = compression_stats({f"net.{k}": v for k, v in net.named_parameters()})
    print(f"pretrained accuracy {100 * base_acc:.2f}%  entropy {base_stats['entropy']:.1f} bits  "
          f"unique {base_stats['unique']}")

    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=len(train))
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net), prior_init=not args.no_prior)
    cluster_defaults = {"fast": {"b": 3, "tau": 2.0, "max_order": 1, "max_b": 5},
                        "paper": {"b": 7, "tau": 1.0, "max_order": 4, "max_b": 40}}[args.preset]
    cfg = {"level_rule": args.level_rule}
    for key in ("b", "tau", "max_order", "max_b", "zero_fix"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
        elif key in cluster_defaults:
            cfg[key] = cluster_defaults[key]
    cluster = ClusterConfig(**cfg)
    schedule = args.schedule or (TAIL_SCHEDULE if args.preset == "fast" else PRESETS["paper"]["schedule"])
    given = {k: getattr(args, k) for k in ("num_epochs", "lr", "scale_lr") if getattr(args, k) is not None}
    runner = PWFN(
        model, guide, train, test_data=test, preset=args.preset, schedule=tuple(schedule), mode=args.mode, S=args.S,
        alpha=args.alpha, cluster=cluster, num_steps=args.num_steps, batch_size=args.batch_size, seed=args.seed,
        checkpoint_dir=args.checkpoint_dir, eval_samples=args.eval_samples, progress=not args.no_progress,
        device=device, **given,
    )
    t1 = time.perf_counter()
    result = runner.run()
    elapsed = time.perf_counter() - t1
    f = result.final
    sizes = file_sizes(guide, args.out_dir)

    def pct(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"

    rows = [
        ("pretrained accuracy", pct(base_acc)),
        ("PWFN point accuracy", pct(f.get("accuracy"))),
        (f"PWFN ensemble accuracy ({f.get('ensemble_samples')} samples)", pct(f.get("ensemble_accuracy"))),
        ("  mean accuracy of one sample", pct(f.get("ensemble_member_accuracy"))),
        ("weight entropy (bits)", f"{f['entropy']:.3f}  (pretrained {base_stats['entropy']:.1f})"),
        ("weight entropy w/o FL-bias", f"{f['entropy_wo_fl_bias']:.3f}"),
        ("unique values", f"{f['unique']}  (w/o FL-bias {f['unique_wo_fl_bias']})"),
        ("fraction fixed", f"{100 * f['fraction_fixed']:.1f}%"),
        ("point network (codebook indices)", f"{sizes['point_bpp']:.3f} bits/param  (ceil(log2 K) = {sizes['log2k']})"),
        ("Bayesian (mu, sigma) packed file", f"{sizes['bayes_bpp']:.3f} bits/param"),
        ("PWFN time", f"{elapsed:.0f}s"),
    ]
    print("\nfinal table (mode=%s, %s)" % (args.mode, "no prior" if args.no_prior else "prior init"))
    width = max(len(r[0]) for r in rows)
    for name, val in rows:
        print(f"  {name:<{width}}  {val}")
    print("  codebook: " + ", ".join(f"{c:g}" for c in f["codebook"]))
    print("\nper site (the paper's Figure 2)")
    for site, st in f["per_site"].items():
        print(f"  {site:<20} weights {st['count']:<6} unique {st['unique']:<4} entropy {st['entropy']:.3f} bits")
    print("\nmovement per codebook value: |mu - c| / sigma of the weights fixed to it")
    for m in f["movement"]:
        print(f"  {m['centre']:>11g}  fixed {m['count']:<6} max {m['max']:<9.3g} mean {m['mean']:<9.3g} std {m['std']:.3g}")
    return {"pretrained_accuracy": base_acc, "rounds": result.rounds, **f, "guide": guide, "model": model}


if __name__ == "__main__":
    parser = build_parser()
    cli = parser.parse_args()
    try:
        resolve_device(cli.device, name="--device")
    except (TypeError, ValueError) as err:
        parser.error(str(err))  # one line and exit status 2, no traceback
    main(cli)
