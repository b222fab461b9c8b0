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
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dotmesh.fs import btrfs, reflink
from dotmesh.fs.reflink import Stats
from dotmesh.meta.statcache import StatCache
from dotmesh.model.objects import Root
from dotmesh.store.packs import PackStore, PackWriter

if TYPE_CHECKING:
    from dotmesh.workdir.restore import Policy, Prepared, RestoreResult
    from dotmesh.workdir.snapshot import Reference, SnapshotResult

# The scan (snapshot.py: the chunker, thread pools) and the restore are imported by the calls
# that use them: the commands that only read the store (dm version, dm log) load neither.

Progress = Callable[[int], None]
Watch = Callable[[str], None]


class FolderBackend(Protocol):
    """What the branch logic asks of the folders that hold a dot's data."""

    name: str

    def make(self, folder: Path) -> None:
        """An empty subdot folder where there is none (parents made as needed)."""

    def snapshot(self, folder: Path, store: PackStore, writer: PackWriter | None,
                 cache: StatCache, progress: Progress | None = None, defer: bool = False,
                 watch: Watch | None = None, reference: Reference | None = None,
                 taken_ns: int | None = None, stats: Stats | None = None) -> SnapshotResult:
        """Capture the folder: its root tree, stored through ``writer`` (None: hash only).
        ``reference``: a kept snapshot of the head, whose shared blocks need no reading;
        ``taken_ns``: when ``folder`` (a read-only snapshot) was taken; ``stats``: what
        :meth:`SnapshotBackend.freeze_copy` returned for it."""

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

    def discard(self, path: Path) -> None:
        """Remove a folder this backend made (and anything in it), if it exists."""

    def seal(self, path: Path) -> None:
        """Make a set kept from now on read-only, where the backend can (a working set moved
        aside as a reset's discarded state, before it is read into a commit)."""


@dataclass(frozen=True)
class PreCopy:
    """A copy made before a freeze (see :meth:`SnapshotBackend.prepare_copy`)."""

    stats: Stats  # the source files' stats as copied
    started_ns: int
    maps: reflink.Maps = field(default_factory=dict)  # the copy's big files' extent maps
    linked: frozenset[bytes] = frozenset()  # files shared with an earlier copy: never patched
    # Work that shortens a freeze, so worth doing only before one that stops writers
    ahead: Callable[[], None] | None = None


class SnapshotBackend(FolderBackend, Protocol):
    """A backend that copies a dot's whole working set (the folder of its subdot folders) at
    once: a btrfs subvolume snapshotted in one call (so the freeze costs one transaction),
    or a reflinked tree. A ZFS backend would map these calls to a dataset per working set,
    ``zfs snapshot`` and ``zfs clone``."""

    # Whether a copy costs the same whatever the set holds (a snapshot); if not (a clone per
    # file), a copy is made before the freeze, sharing what it can with the head's kept state
    instant_copies: bool

    def make_set(self, path: Path) -> None:
        """Make ``path`` a working set (a folder to hold subdot folders) if it is not one;
        an existing folder with data in it is left as it is (see :meth:`is_set`)."""

    def is_set(self, path: Path) -> bool:
        """Can ``path`` be copied as a whole by this backend?"""

    def prepare_copy(self, folder: Path, dest: Path, earlier: reflink.Earlier | None = None
                     ) -> PreCopy | None:
        """Before a freeze: start a copy of ``folder`` at ``dest`` that :meth:`freeze_copy`
        then only brings up to date (None: nothing to prepare, a snapshot is instant).
        ``earlier``: a kept state whose files the copy may share."""

    def freeze_copy(self, folder: Path, dest: Path, prepared: PreCopy | None = None
                    ) -> Stats | None:
        """A read-only copy of ``folder`` at ``dest`` as it is at this instant. For a copy
        whose files are new inodes (reflinks), returns the originals' stats when copied, by
        which a scan of the copy judges its stat cache; None for a true snapshot."""

    def writable_copy(self, source: Path, dest: Path) -> Stats | None:
        """A writable copy at ``dest`` of a copy made by :meth:`freeze_copy`; returns the new
        files' stats if they are new inodes (None for a true snapshot: same inodes)."""

    def changed_inodes(self, copy: Path, reference: Path, source: Path
                       ) -> btrfs.Changed | None:
        """The inodes of ``copy`` (made by :meth:`freeze_copy` of ``source``) that may differ
        from those of ``reference`` (an earlier such copy), and where they are, as the
        filesystem tells without a walk; None when it cannot (the caller walks). May name
        more than changed, never less. A ZFS backend would read ``zfs diff``."""


class PlainFolders:
    """Ordinary folders on any filesystem."""

    name = "plain"

    def make(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)

    def snapshot(self, folder: Path, store: PackStore, writer: PackWriter | None,
                 cache: StatCache, progress: Progress | None = None, defer: bool = False,
                 watch: Watch | None = None, reference: Reference | None = None,
                 taken_ns: int | None = None, stats: Stats | None = None) -> SnapshotResult:
        from dotmesh.workdir import snapshot as scan

        return scan.snapshot(folder, store, writer, cache, progress, defer, watch, reference,
                             taken_ns, stats)

    def update(self, folder: Path, store: PackStore, writer: PackWriter | None,
               prev: SnapshotResult, changed: dict[str, set[str]],
               fresh: Collection[str] = frozenset(), progress: Progress | None = None,
               defer: bool = False, watch: Watch | None = None) -> SnapshotResult:
        from dotmesh.workdir import snapshot as scan

        return scan.update(folder, store, writer, prev, changed, fresh, progress, defer, watch)

    def prepare_restore(self, folder: Path, store: PackStore, target: Root,
                        current: Root | None, staging: Path, policy: Policy,
                        progress: Progress | None = None,
                        seen: StatCache | None = None) -> Prepared:
        from dotmesh.workdir import restore

        return restore.prepare(folder, store, target, current, staging, policy, progress, seen)

    def build_aside(self, aside: Path, store: PackStore, target: Root, policy: Policy,
                    progress: Progress | None = None) -> RestoreResult:
        from dotmesh.workdir import restore

        return restore.build(aside, store, target, policy, progress)

    def swap_in(self, built: Path, folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        os.rename(built, folder)

    def discard(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def seal(self, path: Path) -> None:
        pass  # plain folders and reflinked copies have no read-only flag; nothing writes them


class BtrfsFolders(PlainFolders):
    """A dot's working set (``dots/DOT/subdots``, each branch's parked set, each kept state)
    is one btrfs subvolume holding its subdot folders, as a Dotmesh dot was one ZFS
    filesystem: a commit snapshots it read-only in one call (milliseconds, one transaction,
    however many subdots), and a branch or a reset to a kept state is a writable snapshot,
    sharing every block until it is written."""

    name = "btrfs"
    instant_copies = True

    def make_set(self, path: Path) -> None:
        if not path.exists():
            btrfs.create_subvolume(path)
            return
        if btrfs.is_subvolume(path) or any(path.iterdir()):
            return  # a folder of an older layout: copied by reflinks, see freeze_copy
        st = path.stat()
        path.rmdir()
        btrfs.create_subvolume(path)
        os.chmod(path, st.st_mode & 0o7777)
        os.chown(path, st.st_uid, st.st_gid)

    def is_set(self, path: Path) -> bool:
        return btrfs.is_subvolume(path)

    def discard(self, path: Path) -> None:
        btrfs.remove_tree(path)

    def seal(self, path: Path) -> None:
        if not btrfs.is_subvolume(path):
            return
        try:  # a search of its extents then flushes a file first (btrfs.flushed_extents)
            btrfs.make_read_only(path)
        except btrfs.SnapshotError:
            pass  # not its owner: left writable, its extents are read by FIEMAP

    def prepare_copy(self, folder: Path, dest: Path, earlier: reflink.Earlier | None = None
                     ) -> PreCopy | None:
        return None

    def freeze_copy(self, folder: Path, dest: Path, prepared: PreCopy | None = None
                    ) -> Stats | None:
        if btrfs.is_subvolume(folder):
            btrfs.snapshot(folder, dest, read_only=True)
            return None
        return _reflink_copy(folder, dest)

    def writable_copy(self, source: Path, dest: Path) -> Stats | None:
        btrfs.snapshot(source, dest, read_only=False)
        return None

    def changed_inodes(self, copy: Path, reference: Path, source: Path
                       ) -> btrfs.Changed | None:
        return btrfs.changed_inodes(copy, reference, source)


class ReflinkFolders(PlainFolders):
    """Plain folders on a filesystem that shares blocks between files but has no subvolumes
    (XFS made with ``reflink=1``): a commit's copy, a kept state and a branch made from one
    are reflinked trees. A copy costs a few system calls per file, no data: the freeze lasts
    as long as copying the folders' file list, not their bytes (btrfs does better: one
    snapshot per subdot)."""

    name = "reflink"
    instant_copies = False

    def make_set(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o711)

    def is_set(self, path: Path) -> bool:
        return path.is_dir()

    def prepare_copy(self, folder: Path, dest: Path, earlier: reflink.Earlier | None = None
                     ) -> PreCopy | None:
        started = time.time_ns()
        linked: set[bytes] = set()
        if earlier is None:
            before, after = reflink.copy_tree(folder, dest)
        else:
            before, after, linked = reflink.copy_tree_sharing(folder, dest, earlier)
        own = {rel: st for rel, st in after.items() if rel not in linked}
        maps: reflink.Maps = {}
        return PreCopy(before, started, maps, frozenset(linked),
                       lambda: maps.update(reflink.map_copies(dest, own)))

    def freeze_copy(self, folder: Path, dest: Path, prepared: PreCopy | None = None
                    ) -> Stats | None:
        """In the freeze, only the files changed since :meth:`prepare_copy` are cloned
        again: the writers wait for a stat walk, not for a clone of every file."""
        if prepared is None:
            before, _ = reflink.copy_tree(folder, dest)
            return before
        return reflink.refresh_tree(folder, dest, prepared.stats, prepared.started_ns,
                                    prepared.maps, prepared.linked)

    def writable_copy(self, source: Path, dest: Path) -> Stats | None:
        _, after = reflink.copy_tree(source, dest)
        return after

    def changed_inodes(self, copy: Path, reference: Path, source: Path
                       ) -> btrfs.Changed | None:
        return None  # each copy's files are new inodes


def _reflink_copy(folder: Path, dest: Path) -> Stats:
    """A read-only subvolume ``dest`` holding a copy of ``folder`` whose files share their
    blocks with the originals (a folder that is not a subvolume: made by hand, or by an older
    dm); returns the originals' stats."""
    btrfs.create_subvolume(dest)
    before, _ = reflink.copy_tree(folder, dest, into=True)
    btrfs.make_read_only(dest)
    return before


PLAIN = PlainFolders()
BTRFS = BtrfsFolders()
REFLINK = ReflinkFolders()
BACKENDS: dict[str, FolderBackend] = {"plain": PLAIN, "btrfs": BTRFS, "reflink": REFLINK}
