"""A store on disk (``DM_HOME``): paths, metadata queries, locks and ref updates.

Layout::

    meta.db                          SQLite: refs, reflog, stat caches, object index
    packs/*.pack                     append-only object packs
    dots/DOT/subdots/SUB/            the stable folders; they hold the current branch
    dots/DOT/branches/BRANCH/SUB/    working states parked by other branches
    dots/DOT/tmp/                    scratch space for folders being built
    dots/DOT/trash/                  folders thrown away, removed by a background process
    locks/DOT.lock                   one dm process per dot at a time
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dotmesh.errors import (
    AlreadyExists,
    Corrupt,
    DamagedIndex,
    InvalidName,
    Locked,
    NotFound,
    UsageError,
)
from dotmesh.fs import pool, trash
from dotmesh.fs.btrfs import remove_tree
from dotmesh.meta import config, refs, statcache
from dotmesh.meta.db import Tx, connect
from dotmesh.meta.statcache import StatCache
from dotmesh.model.graph import walk_commits
from dotmesh.model.ids import ID_LEN, ObjectId
from dotmesh.model.names import DEFAULT_BRANCH, check_branch, check_name, check_tag, ref_key
from dotmesh.model.objects import Commit
from dotmesh.model.refspec import looks_like_id_prefix, parse_ref
from dotmesh.model.tags import Tag, check_new_tag_name, check_tag_fields
from dotmesh.store.packs import PackStore


@dataclass(frozen=True)
class Journal:
    """A restore of a dot's folders in progress: ``kind`` is reset (the branch moves from
    ``old`` to ``target`` when done) or clone (the dot's first folders)."""

    kind: str
    branch: str
    old: ObjectId | None
    target: ObjectId
    saved: ObjectId | None
    action: str
    message: str


def _holder_of(fd: int) -> tuple[int, str]:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    pid, _, command = text.partition(" ")
    return (int(pid) if pid.isdigit() else 0), command


def _only_shared(fd: int) -> bool:
    """Is the lock held shared only (by holders that wrote no pid)?"""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # an exclusive holder: its pid is in the file
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


@contextmanager
def _flocked(path: Path, mode: int, command: str, busy: str,
             shared_by: str = "") -> Iterator[None]:
    """Hold ``flock(mode)`` on ``path`` for the block, the holder's pid and command written in
    it (an exclusive holder's); Locked at once, naming the holder, if another has it (or
    saying ``shared_by``, when an exclusive lock is refused and the holders may be shared)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for attempt in range(3):  # a read peeking at the lock holds it for a moment
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 2:
                    if mode == fcntl.LOCK_EX and shared_by and _only_shared(fd):
                        raise Locked(f"{busy}: {shared_by}; try again when they have "
                                     "finished") from None
                    pid, what = _holder_of(fd)
                    doing = f"dm {what}, pid {pid}" if what else f"pid {pid}"
                    raise Locked(f"{busy}: another dm process ({doing}) is working on it; "
                                 "try again when it has finished") from None
                time.sleep(0.02)
        if mode == fcntl.LOCK_EX:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {command}".strip().encode(), 0)
        yield
    finally:
        os.close(fd)


def _named(value: object, what: str, dot: str) -> str:
    """A name read from meta.db, held to the rules it was written with: names become parts
    of paths, and a damaged one must never lead out of the store."""
    try:
        if what == "branch":
            return check_branch(value)  # type: ignore[arg-type]
        if what == "tag":
            return check_tag(value)  # type: ignore[arg-type]
        return check_name(value, f"{what} name")  # type: ignore[arg-type]
    except InvalidName:
        of = f" of dot {dot!r}" if dot else ""
        raise Corrupt(f"meta.db has a damaged {what} name{of} ({str(value)[:40]!r}): run dm "
                      "fsck --repair") from None


def sound_reflog_row(branch: object, ts_ns: object, action: object, old: object, new: object,
                     saved: object, message: object) -> bool:
    """A reflog row has the types it was written with (read by ``dm reflog``, judged by fsck)."""
    return (isinstance(branch, str) and isinstance(ts_ns, int) and isinstance(action, str)
            and isinstance(message, str)
            and all(x is None or (isinstance(x, bytes) and len(x) == ID_LEN)
                    for x in (old, new, saved)))


def _head(dot: str, branch: str, value: object) -> ObjectId | None:
    """A head as stored; a damaged one is an error, never a wrong id."""
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) != 32:
        raise Corrupt(f"the head of branch {branch} of {dot!r} is damaged in meta.db; run dm "
                      "fsck --repair")
    return ObjectId(value)


def _oid(value: bytes | None) -> ObjectId | None:
    return ObjectId(value) if value else None


# Who may see what: the store's own files (the index with remotes' keys, committed data) are
# its owner's alone; the folders on the way to a subdot may be passed through (not listed) by
# anyone, since the services using a subdot (PostgreSQL as user postgres) must reach it; a
# subdot's folder keeps the permissions its data has.
PRIVATE_DIRS = ("locks", "packs", "remotes", "trash")
PASSAGE = 0o711


def _check_index_present(root: Path) -> None:
    """A store that holds packs but no index lost its meta.db: starting a new one would show
    an empty store and bury its history, so say so instead."""
    db = root / "meta.db"
    try:
        empty = not db.exists() or db.stat().st_size == 0
    except OSError:
        return
    packs = root / "packs"
    if empty and packs.is_dir() and any(p.suffix == ".pack" for p in packs.iterdir()):
        raise DamagedIndex(f"the store {root} holds packs but its index meta.db is missing or "
                           "empty: run dm fsck --repair to rebuild it from the packs")


def _make_private(root: Path) -> None:
    if not root.is_dir():
        root.mkdir(parents=True, mode=PASSAGE)
    mode = stat.S_IMODE(root.stat().st_mode)
    if mode & 0o066:
        os.chmod(root, mode & ~0o066)
    for name in PRIVATE_DIRS:
        _tighten(root / name, 0o700)
    _tighten(root / "dots", PASSAGE)
    db = root / "meta.db"
    if not db.exists():
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))  # SQLite gives
    for suffix in ("", "-wal", "-shm"):  # its WAL and SHM the database file's permissions
        path = Path(f"{db}{suffix}")
        if path.exists() and stat.S_IMODE(path.stat().st_mode) != 0o600:
            os.chmod(path, 0o600)


def _tighten(path: Path, mode: int) -> None:
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)


SYSTEM_HOME = Path("/var/lib/dotmesh")


def default_home() -> Path:
    """``$DM_HOME``; else, for root, ``/var/lib/dotmesh`` (as Dotmesh's: service users such
    as postgres can reach their subdots there, never in /root) unless root's store is
    ``~/.dotmesh`` from before; else ``~/.dotmesh``."""
    env = os.environ.get("DM_HOME")
    if env:
        return Path(env)
    personal = Path.home() / ".dotmesh"
    if os.geteuid() == 0 and not (personal.exists() and not SYSTEM_HOME.exists()):
        return SYSTEM_HOME
    return personal


class Repo:
    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        _check_index_present(self.root)
        try:
            _make_private(self.root)
            self.conn = connect(self.root / "meta.db")
        except OSError as e:
            raise UsageError(f"cannot use {self.root} as the dotmesh home: {e.strerror}") from None
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as e:
            raise DamagedIndex(f"the store's index {self.root / 'meta.db'} cannot be read "
                               f"({e}): run dm fsck --repair") from None
        self.packs = PackStore(self.root, self.conn)
        pool.ensure_mounted(self.root)  # after a reboot: the dots' folders are in the pool
        # Trashes whose reaper waits for the end of the operation that filled them: removing
        # a subvolume commits a btrfs transaction, and the operation's fsyncs would wait for
        # it (a reset's last COMMIT took 20-26 ms beside a starting reaper, 5 ms without)
        self._to_reap: set[Path] = set()
        self._to_reap_lock = threading.Lock()
        # Set by dm's CLI, whose process closes the store right after its one command: the
        # reapers then wait for the close's checkpoint too (19 ms beside one, 2-4 without)
        self.reap_at_close = False

    def close(self) -> None:
        try:
            self.packs.close()
            self.conn.close()
        finally:
            self._reap()

    def throw_away(self, dot: str, path: Path) -> None:
        """Remove ``path`` (a folder of the dot, or a subvolume) soon: at once as far as anyone
        can see it, by a reaper started once the operation is over (see ``_to_reap``)."""
        if trash.throw_away(path, self.trash(dot), reap=False):
            with self._to_reap_lock:
                self._to_reap.add(self.trash(dot))

    def _reap(self) -> None:
        with self._to_reap_lock:
            doomed, self._to_reap = self._to_reap, set()
        for folder in sorted(doomed):
            trash.start_reaper(folder)

    # ------------------------------------------------------------ paths
    def dot_dir(self, dot: str) -> Path:
        return self.root / "dots" / dot

    def stable(self, dot: str, subdot: str) -> Path:
        return self.dot_dir(dot) / "subdots" / subdot

    def stable_folders(self, dot: str) -> list[Path]:
        """Where the dot's apps see its data: what writers and restores look at."""
        return [self.stable(dot, s) for s in self.subdots(dot)]

    def parked_set(self, dot: str, branch: str) -> Path:
        """Where a branch that is not checked out keeps its folders."""
        return self.dot_dir(dot) / "branches" / ref_key(branch)

    def parked(self, dot: str, branch: str, subdot: str) -> Path:
        return self.parked_set(dot, branch) / subdot

    def trash(self, dot: str) -> Path:
        """Where folders wait for a background removal (``fs/trash.py``)."""
        return self.dot_dir(dot) / "trash"

    def scratch(self, dot: str) -> Path:
        p = self.dot_dir(dot) / "tmp"
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
        return p

    # ------------------------------------------------------------ locking
    @contextmanager
    def lock(self, dot: str, command: str = "") -> Iterator[None]:
        """Hold the dot's lock for the block; fail at once, naming the holder, if taken.
        ``command`` is written beside the pid, so that reads can say what is going on.
        The store lock is held shared meanwhile: work on different dots runs side by side,
        and a store-wide operation (gc) waits for none of it and lets none of it start."""
        try:
            with self.store_lock(command, exclusive=False), \
                    _flocked(self.root / "locks" / f"{dot}.lock", fcntl.LOCK_EX, command,
                             f"dot {dot!r} is busy"):
                yield
        finally:
            if not self.reap_at_close:
                self._reap()  # the operation is over

    @contextmanager
    def store_lock(self, command: str = "", exclusive: bool = True) -> Iterator[None]:
        """The whole store's lock: exclusive for work that must see every dot at rest (gc),
        shared under every dot's lock."""
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        with _flocked(self.root / "locks" / "store.lock", mode, command, "the store is busy",
                      "other dm commands are working on its dots (dm list shows which)"):
            yield

    def holder(self, dot: str) -> tuple[int, str] | None:
        """(pid, command) of the dm process working on the dot, or None; never waits."""
        try:
            fd = os.open(self.root / "locks" / f"{dot}.lock", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder_of(fd)
            return None
        finally:
            os.close(fd)  # also lets go of a shared lock at once

    # ------------------------------------------------------------ dots
    def current_dot(self) -> str | None:
        dot = config.setting(self.conn, "current_dot")
        return dot if dot is not None and self.dot_exists(dot) else None

    def set_current_dot(self, dot: str) -> None:
        config.set_setting(self.conn, "current_dot", dot)

    def require_current(self, dot: str | None = None) -> str:
        if dot is not None:
            self.require_dot(dot)
            return dot
        cur = self.current_dot()
        if cur is None:
            raise UsageError("no current dot: run dm switch DOT (or dm init DOT) first")
        return cur

    def dot_exists(self, dot: str) -> bool:
        return config.dot_exists(self.conn, dot)

    def require_dot(self, dot: str) -> None:
        check_name(dot, "dot name")
        if not self.dot_exists(dot):
            import difflib

            near = difflib.get_close_matches(dot, self.dots(), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise NotFound(f"no dot named {dot!r} ({hint}dm list shows the dots, dm init "
                           f"{dot} makes one)")

    def dots(self) -> list[str]:
        return [_named(name, "dot", "") for name in config.dot_names(self.conn)]

    def create_dot(self, dot: str, c: sqlite3.Connection | None = None,
                   branch: str = DEFAULT_BRANCH, head: ObjectId | None = None) -> None:
        """Add a dot whose current branch is ``branch`` (at ``head``); inside the caller's
        transaction ``c`` if given, so that what else makes the dot lands with it."""
        check_name(dot, "dot name")
        check_branch(branch)
        if c is None:
            with Tx(self.conn) as tx:
                self.create_dot(dot, tx, branch, head)
            return
        if config.dot_exists(c, dot):
            raise AlreadyExists(f"dot {dot!r} already exists")
        config.add_dot(c, dot, branch, head)
        self.dot_dir(dot).mkdir(mode=PASSAGE, exist_ok=True)
        (self.dot_dir(dot) / "subdots").mkdir(mode=PASSAGE, exist_ok=True)

    def delete_dot(self, dot: str) -> None:
        """Forget the dot: refs, history, folders and settings (a new dot of the same name
        starts empty); its objects stay in the packs until gc."""
        with Tx(self.conn) as c:
            config.delete_dot(c, dot)
        remove_tree(self.dot_dir(dot))  # snapshots in it go whole

    def subdots(self, dot: str) -> list[str]:
        return [_named(name, "subdot", dot) for name in config.subdot_names(self.conn, dot)]

    def add_subdot(self, dot: str, subdot: str) -> None:
        config.add_subdot(self.conn, dot, subdot)

    def forget_subdot(self, dot: str, subdot: str) -> None:
        """Drop a subdot from the working state (its stat caches, hooks and mounts too);
        commits that hold it keep it."""
        with Tx(self.conn) as c:
            config.forget_subdot(c, dot, subdot)

    # ------------------------------------------------------------ journaled restores
    def pending_restore(self, dot: str) -> Journal | None:
        """A restore of the dot's folders that was started and not finished (a kill)."""
        row = refs.pending_restore(self.conn, dot)
        if row is None:
            return None
        kind, branch, old, target, saved, action, message = row
        return Journal(kind, branch, _oid(old), ObjectId(target), _oid(saved), action, message)

    def begin_restore(self, c: sqlite3.Connection, dot: str, j: Journal) -> None:
        """Journal a restore (inside the caller's transaction) before any folder changes."""
        refs.begin_restore(c, dot, j.kind, j.branch, j.old, j.target, j.saved, j.action,
                           j.message)

    def end_restore(self, c: sqlite3.Connection, dot: str) -> None:
        refs.end_restore(c, dot)

    def is_fetched(self, commit: bytes) -> bool:
        """Did this commit come from a remote (rather than being made here)?"""
        return refs.is_fetched(self.conn, commit)

    def dot_option(self, dot: str, key: str) -> str | None:
        return config.dot_option(self.conn, dot, key)

    def set_dot_option(self, dot: str, key: str, value: str) -> None:
        config.set_dot_option(self.conn, dot, key, value)

    def swapping(self, dot: str) -> bool:
        """Is a branch swap of ``dot`` journaled but not finished (a checkout was killed)?"""
        return refs.pending_swap(self.conn, dot) is not None

    # ------------------------------------------------------------ branches and refs
    def branch(self, dot: str) -> str:
        name = refs.current_branch(self.conn, dot)
        if name is None:
            raise NotFound(f"no dot named {dot!r}")
        return _named(name, "branch", dot)

    def branches(self, dot: str) -> dict[str, ObjectId | None]:
        return {_named(name, "branch", dot): _head(dot, str(name), head)
                for name, head in refs.branch_rows(self.conn, dot)}

    def head(self, dot: str, branch: str) -> ObjectId | None:
        row = refs.head_row(self.conn, dot, branch)
        if row is None:
            raise NotFound(f"dot {dot!r} has no branch {branch!r} (dm branch lists them)")
        return _head(dot, branch, row[0])

    def check_new_branch(self, dot: str, branch: str) -> None:
        check_branch(branch)
        if refs.branch_exists(self.conn, dot, branch):
            raise AlreadyExists(f"branch {branch!r} already exists; use dm checkout {branch}")
        if branch in self.tags(dot):
            raise AlreadyExists(f"{branch!r} is a tag of dot {dot!r}: a branch of that name "
                                "would hide it")

    # ------------------------------------------------------------ tags
    def tags(self, dot: str) -> dict[str, Tag]:
        out = {}
        for name, commit, message, tagger, ts_ns in refs.tag_rows(self.conn, dot):
            name = _named(name, "tag", dot)
            if not isinstance(commit, bytes) or len(commit) != ID_LEN:
                raise Corrupt(f"tag {name!r} of dot {dot!r} is damaged in meta.db; run dm "
                              "fsck --repair")
            out[name] = Tag(name, ObjectId(commit), str(message), str(tagger), int(ts_ns))
        return out

    def add_tag(self, dot: str, name: str, commit: ObjectId, message: str, tagger: str,
                force: bool = False, ts_ns: int | None = None) -> None:
        """Name ``commit`` (which must be one of the dot's) ``name``; ``force``: move a tag
        that exists. A branch's name cannot be a tag's: one would hide the other. ``ts_ns``:
        when it was tagged, if elsewhere (a pulled tag)."""
        check_new_tag_name(name)
        check_tag_fields(message, tagger)
        if refs.branch_exists(self.conn, dot, name):
            raise AlreadyExists(f"{name!r} is a branch of dot {dot!r}: a tag of that name "
                                "would be hidden by it")
        with Tx(self.conn) as c:
            if name in self.tags(dot):
                if not force:
                    raise AlreadyExists(f"tag {name!r} already exists (dm tag -f moves it)")
                refs.delete_tag(c, dot, name)
            refs.add_tag(c, dot, name, commit, message, tagger,
                         time.time_ns() if ts_ns is None else ts_ns)

    def delete_tag(self, dot: str, name: str) -> Tag:
        tag = self.tags(dot).get(name)
        if tag is None:
            raise NotFound(f"dot {dot!r} has no tag {name!r} (dm tag lists them)")
        with Tx(self.conn) as c:
            refs.delete_tag(c, dot, name)
        return tag

    def create_branch(self, dot: str, branch: str, head: ObjectId | None) -> None:
        """A new branch whose folders are built when it is checked out (what a killed
        ``dm checkout -b`` of the same name left is dropped first)."""
        self.check_new_branch(dot, branch)
        self.drop_parked(dot, branch)
        with Tx(self.conn) as c:
            self.add_branch(c, dot, branch, head)

    def add_branch(self, c: sqlite3.Connection, dot: str, branch: str,
                   head: ObjectId | None) -> None:
        """Insert a branch row inside the caller's transaction (checked again there)."""
        self.check_new_branch(dot, branch)
        refs.add_branch(c, dot, branch, head)

    def drop_caches(self, c: sqlite3.Connection, dot: str, branch: str) -> None:
        """Forget a branch's stat caches (its folders are going), in the caller's transaction."""
        statcache.drop_branch(c, dot, branch)

    def drop_parked(self, dot: str, branch: str) -> None:
        """Forget the folders and stat caches parked under ``branch``, a branch that does not
        exist (what a failed ``dm checkout -b`` had built)."""
        with Tx(self.conn) as c:
            statcache.drop_branch(c, dot, branch)
        remove_tree(self.parked_set(dot, branch))

    def set_head(self, c: sqlite3.Connection, dot: str, branch: str, old: ObjectId | None,
                 new: ObjectId, action: str, saved: ObjectId | None, message: str,
                 logged: bool = True) -> None:
        """Compare-and-swap a branch head and log it, inside the caller's transaction."""
        refs.set_head(c, dot, branch, old, new, action, saved, message, logged)

    def log_ref(self, c: sqlite3.Connection, dot: str, branch: str, action: str,
                old: bytes | None, new: bytes | None, saved: bytes | None, message: str) -> None:
        """A reflog row for a change that moved no existing head."""
        refs.log(c, dot, branch, action, old, new, saved, message)

    def commit(self, oid: ObjectId) -> Commit:
        return Commit.decode(self.packs.get(oid))

    def resolve(self, dot: str, text: str) -> ObjectId:
        """A commit id for ``HEAD``, ``HEAD^``, ``HEAD~N``, a branch, or a unique id prefix."""
        spec = parse_ref(text)
        branches = self.branches(dot)
        if spec.is_head:
            oid = branches.get(self.branch(dot))
            if oid is None:
                raise NotFound("HEAD has no commit yet: run dm commit first")
        elif spec.base in branches:
            oid = branches[spec.base]
            if oid is None:
                raise NotFound(f"branch {spec.base!r} has no commit yet")
        elif (tag := self.tags(dot).get(spec.base)) is not None:
            oid = tag.commit
        elif looks_like_id_prefix(spec.base):
            oid = self._by_prefix(dot, spec.base)
        else:
            raise NotFound(f"unknown ref {text!r}: not HEAD, a branch, a tag or a commit id")
        for i in range(spec.back):
            parents = self.commit(oid).parents
            if not parents:
                raise NotFound(f"{text!r} goes back {spec.back} commits but history has only {i}")
            oid = parents[0]
        return oid

    def _by_prefix(self, dot: str, prefix: str) -> ObjectId:
        hits = {c for c in self.all_commits(dot) if c.hex().startswith(prefix)}
        if not hits:
            raise NotFound(f"no commit of dot {dot!r} starts with {prefix!r}")
        if len(hits) > 1:
            raise UsageError(f"commit id prefix {prefix!r} is ambiguous: give more characters")
        return hits.pop()

    def all_commits(self, dot: str) -> set[ObjectId]:
        """Every commit reachable from the dot's branches, tags and reflog."""
        heads = [h for h in self.branches(dot).values() if h]
        heads.extend(t.commit for t in self.tags(dot).values())
        heads.extend(ObjectId(x) for x in refs.logged_ids(self.conn, dot))
        heads.extend(self.remote_heads(dot).values())
        return set(walk_commits(self.packs.get, heads, missing_ok=True))

    def remote_heads(self, dot: str) -> dict[tuple[str, str], ObjectId]:
        """The last heads seen on remotes, by (remote, branch): fetched commits stay
        reachable (dm reset --hard can name them) until the next push or pull."""
        return {(r, b): ObjectId(h) for r, b, h in refs.remote_head_rows(self.conn, dot)}

    # ------------------------------------------------------------ stat caches
    def load_cache(self, dot: str, branch: str, subdot: str) -> StatCache:
        return statcache.load(self.conn, dot, branch, subdot)

    def load_encoded_cache(self, dot: str, branch: str, subdot: str
                           ) -> statcache.Encoded | None:
        return statcache.load_encoded(self.conn, dot, branch, subdot)

    def save_cache(self, c: sqlite3.Connection, dot: str, branch: str, subdot: str,
                   old: StatCache, new: StatCache | statcache.Encoded) -> None:
        """Replace the subdot's cache, inside the caller's transaction, if it changed."""
        statcache.save(c, dot, branch, subdot, old, new)
