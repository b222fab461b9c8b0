"""dotmesh: git for application state.

The Python API (:mod:`dotmesh.api`): ``dotmesh.Repo.open()``, ``repo.dot("app")``,
``dot.commit(...)``, ``with dot.at("bug-42"): ...``; results are the dataclasses ``dm``
renders, failures the exceptions it maps to exit codes. The names are loaded on first use,
so that ``dm`` itself starts without them.
"""

from __future__ import annotations

from dotmesh.version import FORMAT_VERSION, __version__

# Every dm command imports this package first, the daemon's client too: ``typing`` would cost
# it about 18 ms of its 60, so the name mypy knows is set here (as server/resident.py does).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from dotmesh.api import CheckoutResult, Dot, LogEntry, Progress, Ref, Repo
    from dotmesh.errors import (
        AlreadyExists,
        Conflict,
        Corrupt,
        DotmeshError,
        Forbidden,
        InvalidName,
        Locked,
        NotFound,
        Unauthorized,
        UsageError,
    )
    from dotmesh.model.ids import ObjectId
    from dotmesh.model.objects import Commit
    from dotmesh.model.tags import Tag
    from dotmesh.ops.browse import Shown
    from dotmesh.ops.checkout import ResetResult
    from dotmesh.ops.commit import CommitResult
    from dotmesh.ops.datadiff import Report
    from dotmesh.ops.history import Change
    from dotmesh.ops.pin import Visit
    from dotmesh.ops.sync import Transfer

_LAZY = {
    "dotmesh.api": ("CheckoutResult", "Dot", "LogEntry", "Progress", "Ref", "Repo"),
    "dotmesh.errors": ("AlreadyExists", "Conflict", "Corrupt", "DotmeshError", "Forbidden",
                       "InvalidName", "Locked", "NotFound", "Unauthorized", "UsageError"),
    "dotmesh.model.ids": ("ObjectId",),
    "dotmesh.model.objects": ("Commit",),
    "dotmesh.model.tags": ("Tag",),
    "dotmesh.ops.browse": ("Shown",),
    "dotmesh.ops.checkout": ("ResetResult",),
    "dotmesh.ops.commit": ("CommitResult",),
    "dotmesh.ops.datadiff": ("Report",),
    "dotmesh.ops.history": ("Change",),
    "dotmesh.ops.pin": ("Visit",),
    "dotmesh.ops.sync": ("Transfer",),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'dotmesh' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [  # pinned by tests/unit/test_api.py
    "FORMAT_VERSION", "AlreadyExists", "Change", "CheckoutResult", "Commit", "CommitResult",
    "Conflict", "Corrupt",
    "Dot", "DotmeshError", "Forbidden", "InvalidName", "Locked", "LogEntry", "NotFound",
    "ObjectId", "Progress", "Ref", "Repo", "Report", "ResetResult", "Shown", "Tag", "Transfer",
    "Unauthorized", "UsageError", "Visit", "__version__",
]
