"""Kept states: the read-only snapshots a snapshot backend keeps of recent commits, so that a
reset, a checkout or a new branch at one of them is a writable snapshot, not a restore.

Layout, per dot: ``snaps/<commit id>/subdots/<subdot>`` (the working set's read-only copy:
one subvolume on btrfs) and ``snaps/<commit id>/.dm-caches`` (the stat caches of the scan
that made the commit from them, so that a folder cloned from a kept state starts with a
cache as good as the commit's).
A state being made lives in ``snaps/.new-*`` until its commit's ref is written; the next
command removes what a kill left there. Which states stay is decided by :func:`prune`.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dotmesh.errors import Corrupt, DotmeshError, InvalidName, NotFound, UsageError
from dotmesh.fs import trash
from dotmesh.fs.reflink import Earlier
from dotmesh.meta import config, refs
from dotmesh.meta.db import Tx
from dotmesh.meta.statcache import (
    FOLDER,
    HINT_ONLY,
    Encoded,
    StatCache,
    decode_or_empty,
    encode_cache,
)
from dotmesh.model.graph import walk_commits
from dotmesh.model.ids import ObjectId, parse_hex_id, parse_id_bytes
from dotmesh.model.names import ROOT_SUBDOT, check_name
from dotmesh.model.objects import KIND_COMMIT, Commit, Root, is_dirty
from dotmesh.store.repo import Repo
from dotmesh.workdir.backend import FolderBackend

CACHES = ".dm-caches"
NEW_PREFIX = ".new-"
KEEP_COMMITS = "snapshots.keep-commits"  # per branch, its head included
MOVES_AWAY = ("reset", "at")  # reflog actions whose old head is worth keeping a while
KEEP_DAYS = "snapshots.keep-days"  # discarded states (reflog) kept this long
DEFAULTS = {KEEP_COMMITS: 3, KEEP_DAYS: 7}
_LEN = struct.Struct("<I")


def snaps_dir(home: Repo, dot: str) -> Path:
    return home.dot_dir(dot) / "snaps"


SET = "subdots"  # a kept state's copy of the working set


def sub_path(state: Path, subdot: str) -> Path:
    """Where a kept state holds ``subdot``'s folder."""
    return state / SET / subdot


def _real_dir(p: Path) -> bool:
    """A folder itself, not a symlink to one: nothing in ``snaps/`` is followed out of it."""
    try:
        return stat.S_ISDIR(os.lstat(p).st_mode)
    except OSError:
        return False


def folder(home: Repo, dot: str, commit: bytes | None) -> Path | None:
    """The kept state of ``commit``, if there is a whole one."""
    if commit is None:
        return None
    p = snaps_dir(home, dot) / commit.hex()
    if not _real_dir(p):
        return None
    try:
        whole = stat.S_ISREG(os.lstat(p / CACHES).st_mode)
    except OSError:
        return None
    return p if whole and _real_dir(p / SET) else None


def begin(home: Repo, dot: str) -> Path:
    """A folder for the snapshots of a state being made."""
    snaps = snaps_dir(home, dot)
    snaps.mkdir(mode=0o700, exist_ok=True)  # commit ids are the store owner's to list
    staging = snaps / f"{NEW_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir(mode=0o700)
    return staging


def keep(home: Repo, dot: str, staging: Path, commit: bytes,
         caches: dict[str, StatCache], backend: FolderBackend) -> None:
    """Name the snapshots in ``staging`` after ``commit`` (whose ref is already written)."""
    _write_caches(staging, caches)
    final = snaps_dir(home, dot) / commit.hex()
    if final.exists():  # the same state kept before (a commit of an unchanged state)
        backend.discard(staging)
        return
    os.rename(staging, final)
    sync_dir(final.parent)


def earlier_copy(home: Repo, dot: str, commit: bytes | None) -> Earlier | None:
    """The kept state of ``commit`` as an earlier copy a new one may share files with (a
    reflinked tree): a working set's file is the one kept there if its stat is the one the
    kept state's caches say it was copied with, not too recent to trust."""
    state = folder(home, dot, commit)
    if state is None:
        return None
    saved = _read_caches(state)

    def same(rel: bytes, st: os.stat_result) -> bool:
        sub, _, inner = rel.partition(b"/")
        entry = saved.get(os.fsdecode(sub), {}).get(inner)
        return (entry is not None and not entry[5] & (HINT_ONLY | FOLDER)
                and (entry[0], entry[1], entry[2], entry[3])
                == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))

    return Earlier(state / SET, same)


def _write_caches(state: Path, caches: Mapping[str, StatCache | Encoded],
                  durable: bool = True) -> None:
    """``durable``: fsync'd before it is renamed in (not for a discarded state's, which
    only spares reads: a lost or short one makes its files be read whole)."""
    blob = bytearray()
    for sub, cache in sorted(caches.items()):
        name = sub.encode()
        body = cache if isinstance(cache, Encoded) else encode_cache(cache)
        blob += _LEN.pack(len(name)) + name + _LEN.pack(len(body)) + body
    tmp = state / f"{CACHES}.tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.rename(tmp, state / CACHES)


def settle(home: Repo, dot: str, staging: Path | None, commit: bytes | None,
           caches: dict[str, StatCache], backend: FolderBackend) -> None:
    """After a command's refs are written: keep ``staging`` as ``commit``'s state (None:
    drop it) and prune. Never fails the command: a state not kept, or not yet removed, costs
    time or space only, and the next command's recover or prune sees to it."""
    try:
        if staging is None:
            pass
        elif commit is None:
            backend.discard(staging)
        else:
            keep(home, dot, staging, commit, caches, backend)
    except (OSError, DotmeshError):
        try:
            if staging is not None:
                backend.discard(staging)
        except (OSError, DotmeshError):
            pass
    try:
        prune(home, dot, backend)
    except (OSError, DotmeshError):
        pass


def caches(home: Repo, dot: str, commit: bytes) -> dict[str, StatCache]:
    """The stat caches saved with a kept state ({} for any part that cannot be read: a cache
    only spares reads, so a damaged one costs time, never data)."""
    p = folder(home, dot, commit)
    return _read_caches(p) if p is not None else {}


def encoded_caches(home: Repo, dot: str, commit: bytes) -> dict[str, Encoded]:
    """:func:`caches`, not decoded: for a copy of the state with the same files, whose
    caches they are as they stand (each one's checksum is checked when it is loaded)."""
    p = folder(home, dot, commit)
    return _read_encoded(p) if p is not None else {}


def _read_encoded(p: Path) -> dict[str, Encoded]:
    """The caches file's parts, by subdot; {} if it is missing or not well framed."""
    out: dict[str, Encoded] = {}
    try:
        blob = (p / CACHES).read_bytes()
    except OSError:
        return out
    pos = 0
    try:
        while pos < len(blob):
            (n,) = _LEN.unpack_from(blob, pos)
            name = blob[pos + 4:pos + 4 + n].decode()
            pos += 4 + n
            (m,) = _LEN.unpack_from(blob, pos)
            if pos + 4 + m > len(blob):
                return {}
            out[name] = Encoded(blob[pos + 4:pos + 4 + m])
            pos += 4 + m
    except (struct.error, UnicodeDecodeError):
        return {}
    return out


def _read_caches(p: Path) -> dict[str, StatCache]:
    """Each subdot's cache decoded on its own: a damaged one reads as empty (its files are
    then read), never the others."""
    return {name: decode_or_empty(body) for name, body in _read_encoded(p).items()}


def kept_ids(home: Repo, dot: str) -> list[ObjectId]:
    d = snaps_dir(home, dot)
    if not d.is_dir():
        return []
    out = []
    for entry in d.iterdir():
        if entry.name.startswith(NEW_PREFIX) or not _real_dir(entry):
            continue  # being made or left by a kill; or not ours (left alone)
        try:
            out.append(parse_hex_id(entry.name))
        except Corrupt:
            continue  # not ours: left alone
    return out


def recover(home: Repo, dot: str, backend: FolderBackend) -> None:
    """Remove the snapshots of states a killed command did not finish."""
    d = snaps_dir(home, dot)
    if d.is_dir():  # (a row too damaged to use still keeps its folder: fsck names it)
        named = {row[0] for row in refs.discarded_rows(home.conn, dot)}
        for entry in d.iterdir():
            if entry.name.startswith(NEW_PREFIX) or (
                    _DISCARDED_NAME.fullmatch(entry.name) and entry.name not in named):
                backend.discard(entry)  # a reset killed before its journal named it


def _limit(home: Repo, key: str) -> int:
    raw = config.setting(home.conn, key)
    try:
        return max(0, int(raw)) if raw is not None else DEFAULTS[key]
    except ValueError:
        return DEFAULTS[key]


def wanted(home: Repo, dot: str) -> set[bytes]:
    """The states worth keeping: every branch's last few commits (its head first), and of
    the last days the reflog's discarded states and the heads resets moved branches away
    from (a reset back to where it came from, as ``dot.at()`` does on leaving, is then a
    swap; a commit's old head is its parent, counted with the branch's commits)."""
    per_branch = _limit(home, KEEP_COMMITS)
    horizon = time.time_ns() - _limit(home, KEEP_DAYS) * 86_400 * 10**9
    out: set[bytes] = set()
    heads = [h for h in home.branches(dot).values() if h is not None]
    for head in heads if per_branch else []:
        out.update(walk_commits(home.packs.get, [head], first_parent=True, limit=per_branch,
                                missing_ok=True))
    for row in refs.reflog_rows(home.conn, dot, None):
        ts, action, old, saved = row[2], row[3], row[4], row[6]
        if isinstance(ts, int) and ts >= horizon:
            moved_from = old if action in MOVES_AWAY else None
            out.update(x for x in (moved_from, saved) if isinstance(x, bytes))
    return out


def prune(home: Repo, dot: str, backend: FolderBackend,
          also_keep: Iterable[bytes] = ()) -> list[ObjectId]:
    """Drop the kept states :func:`wanted` does not name; returns those dropped."""
    horizon = time.time_ns() - _limit(home, KEEP_DAYS) * 86_400 * 10**9
    for d in discarded(home, dot):
        if d.seq is not None and d.taken_ns < horizon:
            try:  # its snapshot goes: the state is stored as a commit first
                store_discarded(home, dot, d, backend)
            except (OSError, DotmeshError):
                continue  # kept as it is; the next prune tries again
    keep_set = wanted(home, dot) | set(also_keep)
    dropped = [c for c in kept_ids(home, dot)
               if c not in keep_set or folder(home, dot, c) is None]
    for c in dropped:
        try:
            drop(home, dot, c)
        except DotmeshError:
            continue  # only space: the next prune tries again, and fsck lists what is kept
    return dropped


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(home: Repo, dot: str) -> list[tuple[ObjectId, str]]:
    """Each kept state read in full and compared with its commit: (commit, problem) pairs.
    A kept state is a cache, so a bad one is dropped by a repair, never trusted."""
    from dotmesh.workdir import snapshot as scan  # dm fsck's: not loaded by every command

    problems: list[tuple[ObjectId, str]] = []
    for c in sorted(kept_ids(home, dot)):
        state = folder(home, dot, c)
        if state is None:
            problems.append((c, "has no saved stat caches (left half made)"))
            continue
        try:
            commit = home.commit(c)
        except DotmeshError as e:
            problems.append((c, f"is the state of a commit the store cannot read ({e})"))
            continue
        missing = [s for s in commit.subdots if not sub_path(state, s).is_dir()]
        if missing:
            problems.append((c, f"lacks the folders of subdots {sorted(missing)}"))
            continue
        for sub in sorted(commit.subdots):
            try:
                got = scan.snapshot(sub_path(state, sub), home.packs, None, {}).root
            except OSError as e:
                problems.append((c, f"cannot be read in subdot {sub}: {e.strerror}"))
                break
            if got != commit.subdots[sub]:
                problems.append((c, f"differs from its commit in subdot {sub}"))
                break
    return problems


def drop(home: Repo, dot: str, commit: bytes) -> None:
    """Remove a kept state; its caches file goes first, so that a kill midway leaves a state
    no command uses (and the next prune finishes removing it)."""
    state = snaps_dir(home, dot) / commit.hex()
    if not _real_dir(state):
        return  # not a kept state: nothing of ours to remove, nothing followed
    (state / CACHES).unlink(missing_ok=True)
    home.throw_away(dot, state)


# ------------------------------------------------------------------ discarded states
DISCARDED_PREFIX = "discarded-"
_DISCARDED_NAME = re.compile(r"discarded-[0-9a-f]{16}")


@dataclass(frozen=True)
class Discarded:
    """A working state a reset discarded, kept unread in ``snaps/NAME``: the working set
    itself, moved aside by the reset's swap, so the reset cost two renames, not a commit
    (nor a copy). It becomes a commit (its reflog row then names it like any saved state,
    and its set is made read-only where the backend can) when it is asked for or its days
    are over."""

    name: str
    branch: str
    old: ObjectId | None  # the head it was a change of
    target: ObjectId  # where the reset went
    taken_ns: int
    seq: int | None  # its reflog row; None while its reset is unfinished
    author: str
    message: str


def discarded(home: Repo, dot: str) -> list[Discarded]:
    """The dot's discarded states, oldest first (rows that are not well formed are left out:
    fsck names them)."""
    out = []
    for name, branch, old, target, taken, seq, author, message in refs.discarded_rows(
            home.conn, dot):
        if not (isinstance(name, str) and _DISCARDED_NAME.fullmatch(name)
                and isinstance(branch, str) and isinstance(taken, int)
                and isinstance(author, str) and isinstance(message, str)
                and (seq is None or isinstance(seq, int))):
            continue
        try:
            old_id = parse_id_bytes(old) if old is not None else None
            target_id = parse_id_bytes(target)
        except Corrupt:
            continue
        out.append(Discarded(name, branch, old_id, target_id, taken, seq, author, message))
    return out


def new_discarded_name() -> str:
    return DISCARDED_PREFIX + uuid.uuid4().hex[:16]


def is_discarded_ref(text: str) -> bool:
    return text.startswith(DISCARDED_PREFIX)


def find_discarded(home: Repo, dot: str, text: str) -> Discarded:
    """The discarded state named ``text`` (or a unique prefix of its name, 4 hex digits on)."""
    hits = [d for d in discarded(home, dot) if d.name.startswith(text)]
    if len(text) < len(DISCARDED_PREFIX) + 4 or not hits:
        raise NotFound(f"dot {dot!r} has no discarded state {text!r} (dm reflog lists them)")
    if len(hits) > 1:
        raise UsageError(f"{text!r} names {len(hits)} discarded states: give more digits")
    return hits[0]


def discarded_folder(home: Repo, dot: str, name: str) -> Path | None:
    """The folder of a discarded state, once its set is in (its caches file may be missing
    or short after a crash: that costs reads, see :func:`begin_discarded`)."""
    p = snaps_dir(home, dot) / name
    if not (_DISCARDED_NAME.fullmatch(name) and _real_dir(p) and _real_dir(p / SET)):
        return None
    return p


def discarded_set(home: Repo, dot: str, name: str) -> Path:
    """Where a reset's swap moves the working set it discards (see :func:`begin_discarded`)."""
    return snaps_dir(home, dot) / name / SET


def begin_discarded(home: Repo, dot: str, name: str, caches: dict[str, Encoded]) -> None:
    """Make the folder of a discarded state, with the working set's stat caches (one per
    subdot, empty ones too), for the working set itself to be moved into
    (:func:`discarded_set`) by the reset's swap, once the journal's transaction has written
    the state's row. A kill before the row leaves a folder that :func:`recover` removes; a
    kill after it, one that :func:`finish_discarding` fills.

    Nothing here is fsync'd, as the swap's renames are not. A crash of the machine may lose
    the folder after the row is written (:func:`finish_discarding` makes it again) or the
    caches file (the state's files are then read whole: :func:`store_discarded` also takes
    its subdots from the dot and from its old head). The renames are written with the reset's last
    transaction's fsync: on btrfs, renaming a subvolume makes that fsync commit the
    filesystem's transaction; on XFS it forces the log, which holds them."""
    snaps = snaps_dir(home, dot)
    snaps.mkdir(mode=0o700, exist_ok=True)
    state = snaps / name
    state.mkdir(mode=0o700)
    _write_caches(state, caches, durable=False)


def finish_discarding(home: Repo, dot: str, working_set: Path) -> None:
    """Move the working set into the discarded state named by a reset that a kill stopped
    before its swap (its row written, its journal pending, the set not moved yet): the
    journal's restore, finished next, would otherwise replace the state the row promises to
    keep. The state's folder is made again if a crash lost it."""
    j = home.pending_restore(dot)
    if j is None or j.kind != "reset" or not _real_dir(working_set):
        return
    for d in discarded(home, dot):
        if d.seq is not None or d.target != j.target:
            continue  # its reset finished: its folder is whole, or fsck reports it lost
        state = snaps_dir(home, dot) / d.name
        if os.path.lexists(state) and not _real_dir(state):
            raise Corrupt(f"{state} is not a folder, so the unfinished reset of dot {dot!r} "
                          "cannot keep the working state in it: move it away")
        if not os.path.lexists(state / SET):
            state.mkdir(mode=0o700, exist_ok=True)
            os.rename(working_set, state / SET)
            return


def undo_discarding(home: Repo, dot: str, working_set: Path, backend: FolderBackend,
                    target: bytes, replaced: Callable[[sqlite3.Connection], None]) -> bool:
    """Put the working set an unfinished reset to ``target`` moved into its discarded state
    back (when the reset cannot be finished: a later reset then replaces it, storing that
    state as any working state). One transaction then forgets the state and runs
    ``replaced`` (which ends the reset's journal): a kill before it leaves the set to be
    moved in again. False if there is none to put back, or the working set holds something
    (it is then left alone)."""
    for d in discarded(home, dot):
        state = discarded_folder(home, dot, d.name)
        if d.seq is not None or d.target != target or state is None:
            continue
        if os.path.lexists(working_set):
            if not _real_dir(working_set) or _holds_files(working_set):
                return False
            backend.discard(working_set)  # an empty set something made since
        os.rename(state / SET, working_set)
        with Tx(home.conn) as tx:
            refs.drop_discarded(tx, dot, d.name)
            replaced(tx)
        backend.discard(state)
        return True
    return False


def _holds_files(top: Path) -> bool:
    """Whether anything but folders (a symlink counts) is under ``top``."""
    for folder, dirs, files in os.walk(top):
        if files or any(os.path.islink(os.path.join(folder, d)) for d in dirs):
            return True
    return False


def moved_discarded(home: Repo, dot: str) -> bool:
    """Whether an unfinished reset has moved the working set into its discarded state."""
    return any(d.seq is None and discarded_folder(home, dot, d.name) is not None
               for d in discarded(home, dot))


def store_discarded(home: Repo, dot: str, d: Discarded, backend: FolderBackend
                    ) -> ObjectId | None:
    """Read a discarded state into a commit (a paged file only where it does not share blocks
    with its head's kept state) and name it in its reflog row; its snapshot becomes that
    commit's kept state. None: it held exactly its head's state."""
    state = discarded_folder(home, dot, d.name)
    if state is None:
        raise Corrupt(f"the discarded state {d.name} of dot {dot!r} is gone: run dm fsck")
    from dotmesh.workdir import snapshot as scan

    backend.seal(state / SET)  # a working set moved aside: read-only from now on
    caches = _read_caches(state)
    head = home.commit(d.old) if d.old is not None else None
    ref_state = folder(home, dot, d.old)
    writer = home.packs.writer()
    roots: dict[str, Root] = {}
    scanned: dict[str, StatCache] = {}
    # (the caches file names every subdot of the time; lost, the head's and today's do)
    names = {sub for sub in caches if _subdot_name(sub)} | set(home.subdots(dot)) \
        | set(head.subdots if head is not None else ())
    for sub in sorted(names):
        top = sub_path(state, sub)
        if not _real_dir(top):
            continue  # none there (or not a folder): recorded as a commit would, empty
        reference = None
        if head is not None and ref_state is not None and sub in head.subdots \
                and _real_dir(sub_path(ref_state, sub)):
            reference = scan.Reference(sub_path(ref_state, sub), head.subdots[sub].tree)
        res = scan.snapshot(top, home.packs, writer, caches.get(sub, {}),
                            reference=reference, taken_ns=d.taken_ns)
        roots[sub], scanned[sub] = res.root, res.cache
    saved = None
    if is_dirty(roots, head):
        saved = writer.put(KIND_COMMIT, Commit(
            parents=(d.old,) if d.old else (), subdots=roots, message=d.message,
            author=d.author, timestamp_ns=d.taken_ns, metadata={}).encode())
    writer.flush()
    with Tx(home.conn) as tx:
        refs.stored_discarded(tx, dot, d.name, d.seq, saved, d.branch, d.old, d.target,
                              d.message)
    if saved is None:
        backend.discard(state)
    else:
        keep(home, dot, state, saved, scanned, backend)
    return saved


def _subdot_name(name: str) -> bool:
    """Whether a name read from a caches file can be a subdot's (one a damaged file makes up
    is then read as none)."""
    try:
        return check_name(name) == name and name != ROOT_SUBDOT
    except InvalidName:
        return False


def drop_discarded(home: Repo, dot: str, name: str) -> None:
    """Forget a discarded state: its row, then its snapshot (what recover would remove)."""
    with Tx(home.conn) as tx:
        refs.drop_discarded(tx, dot, name)
    p = snaps_dir(home, dot) / name
    if _DISCARDED_NAME.fullmatch(name) and _real_dir(p):
        trash.throw_away(p, home.trash(dot))


def saved_caches(home: Repo, dot: str) -> list[StatCache]:
    """The stat caches saved with the dot's kept and discarded states: each names contents
    a folder made from the state (or a commit of it) takes as stored without reading them."""
    out: list[StatCache] = []
    for c in kept_ids(home, dot):
        out += caches(home, dot, c).values()
    for d in discarded(home, dot):
        state = discarded_folder(home, dot, d.name)
        if state is not None:
            out += _read_caches(state).values()
    return out
