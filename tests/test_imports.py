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


# Each layer and what it must never import (lazily included): the arrows only point down.
NEVER = {
    "engine": ("mimkit.eval", "mimkit.interop", "mimkit.commands", "mimkit.viz", "mimkit.cli"),
    "methods": ("mimkit.engine", "mimkit.eval", "mimkit.interop", "mimkit.data", "mimkit.commands"),
    "backbones": ("mimkit.methods", "mimkit.engine", "mimkit.eval", "mimkit.interop", "mimkit.data"),
    "layers": ("mimkit.backbones", "mimkit.methods", "mimkit.engine", "mimkit.eval", "mimkit.data"),
    "data": ("mimkit.engine", "mimkit.eval", "mimkit.interop", "mimkit.commands"),
    "interop": ("mimkit.eval", "mimkit.commands"),
    "viz": ("mimkit.engine", "mimkit.eval", "mimkit.commands"),
}
# Known, documented exceptions (docs/design.md): each one lazy, inside a function.
KNOWN = {"interop/loading.py -> mimkit.eval.finetune"}  # mimkit.load rebuilds a fine-tuned classifier


@pytest.mark.parametrize("package", sorted(NEVER))
def test_no_arrow_points_back_up(package):
    offenders = sorted(
        f"{path.relative_to(SRC)} -> {name}"
        for path in sorted((SRC / package).rglob("*.py"))
        for name in imported_modules(path)
        if any(name == bad or name.startswith(bad + ".") for bad in NEVER[package])
    )
    assert set(offenders) <= KNOWN, offenders


def test_a_command_module_that_cannot_be_imported_is_an_error(monkeypatch):
    from mimkit import cli

    monkeypatch.setitem(cli.COMMANDS, "nowhere", "no_such_command")
    with pytest.raises(ModuleNotFoundError, match="no_such_command"):
        cli.build_parser()
