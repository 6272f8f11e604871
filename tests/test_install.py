"""The package installs as pyro_bq, with models/ and guides/ inside it."""

import subprocess
import sys
from pathlib import Path

import pyro_bq
import pyro_bq.guides
import pyro_bq.models

REPO = Path(__file__).resolve().parents[1]


def test_installed_import_paths_map_to_the_repository_folders():
    assert Path(pyro_bq.models.__file__).resolve() == REPO / "models" / "__init__.py"
    assert Path(pyro_bq.guides.__file__).resolve() == REPO / "guides" / "__init__.py"
    assert Path(pyro_bq.__file__).resolve() == REPO / "pyro_bq" / "__init__.py"
    # no generic top-level package is installed (checked away from the repo,
    # since `python -m pytest` puts the working directory on sys.path)
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('models'), u.find_spec('guides'))"],
        capture_output=True, text=True, cwd="/", timeout=60,
    )
    assert probe.returncode == 0 and probe.stdout.split() == ["None", "None"], probe.stdout + probe.stderr


def test_plain_pip_install_puts_models_and_guides_under_pyro_bq(tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-compile", "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (target / "pyro_bq" / "models" / "bayesian.py").is_file()
    assert (target / "pyro_bq" / "guides" / "meanfield.py").is_file()
    assert not (target / "models").exists() and not (target / "guides").exists()
    probe = subprocess.run(
        [sys.executable, "-c", "import pyro_bq.models, pyro_bq.guides; print(pyro_bq.models.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().startswith(str(target))
