"""The layering rules: `core/` stands alone and torch-free; `networks/` and
`datasets_tools/` never reach up into `trainer/` or `gui/`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("core", "trainer", "networks", "datasets_tools", "gui", "app", "bench")


def imported_roots(path: Path) -> set[str]:
    """Top-level packages `path` imports (relative imports stay in its package)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(("package", "forbidden"), [
    ("core", set(PROJECT_PACKAGES) - {"core"}),
    ("networks", {"trainer", "gui", "app", "bench"}),
    ("datasets_tools", {"trainer", "gui", "app", "bench"}),
])  # fmt: skip
def test_lower_layers_never_import_upper_ones(package, forbidden):
    offenders = {f"{path.relative_to(REPO)}: {sorted(imported_roots(path) & forbidden)}"
                 for path in (REPO / package).rglob("*.py") if imported_roots(path) & forbidden}
    assert not offenders


def test_core_imports_no_torch_and_nothing_else_of_the_project():
    modules = sorted(f"core.{p.stem}" for p in (REPO / "core").glob("*.py")
                     if p.stem != "__init__")
    assert {"core.errors", "core.atomic", "core.run_lock", "core.hashing"} <= set(modules)
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                                       capture_output=True, text=True).stdout)
    roots = {name.split(".")[0] for name in loaded}
    assert "torch" not in roots
    assert roots & set(PROJECT_PACKAGES) == {"core"}
