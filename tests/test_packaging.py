"""Packaging: every third-party module the library imports is a declared dependency, and
importing it leaves matplotlib's global backend alone."""

import ast
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).parent.parent


def imported_top_level_modules() -> set[str]:
    names = set()
    for path in (ROOT / "src" / "energyssl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"energyssl", "__future__"}


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for requirement in project["dependencies"]:
        name = requirement.split(";")[0]
        for mark in "<>=!~[ ":
            name = name.split(mark)[0]
        names.add(name.lower().replace("_", "-"))
    return names


def test_every_third_party_import_is_a_dependency():
    distributions = packages_distributions()
    declared = declared_distributions()
    missing = {}
    for module in sorted(imported_top_level_modules()):
        provided_by = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not provided_by & declared:
            missing[module] = sorted(provided_by)
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


@pytest.mark.parametrize("module", ["energyssl", "energyssl.pretrain", "energyssl.methods.energy.commands"])
def test_importing_the_library_keeps_the_matplotlib_backend(module):
    code = f"import matplotlib; matplotlib.use('svg'); import {module}; print(matplotlib.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"
