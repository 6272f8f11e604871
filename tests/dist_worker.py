"""Test helper: the torchrun entry point ``examples/train_distributed.py`` with faults injected.

Run exactly like the entry point (same arguments), plus:

* ``--fault sum``: each rank's gradient enters the all-reduce with weight 1
  (summing instead of averaging);
* ``--fault local-size``: each rank's model scales its likelihood to the local
  shard size ``N / world_size`` instead of the full dataset size ``N``;
* ``--fault nan``: training image 0 is NaN and Pyro's validation is off (the NaN
  guard of fit_svi must stop every rank at the same step);
* ``--die-at-step K --die-rank R``: rank R kills itself with SIGKILL after step K.
"""

import argparse
import importlib.util
import os
import signal
import sys
from pathlib import Path

_ENTRY = Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"


def load_entry():
    spec = importlib.util.spec_from_file_location("train_distributed", _ENTRY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(argv):
    entry = load_entry()
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fault", choices=("none", "sum", "local-size", "nan"), default="none")
    parser.add_argument("--die-at-step", type=int, default=0)
    parser.add_argument("--die-rank", type=int, default=1)
    known, rest = parser.parse_known_args(argv)
    if known.fault == "sum":
        from pyro_bq.inference import distributed

        honest = distributed.shard_batch

        def summing(indices, rank, world_size):
            local, weight = honest(indices, rank, world_size)
            return local, (1.0 if weight > 0 else 0.0)

        distributed.shard_batch = summing
    elif known.fault == "local-size":
        world = int(os.environ.get("WORLD_SIZE", "1"))

        class ShardScaled(entry.BayesianClassifier):
            def __init__(self, net, prior, dataset_size, **kwargs):
                super().__init__(net, prior, max(1, dataset_size // world), **kwargs)

        entry.BayesianClassifier = ShardScaled
    elif known.fault == "nan":
        # Pyro's argument validation would reject the NaN logits before the NaN guard sees them
        entry.pyro.enable_validation(False)
        honest_load = entry.load_mnist

        def poisoned(*args, **kwargs):
            data = honest_load(*args, **kwargs)
            data.x[0] = float("nan")
            return data

        entry.load_mnist = poisoned
    if known.die_at_step:
        honest_fit = entry.fit_svi
        me = int(os.environ.get("RANK", "0"))

        def fit_then_die(*args, **kwargs):
            def callback(step, loss):
                if me == known.die_rank and step == known.die_at_step:
                    sys.stderr.write(f"rank {me}: killing myself after step {step}\n")
                    sys.stderr.flush()
                    os.kill(os.getpid(), signal.SIGKILL)

            return honest_fit(*args, callback=callback, **kwargs)

        entry.fit_svi = fit_then_die
    return entry.main(rest)


if __name__ == "__main__":
    run(sys.argv[1:])
