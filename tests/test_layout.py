"""The rooms of the house: every module has a row of its own in README's layout table, and no
library module imports a command, so that the library can be used (and tested) without the
commands' side effects."""

import ast
import re

from conftest import ROOT

COMMANDS = {"train", "predict", "export", "bench", "sweep"}
MODULES = sorted(path.stem for path in ROOT.glob("*.py"))


def imported_modules(path):
    """The top-level names of every module `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_library_module_imports_a_command():
    found = {
        module: sorted(imported_modules(ROOT / f"{module}.py") & COMMANDS)
        for module in MODULES
        if module not in COMMANDS
    }
    assert {module: commands for module, commands in found.items() if commands} == {}


def test_readme_names_the_job_of_every_module_once():
    rows = re.findall(r"^\| `(\w+)\.py` \| (.+) \|$", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert sorted(module for module, _ in rows) == MODULES
