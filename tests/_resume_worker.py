"""Subprocess worker for tests/test_resume.py: a small fit_svi run on real MNIST.

Run as ``python tests/_resume_worker.py --data ROOT --ckpt DIR --out FILE [...]``.

* ``--pause-at K`` writes ``DIR/../paused-K`` once K steps are done and then
  sleeps, so the parent can SIGKILL the process at a known point.
* ``--slow S`` sleeps S seconds after every step, so a parent that kills at a
  random moment often hits a checkpoint write.
* ``--pwfn`` runs the PWFN driver instead (rounds of fit_svi plus clustering);
  ``--pause-at K`` then pauses at step K of round ``--pause-round R``, and
  ``--pause-after-round R`` pauses after round R's clustering, before its
  checkpoint is written. fit_svi inside a round checkpoints every ``--every`` steps.

On completion the final model, guide and optimizer states, the losses and
where the run resumed from are written to ``--out`` with ``save_checkpoint``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
torch.set_num_interop_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--every", type=int, default=7)
    parser.add_argument("--pause-at", type=int, default=-1)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--pwfn", action="store_true")
    parser.add_argument("--loader", action="store_true", help="train from a shuffling DataLoader")
    parser.add_argument("--pause-round", type=int, default=-1)
    parser.add_argument("--pause-after-round", type=int, default=-1)
    args = parser.parse_args()
    if args.pwfn:
        return run_pwfn(args)

    import pyro

    from pyro_bq import IIDNormal
    from pyro_bq.data import load_mnist
    from pyro_bq.guides import AutoMeanFieldNormal
    from pyro_bq.inference import fit_svi
    from pyro_bq.io import save_checkpoint
    from pyro_bq.models import MLP, BayesianClassifier

    pyro.clear_param_store()
    torch.manual_seed(args.seed)  # the network's initial weights
    data = load_mnist(args.data, train=True, limit=args.n)
    model = BayesianClassifier(MLP((784, args.hidden, 10)), IIDNormal(1.0), dataset_size=len(data))
    guide = AutoMeanFieldNormal(model, init_scale=1e-2)
    if args.loader:
        from torch.utils.data import DataLoader, TensorDataset

        data = DataLoader(TensorDataset(data.x, data.y), batch_size=args.batch, shuffle=True)
    marker = Path(args.ckpt).parent / f"paused-{args.pause_at}"

    def callback(step: int, loss: float) -> None:
        if args.slow:
            time.sleep(args.slow)
        if step == args.pause_at:
            marker.write_text(str(os.getpid()))
            while True:
                time.sleep(1.0)

    result = fit_svi(
        model,
        guide,
        data,
        num_steps=args.steps,
        batch_size=args.batch,
        lr=3e-3,
        seed=args.seed,
        checkpoint_dir=args.ckpt,
        checkpoint_every=args.every,
        progress=False,
        callback=callback,
    )
    save_checkpoint(
        args.out,
        {
            "model": model.state_dict(),
            "guide": guide.state_dict(),
            "losses": result.losses,
            "steps": result.steps,
            "resumed_from": result.resumed_from,
        },
    )


def _pause(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    while True:
        time.sleep(1.0)


def run_pwfn(args) -> None:
    import pyro

    import pyro_bq.pwfn.driver as driver_module
    from pyro_bq import IIDNormal
    from pyro_bq.data import load_mnist
    from pyro_bq.guides import init_to_pretrained
    from pyro_bq.io import save_checkpoint
    from pyro_bq.models import MLP, BayesianClassifier
    from pyro_bq.pwfn import PWFN, AutoPWFN, ClusterConfig

    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    data = load_mnist(args.data, train=True, limit=args.n)
    net = MLP((784, args.hidden, 10))
    model = BayesianClassifier(net, IIDNormal(1.0), dataset_size=len(data))
    guide = AutoPWFN(model, init_loc_fn=init_to_pretrained(net))
    folder = Path(args.ckpt)
    real_fit = driver_module.fit_svi
    rounds_started = {"n": 0}

    def fit_with_pause(*a, **kw):
        # the driver's own call, with a finer checkpoint interval and a pause point for the test
        rounds_started["n"] += 1
        this_round = int(Path(kw["checkpoint_dir"]).name.split("-")[1])

        def callback(step, loss):
            if args.slow:
                time.sleep(args.slow)
            if this_round == args.pause_round and step == args.pause_at:
                _pause(folder.parent / f"paused-{args.pause_round}-{args.pause_at}")

        kw.update(checkpoint_every=args.every, callback=callback)
        return real_fit(*a, **kw)

    driver_module.fit_svi = fit_with_pause

    def log(line: str) -> None:
        if line.startswith(f"round {args.pause_after_round}/"):
            _pause(folder.parent / f"paused-after-{args.pause_after_round}")

    driver = PWFN(model, guide, data, schedule=(0.5, 0.8, 1.0), cluster=ClusterConfig(b=6), num_steps=args.steps,
                  batch_size=args.batch, lr=1e-3, seed=args.seed, checkpoint_dir=folder, progress=False, log=log)
    result = driver.run()
    save_checkpoint(
        args.out,
        {"guide": guide.state_dict(), "rounds": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in result.rounds],
         "final": result.final, "resumed_from": result.resumed_from, "median": guide.median()},
    )


if __name__ == "__main__":
    main()
