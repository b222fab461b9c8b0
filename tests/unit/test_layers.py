"""The package's layers, as docs/architecture.md draws them: imports only point down."""

from __future__ import annotations

import ast
from pathlib import Path

import dotmesh

PACKAGE = Path(dotmesh.__file__).parent

# Lowest first. Packages on one line are peers: neither may import the other.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "heap", "version"),
    ("model",),
    ("meta", "capture", "fs"),
    ("store",),
    ("remote", "workdir"),
    ("ops",),
    ("api",),
    ("server",),
    ("cli", "pytest_plugin"),
]
RANK = {name: (i, name) for i, names in enumerate(LAYERS) for name in names}


def _layer(module: str) -> tuple[int, str]:
    """The layer of ``dotmesh.X.Y``; the package root is the public API, above everything."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS), ""
    return RANK[parts[1]]


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Every dotmesh module ``path`` imports, at module level or inside functions."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append(".".join([*base, *([node.module] if node.module else [])]))
            else:
                found.append(node.module or "")
    return [m for m in found if m == "dotmesh" or m.startswith("dotmesh.")]


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_layer() -> None:
    packages = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _sources()}
    assert packages - {"__init__"} == set(RANK)


def test_imports_only_point_down() -> None:
    upward = []
    for path in _sources():
        here = _module_of(path)
        if here == "dotmesh":
            continue  # the public API may import from any layer
        rank, package = _layer(here)
        for target in _imports(path):
            their_rank, their_package = _layer(target)
            if their_package == package:
                continue
            if their_rank >= rank:
                upward.append(f"{here} imports {target}")
    assert upward == []


# The daemon imports every module by walking the package (its prefix is the one string): an
# import of everything hides no edge.
EVERYTHING = ("dotmesh.cli.daemon_server", "dotmesh.")


def test_no_string_imports() -> None:
    """An import by name (importlib, uvicorn's "module:attr") hides an edge from the test above."""
    hidden = []
    for path in _sources():
        if _module_of(path) == "dotmesh":
            continue  # the public names, loaded on first use: it may import from any layer
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value.startswith("dotmesh.")
                    and (_module_of(path), node.value) != EVERYTHING):
                hidden.append(f"{_module_of(path)}: {node.value!r}")
            if isinstance(node, ast.Name) and node.id in ("import_module", "__import__"):
                hidden.append(f"{_module_of(path)}: {node.id}")
    assert hidden == []
    assert "dotmesh.api" in {n.value for n in ast.walk(ast.parse((PACKAGE / "__init__.py")
                             .read_text())) if isinstance(n, ast.Constant)}  # (the skip)


def test_the_walk_finds_module_level_and_lazy_imports() -> None:
    """The walk above finds imports inside functions too (lazy imports are still edges)."""
    module = PACKAGE / "store" / "repo.py"
    assert "dotmesh.meta.db" in _imports(module)
    lazy = PACKAGE / "cli" / "hub.py"
    assert "dotmesh.server.hub" in _imports(lazy) or "dotmesh.server.hub.app" in _imports(lazy)
