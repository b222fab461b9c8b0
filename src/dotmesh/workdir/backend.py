"""The seam between a dot's folders and the store: how a subdot's folder is made, captured,
restored, built aside and swapped in.

Every folder operation of ``workdir/branches.py`` goes through a :class:`FolderBackend`.
Today's only backend, :class:`PlainFolders`, works on any filesystem: a snapshot reads what
changed (the stat cache says what did), a restore patches the folder in place, a branch's
folders are built aside and renamed in. A copy-on-write backend (btrfs subvolumes, XFS
reflinks) implements the same calls with snapshots, and produces the same trees, so stores
on different backends share states.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol

from dotmesh.meta.statcache import StatCache
from dotmesh.model.objects import Root
from dotmesh.store.packs import PackStore, PackWriter
from dotmesh.workdir import restore
from dotmesh.workdir import snapshot as scan
from dotmesh.workdir.restore import Policy, Prepared, RestoreResult
from dotmesh.workdir.snapshot import SnapshotResult

Progress = Callable[[int], None]
Watch = Callable[[str], None]


class FolderBackend(Protocol):
    """What the branch logic asks of the folders that hold a dot's data."""

    name: str

    def make(self, folder: Path) -> None:
        """An empty subdot folder where there is none (parents made as needed)."""

    def snapshot(self, folder: Path, store: PackStore, writer: PackWriter | None,
                 cache: StatCache, progress: Progress | None = None, defer: bool = False,
                 watch: Watch | None = None) -> SnapshotResult:
        """Capture the folder: its root tree, stored through ``writer`` (None: hash only)."""

    def update(self, folder: Path, store: PackStore, writer: PackWriter | None,
               prev: SnapshotResult, changed: dict[str, set[str]],
               fresh: Collection[str] = frozenset(), progress: Progress | None = None,
               defer: bool = False, watch: Watch | None = None) -> SnapshotResult:
        """Capture again, moments after ``prev``, when only ``changed`` names may differ."""

    def prepare_restore(self, folder: Path, store: PackStore, target: Root,
                        current: Root | None, staging: Path, policy: Policy,
                        progress: Progress | None = None,
                        seen: StatCache | None = None) -> Prepared:
        """Stage and verify all that making ``folder`` hold ``target`` needs; nothing in the
        folder changes until the result's ``apply()``."""

    def build_aside(self, aside: Path, store: PackStore, target: Root, policy: Policy,
                    progress: Progress | None = None) -> RestoreResult:
        """Build ``target`` in ``aside``, a folder that does not exist yet."""

    def swap_in(self, built: Path, folder: Path) -> None:
        """Put a folder built aside (or parked) where ``folder`` is, atomically; ``folder``
        must not exist or be empty."""


class PlainFolders:
    """Ordinary folders on any filesystem."""

    name = "plain"

    def make(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)

    def snapshot(self, folder: Path, store: PackStore, writer: PackWriter | None,
                 cache: StatCache, progress: Progress | None = None, defer: bool = False,
                 watch: Watch | None = None) -> SnapshotResult:
        return scan.snapshot(folder, store, writer, cache, progress, defer, watch)

    def update(self, folder: Path, store: PackStore, writer: PackWriter | None,
               prev: SnapshotResult, changed: dict[str, set[str]],
               fresh: Collection[str] = frozenset(), progress: Progress | None = None,
               defer: bool = False, watch: Watch | None = None) -> SnapshotResult:
        return scan.update(folder, store, writer, prev, changed, fresh, progress, defer, watch)

    def prepare_restore(self, folder: Path, store: PackStore, target: Root,
                        current: Root | None, staging: Path, policy: Policy,
                        progress: Progress | None = None,
                        seen: StatCache | None = None) -> Prepared:
        return restore.prepare(folder, store, target, current, staging, policy, progress, seen)

    def build_aside(self, aside: Path, store: PackStore, target: Root, policy: Policy,
                    progress: Progress | None = None) -> RestoreResult:
        return restore.build(aside, store, target, policy, progress)

    def swap_in(self, built: Path, folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        os.rename(built, folder)


PLAIN = PlainFolders()
