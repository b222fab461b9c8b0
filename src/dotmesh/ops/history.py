"""Reading history: ``dm log``, ``dm branch``, ``dm reflog`` and ``dm diff``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from dotmesh.errors import Conflict, Corrupt, Locked
from dotmesh.meta import refs
from dotmesh.model.graph import walk_commits
from dotmesh.model.ids import ObjectId
from dotmesh.model.objects import Commit, Root, Tree
from dotmesh.model.trees import Change as Change  # where it lived before: dotmesh.api reads it
from dotmesh.model.trees import changes as tree_changes
from dotmesh.store.repo import Repo, sound_reflog_row
from dotmesh.workdir import kept
from dotmesh.workdir.branches import snapshot_dot

# What a dm holding a dot's lock may be changing in its folders (a commit only reads them).
CHANGES_FOLDERS = {"reset", "checkout", "clone", "pull", "volume rm", "dot delete"}


def log(home: Repo, dot: str, limit: int | None = None,
        start: str = "HEAD") -> Iterator[tuple[ObjectId, Commit]]:
    """Commits from ``start`` back along first parents, newest first."""
    if home.head(dot, home.branch(dot)) is None and start == "HEAD":
        return
    read: dict[ObjectId, bytes] = {}  # the walk yields a commit before reading it: once

    def get(oid: ObjectId) -> bytes:
        return read.pop(oid, b"") or home.packs.get(oid)

    for oid in walk_commits(get, [home.resolve(dot, start)], first_parent=True, limit=limit):
        read[oid] = home.packs.get(oid)
        yield oid, Commit.decode(read[oid])


@dataclass(frozen=True)
class ReflogEntry:
    seq: int
    branch: str
    ts_ns: int
    action: str
    old: bytes | None
    new: bytes | None
    saved: bytes | None
    message: str
    # Discarded states kept as snapshots, not read yet, oldest first: one per reset, but fsck
    # ties every state an interrupted reset left unnamed to the one entry it writes for it.
    kept: tuple[str, ...] = ()

    @property
    def kept_as(self) -> str | None:
        """The newest of :attr:`kept`."""
        return self.kept[-1] if self.kept else None


def reflog(home: Repo, dot: str, limit: int | None = None) -> list[ReflogEntry]:
    rows = refs.reflog_rows(home.conn, dot, limit)
    if not all(sound_reflog_row(*r[1:]) for r in rows):
        raise Corrupt(f"a reflog entry of dot {dot!r} is damaged: run dm fsck --repair")
    unread: dict[int, tuple[str, ...]] = {}
    for d in kept.discarded(home, dot):
        if d.seq is not None:
            unread[d.seq] = unread.get(d.seq, ()) + (d.name,)
    return [replace(ReflogEntry(*r), kept=unread.get(r[0], ())) for r in rows]


def diff(home: Repo, dot: str, a: str | None = None, b: str | None = None) -> list[Change]:
    """Changes from ref ``a`` (default HEAD) to ref ``b`` (default: the working state)."""
    extra: dict[bytes, bytes] = {}
    if b is None:
        busy = home.holder(dot)
        if busy is not None and busy[1] in CHANGES_FOLDERS:
            raise Locked(f"the working state of dot {dot!r} is changing (dm {busy[1]}, pid "
                         f"{busy[0]}): try again when it has finished (dm diff REF REF works "
                         "meanwhile)")
        j = home.pending_restore(dot)
        if j is not None or home.swapping(dot):
            what = j.action if j is not None else "checkout"
            raise Conflict(f"dot {dot!r} has an unfinished {what} (interrupted): the next dm "
                           "command that changes the dot finishes it, e.g. dm commit")
        snap = snapshot_dot(home, dot, None)
        new_roots: dict[str, Root] = snap.roots
        for r in snap.results.values():
            extra.update(r.unstored_trees)
    else:
        new_roots = home.commit(home.resolve(dot, b)).subdots
    if a is None and home.head(dot, home.branch(dot)) is None:
        old_roots: dict[str, Root] = {}
    else:
        old_roots = home.commit(home.resolve(dot, a or "HEAD")).subdots
    return changes_between(home, old_roots, new_roots, extra)


def changes_between(home: Repo, old_roots: dict[str, Root], new_roots: dict[str, Root],
                    extra: dict[bytes, bytes] | None = None) -> list[Change]:
    """What differs between two states, per subdot; ``extra``: trees a hash-only snapshot
    made and did not store. Equal subtrees are skipped by id: the work follows the changes."""
    extra = extra or {}

    def get(tree: ObjectId) -> Tree:
        data = extra.get(tree)
        return Tree.decode(data if data else home.packs.get(tree))

    return list(tree_changes(get, old_roots, new_roots))


def uncommitted_bytes(changes: list[Change]) -> int:
    """The bytes of the files a working state added or changed since its head."""
    return sum(c.new_size for c in changes if c.status != "removed")


def commit_count(home: Repo, head: ObjectId | None) -> int:
    """How many commits the history of ``head`` has (every parent followed)."""
    return sum(1 for _ in walk_commits(home.packs.get, [head])) if head else 0
