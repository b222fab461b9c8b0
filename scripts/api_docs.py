"""The API reference, built from the docstrings with pdoc, and a check of its references.

    .venv/bin/python scripts/api_docs.py [--out docs/api] [--check-only]

The public modules are ``dotmesh``, ``dotmesh.pytest_plugin`` and the modules that define the
names of ``dotmesh.__all__`` (the API and the dataclasses it returns). Every cross-reference
in what pdoc renders of them must name a real object: a role (``:class:`X```, ``:meth:``,
``:func:``, ``:mod:``, ``:attr:``, ``:exc:``...) always, and a backticked dotted name
(```Dot.at```, ````ResetResult.saved````, ```dotmesh.Repo.open()```) when its first part
names something there (so ```dm reset``` or ```HEAD~2``` are text). A name resolves relative
to the class and the module the docstring belongs to (the imports under ``TYPE_CHECKING``
count, as they do for pdoc), or from the top (``dotmesh.ops.pin.Visit``). The broken ones are
listed, one a line, and the exit code is 1; the HTML is written only when there are none.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pdoc.doc

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*```.*?^\s*```", re.MULTILINE | re.DOTALL)
ROLE = re.compile(r":(?:py:)?(class|meth|func|mod|attr|exc|data|obj|const):`([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_MISSING = object()


@dataclass(frozen=True)
class Reference:
    where: str  # module.qualname of the docstring
    text: str  # as written
    name: str  # the name it points at

    def __str__(self) -> str:
        return f"{self.where}: {self.text} names nothing ({self.name!r} does not resolve)"


def public_modules() -> list[str]:
    import dotmesh

    found = {"dotmesh", "dotmesh.pytest_plugin"}
    for name in dotmesh.__all__:
        module = getattr(getattr(dotmesh, name), "__module__", None)
        if isinstance(module, str) and module.startswith("dotmesh."):
            found.add(module)
    return sorted(found)


def references(docstring: str) -> Iterator[tuple[str, str, bool]]:
    """(text, name, always) for each reference in ``docstring``: ``always`` for a role; a
    backticked name only counts if its first part resolves (the caller decides)."""
    text = FENCE.sub("", docstring)
    for m in ROLE.finditer(text):
        target = m.group(2)
        if "<" in target:  # :class:`text <target>`
            target = target.rsplit("<", 1)[1].rstrip(">")
        yield m.group(0), target.lstrip("~").strip().removesuffix("()"), True
    for m in LITERAL.finditer(ROLE.sub("", text)):
        inner = (m.group(1) or m.group(2)).strip().removesuffix("()")
        if DOTTED.fullmatch(inner):
            yield m.group(0), inner, False


@functools.cache
def _imported_names(module: ModuleType) -> dict[str, str]:
    """Names a module imports at its top level, those under ``if TYPE_CHECKING`` too, with
    the dotted path of what they name."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return {}
    names: dict[str, str] = {}
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If):
            stack += node.body + node.orelse
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:  # import a.b as c: c is a.b; import a.b: a is a
                top = a.name.split(".")[0]
                names[a.asname or top] = a.name if a.asname else top
    return names


def _member(obj: Any, part: str) -> Any:
    """``obj.part``: an attribute, a submodule, or a field declared only by its annotation
    (a dataclass field without a default), which stands for itself."""
    if isinstance(obj, ModuleType):
        value = getattr(obj, part, _MISSING)
        if value is _MISSING:
            try:
                value = importlib.import_module(f"{obj.__name__}.{part}")
            except ImportError:
                return _MISSING
        return value
    value = inspect.getattr_static(obj, part, _MISSING)
    if value is _MISSING and inspect.isclass(obj):
        if any(part in getattr(k, "__annotations__", {}) for k in obj.__mro__):
            return (obj, part)  # a field: nothing further to walk
    elif value is not _MISSING:
        value = getattr(obj, part, value)
    return value


def _walk(obj: Any, parts: list[str]) -> bool:
    for part in parts:
        if isinstance(obj, tuple):  # an annotated field: its own attributes are not checked
            return True
        obj = _member(obj, part)
        if obj is _MISSING:
            return False
    return True


def _absolute(name: str) -> Any:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return module if _walk(module, parts[i:]) else _MISSING
    return _MISSING


class Context:
    """Where a docstring's names are looked up: its class, its module, the top."""

    def __init__(self, module: ModuleType, qualname: str) -> None:
        self.module = module
        self.scopes: list[Any] = []
        obj: Any = module
        for part in qualname.split(".") if qualname else []:
            obj = getattr(obj, part, None)
            if inspect.isclass(obj):
                self.scopes.insert(0, obj)
        self.imports = _imported_names(module)

    def first(self, head: str) -> Any:
        for scope in self.scopes:
            value = _member(scope, head)
            if value is not _MISSING:
                return value
        value = _member(self.module, head)
        if value is not _MISSING:
            return value
        if head in self.imports:
            return _absolute(self.imports[head])
        try:
            return importlib.import_module(head)
        except ImportError:
            return _MISSING

    def resolves(self, name: str) -> bool:
        head, *rest = name.split(".")
        value = self.first(head)
        if value is not _MISSING and _walk(value, rest):
            return True
        return _absolute(name) is not _MISSING


def check_docstring(docstring: str, module: ModuleType, qualname: str) -> list[Reference]:
    context = Context(module, qualname)
    where = f"{module.__name__}.{qualname}" if qualname else module.__name__
    broken = []
    for text, name, always in references(docstring):
        if not always and context.first(name.split(".")[0]) is _MISSING:
            continue  # a dotted name in backticks that names nothing here: text
        if not context.resolves(name):
            broken.append(Reference(where, text, name))
    return broken


def _rendered(module: pdoc.doc.Module) -> Iterator[pdoc.doc.Doc[Any]]:
    """What pdoc's page of ``module`` shows: its public members, and theirs for a class
    (as its template does: ``flattened_own_members``, then each class's ``own_members``)."""
    import pdoc.doc

    for member in module.flattened_own_members:
        if not _public(member.name):
            continue
        yield member
        if isinstance(member, pdoc.doc.Class):
            yield from (m for m in member.own_members
                        if not isinstance(m, pdoc.doc.Class) and _public(m.name))


def _public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"


def broken_references(modules: list[str]) -> list[Reference]:
    """Every broken reference in what pdoc renders of ``modules``."""
    import pdoc.doc

    broken: list[Reference] = []
    for name in modules:
        doc = pdoc.doc.Module(importlib.import_module(name))
        broken += check_docstring(doc.docstring, doc.obj, "")
        for member in _rendered(doc):
            module_name, qualname = member.taken_from
            try:
                home = importlib.import_module(module_name)
            except ImportError:
                continue  # inherited from outside (builtins)
            broken += check_docstring(member.docstring, home, qualname)
    return sorted(set(broken), key=str)


def build(modules: list[str], out: Path) -> None:
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="restructuredtext", search=True, show_source=True)
    pdoc.pdoc(*modules, output_directory=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "api")
    parser.add_argument("--check-only", action="store_true", help="check, write no HTML")
    args = parser.parse_args(argv)
    modules = public_modules()
    broken = broken_references(modules)
    for ref in broken:
        print(f"api-docs: broken reference: {ref}", file=sys.stderr)
    if broken:
        return 1
    if not args.check_only:
        build(modules, args.out)
        print(f"api-docs: {len(modules)} modules in {args.out}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
