"""``dm gc``, ``dm reflog expire`` and ``dm branch -d/-D``: giving space back.

gc plans first, then applies (restic's prune is the model):

1. **Mark** (:func:`mark`): every object reachable from what must stay (:func:`roots`):
   branch heads, the reflog's old/new/saved states, unfinished restores, heads seen on
   remotes (all of every dot), the commits kept states are of (``workdir/kept.py``), and what
   stat caches name (a commit trusts them to skip reading a file, so their contents must stay
   stored). Commits are walked with ``model/graph.walk_commits``, their trees with
   ``model/trees.reachable``. A reachable object that cannot be read refuses the gc: what
   lies beneath it is unknown, so nothing would be safe to remove (``dm fsck`` first).
2. **Plan** (:func:`plan_packs`, pure): per pack file, delete it (nothing live, or an orphan a
   killed command left), repack it (live fraction under the threshold), cut its tail (bytes
   past its last live record), or keep it and forget its dead rows.
3. **Apply** (:func:`apply`), in an order a kill -9 at any point leaves safe: rows are dropped
   before the bytes they name; a repack writes and fsyncs the new pack, then in one
   transaction points the rows at it and forgets the old pack, then unlinks the old file. A
   rerun plans again from what is there and finishes the work.

Concurrency (docs/format.md): gc holds the store lock exclusively, from the mark to the end
of the apply; every command that writes objects or moves refs holds it shared.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import cast

from dotmesh.errors import Conflict, Corrupt, DotmeshError, NotFound, UsageError
from dotmesh.meta import config, index, refs, statcache
from dotmesh.meta.db import Tx, drop_fingerprints, fingerprinted
from dotmesh.model.graph import descends, walk_commits
from dotmesh.model.ids import ID_LEN, ObjectId
from dotmesh.model.objects import Commit, FileList, Tree, is_dirty
from dotmesh.model.trees import reachable
from dotmesh.store.packs import PACK_MAGIC, PACK_NAME, RECORD, owned
from dotmesh.store.repo import Repo
from dotmesh.workdir import kept
from dotmesh.workdir.branches import backend_of, recover

Progress = Callable[[int], None]

REFLOG_EXPIRE_DAYS = "gc.reflog-expire-days"
DEFAULTS = {REFLOG_EXPIRE_DAYS: 30}
REPACK_BELOW = 80  # percent: a pack whose live records fill less than this is rewritten
REPACK_GROUP = 256 << 20  # live bytes copied per new pack and per transaction
KILL_ENV = "DM_GC_KILL_AT"  # tests: gc kills itself (SIGKILL) at this point of its apply


def _kill_point(name: str) -> None:
    """For the crash tests: die here, as a kill -9 would, when DM_GC_KILL_AT names it."""
    if os.environ.get(KILL_ENV) == name:
        from dotmesh.capture import proc  # signals live there

        proc.send(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # never reached


# ------------------------------------------------------------------ mark


@dataclass(frozen=True)
class Root:
    where: str  # what names it, for messages
    oid: object  # as stored: mark checks it
    soft: bool = False  # a cache's (kept state): absent from the store, it holds nothing


def roots(home: Repo) -> list[Root]:
    """Every commit that must stay, with what names it."""
    out = [Root(w, x) for w, x in refs.gc_roots(home.conn)]  # checked by mark
    for dot in home.dots():
        out += [Root(f"kept state of {dot}", c, soft=True) for c in kept.kept_ids(home, dot)]
    return out


def cached_contents(home: Repo) -> list[tuple[bytes, bool]]:
    """(content id, chunked) of every entry of every stat cache: a commit trusts an entry to
    skip reading a file, and a changed file's previous chunks are taken as stored."""
    out: list[tuple[bytes, bool]] = []
    caches = []
    for blob in statcache.all_blobs(home.conn):
        try:
            caches.append(statcache.decode_cache(blob))  # type: ignore[arg-type]
        except (ValueError, TypeError, IndexError):
            continue  # a damaged cache is never trusted: it names nothing that must stay
    for dot in home.dots():  # the caches saved with kept and discarded states, too
        caches += kept.saved_caches(home, dot)
    for cache in caches:
        out += [(e[4], bool(e[5] & statcache.CHUNKED)) for e in cache.values()
                if e[5] & statcache.HAS_CONTENT]
    return out


def _refuse(where: str, oid: bytes, why: object) -> Corrupt:
    return Corrupt(f"gc needs every reachable object whole, and {where} reaches "
                   f"{oid.hex()[:16]}, which {why}: run dm fsck (nothing was removed)")


def mark(home: Repo, progress: Progress | None = None) -> set[bytes]:
    """Every object id that must stay (some may not be indexed: a soft root's)."""
    live: set[bytes] = set()
    where = ""

    def read(oid: ObjectId) -> bytes:
        try:
            data = home.packs.get(oid)
        except NotFound:
            raise _refuse(where, oid, "is missing") from None
        except Corrupt as e:
            raise _refuse(where, oid, f"is damaged ({e})") from None
        if progress:
            progress(len(data))
        return data

    def tree(oid: ObjectId) -> Tree:
        data = read(oid)
        try:
            return Tree.decode(data)
        except DotmeshError as e:
            raise _refuse(where, oid, f"is not a tree ({e})") from None

    def file_list(oid: ObjectId) -> FileList:
        data = read(oid)
        try:
            return FileList.decode(data)
        except DotmeshError as e:
            raise _refuse(where, oid, f"is not a file list ({e})") from None

    trees: list[ObjectId] = []

    def commit(oid: ObjectId) -> bytes:
        data = read(oid)
        try:
            c = Commit.decode(data)
        except DotmeshError as e:
            raise _refuse(where, oid, f"is not a commit ({e})") from None
        trees.extend(r.tree for r in c.subdots.values())
        return data

    for root in roots(home):
        if not isinstance(root.oid, bytes) or len(root.oid) != ID_LEN:
            raise Corrupt(f"gc cannot read a ref of {root.where} (damaged in meta.db): run dm "
                          "fsck --repair (nothing was removed)")
        oid = ObjectId(root.oid)
        if oid in live or (root.soft and not home.packs.has(oid)):
            continue
        where = root.where
        trees.clear()
        live.update(walk_commits(commit, [oid], stop=live.__contains__))
        for _ in reachable(tree, file_list, list(trees), seen=live):
            pass  # what it yields it adds to live
    where = "a stat cache"
    for content, chunked in cached_contents(home):
        if content in live or not home.packs.has(ObjectId(content)):
            continue
        live.add(content)
        if chunked:
            live.update(c for c, _ in file_list(ObjectId(content)).chunks)
    return live


# ------------------------------------------------------------------ plan

KEEP, FORGET, CUT, REPACK, DELETE, BUSY = "keep", "forget", "cut", "repack", "delete", "busy"


@dataclass
class PackPlan:
    """What gc does with one pack file (or a pack row with no file)."""

    name: str
    pack: int | None  # its number in the index; None: a file no row names (an orphan)
    size: int  # bytes in the file (0: no file)
    action: str  # keep, forget (its dead rows), cut, repack, delete, busy (a writer holds it)
    live: list[bytes] = field(default_factory=list)
    live_bytes: int = 0  # the live records, headers included
    dead: list[bytes] = field(default_factory=list)
    cut: int = 0  # the size it is cut to (action cut)

    @property
    def after(self) -> int:
        """Its bytes once the plan is applied (a repack's in the new pack)."""
        if self.action == DELETE:
            return 0
        if self.action == REPACK:
            return self.live_bytes
        if self.action == CUT:
            return self.cut
        return self.size


def plan_packs(rows: Iterable[tuple[bytes, int, int, int]], live: Container[bytes],
               pack_rows: dict[int, str], files: dict[str, int],
               is_owned: Callable[[str], bool], repack_below: float) -> list[PackPlan]:
    """What to do with each pack, from the index's rows (id, pack, offset, stored_len), the
    live ids, the pack rows (number -> name), the pack files (name -> size) and whether a live
    writer holds a file; ``repack_below`` is a fraction (0.8)."""
    plans: dict[int, PackPlan] = {n: PackPlan(name, n, files.get(name, 0), KEEP)
                                  for n, name in pack_rows.items()}
    ends: dict[int, int] = {}  # end of the last live record of each pack
    for oid, pack, offset, stored_len in rows:
        p = plans.get(pack)
        if p is None:  # a row naming no pack: unreadable, gc leaves it to fsck
            continue
        if oid in live:
            p.live.append(oid)
            p.live_bytes += RECORD.size + stored_len
            ends[pack] = max(ends.get(pack, 0), offset + stored_len)
        else:
            p.dead.append(oid)
    out = []
    for n, p in plans.items():
        if p.name not in files:  # its file is gone: forget its dead rows (and the row if
            p.action = DELETE if not p.live else FORGET  # nothing is left; fsck reports
        elif is_owned(p.name):  # the live ones)
            p.action = BUSY
        elif not p.live:
            p.action = DELETE
        elif p.live_bytes + len(PACK_MAGIC) < repack_below * p.size:
            p.action = REPACK
        elif ends[n] < p.size:
            p.action, p.cut = CUT, ends[n]
        elif p.dead:
            p.action = FORGET
        out.append(p)
    named = set(pack_rows.values())
    for name, size in sorted(files.items()):
        if name not in named:
            out.append(PackPlan(name, None, size, BUSY if is_owned(name) else DELETE))
    return out


@dataclass
class Plan:
    objects: int  # indexed
    live: int  # indexed and live
    packs: list[PackPlan]

    @property
    def dead(self) -> int:
        return self.objects - self.live

    def count(self, action: str) -> int:
        return sum(1 for p in self.packs if p.action == action)

    @property
    def before(self) -> int:
        return sum(p.size for p in self.packs)

    @property
    def after(self) -> int:
        return sum(p.after for p in self.packs) + (len(PACK_MAGIC) if self.count(REPACK) else 0)

    @property
    def copied(self) -> int:
        return sum(p.live_bytes for p in self.packs if p.action == REPACK)

    @property
    def orphans(self) -> int:
        return sum(1 for p in self.packs if p.action == DELETE and (p.pack is None or (
            not p.live and not p.dead)))


def plan(home: Repo, repack_below: int = REPACK_BELOW,
         progress: Progress | None = None) -> tuple[Plan, set[bytes]]:
    """Mark and plan (changes nothing); returns the plan and the live set."""
    if not 0 <= repack_below <= 100:
        raise UsageError(f"--repack-below is a percentage (0-100), not {repack_below}")
    live = mark(home, progress)
    rows = cast(list[tuple[bytes, int, int, int]],  # as checked here (fsck judges the rest)
                [(r[0], r[2], r[3], r[4]) for r in home.packs.index_rows()
                 if isinstance(r[0], bytes) and all(type(x) is int for x in r[2:5])])
    pack_rows = {n: name for n, name in index.pack_rows(home.conn)
                 if isinstance(n, int) and isinstance(name, str) and PACK_NAME.fullmatch(name)}
    files: dict[str, int] = {}
    with os.scandir(home.packs.dir) as it:
        for e in it:
            if PACK_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                files[e.name] = e.stat(follow_symlinks=False).st_size
    plans = plan_packs(rows, live, pack_rows, files, lambda n: owned(home.packs.dir / n),
                       repack_below / 100)
    return Plan(len(rows), sum(1 for r in rows if r[0] in live), plans), live


# ------------------------------------------------------------------ apply


def _fsync_dir(path: os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply(home: Repo, p: Plan, progress: Progress | None = None) -> None:
    """Carry the plan out (the store lock held exclusively by the caller)."""
    conn, folder = home.packs.conn, home.packs.dir
    expect = getattr(progress, "expect", None)  # a meter that shows a total (cli/render.py)
    if expect is not None:
        expect(sum(q.size - q.cut if q.action == CUT else q.size for q in p.packs
                   if q.action in (DELETE, CUT, REPACK)))
    # 1. Rows of dead objects in packs that stay; caches of what goes.
    forget = [x for q in p.packs if q.action in (FORGET, CUT) for x in q.dead]
    dead_all = {x for q in p.packs if q.action != BUSY for x in q.dead}
    gone_fps = [c for c in fingerprinted(conn) if c in dead_all]
    for i in range(0, max(len(forget), 1), 10_000):
        with Tx(conn) as c:
            index.drop_object_rows(c, forget[i:i + 10_000])
            if i == 0:
                drop_fingerprints(c, gone_fps)
                refs.forget_fetched(c, dead_all)
    _kill_point("rows-dropped")
    # 2. Packs with nothing live, and orphans: rows first, then the file.
    for q in p.packs:
        if q.action != DELETE:
            continue
        if q.pack is not None:
            with Tx(conn) as c:
                index.drop_pack_rows(c, q.pack)
                index.drop_pack(c, q.pack)
            _kill_point("delete-row")
        if q.size:
            (folder / q.name).unlink(missing_ok=True)
        if progress:
            progress(q.size)
    _fsync_dir(folder)
    # 3. Tails past the last live record (their rows went in step 1).
    for q in p.packs:
        if q.action == CUT:
            fd = os.open(folder / q.name, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, q.cut)
                os.fsync(fd)
            finally:
                os.close(fd)
            _kill_point("cut")
            if progress:
                progress(q.size - q.cut)
    # 4. Repacks, a group of packs at a time.
    group: list[PackPlan] = []
    size = 0
    for q in [q for q in p.packs if q.action == REPACK]:
        group.append(q)
        size += q.live_bytes
        if size >= REPACK_GROUP:
            _repack(home, group, progress)
            group, size = [], 0
    if group:
        _repack(home, group, progress)


def _repack(home: Repo, group: list[PackPlan], progress: Progress | None) -> None:
    """Copy the live objects of ``group`` to a new pack, fsync it, point their rows at it and
    forget the old packs in one transaction, then remove the old files."""
    writer = home.packs.writer()
    for q in group:
        for oid, loc, payload in home.packs.stored([ObjectId(x) for x in q.live]):
            home.packs.check_stored(oid, loc, payload)  # never copy damage along
            writer.add(loc.kind, oid, loc.raw_len, payload, loc.zstd)
        if progress:
            progress(q.size)
    _kill_point("repack-written")
    old = [q.pack for q in group if q.pack is not None]

    def forget_old(c: sqlite3.Connection) -> None:
        for n in old:
            index.drop_pack_rows(c, n)  # its live rows name the new pack already
            index.drop_pack(c, n)

    writer.flush(moving=forget_old)
    _kill_point("repack-indexed")
    for q in group:
        (home.packs.dir / q.name).unlink(missing_ok=True)
    _fsync_dir(home.packs.dir)


@dataclass
class GcResult:
    plan: Plan
    applied: bool
    stored_after: int  # bytes in pack files once done (the plan's estimate on a dry run)


def stored_bytes(home: Repo) -> int:
    """Bytes in the store's pack files."""
    total = 0
    with os.scandir(home.packs.dir) as it:
        for e in it:
            if PACK_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                total += e.stat(follow_symlinks=False).st_size
    return total


def gc(home: Repo, dry_run: bool = False, repack_below: int = REPACK_BELOW,
       marking: Progress | None = None, sweeping: Progress | None = None,
       planned: Callable[[Plan], None] | None = None) -> GcResult:
    """Plan, then (unless ``dry_run``) apply, holding the store lock exclusively throughout:
    no command writes objects or moves refs meanwhile. ``planned`` is told the plan before
    anything changes (to print what will be freed)."""
    with home.store_lock("gc", exclusive=True):
        p, _ = plan(home, repack_below, marking)
        if planned is not None:
            planned(p)
        if dry_run:
            return GcResult(p, False, p.after)
        apply(home, p, sweeping)
        return GcResult(p, True, stored_bytes(home))


# ------------------------------------------------------------------ retention


def expire_days(home: Repo) -> int:
    raw = config.setting(home.conn, REFLOG_EXPIRE_DAYS)
    try:
        return max(0, int(raw)) if raw is not None else DEFAULTS[REFLOG_EXPIRE_DAYS]
    except ValueError:
        return DEFAULTS[REFLOG_EXPIRE_DAYS]


def expire_reflog(home: Repo, days: int | None = None, dry_run: bool = False,
                  now_ns: int | None = None) -> int:
    """Forget reflog entries (of every dot) older than ``days`` (default: the setting
    gc.reflog-expire-days): the states only they name, discarded states included, are then
    gc's to remove. Returns how many entries went (or would go)."""
    if days is None:
        days = expire_days(home)
    if days < 0:
        raise UsageError(f"--days must be 0 or more, not {days}")
    before = (time.time_ns() if now_ns is None else now_ns) - days * 86_400 * 10**9
    if dry_run:
        return refs.expiring_reflog(home.conn, before)
    with Tx(home.conn) as c:
        return refs.expire_reflog(c, before)


def delete_branch(home: Repo, dot: str, branch: str, force: bool = False) -> ObjectId | None:
    """``dm branch -d`` (``-D`` with ``force``): forget a branch that is not checked out, and
    its parked folders. Without ``force``, refused when its head is in no other branch's
    history or its parked folders hold changes not committed. The reflog keeps an entry
    naming its last head (gc keeps that state until the entry expires). Returns the head."""
    home.require_dot(dot)
    with home.lock(dot, "branch delete"):
        recover(home, dot)
        heads = home.branches(dot)
        if branch not in heads:
            raise NotFound(f"dot {dot!r} has no branch {branch!r} (dm branch lists them)")
        if branch == home.branch(dot):
            raise Conflict(f"branch {branch!r} is checked out: dm checkout another branch "
                           "first")
        head = heads[branch]
        if not force:
            _check_merged(home, dot, branch, head, heads)
        with Tx(home.conn) as c:
            refs.delete_branch(c, dot, branch)
            home.drop_caches(c, dot, branch)
            home.log_ref(c, dot, branch, "branch delete", head, None, None,
                         f"branch {'-D' if force else '-d'} {branch}")
        home.drop_parked(dot, branch)
        try:
            kept.prune(home, dot, backend_of(home))  # its kept states go
        except (OSError, DotmeshError):
            pass  # only space: the next prune tries again
    return head


def _check_merged(home: Repo, dot: str, branch: str, head: ObjectId | None,
                  heads: dict[str, ObjectId | None]) -> None:
    if head is not None and not any(
            h is not None and (h == head or descends(home.packs.get, h, head))
            for b, h in heads.items() if b != branch):
        raise Conflict(f"branch {branch!r} has commits no other branch has: dm branch -D "
                       f"{branch} deletes it anyway (its head {head.hex()[:12]} stays in the "
                       "reflog until it expires)")
    backend = backend_of(home)
    parked = {s: home.parked(dot, branch, s) for s in home.subdots(dot)}
    parked = {s: q for s, q in parked.items() if q.exists()}
    if not parked:
        return
    found = {s: backend.snapshot(q, home.packs, None, home.load_cache(dot, branch, s)).root
             for s, q in parked.items()}
    if is_dirty(found, home.commit(head) if head else None):
        raise Conflict(f"branch {branch!r} has changes that are not committed: dm checkout "
                       f"{branch} and commit them, or dm branch -D {branch} to drop them")


__all__ = ["GcResult", "Plan", "PackPlan", "apply", "delete_branch", "expire_reflog", "gc",
           "mark", "plan", "plan_packs", "roots"]
