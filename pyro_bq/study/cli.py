"""Command line of the Dirty-MNIST study: ``pyro-bq study`` and ``python -m pyro_bq.study``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from pyro_bq.data.ambiguous import DDU_NOISE_STD

from .config import ALL_POLICIES, AMNIST_SIZES, BITS_RANGE, DEFAULT_BITS, SR_ROUNDINGS, StudyConfig, check_out_dir
from .runner import StudyBusyError, run_study
from .seeds import run_seeds

__all__ = ["build_parser", "config_from_args", "main"]


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> tuple:
    return tuple(t.strip().lower() for t in text.split(",") if t.strip())


def _optional_int(text: str):
    return None if text.lower() in ("none", "all", "0") else int(text)


def build_parser(prog: str = "pyro-bq study") -> argparse.ArgumentParser:
    d = StudyConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Dirty-MNIST study: train a Bayesian LeNet-5 on MNIST + Ambiguous-MNIST, quantize it "
        "(float, VPQ/SPQ/JQ, log-quantized guide, activations, PWFN, mixed precision) and compare accuracy, "
        "calibration and uncertainty (Fashion-MNIST as OOD). Finished configurations are skipped on a re-run.",
    )
    p.add_argument("--data-dir", default=None, help="data root with MNIST/raw and FashionMNIST/raw "
                   "(default: $PYRO_BQ_DATA or ~/.cache/pyro_bq/data); original amnist_*.pt files are used if "
                   "found in DATA_DIR/AmbiguousMNIST")
    p.add_argument("--out-dir", default=d.out_dir, help=f"output folder (default: {d.out_dir})")
    p.add_argument("--cache-dir", default=None, help="cache of the generated Ambiguous-MNIST (default: OUT_DIR/cache)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--seeds", type=_int_list, default=None,
                   help="comma-separated seeds, e.g. 0,1,2: one complete study per seed in OUT_DIR/seed-K (each "
                   "resumable) and a summary with mean ± std in OUT_DIR (default: one study with --seed)")
    p.add_argument("--policies", type=_name_list, default=d.policies,
                   help=f"comma-separated rows to evaluate, from {','.join(ALL_POLICIES)} (default: all; float is always evaluated)")
    p.add_argument("--bits", type=_int_list, default=DEFAULT_BITS,
                   help=f"comma-separated bit widths for VPQ/SPQ/JQ, each in {BITS_RANGE[0]}..{BITS_RANGE[1]} "
                   f"(default: {','.join(map(str, DEFAULT_BITS))})")
    p.add_argument("--act-bits", type=int, default=d.act_bits, help=f"bits of quantized activations (default: {d.act_bits})")
    p.add_argument("--ends-bits", type=_optional_int, default=d.ends_bits,
                   help="VPQ/SPQ/JQ keep the first and last layer at this many bits (default: 8; 'none': all layers "
                   "at the row's bits)")
    p.add_argument("--act-policies", type=_name_list, default=d.act_policies,
                   help="rows that also get an activation-quantized variant (default: float,jq,logquant; '' for none)")
    p.add_argument("--sr-rounding", choices=SR_ROUNDINGS, default=d.sr_rounding,
                   help="rounding rule of the -sr rows (spq2-sr, jq3-sr, jq2-sr): the variance-matched rule where it "
                   "matches the posterior's variance and round to nearest elsewhere, the variance-matched rule "
                   "everywhere, or plain stochastic rounding (default: %(default)s)")
    p.add_argument("--num-epochs", type=int, default=d.num_epochs, help="SVI epochs over Dirty-MNIST")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs,
                   help="epochs of the deterministic LeNet-5 the guide starts from (0: start from the initialisation)")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="weight draws per evaluation")
    p.add_argument("--eval-limit", type=_optional_int, default=d.eval_limit,
                   help="rows per test set ('all' for the full sets)")
    p.add_argument("--mnist-limit", type=_optional_int, default=d.mnist_limit, help="MNIST training rows ('all': 60,000)")
    p.add_argument("--amnist-train-images", type=int, default=d.amnist_train_images,
                   help="unique generated Ambiguous-MNIST training images (x10 labels)")
    p.add_argument("--amnist-test-images", type=int, default=d.amnist_test_images)
    p.add_argument("--amnist-size", choices=tuple(AMNIST_SIZES), default=None,
                   help="named Ambiguous-MNIST size: ddu = 6,000 train and 6,000 test unique images, as the published "
                   "set (overrides --amnist-train-images and --amnist-test-images)")
    p.add_argument("--amnist-noise", type=float, default=d.amnist_noise,
                   help=f"std of Gaussian noise added to every normalised image (the published Dirty-MNIST reader "
                   f"uses {DDU_NOISE_STD}; default: {d.amnist_noise})")
    p.add_argument("--ood-dir", default=None,
                   help="folder of extra OOD sets (NAME/t10k-images-idx3-ubyte.gz or NAME.npz with a uint8 "
                   "(N, 28, 28) array): each gets its own AUROC columns and curves")
    p.add_argument("--amnist-source", choices=("auto", "original", "generated"), default=d.amnist_source)
    p.add_argument("--amnist-fit-size", type=int, default=d.amnist_fit_size,
                   help="MNIST images the Ambiguous-MNIST generator's VAE and LeNet ensemble train on")
    p.add_argument("--amnist-vae-epochs", type=int, default=d.amnist_vae_epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate of the posterior means")
    p.add_argument("--scale-lr", type=float, default=d.scale_lr,
                   help="Adam learning rate of the posterior scales (default: 1e-2)")
    p.add_argument("--init-scale", type=float, default=d.init_scale)
    p.add_argument("--logquant-bits", type=int, default=d.logquant_bits)
    p.add_argument("--logquant-steps", type=int, default=d.logquant_steps)
    p.add_argument("--extra-steps", type=int, default=d.extra_steps,
                   help="SVI steps per PWFN round / per phase of the SMOL and Random Bits rows")
    p.add_argument("--mixed-bits", type=float, default=d.mixed_bits,
                   help="target mean bits of the QI / RB allocations (2..8)")
    p.add_argument("--arviz-samples", type=int, default=d.arviz_samples)
    p.add_argument("--arviz-limit", type=int, default=d.arviz_limit, help="MNIST test rows in each InferenceData")
    p.add_argument("--checkpoint", default=None, help="load this trained guide (OUT_DIR/train/*/guide.bq) instead of training")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); part of the fingerprints, since the count changes "
                   "the results in the last digits")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"),
                   help="where training and evaluation run; auto: cuda when available (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--keep-going", action="store_true",
                   help="a row that raises is recorded with its error in the results and the other rows still run "
                   "(default: the first error stops the study)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    if args.amnist_size is not None:
        args.amnist_train_images, args.amnist_test_images = AMNIST_SIZES[args.amnist_size]
    return StudyConfig(
        data_dir=args.data_dir, out_dir=args.out_dir, cache_dir=args.cache_dir, seed=args.seed,
        policies=args.policies, bits=args.bits, act_bits=args.act_bits, ends_bits=args.ends_bits, sr_rounding=args.sr_rounding, act_policies=args.act_policies,
        num_epochs=args.num_epochs, pretrain_epochs=args.pretrain_epochs, batch_size=args.batch_size, lr=args.lr, scale_lr=args.scale_lr,
        init_scale=args.init_scale, num_samples=args.num_samples, eval_limit=args.eval_limit,
        mnist_limit=args.mnist_limit, amnist_train_images=args.amnist_train_images,
        amnist_test_images=args.amnist_test_images, amnist_source=args.amnist_source,
        amnist_fit_size=args.amnist_fit_size, amnist_vae_epochs=args.amnist_vae_epochs,
        amnist_noise=args.amnist_noise, ood_dir=args.ood_dir,
        logquant_bits=args.logquant_bits, logquant_steps=args.logquant_steps, extra_steps=args.extra_steps, mixed_bits=args.mixed_bits,
        arviz_samples=args.arviz_samples, arviz_limit=args.arviz_limit, checkpoint=args.checkpoint,
        threads=args.threads, progress=not args.no_progress, keep_going=args.keep_going, device=args.device,
    )


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m pyro_bq.study") -> int:
    """Parse ``argv``, run the study, print where the results are; returns the exit status.

    Bad arguments exit with status 2, a folder another study is using with status 1.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_out_dir("--out-dir", cfg.out_dir)
        if args.seeds is not None and (not args.seeds or min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds)):
            raise ValueError(f"--seeds must list distinct non-negative ints, e.g. 0,1,2; got {args.seeds!r}")
    except (ValueError, TypeError) as err:
        parser.error(str(err).replace("out_dir", "--out-dir"))
    logger = logging.getLogger("pyro_bq.study")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[study %(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        result = run_study(cfg) if args.seeds is None else run_seeds(cfg, args.seeds)
    except StudyBusyError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(open(result["files"]["markdown"]).read())
    print("files:", *(f"  {k}: {v}" for k, v in result["files"].items()), sep="\n")
    return 0
