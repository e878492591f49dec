"""The layers' rules (docs/architecture.md), checked on the source: what each part may import.

- passes/ stand on the core alone: no import statement names ``tvm`` or ``graphopt.targets``;
- the core (graphopt/ outside passes/ and targets/) names no built-in pass or target module and
  no TVM: it reaches passes and targets through the registries and entry points;
- no module is over 600 lines.
Every import statement counts, lazy ones inside functions too.
"""
import ast
import importlib.util
import pathlib
import subprocess
import sys

import pytest

import graphopt
import graphopt.passes
import graphopt.targets

CORE = pathlib.Path(graphopt.__path__[0])
PASSES = pathlib.Path(graphopt.passes.__path__[0])
TARGETS = pathlib.Path(graphopt.targets.__path__[0])
MAX_LINES = 600


def _imports(root: pathlib.Path, package: str):
    """(file:line, imported module) for every import statement under ``root``."""
    for path in sorted(root.rglob("*.py")):
        if any(p in (PASSES, TARGETS) for p in path.parents) and root == CORE:
            continue  # an installed layout may nest them; they are checked on their own
        pkg = ".".join([package, *path.relative_to(root).parent.parts])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [importlib.util.resolve_name("." * node.level + (node.module or ""), pkg)
                         if node.level else node.module]
            else:
                continue
            for n in names:
                yield f"{path.relative_to(root.parent)}:{node.lineno}", n


def _names_any(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_passes_import_neither_tvm_nor_the_targets():
    found = [f"{where} {n}" for where, n in _imports(PASSES, "graphopt.passes")
             if _names_any(n, ("tvm", "tvm_ffi", "graphopt.targets"))]
    assert not found


def test_the_core_imports_no_pass_no_target_and_no_tvm():
    found = [f"{where} {n}" for where, n in _imports(CORE, "graphopt")
             if _names_any(n, ("tvm", "tvm_ffi", "graphopt.passes", "graphopt.targets"))]
    assert not found


def test_importing_the_core_and_the_registries_loads_no_tvm():
    code = ("import sys, graphopt; graphopt.list_passes(); graphopt.list_targets(); "
            "print('tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("root", [CORE, PASSES, TARGETS], ids=["core", "passes", "targets"])
def test_no_module_over_600_lines(root):
    long = {str(p.relative_to(root.parent)): n for p in root.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job: {long}"
