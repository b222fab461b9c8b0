"""The API reference's references (scripts/api_docs.py, what scripts/api-docs.sh runs before
pdoc builds the HTML): none broken in the public docstrings, and a broken one is caught."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import dotmesh.api
from dotmesh.api import Dot

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "api_docs.py"


@pytest.fixture(scope="module")
def api_docs() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("api_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_every_reference_in_the_public_docstrings_names_something(api_docs):
    modules = api_docs.public_modules()
    assert {"dotmesh", "dotmesh.api", "dotmesh.errors", "dotmesh.pytest_plugin",
            "dotmesh.ops.commit", "dotmesh.ops.pin", "dotmesh.ops.sync"} <= set(modules)
    assert [str(r) for r in api_docs.broken_references(modules)] == []


def test_broken_references_are_named_and_text_is_left_alone(api_docs):
    doc = """:meth:`commit`, :meth:`comit`, :class:`ResetResult`, :class:`ResetReslt`,
    ``ResetResult.saved`` and ``ResetResult.savd``, ``Dot.at`` and `Dot.att`,
    :mod:`dotmesh.errors`, :class:`dotmesh.errors.NotFund`, ``dotmesh.Repo.open()``,
    ``dotmesh.Repo.opn()``, :class:`~dotmesh.ops.pin.Visit`, :exc:`Conflct`;
    text: ``dm reset --hard``, ``HEAD~2``, ``visit.entered``, ``freeze``, ``~/.dotmesh``.

    ```python
    not.checked.in_a_fence
    ```
    """
    broken = api_docs.check_docstring(doc, dotmesh.api, "Dot")
    assert sorted(r.name for r in broken) == [
        "Conflct", "Dot.att", "ResetReslt", "ResetResult.savd", "comit",
        "dotmesh.Repo.opn", "dotmesh.errors.NotFund"]
    assert str(broken[0]).startswith("dotmesh.api.Dot: ")


def test_a_broken_docstring_fails_the_build(api_docs, monkeypatch, capsys):
    monkeypatch.setattr(Dot.commit, "__doc__", "Returns a :class:`CommitReslt`.")
    assert api_docs.main(["--check-only"]) == 1
    assert ("api-docs: broken reference: dotmesh.api.Dot.commit: :class:`CommitReslt` "
            "names nothing") in capsys.readouterr().err
