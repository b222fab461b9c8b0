"""Walks over the object graph below commits (trees -> file lists -> chunks), with no I/O of
their own: objects come from a ``get`` function, so the same walks serve a local store, a batch
just received, or a hub's storage. Walks over commits are in :mod:`dotmesh.model.graph`.

The central idea: a commit is sent together with what differs from its first parent, found by
walking both trees and skipping equal subtrees by id; the other side already holds the parent's
closure (refs only ever name commits whose closure is complete), so that is all it can lack.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from dotmesh.errors import Corrupt
from dotmesh.model.ids import HOLE, ObjectId
from dotmesh.model.objects import (
    DIR,
    FILE,
    KIND_CHUNK,
    KIND_COMMIT,
    KIND_FILELIST,
    KIND_TREE,
    MAX_DEPTH,
    SYMLINK,
    Commit,
    Entry,
    FileList,
    Tree,
)
from dotmesh.model.trees import Folder, Step, walk_trees
from dotmesh.remote.wire import Record

Get = Callable[[ObjectId], bytes]  # an object's bytes by id; raises NotFound
MAX_PATH = 3072  # bytes of a path inside a subdot: PATH_MAX less room for the store's own
MAX_ENTRIES = 10_000_000  # entries of a subdot's tree, shared subtrees counted at each place


@dataclass
class Delta:
    """Objects a set of commits adds to what their parents hold, ordered by kind (chunks,
    file lists, trees, commits: each after the other kinds it names; within the trees a
    folder comes before its subfolders, which is fine, since a receiver checks a commit's
    closure only when a ref moves)."""

    kinds: dict[ObjectId, int] = field(default_factory=dict)
    # file list -> the file list of the same path in the parent (a base for a delta)
    bases: dict[ObjectId, ObjectId] = field(default_factory=dict)

    def add(self, oid: ObjectId, kind: int) -> None:
        self.kinds.setdefault(oid, kind)

    def ordered(self) -> list[ObjectId]:
        rank = {KIND_CHUNK: 0, KIND_FILELIST: 1, KIND_TREE: 2, KIND_COMMIT: 3}
        return sorted(self.kinds, key=lambda o: rank[self.kinds[o]])


def delta(get: Get, commits: Sequence[ObjectId]) -> Delta:
    """The objects of ``commits`` that are not in their first parents (whole trees for a
    commit without parents)."""
    out = Delta()
    walker = _Differ(get, out)
    for cid in commits:
        out.add(cid, KIND_COMMIT)
        c = Commit.decode(get(cid))
        base = Commit.decode(get(c.parents[0])).subdots if c.parents else {}
        for sub, root in c.subdots.items():
            old = base.get(sub)
            walker.tree(root.tree, old.tree if old else None)
    return out


class _Differ:
    def __init__(self, get: Get, out: Delta) -> None:
        self.get, self.out = get, out
        self.done: set[tuple[ObjectId | None, ObjectId | None]] = set()

    def _tree(self, oid: ObjectId) -> Tree:
        return Tree.decode(self.get(oid))

    def _enter(self, f: Folder) -> bool:
        """Folders ``new`` has, each beside a given ``old`` once, at most MAX_DEPTH deep."""
        if f.new is None or (f.new, f.old) in self.done:
            return False
        if f.depth > MAX_DEPTH:
            raise Corrupt(f"tree {f.new.hex()[:16]} is nested over {MAX_DEPTH} folders deep")
        self.done.add((f.new, f.old))
        return True

    def tree(self, new: ObjectId, old: ObjectId | None) -> None:
        """Add what ``new`` has and ``old`` lacks."""
        for x in walk_trees(self._tree, new, old, enter=self._enter):
            if isinstance(x, Folder):
                assert x.new is not None  # _enter refuses the others
                self.out.add(x.new, KIND_TREE)
                continue
            e, o = x.new, x.old
            if e is not None and e.kind == FILE and isinstance(e.ref, bytes):
                if o is not None and o.kind == FILE and o.ref == e.ref:
                    continue
                self.file(e, o if o is not None and o.kind == FILE else None)

    def file(self, e: Entry, old: Entry | None) -> None:
        assert isinstance(e.ref, bytes)
        if not e.chunked:
            self.out.add(e.ref, KIND_CHUNK)
            return
        self.out.add(e.ref, KIND_FILELIST)
        known: set[ObjectId] = set()
        if old is not None and isinstance(old.ref, bytes):
            known = ({c for c, _ in FileList.decode(self.get(old.ref)).chunks} if old.chunked
                     else {old.ref})
            if old.chunked:
                self.out.bases.setdefault(e.ref, old.ref)
        for cid, _ in FileList.decode(self.get(e.ref)).chunks:
            if cid != HOLE and cid not in known:
                self.out.add(cid, KIND_CHUNK)


def link_climb(target: str) -> int | None:
    """How many folders a symlink's text climbs before it goes down, if it is of the one
    shape a received link may have: relative, its ``..`` all at the start (``../../a/b``,
    ``a/b``; ``.`` and empty parts are no-ops). None for any other: absolute, or with a
    ``..`` after a name (``s0/..``: if ``s0`` is itself a link, the kernel climbs from
    wherever it points, which is how chains of harmless-looking links escape)."""
    text = os.fsencode(target)
    if text.startswith(b"/"):
        return None
    climb, named = 0, False
    for part in text.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if named:
                return None
            climb += 1
        else:
            named = True
    return climb


class TreeCheck:
    """Judges the trees a receiver is about to restore, in time linear in their size, however
    a sender shares subtrees between places (a few KiB of trees can name a folder 2^40 times):

    - symlinks: each is of the shape :func:`link_climb` accepts and climbs no higher than the
      shallowest place its folder appears at. Then no link, alone or chained, leads out: the
      kernel climbs real folders only (each place a link is resolved from is a real folder
      inside, at least as deep as the link climbs), then only goes down;
    - nesting: at most MAX_DEPTH folders deep, MAX_PATH bytes of path;
    - size: at most MAX_ENTRIES entries once every shared subtree is counted at each place
      (what a restore makes, and plans in memory).
    """

    def __init__(self, get: Get) -> None:
        self.get = get
        self.shallowest: dict[ObjectId, int] = {}
        self.measured: dict[ObjectId, tuple[int, int, int]] = {}  # entries, height, path bytes

    def _tree(self, tree: ObjectId) -> Tree:
        return Tree.decode(self.get(tree))

    def _entries(self, tree: ObjectId) -> tuple[Entry, ...]:
        return Tree.decode(self.get(tree)).entries

    def _shallower(self, f: Folder) -> bool:
        """A tree is judged again only where it appears shallower than where it was."""
        assert f.new is not None  # one tree walked alone: always the new side
        if self.shallowest.get(f.new, 1 << 30) <= f.depth:
            return False
        self.shallowest[f.new] = f.depth
        return True

    def check_root(self, tree: ObjectId, subdot: str) -> str | None:
        """None if the tree may be restored as subdot ``subdot``; else what is wrong."""
        entries, height, path = self._measure(tree)
        if height > MAX_DEPTH:
            return f"{subdot}: folders nested over {MAX_DEPTH} deep"
        if path > MAX_PATH:
            return f"{subdot}: a path of {path} bytes (over {MAX_PATH})"
        if entries > MAX_ENTRIES:
            return f"{subdot}: {entries} entries once shared folders are counted at each " \
                   f"place (over {MAX_ENTRIES})"
        # Breadth first, so each tree is first met at the shallowest place it appears; one
        # judged deeper under another root is judged again here, shallower.
        for x in walk_trees(self._tree, tree, order="breadth", enter=self._shallower):
            if isinstance(x, Step) and x.new is not None and x.new.kind == SYMLINK:
                assert isinstance(x.new.ref, str)
                climb = link_climb(x.new.ref)
                if climb is None or climb > x.folder.depth:
                    return f"{subdot}:{x.path}"
        return None

    def _measure(self, tree: ObjectId) -> tuple[int, int, int]:
        """(entries, folders deep, longest path in bytes) beneath ``tree``, each shared
        subtree computed once (children before their folder; no recursion: a sender chooses
        the depth)."""
        stack: list[tuple[ObjectId, bool]] = [(tree, False)]
        on_path: set[ObjectId] = set()
        while stack:
            t, done = stack.pop()
            if t in self.measured:
                continue
            if not done:
                if t in on_path:
                    raise Corrupt(f"tree {t.hex()[:16]} contains itself")
                if len(on_path) > MAX_DEPTH:
                    self.measured[t] = (0, MAX_DEPTH + 1, 0)  # too deep: judged as such
                    continue
                on_path.add(t)
                stack.append((t, True))
                stack.extend((e.ref, False) for e in self._entries(t)
                             if e.kind == DIR and isinstance(e.ref, bytes))
                continue
            on_path.discard(t)
            entries = height = path = 0
            for e in self._entries(t):
                entries += 1
                name = len(os.fsencode(e.name)) + 1
                path = max(path, name)
                if e.kind == DIR and isinstance(e.ref, bytes):
                    n, h, p = self.measured[e.ref]
                    entries, height, path = entries + n, max(height, h), max(path, name + p)
            self.measured[t] = (min(entries, MAX_ENTRIES + 1), height + 1, path)
        return self.measured[tree]


SymlinkCheck = TreeCheck  # the name the callers knew


def _claim(lengths: dict[ObjectId, int], chunk: ObjectId, n: int) -> None:
    """One chunk has one length: objects that say otherwise of it are not dm's."""
    if lengths.setdefault(chunk, n) != n:
        raise Corrupt(f"chunk {chunk.hex()[:16]} is said to be {lengths[chunk]} and {n} bytes "
                      "long")


FetchIter = Callable[[dict[ObjectId, int]], Iterable[list[Record]]]  # answers, as they come
Lacking = Callable[[list[ObjectId]], set[ObjectId]]  # which of these ids the receiver lacks
Keep = Callable[[list[Record]], None]  # puts received trees and file lists aside


@dataclass
class Discovered:
    """What a receiver fetched (trees and file lists, put aside) and the chunks it still
    lacks, with the length each must have (as its file list or tree entry says); and the
    chunks those name that it holds already, with the length they are said to have (to be
    checked against its own before anything names them)."""

    trees: list[ObjectId] = field(default_factory=list)
    lists: list[ObjectId] = field(default_factory=list)
    chunks: dict[ObjectId, int] = field(default_factory=dict)
    held: dict[ObjectId, int] = field(default_factory=dict)


def discover(roots: Iterable[ObjectId], lacking: Lacking, fetch: FetchIter, keep: Keep,
             batch: int = 2000) -> Discovered:
    """What a receiver lacks to hold the trees ``roots``: fetches the trees and file lists
    it lacks, level by level, handing each answer to ``keep`` as it comes (so memory holds
    one answer and ids, not a whole history), and lists the chunks it lacks. It does not
    descend into trees it has: a tree it holds comes with everything it names."""
    out = Discovered()
    got: set[ObjectId] = set()
    wanted: dict[ObjectId, int] = {}
    level = list(dict.fromkeys(roots))
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH + 1:
            raise Corrupt(f"the trees sent are nested over {MAX_DEPTH} folders deep")
        want = [t for t in lacking(level) if t not in got]
        level, files = [], []
        for i in range(0, len(want), batch):
            for answer in fetch({t: KIND_TREE for t in want[i:i + batch]}):
                keep(answer)
                for r in answer:
                    got.add(r.oid)
                    out.trees.append(r.oid)
                    for e in Tree.decode(r.raw()).entries:
                        if e.kind == DIR and isinstance(e.ref, bytes):
                            level.append(e.ref)
                        elif e.kind == FILE and isinstance(e.ref, bytes):
                            if e.chunked:
                                files.append(e.ref)
                            else:
                                _claim(wanted, e.ref, e.size)
        level = list(dict.fromkeys(level))
        lists = [f for f in lacking(list(dict.fromkeys(files))) if f not in got]
        for i in range(0, len(lists), batch):
            for answer in fetch({f: KIND_FILELIST for f in lists[i:i + batch]}):
                keep(answer)
                for r in answer:
                    got.add(r.oid)
                    out.lists.append(r.oid)
                    for c, n in FileList.decode(r.raw()).chunks:
                        if c != HOLE:
                            _claim(wanted, c, n)
    if wanted:
        missing = lacking(list(wanted))
        out.chunks = {c: n for c, n in wanted.items() if c in missing}
        out.held = {c: n for c, n in wanted.items() if c not in missing}
    return out


__all__ = ["Delta", "Discovered", "SymlinkCheck", "TreeCheck",
           "delta", "discover", "link_climb"]
