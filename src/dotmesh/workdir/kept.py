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
import stat
import struct
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from dotmesh.errors import Corrupt, DotmeshError
from dotmesh.meta import config, refs
from dotmesh.meta.statcache import StatCache, decode_cache, encode_cache
from dotmesh.model.graph import walk_commits
from dotmesh.model.ids import ObjectId, parse_hex_id
from dotmesh.store.repo import Repo
from dotmesh.workdir import snapshot as scan
from dotmesh.workdir.backend import FolderBackend

CACHES = ".dm-caches"
NEW_PREFIX = ".new-"
KEEP_COMMITS = "snapshots.keep-commits"  # per branch, its head included
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
    blob = bytearray()
    for sub, cache in sorted(caches.items()):
        name, body = sub.encode(), encode_cache(cache)
        blob += _LEN.pack(len(name)) + name + _LEN.pack(len(body)) + body
    tmp = staging / f"{CACHES}.tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, staging / CACHES)
    final = snaps_dir(home, dot) / commit.hex()
    if final.exists():  # the same state kept before (a commit of an unchanged state)
        backend.discard(staging)
        return
    os.rename(staging, final)
    _sync_dir(final.parent)


def settle(home: Repo, dot: str, staging: Path, commit: bytes | None,
           caches: dict[str, StatCache], backend: FolderBackend) -> None:
    """After a command's refs are written: keep ``staging`` as ``commit``'s state (None:
    drop it) and prune. Never fails the command: a state not kept, or not yet removed, costs
    time or space only, and the next command's recover or prune sees to it."""
    try:
        if commit is None:
            backend.discard(staging)
        else:
            keep(home, dot, staging, commit, caches, backend)
    except (OSError, DotmeshError):
        try:
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
    out: dict[str, StatCache] = {}
    if p is None:
        return out
    blob = (p / CACHES).read_bytes()
    pos = 0
    try:
        while pos < len(blob):
            (n,) = _LEN.unpack_from(blob, pos)
            name = blob[pos + 4:pos + 4 + n].decode()
            pos += 4 + n
            (m,) = _LEN.unpack_from(blob, pos)
            out[name] = decode_cache(blob[pos + 4:pos + 4 + m])
            pos += 4 + m
    except Exception:
        return {}
    return out


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
    if d.is_dir():
        for entry in d.iterdir():
            if entry.name.startswith(NEW_PREFIX):
                backend.discard(entry)


def _limit(home: Repo, key: str) -> int:
    raw = config.setting(home.conn, key)
    try:
        return max(0, int(raw)) if raw is not None else DEFAULTS[key]
    except ValueError:
        return DEFAULTS[key]


def wanted(home: Repo, dot: str) -> set[bytes]:
    """The states worth keeping: every branch's last few commits (its head first) and the
    reflog's discarded states of the last days."""
    per_branch = _limit(home, KEEP_COMMITS)
    horizon = time.time_ns() - _limit(home, KEEP_DAYS) * 86_400 * 10**9
    out: set[bytes] = set()
    heads = [h for h in home.branches(dot).values() if h is not None]
    for head in heads if per_branch else []:
        out.update(walk_commits(home.packs.get, [head], first_parent=True, limit=per_branch,
                                missing_ok=True))
    for row in refs.reflog_rows(home.conn, dot, None):
        ts, saved = row[2], row[6]
        if isinstance(saved, bytes) and isinstance(ts, int) and ts >= horizon:
            out.add(saved)
    return out


def prune(home: Repo, dot: str, backend: FolderBackend,
          also_keep: Iterable[bytes] = ()) -> list[ObjectId]:
    """Drop the kept states :func:`wanted` does not name; returns those dropped."""
    keep_set = wanted(home, dot) | set(also_keep)
    dropped = [c for c in kept_ids(home, dot)
               if c not in keep_set or folder(home, dot, c) is None]
    for c in dropped:
        try:
            drop(home, dot, c, backend)
        except DotmeshError:
            continue  # only space: the next prune tries again, and fsck lists what is kept
    return dropped


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(home: Repo, dot: str) -> list[tuple[ObjectId, str]]:
    """Each kept state read in full and compared with its commit: (commit, problem) pairs.
    A kept state is a cache, so a bad one is dropped by a repair, never trusted."""
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


def drop(home: Repo, dot: str, commit: bytes, backend: FolderBackend) -> None:
    """Remove a kept state; its caches file goes first, so that a kill midway leaves a state
    no command uses (and the next prune finishes removing it)."""
    state = snaps_dir(home, dot) / commit.hex()
    if not _real_dir(state):
        return  # not a kept state: nothing of ours to remove, nothing followed
    (state / CACHES).unlink(missing_ok=True)
    backend.discard(state)
