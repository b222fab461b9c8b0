"""What the hub tells about a dot's history as JSON: a page of its log, one commit with the
files it changed, a dot's newest commit. Objects come from a ``get`` (the dot's getter:
its own objects, verified when pushed); every walk is bounded, so an answer costs what its
limits say whatever a dot holds."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from dotmesh.errors import Corrupt, NotFound
from dotmesh.model.graph import walk_commits
from dotmesh.model.ids import ObjectId
from dotmesh.model.objects import Commit, Tree
from dotmesh.model.trees import changes

Get = Callable[[ObjectId], bytes]
LOG_LIMIT = 50  # commits of a log page, unless asked
LOG_MAX = 500  # commits of a log page at most
LOG_BYTES = 4 << 20  # of commits read for one page (its JSON is about as big)
DIFF_CHANGES = 1000  # files a commit's diff lists at most
DIFF_TREE_BYTES = 256 << 20  # of trees a commit's diff reads at most
HEADS_READ = 32  # branch heads read to find a dot's newest commit


def iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


def commit(get: Get, oid: ObjectId) -> Commit:
    """Commit ``oid`` of the dot; NotFound if the dot has no commit of that id."""
    try:
        return Commit.decode(get(oid))
    except Corrupt:  # an object of the dot, but not a commit
        raise NotFound(f"the dot has no commit {oid.hex()[:16]}") from None


def commit_json(oid: ObjectId, cm: Commit) -> dict[str, Any]:
    """A commit's fields as its object has them (a client can check them against its id),
    and its time in ISO 8601."""
    return {"id": oid.hex(), "parents": [p.hex() for p in cm.parents], "message": cm.message,
            "author": cm.author, "timestamp": iso(cm.timestamp_ns),
            "timestamp_ns": cm.timestamp_ns, "metadata": cm.metadata,
            "subdots": {name: root.to_json() for name, root in sorted(cm.subdots.items())}}


def log_page(get: Get, start: ObjectId | None,
             limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` commits (and LOG_BYTES of them) from ``start`` back along first
    parents, newest first; and the id to ask ``after`` for the next page (None: no more)."""
    out: list[dict[str, Any]] = []
    if start is None:
        return out, None
    size = 0
    last: Commit | None = None
    for oid in walk_commits(get, [start], first_parent=True, limit=limit):
        data = get(oid)
        size += len(data)
        last = commit(get, oid)
        out.append(commit_json(oid, last))
        if size >= LOG_BYTES:
            break
    return out, out[-1]["id"] if last is not None and last.parents else None


def newest(get: Get, heads: dict[str, ObjectId]) -> dict[str, Any] | None:
    """The newest of the commits the first HEADS_READ branches (by name) point at, with its
    branch: a dot's "last commit"."""
    best: tuple[int, str, ObjectId, Commit] | None = None
    for branch in sorted(heads)[:HEADS_READ]:
        try:
            cm = commit(get, heads[branch])
        except NotFound:  # a dot deleted meanwhile
            continue
        if best is None or cm.timestamp_ns > best[0]:
            best = (cm.timestamp_ns, branch, heads[branch], cm)
    if best is None:
        return None
    return {**commit_json(best[2], best[3]), "branch": best[1]}


class _OverBudget(Exception):
    pass


def commit_view(get: Get, oid: ObjectId) -> dict[str, Any]:
    """Commit ``oid``: its fields, its subdots' roots, and the files it changed against its
    first parent (every file, for a first commit), at most DIFF_CHANGES of them, reading at
    most DIFF_TREE_BYTES of trees (``truncated`` says whether some were left out)."""
    cm = commit(get, oid)
    parent = cm.parents[0] if cm.parents else None
    before = commit(get, parent).subdots if parent is not None else {}
    read = 0

    def tree(t: ObjectId) -> Tree:
        nonlocal read
        data = get(t)
        read += len(data)
        if read > DIFF_TREE_BYTES:
            raise _OverBudget
        try:
            return Tree.decode(data)
        except Corrupt:
            raise NotFound(f"the dot has no tree {t.hex()[:16]}") from None

    listed: list[dict[str, Any]] = []
    truncated = False
    try:
        for ch in changes(tree, before, cm.subdots):
            if len(listed) >= DIFF_CHANGES:
                truncated = True
                break
            listed.append({"subdot": ch.subdot, "status": ch.status, "path": ch.path,
                           "old_size": ch.old_size, "new_size": ch.new_size})
    except _OverBudget:
        truncated = True
    return {**commit_json(oid, cm),
            "diff": {"against": parent.hex() if parent is not None else None,
                     "changes": listed, "truncated": truncated}}
