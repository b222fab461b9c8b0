"""Looking inside any commit without moving a branch: ``dm show``, ``dm ls`` and ``dm cat``.

Everything here reads the store only (verified reads, no lock): a commit's folders are its
trees, a file is its chunks streamed in order, so a 2 GiB file is never held in memory.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dotmesh.errors import AlreadyExists, Corrupt, NotFound, UsageError
from dotmesh.fs.btrfs import remove_tree
from dotmesh.model.ids import HOLE, ObjectId
from dotmesh.model.names import DEFAULT_SUBDOT
from dotmesh.model.objects import DIR, FILE, Commit, Entry, FileList, Root, Tree
from dotmesh.model.trees import Step, walk_trees
from dotmesh.ops.history import changes_between
from dotmesh.store.repo import Repo

Progress = Callable[[int], None]
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
    """Parse ``REF[:SUBDOT[/PATH]]`` (no REF, or an empty one: HEAD) and resolve its ref. In
    a dot whose only subdot is the default one (``dm init app``), ``REF:PATH`` is its path."""
    ref, colon, rest = (spec or "HEAD").partition(":")
    ref = ref or "HEAD"
    oid = home.resolve(dot, ref)
    if not colon:
        return Where(ref, oid, None, "")
    subdot, _, path = rest.partition("/")
    if not subdot:
        raise UsageError(f"{spec!r} names no subdot after the colon (REF:SUBDOT/PATH)")
    subdots = home.commit(oid).subdots
    if subdot not in subdots and list(subdots) == [DEFAULT_SUBDOT]:
        subdot, path = DEFAULT_SUBDOT, rest
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


@dataclass(frozen=True)
class Listing:
    """What ``dm ls REF[:SUBDOT[/PATH]]`` shows: a commit's subdots with their sizes (REF
    alone), or the entries at a path in one, as (path, entry)."""

    where: Where
    subdots: dict[str, SubdotSize] | None
    entries: list[tuple[str, Entry]]


def ls(home: Repo, dot: str, spec: str | None, recursive: bool = False) -> Listing:
    """List what ``spec`` names in ``dot`` without checking anything out."""
    at = locate(home, dot, spec)
    if at.subdot is None:
        subdots = home.commit(at.commit).subdots
        return Listing(at, {name: subdot_size(home, root)
                            for name, root in sorted(subdots.items())}, [])
    return Listing(at, None, list(listing(home, at, recursive)))


def cat(home: Repo, dot: str, spec: str) -> Iterator[bytes | memoryview]:
    """``dm cat REF:SUBDOT/PATH``: the file's bytes, checked as they stream (UsageError for a
    name without a colon, a folder or a symlink)."""
    if ":" not in spec:
        raise UsageError(f"name a file as REF:SUBDOT/PATH, not {spec!r}")
    return content(home, file_entry(home, locate(home, dot, spec)))


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


def export(home: Repo, dot: str, ref: str, dest: Path, subdot: str | None = None,
           progress: Progress | None = None) -> list[str]:
    """Write the state ``ref`` names into ``dest`` (which must not exist, or be an empty
    folder): one folder per subdot, or with ``subdot`` that subdot's files alone. Byte-exact,
    holes stay holes, attributes as a restore applies them (a state from a remote as tar
    treats a stranger's archive). Built beside ``dest`` and renamed into place, so a failure
    leaves no half-written export. Returns the subdots written."""
    from dotmesh.workdir.branches import backend_of, policy_for

    oid = home.resolve(dot, ref)
    roots = home.commit(oid).subdots
    if subdot is not None and subdot not in roots:
        raise NotFound(f"commit {oid.hex()[:12]} has no subdot {subdot!r} (it has: "
                       f"{', '.join(sorted(roots)) or 'none'})")
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise AlreadyExists(f"{dest} exists and is not an empty folder: export into a new one")
    if not dest.parent.is_dir():
        raise NotFound(f"{dest.parent} is not a folder")
    backend, policy = backend_of(home), policy_for(home, dot, oid)
    building = dest.parent / f".{dest.name}.dm-export-{uuid.uuid4().hex[:8]}"
    try:
        if subdot is not None:
            backend.build_aside(building, home.packs, roots[subdot], policy, progress)
        else:
            building.mkdir()
            for name, root in sorted(roots.items()):
                backend.build_aside(building / name, home.packs, root, policy, progress)
        if dest.is_dir():
            dest.rmdir()  # empty, as checked
        os.rename(building, dest)
    except BaseException:
        from dotmesh.workdir.snapshot import drain_pool

        drain_pool()  # (Ctrl-C) the writing threads first, then what they wrote
        remove_tree(building)
        raise
    return [subdot] if subdot is not None else sorted(roots)


def tar_stream(home: Repo, dot: str, ref: str, out: BinaryIO, subdot: str | None = None
               ) -> None:
    """Write the state ``ref`` names to ``out`` as a tar stream (``SUBDOT/PATH`` names, or
    ``PATH`` with ``subdot``), files read chunk by chunk; holes are written as zeros (a
    stream cannot seek back to say where they are)."""
    import tarfile

    oid = home.resolve(dot, ref)
    roots = home.commit(oid).subdots
    if subdot is not None and subdot not in roots:
        raise NotFound(f"commit {oid.hex()[:12]} has no subdot {subdot!r} (it has: "
                       f"{', '.join(sorted(roots)) or 'none'})")
    chosen = {subdot: roots[subdot]} if subdot is not None else dict(sorted(roots.items()))
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, root in chosen.items():
            prefix = "" if subdot is not None else name + "/"
            if prefix:
                top = tarfile.TarInfo(name)
                top.type, top.mode, top.mtime = tarfile.DIRTYPE, root.mode, root.mtime_ns / 1e9
                top.uid, top.gid = root.uid, root.gid
                tar.addfile(top)
            where = Where(ref, oid, name, "")
            for path, e in listing(home, where, recursive=True):
                info = tarfile.TarInfo(prefix + path)
                info.mode, info.uid, info.gid = e.mode, e.uid, e.gid
                info.mtime = e.mtime_ns / 1e9
                if e.kind == DIR:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif e.kind == FILE:
                    info.size = e.size
                    tar.addfile(info, _Reader(content(home, e)))
                else:
                    info.type, info.linkname = tarfile.SYMTYPE, str(e.ref)
                    tar.addfile(info)


class _Reader:
    """A file object over a stream of pieces (what tarfile reads a member's data from)."""

    def __init__(self, pieces: Iterator[bytes | memoryview]) -> None:
        self.pieces, self.left = pieces, memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if not self.left:
                nxt = next(self.pieces, None)
                if nxt is None:
                    break
                self.left = memoryview(nxt)
            take = len(self.left) if n < 0 else min(n - len(out), len(self.left))
            out += self.left[:take]
            self.left = self.left[take:]
        return bytes(out)


__all__ = ["Shown", "SubdotSize", "Where", "content", "entry_at", "export", "file_entry",
           "listing", "locate", "show", "subdot_size", "tar_stream"]
