"""Dots and subdots: ``dm init``, ``dm switch``, ``dm path``, ``dm list``, ``dm dot show``,
``dm dot delete``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dotmesh.capture.containers import Container, containers_using
from dotmesh.capture.writers import Writer
from dotmesh.errors import UsageError
from dotmesh.model.names import VolumeName, check_name
from dotmesh.model.objects import EMPTY_TREE, Commit, ObjectId, Root, object_id
from dotmesh.ops.home import Home
from dotmesh.ops.live import containers_of, writers_of
from dotmesh.ops.working import recover, snapshot_dot


def init(home: Home, dot: str) -> bool:
    """Create ``dot``; returns True if it became the current dot (there was none)."""
    check_name(dot, "dot name")
    home.create_dot(dot)
    if home.current_dot() is None:
        home.set_current_dot(dot)
        return True
    return False


def switch(home: Home, dot: str) -> None:
    home.require_dot(dot)
    home.set_current_dot(dot)


def path(home: Home, name: str) -> Path:
    """The stable folder of ``DOT[.SUBDOT]``, creating the dot and subdot if needed."""
    vol = VolumeName.parse(name)
    if not home.dot_exists(vol.dot):
        init(home, vol.dot)
    with home.lock(vol.dot):
        recover(home, vol.dot)
        home.add_subdot(vol.dot, vol.subdot)
        p = home.stable(vol.dot, vol.subdot)
        p.mkdir(parents=True, exist_ok=True)
    return p


def delete(home: Home, dot: str, force: bool) -> None:
    home.require_dot(dot)
    if not force:
        raise UsageError(f"deleting dot {dot!r} removes its data and history: add -f to confirm")
    with home.lock(dot):
        home.delete_dot(dot)


@dataclass
class DotStatus:
    name: str
    current: bool
    branch: str
    head: ObjectId | None
    head_message: str | None
    head_timestamp_ns: int | None
    dirty: bool
    size: int
    subdots: dict[str, Path] = field(default_factory=dict)
    branches: list[str] = field(default_factory=list)
    writers: list[Writer] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)
    remotes: dict[str, str] = field(default_factory=dict)  # remote -> the dot's name there


def statuses(home: Home, dots: list[str] | None = None) -> list[DotStatus]:
    """The status of each dot (default: all), asking the Docker engine once for them all."""
    names = home.dots() if dots is None else dots
    found = containers_using(names)
    return [status(home, d, found[d]) for d in names]


def status(home: Home, dot: str, containers: list[Container] | None = None) -> DotStatus:
    """What ``dm list`` and ``dm dot show`` print; hashes only files whose stat changed."""
    home.require_dot(dot)
    with home.lock(dot):
        recover(home, dot)
        branch = home.branch(dot)
        head = home.head(dot, branch)
        snap = snapshot_dot(home, dot, None)
        c = home.commit(head) if head else None
    dirty = is_dirty(snap.roots, c)
    size = sum(r.total_size for r in snap.results.values())
    return DotStatus(
        name=dot, current=home.current_dot() == dot, branch=branch, head=head,
        head_message=c.message if c else None, head_timestamp_ns=c.timestamp_ns if c else None,
        dirty=dirty, size=size,
        subdots={s: home.stable(dot, s) for s in home.subdots(dot)},
        branches=list(home.branches(dot)),
        writers=writers_of(home, dot),
        containers=containers_of(home, dot) if containers is None else containers,
        remotes={r[0]: r[1] for r in home.conn.execute(
            "SELECT remote, remote_dot FROM dot_remotes WHERE dot=? ORDER BY remote", (dot,))},
    )


def is_dirty(roots: dict[str, Root], head: Commit | None) -> bool:
    """Does the working state differ from ``head`` (in contents, modes or owners)?"""
    committed = head.subdots if head else {}
    empty = object_id(EMPTY_TREE.encode())
    for sub, root in roots.items():
        c = committed.get(sub)
        if c is None:
            if root.tree != empty:
                return True
        elif (root.tree, root.mode, root.uid, root.gid) != (c.tree, c.mode, c.uid, c.gid):
            return True
    return False
