"""Walks over the object graph (commits -> trees -> file lists -> chunks), with no I/O of their
own: objects come from a ``get`` function, so the same walks serve a local store, a batch just
received, or a hub's storage.

The central idea: a commit is sent together with what differs from its first parent, found by
walking both trees and skipping equal subtrees by id; the other side already holds the parent's
closure (refs only ever name commits whose closure is complete), so that is all it can lack.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

from dotmesh.errors import Corrupt
from dotmesh.model.objects import (
    DIR,
    FILE,
    HOLE,
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
from dotmesh.remote.wire import Record

Get = Callable[[bytes], bytes]  # an object's bytes by id; raises NotFound


def ancestors(get: Get, heads: Iterable[bytes], have: Callable[[bytes], bool]) -> set[bytes]:
    """Every commit reachable from ``heads`` (those ``have`` says are present only)."""
    seen: set[bytes] = set()
    stack = [h for h in heads if have(h)]
    while stack:
        c = stack.pop()
        if c in seen:
            continue
        seen.add(c)
        stack.extend(p for p in Commit.decode(get(c)).parents if have(p))
    return seen


def commits_between(get: Get, head: bytes, stop: Container[bytes]) -> list[bytes]:
    """Commits reachable from ``head`` and not from ``stop`` (closed under parents), parents
    before children."""
    order: list[bytes] = []
    seen: set[bytes] = set()
    stack: list[tuple[bytes, bool]] = [(head, False)]
    while stack:
        c, expanded = stack.pop()
        if expanded:
            order.append(c)
            continue
        if c in seen or c in stop:
            continue
        seen.add(c)
        stack.append((c, True))
        stack.extend((p, False) for p in Commit.decode(get(c)).parents)
    return order


@dataclass
class Delta:
    """Objects a set of commits adds to what their parents hold, by kind, in an order that
    puts every object after those it names (chunks, file lists, trees, commits)."""

    kinds: dict[bytes, int] = field(default_factory=dict)
    # file list -> the file list of the same path in the parent (a base for a delta)
    bases: dict[bytes, bytes] = field(default_factory=dict)

    def add(self, oid: bytes, kind: int) -> None:
        self.kinds.setdefault(oid, kind)

    def ordered(self) -> list[bytes]:
        rank = {KIND_CHUNK: 0, KIND_FILELIST: 1, KIND_TREE: 2, KIND_COMMIT: 3}
        return sorted(self.kinds, key=lambda o: rank[self.kinds[o]])


def delta(get: Get, commits: list[bytes]) -> Delta:
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
        self.done: set[tuple[bytes, bytes | None]] = set()

    def tree(self, new: bytes, old: bytes | None) -> None:
        """Add what ``new`` has and ``old`` lacks (iteratively: trees from outside may be
        nested deep)."""
        stack = [(new, old, 0)]
        while stack:
            new, old, depth = stack.pop()
            if new == old or (new, old) in self.done:
                continue
            if depth > MAX_DEPTH:
                raise Corrupt(f"tree {new.hex()[:16]} is nested over {MAX_DEPTH} folders deep")
            self.done.add((new, old))
            self.out.add(new, KIND_TREE)
            before = {e.name: e for e in Tree.decode(self.get(old)).entries} if old else {}
            for e in Tree.decode(self.get(new)).entries:
                o = before.get(e.name)
                if e.kind == DIR:
                    assert isinstance(e.ref, bytes)
                    stack.append((e.ref, o.ref if o is not None and o.kind == DIR and isinstance(
                        o.ref, bytes) else None, depth + 1))
                elif e.kind == FILE and isinstance(e.ref, bytes):
                    if o is not None and o.kind == FILE and o.ref == e.ref:
                        continue
                    self.file(e, o if o is not None and o.kind == FILE else None)

    def file(self, e: Entry, old: Entry | None) -> None:
        assert isinstance(e.ref, bytes)
        if not e.chunked:
            self.out.add(e.ref, KIND_CHUNK)
            return
        self.out.add(e.ref, KIND_FILELIST)
        known: set[bytes] = set()
        if old is not None and isinstance(old.ref, bytes):
            known = ({c for c, _ in FileList.decode(self.get(old.ref)).chunks} if old.chunked
                     else {old.ref})
            if old.chunked:
                self.out.bases.setdefault(e.ref, old.ref)
        for cid, _ in FileList.decode(self.get(e.ref)).chunks:
            if cid != HOLE and cid not in known:
                self.out.add(cid, KIND_CHUNK)


class SymlinkCheck:
    """Rejects trees whose symlinks could lead out of the subdot they are restored in, alone or
    chained: each link text is followed through the tree being received, as the kernel would.

    The rule: a target is relative, and each ``..`` climbs out of a real folder of the tree,
    never above the subdot's top, and never after the walk went through a name that is itself
    a link (from there the kernel climbs from wherever that link points: ``s1 -> s0/..`` with
    ``s0 -> .`` is the parent of the top). Names the tree lacks (or files) count as one level
    each, so ``missing/..`` stays where it was. A target without ``..`` after a link only goes
    down from places inside, so by induction every chain stays inside.

    How far a folder's links climb above it (its reach) follows from their texts alone, so a
    folder is judged once per set of ancestors within its reach: once in all for one whose
    links never climb out of it, and a tree shared at many places (a few KiB can name a
    folder 2^30 times) costs one walk, not one per place.
    """

    def __init__(self, get: Get) -> None:
        self.get = get
        self.reach: dict[bytes, tuple[int, int]] = {}  # tree -> (reach, height)
        self.judged: set[tuple[bytes, tuple[bytes, ...]]] = set()
        self._entries: dict[bytes, dict[bytes, Entry]] = {}

    def entries(self, tree: bytes) -> dict[bytes, Entry]:
        """A tree's entries by the bytes of their names: a link's text is followed as the
        kernel follows it, byte for byte, whatever spelling a sender chose."""
        got = self._entries.get(tree)
        if got is None:
            if len(self._entries) > 4096:
                self._entries.clear()
            got = self._entries[tree] = {os.fsencode(e.name): e
                                         for e in Tree.decode(self.get(tree)).entries}
        return got

    @staticmethod
    def _key(chain: list[bytes], reach: int) -> tuple[bytes, tuple[bytes, ...]]:
        return chain[-1], tuple(chain[max(0, len(chain) - 1 - reach):-1])

    def check_root(self, tree: bytes, subdot: str) -> str | None:
        """None if safe; else ``SUBDOT:PATH`` of a link that leads out."""
        # Depth-first, children before their folder; a frame is (chain of tree ids from the
        # top, path, [lowest level any link below reaches, deepest level below], entries
        # still to look at).
        frames: list[tuple[list[bytes], str, list[int], list[Entry]]] = [
            ([tree], "", [0, 0], list(self.entries(tree).values()))]
        while frames:
            chain, where, seen, todo = frames[-1]
            if not todo:
                frames.pop()
                level = len(chain) - 1
                reach = level - seen[0]
                self.reach[chain[-1]] = (reach, seen[1] - level)
                self.judged.add(self._key(chain, reach))
                if frames:
                    up = frames[-1][2]
                    up[0], up[1] = min(up[0], seen[0]), max(up[1], seen[1])
                continue
            e = todo.pop()
            if e.kind == SYMLINK:
                assert isinstance(e.ref, str)
                reached = self.resolve(chain, e.ref)
                if reached is None:
                    return f"{subdot}:{where}{e.name}"
                seen[0] = min(seen[0], reached)
            elif e.kind == DIR and isinstance(e.ref, bytes):
                level = len(chain)
                if level >= MAX_DEPTH:
                    return f"{subdot}:{where}{e.name} (folders nested over {MAX_DEPTH} deep)"
                inner = [*chain, e.ref]
                known = self.reach.get(e.ref)
                if (known is not None and known[0] <= level and level + known[1] < MAX_DEPTH
                        and self._key(inner, known[0]) in self.judged):
                    seen[0] = min(seen[0], level - known[0])
                    seen[1] = max(seen[1], level + known[1])
                    continue
                frames.append((inner, f"{where}{e.name}/", [level, level],
                               list(self.entries(e.ref).values())))
        return None

    def resolve(self, chain: list[bytes], target: str) -> int | None:
        """The lowest level (0 is the top) that ``target``, written in the folder at the end
        of ``chain``, passes through; None if it leads out."""
        text = os.fsencode(target)
        if text.startswith(b"/"):
            return None
        path: list[bytes | None] = list(chain)
        low = len(path) - 1
        through_link = False
        for part in text.split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                if through_link or len(path) == 1:
                    return None
                path.pop()
                low = min(low, len(path) - 1)
                continue
            here = path[-1]
            e = self.entries(here).get(part) if here is not None else None
            if e is not None and e.kind == DIR and isinstance(e.ref, bytes):
                path.append(e.ref)
            else:
                through_link = through_link or (e is not None and e.kind == SYMLINK)
                path.append(None)
        return low


def _claim(lengths: dict[bytes, int], chunk: bytes, n: int) -> None:
    """One chunk has one length: objects that say otherwise of it are not dm's."""
    if lengths.setdefault(chunk, n) != n:
        raise Corrupt(f"chunk {chunk.hex()[:16]} is said to be {lengths[chunk]} and {n} bytes "
                      "long")


FetchIter = Callable[[dict[bytes, int]], Iterable[list[Record]]]  # answers, as they come
Lacking = Callable[[list[bytes]], set[bytes]]  # which of these ids the receiver lacks
Keep = Callable[[list[Record]], None]  # puts received trees and file lists aside


@dataclass
class Discovered:
    """What a receiver fetched (trees and file lists, put aside) and the chunks it still
    lacks, with the length each must have (as its file list or tree entry says)."""

    trees: list[bytes] = field(default_factory=list)
    lists: list[bytes] = field(default_factory=list)
    chunks: dict[bytes, int] = field(default_factory=dict)


def discover(roots: Iterable[bytes], lacking: Lacking, fetch: FetchIter, keep: Keep,
             batch: int = 2000) -> Discovered:
    """What a receiver lacks to hold the trees ``roots``: fetches the trees and file lists
    it lacks, level by level, handing each answer to ``keep`` as it comes (so memory holds
    one answer and ids, not a whole history), and lists the chunks it lacks. It does not
    descend into trees it has: a tree it holds comes with everything it names."""
    out = Discovered()
    got: set[bytes] = set()
    wanted: dict[bytes, int] = {}
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
    return out


__all__ = ["Delta", "Discovered", "SymlinkCheck", "ancestors", "commits_between", "delta",
           "discover"]
