"""``dm commit``: one commit capturing every subdot of the current dot."""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from dotmesh.capture.changes import Changes, ChangeWatcher
from dotmesh.capture.freeze import frozen
from dotmesh.capture.hooks import HookFailed, run_hooks
from dotmesh.capture.stop import running_containers
from dotmesh.capture.writers import Writer, find_writers, shared_mappings
from dotmesh.errors import Corrupt, DotmeshError, UsageError
from dotmesh.heap import no_cycle_gc
from dotmesh.meta.db import Tx
from dotmesh.meta.statcache import HINT_ONLY
from dotmesh.model.ids import ObjectId
from dotmesh.model.objects import KIND_COMMIT, Commit
from dotmesh.ops.hooks import hooks as hooks_of
from dotmesh.store.packs import PackWriter
from dotmesh.store.repo import Repo
from dotmesh.workdir import kept
from dotmesh.workdir.backend import SnapshotBackend
from dotmesh.workdir.branches import (
    DotSnapshot,
    Progress,
    backend_of,
    recover,
    save_caches,
    snapshot_dot,
    snapshot_dot_frozen,
    snapshots_of,
)
from dotmesh.workdir.snapshot import store_deferred

PRECOPY_PASSES = 3
SMALL_DELTA_FILES = 32  # a pass that read less than this leaves little for the freeze
SMALL_DELTA_BYTES = 4 << 20


@dataclass
class CommitResult:
    id: ObjectId
    commit: Commit
    files_read: int
    bytes_read: int
    bytes_stored: int
    frozen_bytes_read: int = 0  # read while the writers were stopped
    looked_at: int = 0  # names whose stat the capture compared (see SnapshotResult.looked_at)


RESERVED_PREFIX = "dm."  # metadata keys dm writes itself (dm.freeze_ms, dm.writers)


def default_author() -> str:
    name = os.environ.get("DM_AUTHOR")
    if name:
        return name
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def commit(home: Repo, dot: str, message: str, metadata: dict[str, str] | None = None,
           author: str | None = None, progress: Progress | None = None, freeze: bool = True,
           freeze_timeout: float = 5.0) -> CommitResult:
    """Commit every subdot at once.

    With writers running (and ``freeze``), everything is first copied while they run, then
    they are all stopped together, only what changed meanwhile is read, and they are thawed:
    one point in time across all subdots, with a short freeze.
    """
    if any(k.startswith(RESERVED_PREFIX) for k in metadata or {}):
        raise UsageError(f"metadata keys starting with {RESERVED_PREFIX!r} are reserved")
    if not message.strip():
        raise UsageError("the commit message is empty: give one with -m")
    if freeze_timeout <= 0:
        raise UsageError("--freeze-timeout must be positive")
    metadata = dict(metadata or {})
    with home.lock(dot, "commit"), no_cycle_gc():
        recover(home, dot)
        branch = home.branch(dot)
        old = home.head(dot, branch)
        if old is not None:
            try:  # a new commit must never name a parent the store cannot give back
                home.commit(old)
            except DotmeshError as e:
                raise Corrupt(f"branch {branch} of {dot!r} points to {old.hex()[:12]}, which "
                              f"cannot be read ({e}); nothing was committed: run dm fsck "
                              "--repair") from None
        dot_hooks = hooks_of(home, dot)
        folders = {s: str(home.stable(dot, s)) for s in home.subdots(dot)}
        run_hooks(dot_hooks, "pre-freeze", folders)
        writer = home.packs.writer()
        cow = snapshots_of(home)
        staging: Path | None = None
        try:
            if cow is not None:
                staging, snap = _capture_by_snapshots(home, dot, cow, writer, progress, freeze,
                                                      freeze_timeout, metadata)
                frozen_read, files_read, bytes_read = 0, snap.files_read, snap.bytes_read
            else:
                snap, frozen_read, files_read, bytes_read = _capture_live(
                    home, dot, writer, progress, freeze, freeze_timeout, metadata)
            c = Commit(
                parents=(old,) if old else (),
                subdots=snap.roots,
                message=message,
                author=author or default_author(),
                timestamp_ns=time.time_ns(),
                metadata=metadata,
            )
            oid = writer.put(KIND_COMMIT, c.encode())
            writer.flush()  # objects are durable before the ref names them
            with Tx(home.conn) as tx:
                home.set_head(tx, dot, branch, old, oid, "commit", None, message)
                save_caches(home, tx, dot, branch, snap)
        except BaseException:
            if staging is not None:
                backend_of(home).discard(staging)
            raise
        if cow is not None and staging is not None:
            kept.settle(home, dot, staging, oid, {s: r.cache for s, r in snap.results.items()},
                        cow)
    try:
        run_hooks(dot_hooks, "post-thaw", folders)
    except HookFailed as e:
        raise HookFailed(f"commit {oid.hex()[:12]} was made, but {e}") from None
    return CommitResult(oid, c, files_read, bytes_read, writer.bytes_written, frozen_read,
                        snap.looked_at)


def _capture_live(home: Repo, dot: str, writer: PackWriter, progress: Progress | None,
                  freeze: bool, freeze_timeout: float, metadata: dict[str, str]
                  ) -> tuple[DotSnapshot, int, int, int]:
    """Plain folders: copy while the writers run, then stop them all and read only what
    changed meanwhile. Returns the snapshot, the bytes read while they were stopped, and the
    files and bytes read by all passes together."""
    with ChangeWatcher() if freeze else nullcontext() as watcher:
        # The pre-copy, while writers run; from here on inotify names what changes.
        snap = snapshot_dot(home, dot, writer, progress, watcher=watcher)
        files_read, bytes_read = snap.files_read, snap.bytes_read
        writers = find_writers(home.stable_folders(dot)) if freeze else []
        containers = running_containers(dot) if freeze else []
        if not (writers or containers):
            return snap, 0, files_read, bytes_read
        assert watcher is not None
        # More copy passes while much changed during the last one: each is shorter,
        # so less is left for the freeze (as in live migration of virtual machines).
        for _ in range(PRECOPY_PASSES - 1):
            if snap.files_read <= SMALL_DELTA_FILES and snap.bytes_read <= SMALL_DELTA_BYTES:
                break
            writer.flush()  # the next pass reads this one's file lists as hints
            snap = snapshot_dot(home, dot, writer, None, after=snap, watcher=watcher,
                                changes=_changed(home, dot, watcher, snap, writers))
            files_read, bytes_read = files_read + snap.files_read, bytes_read + snap.bytes_read
        writer.flush()
        with frozen(writers, freeze_timeout, containers) as fz:
            snap = snapshot_dot(home, dot, writer, None, after=snap, defer=True,
                                changes=_changed(home, dot, watcher, snap, writers))
        frozen_read = snap.frozen_bytes_read
        files_read, bytes_read = files_read + snap.files_read, bytes_read + snap.bytes_read
        snap.finish()  # trees are encoded, and chunks compressed, after the thaw
        _distrust_mapped(home, dot, snap, writers)  # for the next command, too
        for res in snap.results.values():
            store_deferred(writer, res.deferred)
        _note_freeze(metadata, fz.ms, [*writers, *containers])
    return snap, frozen_read, files_read, bytes_read


def _capture_by_snapshots(home: Repo, dot: str, cow: SnapshotBackend, writer: PackWriter,
                          progress: Progress | None, freeze: bool, freeze_timeout: float,
                          metadata: dict[str, str]) -> tuple[Path, DotSnapshot]:
    """A snapshot backend: the writers are stopped only while every subdot is snapshotted
    read-only (milliseconds); the snapshots are read after they run again."""
    writers = find_writers(home.stable_folders(dot)) if freeze else []
    containers = running_containers(dot) if freeze else []
    timing: list[float] = []

    @contextmanager
    def freezing(settle: Callable[[], None]) -> Iterator[None]:
        if not (writers or containers):  # no freeze to shorten: the snapshot itself writes
            yield  # out what is dirty, in one btrfs transaction rather than two
            return
        with frozen(writers, freeze_timeout, containers, settle) as fz:
            yield
        timing.append(fz.ms)

    staging, snap = snapshot_dot_frozen(home, dot, cow, writer, progress, freezing,
                                        quiet=not (writers or containers))
    if timing:
        _note_freeze(metadata, timing[0], [*writers, *containers])
    return staging, snap


def _note_freeze(metadata: dict[str, str], ms: float, stopped: list[object]) -> None:
    metadata["dm.freeze_ms"] = f"{ms:.1f}"
    metadata["dm.writers"] = ", ".join(map(str, stopped))


def _changed(home: Repo, dot: str, watcher: ChangeWatcher, snap: DotSnapshot,
             writers: list[Writer]) -> dict[str, Changes] | None:
    """What may have changed since ``snap``: inotify's names, plus its blind spots. Files with
    other hard links are looked at again; files the writers map shared and writable are read
    again (see :func:`_distrust_mapped`). None: inotify lost track, look at everything."""
    changes = watcher.take()
    mapped = _distrust_mapped(home, dot, snap, writers)
    if changes is not None:
        for sub, res in snap.results.items():
            ch = changes.setdefault(sub, Changes())
            for rel in (*res.linked, *mapped.get(sub, ())):
                parent, _, name = rel.rpartition("/")
                ch.add(parent, name)
    return changes


def _distrust_mapped(home: Repo, dot: str, snap: DotSnapshot,
                     writers: list[Writer]) -> dict[str, list[str]]:
    """Mark files the writers map shared and writable as not to be trusted by their stat:
    stores to such a mapping change the file without an event or a new mtime. Returns them
    by subdot."""
    tops = {sub: str(home.stable(dot, sub)) for sub in snap.results}
    mapped = shared_mappings([w.pid for w in writers], [Path(t) for t in tops.values()])
    out: dict[str, list[str]] = {}
    for sub, res in snap.results.items():
        top = os.path.realpath(tops[sub]) + "/"
        out[sub] = [m[len(top):] for m in mapped if m.startswith(top)]
        for rel in out[sub]:
            key = os.fsencode(rel)
            entry = res.cache.get(key)
            if entry is not None:
                res.cache[key] = (*entry[:5], entry[5] | HINT_ONLY)
    return out
