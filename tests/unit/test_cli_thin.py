"""The CLI is a thin user of the Python API: a command parses its arguments, calls
``dotmesh.api`` and renders the result. No command module imports the operations or the
store itself (type-only imports aside), so what a command can do, a script can do too."""

from __future__ import annotations

import ast
from pathlib import Path

import dotmesh.cli

CLI = Path(dotmesh.cli.__file__).parent
# Shell completion reads the store directly: it runs on every TAB and must stay light.
ALLOWED = {"completion.py": {"dotmesh.store.repo", "dotmesh.ops.remotes"}}
FORBIDDEN = ("dotmesh.ops", "dotmesh.store", "dotmesh.workdir", "dotmesh.meta")


def _type_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    lines.add(inner.lineno)
    return lines


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and node.lineno in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_no_command_module_imports_the_operations_or_the_store():
    offenders = {}
    for path in sorted(CLI.glob("*.py")):
        if path.name == "context.py":
            continue  # opens the store through dotmesh.api
        allowed = ALLOWED.get(path.name, set())
        bad = {m for m in _runtime_imports(path)
               if m.startswith(FORBIDDEN) and not any(m.startswith(a) for a in allowed)}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_the_checker_sees_a_runtime_import(tmp_path):
    sample = tmp_path / "cmd.py"
    sample.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from dotmesh.ops import gc\n"
                      "def f():\n    from dotmesh.ops import dots\n")
    assert "dotmesh.ops.dots" in _runtime_imports(sample)
    assert "dotmesh.ops.gc" not in _runtime_imports(sample)
