"""The package's shape is a contract: imports flow one way through the layers `pyproject.toml` names
(import-linter, counting imports inside functions), no package's modules import each other in a
circle, names cross packages only when public, and no module grows past what one reader holds."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "rsmtdf"
MAX_LINES, CLI_LINES = 450, 300


def test_the_layers_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    proc = subprocess.run([exe or "lint-imports"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_imports_inside_functions_are_in_the_graph_the_contract_checks():
    """cli.py imports the library inside its commands (for a quick `--help`): those imports are what
    the contract must see, or a function could import against the flow unseen."""
    import grimp

    graph = grimp.build_graph("rsmtdf")
    assert "rsmtdf.pipeline.extract" in graph.find_modules_directly_imported_by("rsmtdf.cli")
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert "pipeline.extract" not in top  # imported in a function only


def test_every_package_is_a_layer_of_the_contract():
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    present = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert named == present


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _package(module: str) -> str:
    """The top subpackage (or module) of a dotted rsmtdf name: rsmtdf.cache.store → cache."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_names_cross_packages_only_when_public(path):
    here = "rsmtdf." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
    package_parts = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package_parts[: len(package_parts) - node.level + 1] if node.level else []
        module = ".".join([*base, node.module] if node.module else base) if node.level else node.module or ""
        if not module.startswith("rsmtdf") or _package(module) == _package(here):
            continue
        private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
        assert not private, f"{here} imports {private} from {module}: use public names across packages"


def test_no_module_is_longer_than_one_reader_holds():
    long = {p.relative_to(ROOT).as_posix(): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
    assert len((PACKAGE / "cli.py").read_text().splitlines()) < CLI_LINES
