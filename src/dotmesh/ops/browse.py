"""Looking inside any commit without moving a branch: ``dm show``, ``dm ls`` and ``dm cat``.

Everything here reads the store only (verified reads, no lock): a commit's folders are its
trees, a file is its chunks streamed in order, so a 2 GiB file is never held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from dotmesh.errors import Corrupt, NotFound, UsageError
from dotmesh.model.ids import HOLE, ObjectId
from dotmesh.model.objects import DIR, FILE, Commit, Entry, FileList, Root, Tree
from dotmesh.model.trees import Step, walk_trees
from dotmesh.ops.history import changes_between
from dotmesh.store.repo import Repo

CAT_BATCH = 1024  # chunks located at once while a file streams out (about 8 MiB of pages)


@dataclass(frozen=True)
class Where:
    """What ``REF[:SUBDOT[/PATH]]`` names: a commit, and in it a subdot and a path (``""``:
    its top), or neither (the commit's subdots)."""

    ref: str
    commit: ObjectId
    subdot: str | None
    path: str


@dataclass(frozen=True)
class SubdotSize:
    files: int
    bytes: int


@dataclass(frozen=True)
class Shown:
    """A commit as ``dm show`` tells it: its own fields, each subdot's size, and what it
    changed against its first parent (every file added, for a first commit)."""

    id: ObjectId
    commit: Commit
    sizes: dict[str, SubdotSize]
    added: int
    removed: int
    changed: int
    bytes_added: int  # bytes of the files added or changed, as they are now
    bytes_removed: int  # bytes of the files removed or changed, as they were


def locate(home: Repo, dot: str, spec: str | None) -> Where:
    """Parse ``REF[:SUBDOT[/PATH]]`` (no REF, or an empty one: HEAD) and resolve its ref."""
    ref, colon, rest = (spec or "HEAD").partition(":")
    ref = ref or "HEAD"
    oid = home.resolve(dot, ref)
    if not colon:
        return Where(ref, oid, None, "")
    subdot, _, path = rest.partition("/")
    if not subdot:
        raise UsageError(f"{spec!r} names no subdot after the colon (REF:SUBDOT/PATH)")
    subdots = home.commit(oid).subdots
    if subdot not in subdots:
        raise NotFound(f"commit {oid.hex()[:12]} has no subdot {subdot!r} (it has: "
                       f"{', '.join(sorted(subdots)) or 'none'})")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise UsageError(f"{spec!r}: a path in a commit has no . or .. in it")
    return Where(ref, oid, subdot, "/".join(parts))


def _tree(home: Repo, oid: ObjectId) -> Tree:
    return Tree.decode(home.packs.get(oid))


def entry_at(home: Repo, root: Root, path: str) -> Entry | None:
    """The entry at ``path`` under ``root`` (None for the top, which is a folder); NotFound
    when a name on the way is missing or is not a folder (symlinks are not followed)."""
    tree, found = root.tree, None
    walked: list[str] = []
    for name in path.split("/") if path else []:
        if found is not None:
            if found.kind != DIR:
                raise NotFound(f"{'/'.join(walked)} is not a folder in that commit")
            assert isinstance(found.ref, bytes)
            tree = ObjectId(found.ref)
        found = next((e for e in _tree(home, tree).entries if e.name == name), None)
        walked.append(name)
        if found is None:
            raise NotFound(f"no {'/'.join(walked)} in that commit")
    return found


def listing(home: Repo, where: Where, recursive: bool = False
            ) -> Iterator[tuple[str, Entry]]:
    """(path, entry) of what ``where`` names: a folder's entries (with ``recursive``, all
    beneath it, parents before children, in path order), or the one file or symlink."""
    assert where.subdot is not None
    root = home.commit(where.commit).subdots[where.subdot]
    entry = entry_at(home, root, where.path)
    if entry is not None and entry.kind != DIR:
        yield where.path, entry
        return
    top = root.tree if entry is None else ObjectId(entry.ref)  # type: ignore[arg-type]
    prefix = where.path + "/" if where.path else ""
    for step in walk_trees(lambda t: _tree(home, t), top, order="path"):
        if isinstance(step, Step) and step.new is not None:
            if recursive or step.folder.depth == 0:
                yield prefix + step.path, step.new


def subdot_size(home: Repo, root: Root) -> SubdotSize:
    """Files and bytes beneath a subdot's top (each tree read once)."""
    files = size = 0
    for step in walk_trees(lambda t: _tree(home, t), root.tree):
        if isinstance(step, Step) and step.new is not None and step.new.kind == FILE:
            files += 1
            size += step.new.size
    return SubdotSize(files, size)


def show(home: Repo, dot: str, ref: str | None) -> Shown:
    """The commit ``ref`` names (default HEAD), with sizes and its change to its parent."""
    oid = home.resolve(dot, ref or "HEAD")
    cm = home.commit(oid)
    before = home.commit(cm.parents[0]).subdots if cm.parents else {}
    changes = changes_between(home, before, cm.subdots)
    count = {s: sum(1 for c in changes if c.status == s and not c.path.endswith("/"))
             for s in ("added", "removed", "changed")}
    return Shown(oid, cm, {s: subdot_size(home, r) for s, r in sorted(cm.subdots.items())},
                 count["added"], count["removed"], count["changed"],
                 sum(c.new_size for c in changes if c.status != "removed"),
                 sum(c.old_size for c in changes if c.status != "added"))


def file_entry(home: Repo, where: Where) -> Entry:
    """The regular file ``where`` names; NotFound or UsageError for anything else."""
    if where.subdot is None or not where.path:
        raise UsageError(f"name a file: {where.ref}:SUBDOT/PATH")
    assert where.subdot is not None
    entry = entry_at(home, home.commit(where.commit).subdots[where.subdot], where.path)
    assert entry is not None
    if entry.kind == DIR:
        raise UsageError(f"{where.path} is a folder in that commit: dm ls "
                         f"{where.ref}:{where.subdot}/{where.path}")
    if entry.kind != FILE:
        raise UsageError(f"{where.path} is a symlink to {entry.ref!r} in that commit")
    return entry


def content(home: Repo, entry: Entry) -> Iterator[bytes | memoryview]:
    """A file's bytes in order, a chunk at a time, each verified against its id; holes come
    out as zeros. The total is checked against the entry's size."""
    if entry.ref is None or not entry.size:
        return
    assert isinstance(entry.ref, bytes)
    if not entry.chunked:
        data = home.packs.get(ObjectId(entry.ref))
        if len(data) != entry.size:
            raise Corrupt(f"{entry.name}: its content has {len(data)} bytes, not {entry.size}")
        yield data
        return
    chunks = FileList.decode(home.packs.get(ObjectId(entry.ref))).chunks
    if sum(n for _, n in chunks) != entry.size:
        raise Corrupt(f"{entry.name}: its file list does not add up to {entry.size} bytes")
    zeros = memoryview(bytes(max((n for c, n in chunks if c == HOLE), default=0)))
    for start in range(0, len(chunks), CAT_BATCH):
        batch = chunks[start:start + CAT_BATCH]
        where = home.packs.locate_many([c for c, _ in batch if c != HOLE])
        for cid, n in batch:
            if cid == HOLE:
                yield zeros[:n]
                continue
            loc = where.get(cid)
            if loc is None:
                raise Corrupt(f"chunk {cid.hex()[:16]} of {entry.name} is not in the store; "
                              "run dm fsck")
            data = home.packs.read_located(cid, loc)
            if len(data) != n:
                raise Corrupt(f"chunk {cid.hex()[:16]} of {entry.name} has {len(data)} bytes, "
                              f"not {n}")
            yield data


__all__ = ["Shown", "SubdotSize", "Where", "content", "entry_at", "file_entry", "listing",
           "locate", "show", "subdot_size"]
