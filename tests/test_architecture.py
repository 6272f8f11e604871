"""The package layering of docs/architecture.md holds: no upward import, no import inside a function."""

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"pyro_bq": "pyro_bq", "models": "pyro_bq.models", "guides": "pyro_bq.guides"}


def _layers() -> list[list[str]]:
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    return [line.split() for line in block.group(1).strip().splitlines()]


def _modules():
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if folder == "pyro_bq" and parts[0] in ("models", "guides"):
                continue  # symlinked copies of the folders above in some checkouts
            is_pkg = parts[-1] == "__init__"
            name = ".".join([package] + (parts[:-1] if is_pkg else parts))
            yield name, is_pkg, path


def _imports(name: str, is_pkg: bool, tree: ast.Module):
    """(target module, line, at module level?) of every pyro_bq import in ``tree``."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                targets = [".".join(base + ([node.module] if node.module else []))]
            else:
                targets = [node.module or ""]
        else:
            continue
        up, top = parents.get(node), True
        while up is not None:
            if isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                top = False
            up = parents.get(up)
        for target in targets:
            if target == "pyro_bq" or target.startswith("pyro_bq."):
                yield target, node.lineno, top


def _layer_of(module: str, layers) -> int:
    best, index = "", None
    for i, names in enumerate(layers):
        for prefix in names:
            inside = module == prefix or (prefix != "pyro_bq" and module.startswith(prefix + "."))
            if inside and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, f"{module} is in no layer of docs/architecture.md"
    return index


def _violations():
    layers = _layers()
    for name, is_pkg, path in _modules():
        here = _layer_of(name, layers)
        for target, line, top in _imports(name, is_pkg, ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{line} imports {target}"
            if not top:
                yield f"{where} inside a function or class"
            elif _layer_of(target, layers) > here:
                yield f"{where}, a higher layer"


def test_every_module_belongs_to_a_layer():
    layers = _layers()
    for name, _, _ in _modules():
        _layer_of(name, layers)
    with pytest.raises(AssertionError, match="in no layer"):
        _layer_of("pyro_bq.not_a_package", layers)


def test_imports_point_down_the_layers():
    assert list(_violations()) == []


def test_the_checker_catches_an_upward_and_a_hidden_import(tmp_path, monkeypatch):
    fake = tmp_path / "pyro_bq" / "quant"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from pyro_bq.mixed import x\n\ndef f():\n    import pyro_bq.io\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "architecture.md").write_text((REPO / "docs" / "architecture.md").read_text())
    for folder in ("models", "guides"):
        (tmp_path / folder).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = list(_violations())
    assert any("imports pyro_bq.mixed, a higher layer" in v for v in found)
    assert any("imports pyro_bq.io inside a function" in v for v in found)


def test_quant_never_imports_mixed():
    for name, is_pkg, path in _modules():
        if name.startswith("pyro_bq.quant"):
            targets = [t for t, _, _ in _imports(name, is_pkg, ast.parse(path.read_text()))]
            assert not [t for t in targets if t.startswith("pyro_bq.mixed")], path
