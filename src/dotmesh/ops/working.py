"""The working state of a dot: snapshot all its subdots, finish interrupted branch swaps, and
build or swap the per-branch folders."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from dotmesh.capture.changes import Changes, ChangeWatcher
from dotmesh.meta.db import Tx
from dotmesh.model.objects import EMPTY_TREE, KIND_TREE, Commit, Root, object_id
from dotmesh.ops.home import Home
from dotmesh.store.packs import PackWriter
from dotmesh.workdir.restore import RestoreResult, merge_cache, restore
from dotmesh.workdir.snapshot import SnapshotResult, StatCache, snapshot, update

Progress = Callable[[int], None]


@dataclass
class DotSnapshot:
    roots: dict[str, Root]
    results: dict[str, SnapshotResult]
    caches: dict[str, StatCache]  # the caches the scan started from

    def finish(self) -> None:
        """Store the trees that a snapshot taken in a freeze (``defer``) left for the thaw."""
        for sub, res in self.results.items():
            res.finish()
            self.roots[sub] = res.root

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.results.values())

    @property
    def files_read(self) -> int:
        return sum(r.files_read for r in self.results.values())

    @property
    def frozen_bytes_read(self) -> int:
        return sum(r.frozen_bytes_read for r in self.results.values())


def ensure_folders(home: Home, dot: str) -> None:
    for sub in home.subdots(dot):
        home.stable(dot, sub).mkdir(parents=True, exist_ok=True)


def snapshot_dot(home: Home, dot: str, writer: PackWriter | None,
                 progress: Progress | None = None,
                 after: DotSnapshot | None = None, defer: bool = False,
                 changes: dict[str, Changes] | None = None,
                 watcher: ChangeWatcher | None = None) -> DotSnapshot:
    """Snapshot every subdot of the current branch (``writer=None``: hash only, store nothing).

    ``after``: a snapshot taken moments ago (a live commit's pre-copy); only what changed since
    is read: the names in ``changes`` if given (from ``watcher``), else every file whose stat
    changed. The stat caches to save are still relative to the stored ones. ``watcher`` is told
    every folder listed.
    """
    branch = home.branch(dot)
    ensure_folders(home, dot)
    snap = DotSnapshot({}, {}, {})
    for sub in home.subdots(dot):
        top = home.stable(dot, sub)
        watch = watcher.watcher(sub, str(top)) if watcher else None
        if after is not None and sub in after.results:
            prev = after.results[sub]
            if changes is not None:
                ch = changes.get(sub) or Changes()
                res = update(top, home.packs, writer, prev, ch.names, ch.fresh, progress,
                             defer, watch)
            else:
                res = snapshot(top, home.packs, writer, prev.cache, progress, defer, watch)
            snap.roots[sub], snap.results[sub], snap.caches[sub] = res.root, res, \
                after.caches[sub]
            continue
        cache = home.load_cache(dot, branch, sub)
        res = snapshot(top, home.packs, writer, cache, progress, watch=watch)
        snap.roots[sub], snap.results[sub], snap.caches[sub] = res.root, res, cache
    return snap


def save_caches(home: Home, c: object, dot: str, branch: str, snap: DotSnapshot) -> None:
    for sub, res in snap.results.items():
        home.save_cache(c, dot, branch, sub, snap.caches[sub], res.cache)


def empty_root(writer: PackWriter | None) -> Root:
    data = EMPTY_TREE.encode()
    oid = writer.put(KIND_TREE, data) if writer else object_id(data)
    return Root(oid, 0o755, os.getuid(), os.getgid(), time.time_ns())


def target_roots(home: Home, dot: str, commit: Commit | None,
                 writer: PackWriter) -> dict[str, Root]:
    """What each subdot should hold for ``commit``; subdots it lacks become empty."""
    roots = dict(commit.subdots) if commit else {}
    for sub in roots:
        home.add_subdot(dot, sub)
    for sub in home.subdots(dot):
        roots.setdefault(sub, empty_root(writer))
    return roots


def restore_dot(home: Home, dot: str, roots: dict[str, Root], snap: DotSnapshot,
                progress: Progress | None = None) -> dict[str, StatCache]:
    """Restore the stable folders in place; returns each subdot's new stat cache."""
    caches: dict[str, StatCache] = {}
    for sub, root in roots.items():
        res: RestoreResult = restore(home.stable(dot, sub), home.packs, root,
                                     snap.roots.get(sub), progress)
        base = snap.results[sub].cache if sub in snap.results else {}
        caches[sub] = merge_cache(base, res)
    return caches


def materialize(home: Home, dot: str, branch: str, commit: Commit | None, writer: PackWriter,
                progress: Progress | None = None) -> None:
    """Build the parked folders of ``branch`` from ``commit`` (built aside, then renamed in)."""
    roots = target_roots(home, dot, commit, writer)
    writer.flush()
    for sub, root in roots.items():
        final = home.parked(dot, branch, sub)
        if final.exists():
            continue
        tmp = home.scratch(dot) / uuid.uuid4().hex
        res = restore(tmp, home.packs, root, None, progress)
        with Tx(home.conn) as c:
            home.save_cache(c, dot, branch, sub, home.load_cache(dot, branch, sub),
                            merge_cache({}, res))
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)


def swap(home: Home, dot: str, to_branch: str) -> None:
    """Park the current branch's folders and bring ``to_branch``'s in, crash-safely."""
    from_branch = home.branch(dot)
    with Tx(home.conn) as c:
        c.execute("INSERT OR REPLACE INTO swaps VALUES (?, ?, ?)", (dot, from_branch, to_branch))
    settle(home, dot)


def settle(home: Home, dot: str) -> None:
    """Finish a swap that a killed dm left half done (always rolls forward)."""
    row = home.conn.execute("SELECT from_branch, to_branch FROM swaps WHERE dot=?",
                            (dot,)).fetchone()
    if row is None:
        return
    from_branch, to_branch = row
    for sub in home.subdots(dot):
        stable = home.stable(dot, sub)
        old, new = home.parked(dot, from_branch, sub), home.parked(dot, to_branch, sub)
        if stable.exists() and not old.exists() and new.exists():
            old.parent.mkdir(parents=True, exist_ok=True)
            os.rename(stable, old)
        if not stable.exists():
            if new.exists():
                os.rename(new, stable)
            else:
                stable.mkdir(parents=True)
    with Tx(home.conn) as c:
        c.execute("UPDATE dots SET branch=? WHERE name=?", (to_branch, dot))
        c.execute("DELETE FROM swaps WHERE dot=?", (dot,))
    leftover = home.dot_dir(dot) / "branches" / to_branch
    if leftover.exists() and not any(leftover.iterdir()):
        leftover.rmdir()


def recover(home: Home, dot: str) -> None:
    """Run under the dot's lock before any change: finish swaps, drop half-built folders."""
    settle(home, dot)
    shutil.rmtree(home.dot_dir(dot) / "tmp", ignore_errors=True)

