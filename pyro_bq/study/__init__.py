"""The Dirty-MNIST study: train, quantize and evaluate a Bayesian LeNet-5.

Usage::

    from pyro_bq.study import StudyConfig, run_study

    result = run_study(StudyConfig(data_dir="data", out_dir="runs/study", bits=(8, 4, 3)))
    print(result["files"]["markdown"])

or from the shell: ``pyro-bq study --data-dir data --out-dir runs/study``. A new
kind of row is added in :data:`pyro_bq.study.runner.ROW_BUILDERS`.
"""

from .config import ALL_POLICIES, DEFAULT_BITS, RowSpec, StudyConfig
from .runner import ROW_BUILDERS, StudyBusyError, run_study
from .seeds import run_seeds

__all__ = ["StudyConfig", "RowSpec", "run_study", "run_seeds", "StudyBusyError", "ROW_BUILDERS", "ALL_POLICIES",
           "DEFAULT_BITS"]
