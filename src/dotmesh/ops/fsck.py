"""``dm fsck [--repair]``: verify every stored object and every row of ``meta.db``, and say
what is wrong; with ``--repair``, drop what cannot be trusted and keep all that can.

fsck never stops at the first problem: each object, each row and each ref is judged on its
own. Repair only removes rows that are damaged or name what is gone (stat caches, index rows
of damaged objects, orphans), moves a branch whose head is lost back to the newest commit its
reflog names that is still whole, and never deletes pack data. When ``meta.db`` itself cannot
be read, :func:`rebuild` makes a new one: the object index from the packs (which describe
themselves) and every row it can still read of the old one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotmesh.errors import Corrupt, DamagedIndex, DotmeshError, InvalidName, Locked, NotFound
from dotmesh.meta import check, config, index, refs
from dotmesh.meta.db import Tx, connect
from dotmesh.meta.statcache import HAS_CONTENT, decode_cache
from dotmesh.model.graph import walk_commits
from dotmesh.model.ids import HOLE, ID_LEN, ObjectId
from dotmesh.model.names import DEFAULT_BRANCH, check_branch, check_name
from dotmesh.model.objects import FILE, KIND_COMMIT, Commit, FileList, Tree
from dotmesh.model.trees import Folder, walk_trees
from dotmesh.store.packs import PACK_NAME, Location, _location, scan_pack
from dotmesh.store.repo import Repo, sound_reflog_row
from dotmesh.workdir import kept

Progress = Callable[[int], None]
Repair = tuple[Callable[..., Any], tuple[Any, ...]]  # a function of meta/ and its arguments
LOST_FOUND = "lost-found"


@dataclass
class FsckReport:
    objects: int = 0
    commits: int = 0
    trees: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _is_id(x: object) -> bool:
    return isinstance(x, bytes) and len(x) == ID_LEN


def _name_ok(name: object, branch: bool = False) -> bool:
    try:
        (check_branch if branch else check_name)(name)  # type: ignore[arg-type]
    except InvalidName:
        return False
    return True


class _Fsck:
    def __init__(self, home: Repo, repair: bool, progress: Progress | None) -> None:
        self.home, self.repair, self.progress = home, repair, progress
        self.conn = home.conn
        self.r = FsckReport()
        self.index: dict[bytes, Location] = {}
        self.seen: set[bytes] = set()
        self.good_commits: set[bytes] = set()
        self.bad_commits: set[bytes] = set()

    def problem(self, text: str, fix: str | None = None, *repairs: Repair) -> None:
        """Report ``text``; when repairing, make the ``repairs`` (each ``(f, args)`` runs
        ``f(conn, *args)``) in one transaction and say ``fix``."""
        self.r.problems.append(text)
        if self.repair and repairs:
            with Tx(self.conn) as c:
                for f, args in repairs:
                    f(c, *args)
            self.r.repaired.append(fix or f"dropped: {text}")

    # ------------------------------------------------------------ the database and the index
    def database(self) -> None:
        try:
            rows = check.quick_check(self.conn)
        except sqlite3.DatabaseError as e:
            rows = [str(e)]
        if rows != ["ok"]:
            raise DamagedIndex(f"meta.db is damaged ({str(rows[0])[:120]}): run dm fsck "
                               "--repair")

    def objects(self) -> None:
        packs: dict[object, str] = {}
        for pid, name in index.pack_rows(self.conn):
            if not (isinstance(name, str) and PACK_NAME.fullmatch(name)):
                self.problem(f"pack row #{pid} names no pack file ({str(name)[:40]!r})", None,
                             (index.drop_pack, (pid,)))
                continue
            packs[pid] = name
        rows = self.home.packs.index_rows()
        self.r.objects = len(rows)
        located: list[tuple[bytes, Location]] = []
        for row in rows:
            oid = row[0]
            try:
                loc = _location(*row)
                assert isinstance(oid, bytes)  # _location checked it
                if loc.pack not in packs:
                    raise Corrupt(f"the index entry of object {oid.hex()[:16]} names a pack "
                                  "that is not there")
            except (Corrupt, TypeError, AttributeError) as e:
                self._drop_object(oid, str(e).removesuffix("; run dm fsck --repair"))
                continue
            located.append((oid, loc))

        def verify(item: tuple[bytes, Location]) -> str | None:
            oid, loc = item
            try:
                self.home.packs.verify_located(ObjectId(oid), loc)  # checked by _location
            except DotmeshError as e:
                return str(e).removesuffix("; run dm fsck")
            finally:
                if self.progress:
                    self.progress(1)
            return None

        with ThreadPoolExecutor(2) as pool:
            for (oid, loc), bad in zip(located, pool.map(verify, located), strict=True):
                if bad:
                    self._drop_object(oid, bad)
                else:
                    self.index[oid] = loc

    def reindex(self) -> None:
        """Index what the packs hold and the index lacks (rows lost or dropped as damaged):
        packs describe themselves, and every record found is verified by its hash."""
        names = {name: pid for pid, name in index.pack_rows(self.conn)}
        found = 0
        folder = self.home.packs.dir
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if not PACK_NAME.fullmatch(path.name):
                continue
            records = [r for r in scan_pack(path).records if r[0] not in self.index]
            if not records:
                continue
            with Tx(self.conn) as c:
                pid = names.get(path.name)
                if pid is None:
                    pid = index.add_pack(c, path.name)
                index.replace_object_rows(c, [(oid, kind, pid, off, stored, raw, int(z))
                                              for oid, kind, off, stored, raw, z in records])
                for oid, kind, off, stored, raw, z in records:
                    self.index[oid] = Location(kind, pid, off, stored, raw, z)
            found += len(records)
        if found:
            self.r.repaired.append(f"indexed {found} objects the packs hold and the index "
                                   "lacked")

    def _drop_object(self, oid: object, why: str) -> None:
        self.problem(why, f"dropped the index entry of object {bytes(oid).hex()[:16]} "
                     "(its data is damaged: a copy pushed or pulled again restores it)"
                     if isinstance(oid, bytes) else None,
                     (index.drop_object_row, (oid,)))

    # ------------------------------------------------------------ walks
    def need(self, oid: bytes, what: str) -> bytes | None:
        if oid not in self.index:
            self.r.problems.append(f"{what} {oid.hex()[:16]} is missing")
            return None
        try:
            return self.home.packs.get(ObjectId(oid))  # in the index, so 32 bytes
        except DotmeshError as e:
            self.r.problems.append(f"{what} {oid.hex()[:16]}: {e}")
            return None

    def tree(self, oid: bytes, where: str) -> bool:
        """Walk a tree; False if anything beneath it is missing or damaged."""
        whole = True
        at = where  # the folder being walked, as reports name it

        def first(f: Folder) -> bool:
            assert f.new is not None  # one tree walked alone: always the new side
            if f.new in self.seen:
                return False
            self.seen.add(f.new)
            return True

        def get(t: ObjectId) -> Tree | None:  # judges as it reads: None is walked as empty
            nonlocal whole
            data = self.need(t, f"tree of {at}")
            if data is None:
                whole = False
                return None
            self.r.trees += 1
            try:
                return Tree.decode(data)
            except DotmeshError as err:
                self.r.problems.append(f"tree {t.hex()[:16]} of {at}: {err}")
                whole = False
                return None

        for x in walk_trees(get, ObjectId(oid), enter=first):
            if isinstance(x, Folder):
                at = f"{where}/{x.path[:-1]}" if x.path else where
                continue
            e = x.new
            if e is not None and e.kind == FILE and isinstance(e.ref, bytes):
                whole = self.file(e.ref, e.chunked, e.size, f"{where}/{x.path}") and whole
        return whole

    def file(self, ref: bytes, chunked: bool, size: int, where: str) -> bool:
        if not chunked:
            loc = self.index.get(ref)
            if loc is None:
                self.r.problems.append(f"content of {where} is missing")
                return False
            if loc.raw_len != size:
                self.r.problems.append(f"content of {where} has {loc.raw_len} bytes, not "
                                       f"{size}")
                return False
            return True
        if ref in self.seen:
            return True
        self.seen.add(ref)
        data = self.need(ref, f"file list of {where}")
        if data is None:
            return False
        try:
            fl = FileList.decode(data)
        except DotmeshError as e:
            self.r.problems.append(f"file list of {where}: {e}")
            return False
        lost = sum(1 for c, n in fl.chunks if c != HOLE and (
            c not in self.index or self.index[c].raw_len != n))
        if lost:
            self.r.problems.append(f"{lost} chunks of {where} are missing or damaged")
        if fl.size != size:
            self.r.problems.append(f"file list of {where} has {fl.size} bytes, not {size}")
        return not lost and fl.size == size

    def commit(self, oid: bytes, where: str) -> bool:
        """Walk a commit and its history; False if it cannot be read or lacks anything."""
        order: list[tuple[bytes, bool]] = []

        def get(cid: ObjectId) -> bytes:  # judges as it reads: a bad commit has no parents
            data = self.need(cid, f"commit reachable from {where}")
            if data is None:
                self.bad_commits.add(cid)
                raise NotFound(cid.hex())
            try:
                c = Commit.decode(data)
            except DotmeshError as e:
                self.r.problems.append(f"commit {cid.hex()[:16]}: {e}")
                self.bad_commits.add(cid)
                raise NotFound(cid.hex()) from None
            if self.index[cid].kind != KIND_COMMIT:
                self.r.problems.append(f"{where} names {cid.hex()[:16]}, which is not a commit")
                self.bad_commits.add(cid)
                raise NotFound(cid.hex())
            self.r.commits += 1
            whole = all([self.tree(root.tree, f"{where}:{sub}")
                         for sub, root in c.subdots.items()])
            order.append((cid, whole))
            return data

        def known(cid: ObjectId) -> bool:
            return cid in self.good_commits or cid in self.bad_commits or cid in self.seen

        for cid in walk_commits(get, [ObjectId(oid)], stop=known, missing_ok=True):
            self.seen.add(cid)
        for done, whole in order:
            (self.good_commits if whole else self.bad_commits).add(done)
        return oid in self.good_commits

    # ------------------------------------------------------------ rows
    def rows(self) -> None:
        c = self.conn
        dots = {}
        for rowid, name, branch in check.dot_rows(c):
            if not _name_ok(name):
                self.problem(f"meta.db has a dot with a bad name {str(name)[:40]!r}", None,
                             (check.drop_dot_row, (rowid,)))
                continue
            dots[name] = branch
        self.dots = dots
        for table in check.DOT_TABLES:
            orphans = check.count_orphans(c, table)
            if orphans and self.repair:  # left by an older dm's dot delete: harmless
                with Tx(c) as tx:
                    check.drop_orphans(tx, table)
                self.r.repaired.append(f"dropped {orphans} rows of {table} of deleted dots")
        for rowid, dot, name in check.subdot_rows(c):
            if dot in dots and not _name_ok(name):
                self.problem(f"dot {dot} has a subdot with a bad name {str(name)[:40]!r}", None,
                             (check.drop_subdot_row, (rowid,)))
        for rowid, dot, name, head in check.branch_rows(c):
            if dot not in dots:
                continue
            if not _name_ok(name, branch=True):
                self.problem(f"dot {dot} has a branch with a bad name {str(name)[:40]!r}", None,
                             (check.drop_branch_row, (rowid,)))
                continue
            if head is None:
                continue
            if not _is_id(head) or not self.commit(head, f"{dot}@{name}"):
                shown = head.hex()[:16] if _is_id(head) else repr(head)[:40]
                self.lost_head(dot, name, rowid, f"branch {name} of {dot} points to {shown}, "
                               "which cannot be read whole")
        for dot, branch in dots.items():
            if not refs.branch_exists(c, dot, branch):
                self.problem(f"dot {dot} is on branch {str(branch)[:40]!r}, which does not exist",
                             f"dot {dot} is on branch {DEFAULT_BRANCH} now",
                             (check.add_branch_if_missing, (dot, DEFAULT_BRANCH)),
                             (check.set_dot_branch, (dot, DEFAULT_BRANCH)))
        for rowid, dot, branch, ts, action, old, new, saved, message in check.reflog_rows(c):
            if dot not in dots:
                continue
            if not sound_reflog_row(branch, ts, action, old, new, saved, message):
                self.problem(f"a reflog entry of {dot} is damaged", None,
                             (check.drop_reflog_row, (rowid,)))
                continue
            for col, x in (("old", old), ("new", new), ("saved", saved)):
                if x and not self.commit(x, f"{dot} reflog"):
                    self.problem(f"a reflog entry of {dot} names {x.hex()[:16]}, which cannot "
                                 "be read whole", f"a reflog entry of {dot} no longer names "
                                 f"{x.hex()[:16]}",
                                 (check.forget_reflog_id, (rowid, col)))
        for dot, old, target, saved in check.restore_rows(c):
            if dot not in dots:
                continue
            named = {x for x in (old, target, saved) if x is not None}
            readable = frozenset(x for x in named if _is_id(x) and self.commit(
                x, f"{dot} unfinished restore"))
            if len(readable) < len(named):
                self.problem(f"the unfinished restore of {dot} names a state that cannot be "
                             "read whole", f"dropped the unfinished restore of {dot} (its "
                             "folders stay as they are: dm reset --hard brings a state back)",
                             (refs.drop_restore, (dot, readable)))
        for rowid, dot, name, commit in check.tag_rows(c):
            if dot not in dots:
                continue
            if not _name_ok(name, branch=True):
                self.problem(f"dot {dot} has a tag with a bad name {str(name)[:40]!r}", None,
                             (check.drop_tag_row, (rowid,)))
            elif not _is_id(commit) or not self.commit(commit, f"{dot} tag {name}"):
                self.problem(f"tag {name} of {dot} names a commit that cannot be read whole",
                             f"dropped tag {name} of {dot}", (check.drop_tag_row, (rowid,)))
        for rowid, dot, remote, branch, head in check.remote_ref_rows(c):
            if dot not in dots:
                continue
            if not _is_id(head) or not self.commit(head, f"{dot}@{remote}/{branch}"):
                self.problem(f"the last head seen of {dot} on {remote} ({branch}) cannot be read",
                             None, (check.drop_remote_ref_row, (rowid,)))
        for name, kind, options in check.remote_rows(c):
            try:
                ok = _name_ok(name) and kind in ("hub", "s3") and isinstance(
                    json.loads(options), dict)
            except (ValueError, TypeError):
                ok = False
            if not ok:
                self.problem(f"remote {str(name)[:40]!r} is damaged", None,
                             (check.drop_remote_row, (name,)))

    def lost_head(self, dot: str, branch: str, rowid: int, text: str) -> None:
        """A branch whose head is gone: back to the newest whole commit its reflog names."""
        back = None
        for old, new in check.reflog_moves(self.conn, dot, branch):
            for x in (new, old):
                if _is_id(x) and x not in self.bad_commits and self.commit(x, f"{dot} reflog"):
                    back = x
                    break
            if back:
                break
        where = back.hex()[:12] if back else "no commit"
        self.problem(text, f"branch {branch} of {dot} moved back to {where}",
                     (check.move_branch_row, (rowid, back)),
                     (refs.log, (dot, branch, "repair", None, back, None,
                                 "dm fsck --repair: the head could not be read")))

    def caches(self) -> None:
        for dot, branch, sub, data in check.statcache_rows(self.conn):
            if dot not in self.dots:
                continue
            where = f"{dot}@{branch}:{sub}"
            try:
                cache = decode_cache(data)
            except (ValueError, TypeError, IndexError):
                self.problem(f"the stat cache of {where} is damaged (the next commit reads "
                             "every file again)", None,
                             (check.drop_statcache, (dot, branch, sub)))
                continue
            lost = sum(1 for e in cache.values() if e[5] & HAS_CONTENT and e[4] not in
                       self.index)
            if lost:
                self.problem(f"the stat cache of {where} names {lost} objects the store lacks",
                             None, (check.drop_statcache, (dot, branch, sub)))


    def kept_states(self) -> None:
        """Each kept state (snapshot backends) read whole and compared with its commit; a bad
        one is only a cache, so a repair drops it (restores of it then read the store)."""
        for dot in self.dots:
            for commit, why in kept.verify(self.home, dot):
                self.r.problems.append(f"the kept state {commit.hex()[:12]} of {dot} {why}")
                if self.repair:
                    kept.drop(self.home, dot, commit)
                    self.r.repaired.append(f"dropped the kept state {commit.hex()[:12]} of "
                                           f"{dot} (a restore of it reads the store)")
            self.discarded_states_locked(dot)

    def discarded_states_locked(self, dot: str, wait: float = 5.0) -> None:
        """:meth:`discarded_states` under the dot's lock (a reset at work names its state
        before its set is moved in), waiting a while for it."""
        deadline = time.monotonic() + wait
        while True:
            try:
                with self.home.lock(dot, "fsck"):
                    self.discarded_states(dot)
                return
            except Locked:
                if time.monotonic() > deadline:
                    self.r.problems.append(f"the discarded states of {dot} were not checked: "
                                           "another dm kept working on it (run dm fsck again)")
                    return
                time.sleep(0.1)

    def discarded_states(self, dot: str) -> None:
        """Each discarded state's folder, under the dot's lock."""
        pending = self.home.pending_restore(dot)
        for d in kept.discarded(self.home, dot):
            if d.seq is None and pending is not None and pending.kind == "reset" \
                    and pending.target == d.target:
                continue  # a reset a kill stopped: the state may still be the working set
            if d.seq is None:  # named by no reflog entry, and no reset will link it
                self.problem(f"the discarded state {d.name} of {dot} has no reflog entry",
                             f"a reflog entry names the discarded state {d.name} of {dot}",
                             (refs.log_orphan_discarded, (dot, d.name, d.branch, d.old,
                                                          d.target)))
                continue
            if kept.discarded_folder(self.home, dot, d.name) is None:
                # Unlike a kept state, this is the only copy of that working state.
                self.r.problems.append(f"the discarded state {d.name} of {dot} named in "
                                       "its reflog is gone: that working state is lost")
                if self.repair:
                    kept.drop_discarded(self.home, dot, d.name)
                    self.r.repaired.append(f"forgot the discarded state {d.name} of {dot}")


def fsck(home: Repo, progress: Progress | None = None, repair: bool = False) -> FsckReport:
    """Check the store; the store lock is held shared, so that no gc moves packs under it."""
    with home.store_lock("fsck", exclusive=False):
        f = _Fsck(home, repair, progress)
        f.database()
        f.objects()
        if repair:
            f.reindex()
        f.rows()
        f.caches()
        f.kept_states()
        return f.r


# ------------------------------------------------------------------ rebuilding meta.db


def rebuild(root: Path) -> list[str]:
    """Replace a ``meta.db`` that cannot be read: the damaged one is kept aside, the object
    index is rebuilt from the packs, every row of the old one that can still be read is
    copied, dots whose folders exist but whose rows are lost are added again, and commits no
    ref names any more are kept as branches of dot lost-found. Returns what it did."""
    notes: list[str] = []
    aside = root / f"meta.db.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in ("", "-wal", "-shm"):
        src = root / f"meta.db{suffix}"
        if src.exists():
            os.rename(src, Path(f"{aside}{suffix}"))
    notes.append(f"kept the damaged index as {aside.name}")
    conn = connect(root / "meta.db")
    try:
        _salvage(aside, conn, notes)
        _reindex(root / "packs", conn, notes)
    finally:
        conn.close()
    home = Repo(root)
    try:
        _readopt(home, notes)
    finally:
        home.close()
    return notes


def _salvage(old: Path, conn: sqlite3.Connection, notes: list[str]) -> None:
    if not old.exists() or old.stat().st_size == 0:
        notes.append("the old index was missing or empty: refs are taken back from the "
                     "folders and the packs alone")
        return
    try:
        src = check.open_damaged(old)
    except sqlite3.Error as e:
        notes.append(f"nothing of the old index could be read ({e}): every dot's refs are "
                     "lost")
        return
    for table in check.SALVAGED:
        copied, failed = check.copy_table(src, conn, table)
        if failed:
            notes.append(f"lost rows of {table} (kept {copied}): {failed}")
    conn.commit()
    src.close()


def _reindex(packs: Path, conn: sqlite3.Connection, notes: list[str]) -> None:
    index.clear(conn)
    objects = damaged = tails = 0
    for path in sorted(packs.iterdir()) if packs.is_dir() else []:
        if not PACK_NAME.fullmatch(path.name):
            continue
        got = scan_pack(path)
        with Tx(conn) as c:
            pid = index.add_pack(c, path.name)
            index.add_object_rows(c, [(oid, kind, pid, off, stored, raw, int(z))
                                      for oid, kind, off, stored, raw, z in got.records])
        objects += len(got.records)
        damaged += got.damaged
        tails += got.tail
    notes.append(f"indexed {objects} objects from the packs"
                 + (f"; {damaged} damaged records left out" if damaged else "")
                 + (f"; {tails} bytes of unfinished writes ignored" if tails else ""))


def _heads_from_reflogs(home: Repo, notes: list[str]) -> None:
    """Branches whose rows (or heads) were lost, while their reflog survived: back to the
    newest commit their reflog names that the packs hold (a new commit must not start a new
    root beside a history that is still there)."""
    for dot in home.dots():
        try:
            heads = home.branches(dot)
        except DotmeshError:
            continue
        logged = check.reflog_branches(home.conn, dot)
        for branch in logged:
            if heads.get(branch) is not None or not _name_ok(branch, branch=True):
                continue
            back = None
            for old, new in check.reflog_moves(home.conn, dot, branch):
                back = next((x for x in (new, old) if _is_id(x) and home.packs.has(x)), None)
                if back:
                    break
            if back is None:
                continue
            with Tx(home.conn) as c:
                check.put_branch(c, dot, branch, back)
            notes.append(f"branch {branch} of {dot} is back at {back.hex()[:12]}, the newest "
                         "commit its reflog names")


def _readopt(home: Repo, notes: list[str]) -> None:
    """Dots whose folders are there but whose rows were lost, and commits nobody names."""
    for folder in sorted((home.root / "dots").iterdir()):
        name = folder.name
        if not _name_ok(name) or home.dot_exists(name) or not (folder / "subdots").is_dir():
            continue
        branches = home.branches(name)
        branch = DEFAULT_BRANCH if DEFAULT_BRANCH in branches or not branches else min(branches)
        with Tx(home.conn) as c:
            check.readd_dot(c, name, branch)
            for sub in (folder / "subdots").iterdir():
                if _name_ok(sub.name) and sub.is_dir():
                    config.add_subdot(c, name, sub.name)
        notes.append(f"dot {name} was lost from the index: added again from its folders")
    _heads_from_reflogs(home, notes)
    named = set()
    for dot in home.dots():
        try:
            named |= home.all_commits(dot)
        except DotmeshError:  # a damaged row: fsck --repair goes on to judge it
            continue
    commits = [oid for oid, loc in home.packs.iter_index() if loc.kind == KIND_COMMIT]
    parents: set[bytes] = set()
    dated: dict[bytes, int] = {}
    for oid in commits:
        if oid in named:
            continue
        try:
            commit = home.commit(oid)
        except DotmeshError:
            continue
        parents.update(commit.parents)
        dated[oid] = commit.timestamp_ns
    tips = sorted((o for o in dated if o not in parents), key=lambda o: dated[o])
    if not tips:
        return
    dot = LOST_FOUND
    n = 1
    while home.dot_exists(dot):
        n += 1
        dot = f"{LOST_FOUND}-{n}"
    home.create_dot(dot)
    with Tx(home.conn) as c:
        for i, tip in enumerate(tips, 1):
            branch = DEFAULT_BRANCH if i == len(tips) else f"lost-{i}"
            check.put_branch(c, dot, branch, tip)
            home.log_ref(c, dot, branch, "repair", None, tip, None,
                         "dm fsck --repair: a commit no ref named any more")
    notes.append(f"{len(tips)} commits no ref names any more are branches of dot {dot} "
                 f"(dm switch {dot}; dm branch)")

