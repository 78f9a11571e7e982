"""The package's import graph: which subpackage may import which (checked on the source, lazy imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "mimkit"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the mimkit modules a file imports anywhere (module level or inside a function)."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "mimkit" or n.startswith("mimkit.")}


def test_imported_modules_resolves_relative_imports(tmp_path):
    assert "mimkit.eval.features" in imported_modules(SRC / "eval" / "__init__.py")
    assert "mimkit.engine.checkpoint" in imported_modules(SRC / "eval" / "features.py")


def test_the_engine_never_imports_eval():
    """eval imports the engine (checkpoints); the arrow back (the online probe) would make a cycle."""
    offenders = {
        f"{path.relative_to(SRC)} -> {name}"
        for path in sorted((SRC / "engine").glob("*.py"))
        for name in imported_modules(path)
        if name == "mimkit.eval" or name.startswith("mimkit.eval.")
    }
    assert not offenders


def test_a_command_module_that_cannot_be_imported_is_an_error(monkeypatch):
    from mimkit import cli

    monkeypatch.setitem(cli.COMMANDS, "nowhere", "no_such_command")
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        cli.build_parser()
