"""The Dirty-MNIST study (issue 7): train, quantize and evaluate a Bayesian LeNet-5.

Usage::

    from pyro_bq.study import StudyConfig, run_study

    result = run_study(StudyConfig(data_dir="data", out_dir="runs/study", bits=(8, 4, 3)))
    print(result["files"]["markdown"])

or from the shell: ``pyro-bq study --data-dir data --out-dir runs/study``.
"""

from .config import ALL_POLICIES, DEFAULT_BITS, RowSpec, StudyConfig


def run_study(cfg):
    """Run (or resume) the study; see :func:`pyro_bq.study.runner.run_study`."""
    from .runner import run_study as _run

    return _run(cfg)


__all__ = ["StudyConfig", "RowSpec", "run_study", "ALL_POLICIES", "DEFAULT_BITS"]
