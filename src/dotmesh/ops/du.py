"""``dm du``: where the disk went, per dot, per branch and per subdot.

Every stored object is marked with the things that reach it (bits of one integer): each dot
(through its branches, reflog, kept and discarded states and remote heads), each branch (its
head's history) and each subdot (its trees in every commit of its dot). Marks flow down the
object graph only where they add a bit, so history that several commits share is walked once
per new owner, not once per commit. Sizes are bytes in pack files (compressed, with record
headers), what ``dm gc`` would give back if the owner went.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dotmesh.errors import Corrupt, DotmeshError
from dotmesh.model.graph import walk_commits
from dotmesh.model.ids import HOLE, ObjectId
from dotmesh.model.objects import DIR, FILE, Commit, Tree, chunk_ids
from dotmesh.store.packs import RECORD
from dotmesh.store.repo import Repo
from dotmesh.workdir import kept

Progress = Callable[[int], None]


@dataclass
class Usage:
    """One line of ``dm du``."""

    name: str
    logical: int  # bytes of the files of its newest state (a dot's: its current branch's head)
    stored: int = 0  # bytes in packs of every object its history reaches
    unique: int = 0  # of those, what nothing else reaches (at its level, and no other dot)
    shared: int = 0  # of those, what another dot reaches too
    branches: list[Usage] = field(default_factory=list)  # a dot's
    subdots: list[Usage] = field(default_factory=list)  # a dot's (over all its history)


@dataclass
class DuReport:
    dots: list[Usage]
    packs: int  # bytes in the store's pack files
    reclaimable: int | None  # what dm gc would free now (None: not asked)


class _Marks:
    """Object id -> the owners that reach it, as bits."""

    def __init__(self, home: Repo, progress: Progress | None) -> None:
        self.home, self.progress = home, progress
        self.mask: dict[bytes, int] = {}
        self.lists: set[bytes] = set()  # file lists met (their chunks are marked at the end)
        self.trees: dict[bytes, list[tuple[bytes, bool, bool]]] = {}

    def _read(self, oid: ObjectId) -> bytes | None:
        try:
            data = self.home.packs.get(oid)
        except DotmeshError:
            return None  # missing or damaged: dm fsck's business; du counts what it finds
        if self.progress:
            self.progress(1)
        return data

    def add(self, oid: bytes, bits: int) -> bool:
        """Give ``oid`` the ``bits``; True if that added any (so its children need them)."""
        old = self.mask.get(oid, 0)
        if old | bits == old:
            return False
        self.mask[oid] = old | bits
        return True

    def tree(self, root: ObjectId, bits: int) -> None:
        """Give ``bits`` to the tree ``root`` and what lies beneath it. File lists get them
        too, and pass them on to their chunks in :meth:`finish`: each is decoded once."""
        stack = [root]
        if not self.add(root, bits):
            return
        while stack:
            for ref, is_dir, chunked in self._entries(ObjectId(stack.pop())):
                if not self.add(ref, bits):
                    continue
                if is_dir:
                    stack.append(ObjectId(ref))
                elif chunked:
                    self.lists.add(ref)

    def _entries(self, tree: ObjectId) -> list[tuple[bytes, bool, bool]]:
        """(ref, folder?, file list?) of a tree's folders and files, decoded once."""
        got = self.trees.get(tree)
        if got is None:
            data = self._read(tree)
            try:
                entries = Tree.decode(data).entries if data is not None else ()
            except DotmeshError:
                entries = ()
            got = self.trees[tree] = [(e.ref, e.kind == DIR, e.kind == FILE and bool(e.chunked))
                                      for e in entries
                                      if isinstance(e.ref, bytes) and e.kind in (DIR, FILE)]
        return got

    def finish(self) -> None:
        """Give each file list's owners to its chunks (the inner loop of dm du: a store of
        2 GiB and 40 versions of its database files names 15 million chunks)."""
        mask = self.mask
        get = mask.get
        for fl in self.lists:
            data = self._read(ObjectId(fl))
            if data is None:
                continue
            bits = mask[fl]
            try:
                for c in chunk_ids(data):
                    had = get(c, 0)
                    if had | bits != had:
                        mask[c] = had | bits
            except DotmeshError:
                continue
        mask.pop(HOLE, None)  # a run of zeros, not an object


def _logical(home: Repo, tree: ObjectId, memo: dict[bytes, int]) -> int:
    """Bytes of the files beneath ``tree`` (each folder's total computed once)."""
    if tree in memo:
        return memo[tree]
    total = 0
    try:
        entries = Tree.decode(home.packs.get(tree)).entries
    except DotmeshError:
        entries = ()
    for e in entries:
        if e.kind == FILE:
            total += e.size
        elif e.kind == DIR and isinstance(e.ref, bytes):
            total += _logical(home, ObjectId(e.ref), memo)
    memo[tree] = total
    return total


def _commit(home: Repo, oid: ObjectId) -> Commit | None:
    try:
        return home.commit(oid)
    except DotmeshError:
        return None


def du(home: Repo, only: Iterable[str] | None = None, progress: Progress | None = None,
       reclaimable: Callable[[], int] | None = None) -> DuReport:
    """What each dot (``only``: those; the others are still looked at, for what they share)
    holds in the store. ``reclaimable``: how to tell what dm gc would free."""
    dots = home.dots()
    marks = _Marks(home, progress)
    bit = 1
    dot_bit: dict[str, int] = {}
    branch_bit: dict[tuple[str, str], int] = {}
    sub_bit: dict[tuple[str, str], int] = {}
    for dot in dots:
        dot_bit[dot], bit = bit, bit << 1
        for b in home.branches(dot):
            branch_bit[(dot, b)], bit = bit, bit << 1
    for dot in dots:
        reaching: dict[ObjectId, int] = {}  # commit -> the dot's and its branches' bits
        for b, head in home.branches(dot).items():
            for c in walk_commits(home.packs.get, [head] if head else [], missing_ok=True):
                reaching[c] = reaching.get(c, 0) | branch_bit[(dot, b)]
        roots = [*home.all_commits(dot), *kept.kept_ids(home, dot)]
        for c in walk_commits(home.packs.get, roots, missing_ok=True):
            reaching[c] = reaching.get(c, 0) | dot_bit[dot]
        for c, bits in reaching.items():
            commit = _commit(home, c)
            marks.add(c, bits)
            for name, root in (commit.subdots.items() if commit else ()):
                if (dot, name) not in sub_bit:
                    sub_bit[(dot, name)], bit = bit, bit << 1
                marks.tree(root.tree, bits | sub_bit[(dot, name)])
    marks.finish()
    size = _sizes(home)
    all_dots = _or(dot_bit.values())
    totals: dict[int, list[int]] = {}  # bit -> [stored, unique, shared]

    def add(b: int, n: int, unique: bool, shared: bool) -> None:
        t = totals.setdefault(b, [0, 0, 0])
        t[0] += n
        t[1] += n if unique else 0
        t[2] += n if shared else 0

    levels = [list(dot_bit.values()), list(branch_bit.values()), list(sub_bit.values())]
    by_mask: dict[int, int] = {}  # a few hundred distinct owner sets, millions of objects
    for oid, m in marks.mask.items():
        by_mask[m] = by_mask.get(m, 0) + size.get(oid, 0)
    for m, n in by_mask.items():
        shared_dots = (m & all_dots).bit_count() > 1
        for level in levels:
            present = [x for x in level if m & x]
            for x in present:
                add(x, n, len(present) == 1 and not shared_dots, shared_dots)
    memo: dict[bytes, int] = {}
    wanted = set(only) if only is not None else set(dots)
    out = []
    for dot in dots:
        if dot not in wanted:
            continue
        current = home.branch(dot)
        head = home.head(dot, current)
        commit = _commit(home, head) if head else None
        u = _usage(dot, _state_size(home, commit, memo), totals.get(dot_bit[dot]))
        for b, bhead in home.branches(dot).items():
            bc = _commit(home, bhead) if bhead else None
            u.branches.append(_usage(b, _state_size(home, bc, memo),
                                     totals.get(branch_bit[(dot, b)])))
        for (d, name), sb in sorted(sub_bit.items()):
            if d == dot:
                now = commit.subdots.get(name) if commit else None
                u.subdots.append(_usage(name, _logical(home, now.tree, memo) if now else 0,
                                        totals.get(sb)))
        out.append(u)
    from dotmesh.ops.gc import stored_bytes

    return DuReport(out, stored_bytes(home), reclaimable() if reclaimable else None)


def _usage(name: str, logical: int, t: list[int] | None) -> Usage:
    stored, unique, shared = t or (0, 0, 0)
    return Usage(name, logical, stored, unique, shared)


def _state_size(home: Repo, commit: Commit | None, memo: dict[bytes, int]) -> int:
    return sum(_logical(home, r.tree, memo) for r in commit.subdots.values()) if commit else 0


def _sizes(home: Repo) -> dict[bytes, int]:
    """Each indexed object's bytes in its pack file, its record header included."""
    out: dict[bytes, int] = {}
    for r in home.packs.index_rows():
        if isinstance(r[0], bytes) and isinstance(r[4], int):
            out[r[0]] = RECORD.size + r[4]
    return out


def _or(bits: Iterable[int]) -> int:
    out = 0
    for b in bits:
        out |= b
    return out


def usage(home: Repo, only: Iterable[str] | None = None, progress: Progress | None = None,
          with_gc: bool = True) -> DuReport:
    """``dm du``: :func:`du` under the store lock held shared (no gc moves packs meanwhile);
    ``with_gc``: also what dm gc would free (-1 if the store is damaged: dm fsck first)."""
    from dotmesh.ops import gc as gc_ops  # noqa: PLC0415 - gc's planner, only when asked

    names = list(only or ())
    for d in names:
        home.require_dot(d)

    def reclaimable() -> int:
        try:
            p = gc_ops.plan(home)[0]
        except Corrupt:
            return -1
        return max(0, p.before - p.after)

    with home.store_lock("du", exclusive=False):
        return du(home, names or None, progress, reclaimable if with_gc else None)
