"""Every Python snippet in the README runs."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert SNIPPETS


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(README.parent)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "readme", "TMP": str(tmp_path)}
    exec(compile(code, str(README), "exec"), namespace)
