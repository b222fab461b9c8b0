"""The working state of a dot: snapshot all its subdots, finish interrupted branch swaps, and
build or swap the per-branch folders."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dotmesh.errors import DotmeshError, UsageError
from dotmesh.fs import btrfs, reflink, trash
from dotmesh.fs.btrfs import Changed
from dotmesh.fs.reflink import Stats
from dotmesh.meta import config, refs
from dotmesh.meta.db import Tx
from dotmesh.meta.statcache import Encoded, StatCache, decode_or_empty, encode_cache, largest_files
from dotmesh.model.ids import ObjectId, object_id
from dotmesh.model.objects import EMPTY_TREE, KIND_TREE, Commit, Root
from dotmesh.store.packs import PackWriter
from dotmesh.store.repo import Repo
from dotmesh.workdir import kept
from dotmesh.workdir.backend import BACKENDS, PLAIN, FolderBackend, SnapshotBackend

if TYPE_CHECKING:
    from dotmesh.capture.changes import Changes, ChangeWatcher
    from dotmesh.workdir.restore import Policy, Prepared, RestoreResult
    from dotmesh.workdir.snapshot import Reference, SnapshotResult

# The restore, the scan and inotify are imported by the functions that use them, so a command
# that only reads the store (dm version, dm log) does not load them.

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

    @property
    def looked_at(self) -> int:
        return sum(r.looked_at for r in self.results.values())


BACKEND_SETTING = "backend"


def backend_of(home: Repo) -> FolderBackend:
    """The store's folder backend: chosen by ``dm init --backend``, else from where the store
    is when a command first needs it (see :func:`choose`)."""
    name = config.setting(home.conn, BACKEND_SETTING) or choose(home, None)
    return BACKENDS.get(name, PLAIN)


def snapshots_of(home: Repo) -> SnapshotBackend | None:
    """The store's backend if it snapshots folders in constant time."""
    backend = backend_of(home)
    return cast(SnapshotBackend, backend) if hasattr(backend, "freeze_copy") else None


def detect(dots: Path) -> str:
    """The backend a store gets by default: btrfs where its dots' folders (``dots``) are on
    btrfs (the store is, or its pool is mounted there)."""
    if btrfs.on_btrfs(dots):
        return "btrfs"
    if btrfs.fs_magic(dots) == btrfs.XFS_SUPER_MAGIC:
        probe = dots
        while not probe.is_dir():  # a store not made yet: where it will be
            probe = probe.parent
        if reflink.supported(probe):
            return "reflink"
    return "plain"


def choose(home: Repo, name: str | None) -> str:
    """Set the store's backend (``name``, or detected) unless it has one; returns it. A
    store's backend is fixed once it has a dot: its folders were made for it."""
    current = config.setting(home.conn, BACKEND_SETTING)
    wanted = name or detect(home.root / "dots")
    if name is not None and name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "reflink" and detect(home.root / "dots") == "plain":
        raise UsageError(f"the reflink backend needs the dots' folders on a filesystem that "
                         f"shares blocks (XFS made with reflink=1); {home.root} is not")
    if name == "btrfs" and not btrfs.on_btrfs(home.root / "dots"):
        raise UsageError(f"the btrfs backend needs the dots' folders on btrfs; {home.root} is "
                         "not (dm pool create makes a btrfs pool in a file)")
    if current is None or (current != wanted and name is not None and not home.dots()):
        with Tx(home.conn) as tx:
            config.set_setting(tx, BACKEND_SETTING, wanted)
        return wanted
    if name is not None and current != name:
        raise UsageError(f"this store uses the {current} backend, chosen when its first dot "
                           f"was made; a store of another backend needs another --home")
    return current


def working_set(home: Repo, dot: str) -> Path:
    """The folder of the current branch's subdot folders (one subvolume on btrfs)."""
    return home.dot_dir(dot) / "subdots"


def _set_mode(home: Repo, dot: str) -> SnapshotBackend | None:
    """The store's snapshot backend if this dot's working set is one it copies whole (a
    working set of an older layout is handled subdot by subdot, as plain folders are)."""
    cow = snapshots_of(home)
    ws = working_set(home, dot)
    if cow is None:
        return None
    if ws.exists() and not cow.is_set(ws):
        cow.make_set(ws)  # an empty folder (a new dot's) becomes a set
        if not cow.is_set(ws):
            return None
    return cow


def make_stable(home: Repo, dot: str, subdot: str) -> Path:
    """The one place a subdot's stable folder (where apps see its data) comes into being."""
    folder = home.stable(dot, subdot)
    cow = snapshots_of(home)
    if cow is not None:
        cow.make_set(working_set(home, dot))
        folder.mkdir(exist_ok=True, mode=0o755)
    else:
        backend_of(home).make(folder)
    return folder


def make_working_set(home: Repo, dot: str) -> Path:
    """The dot's working set (its subdot folders' folder: ``DOT.__root__`` as a Docker
    volume), made if missing, as a set on a snapshot backend."""
    ws = working_set(home, dot)
    cow = snapshots_of(home)
    if cow is not None:
        cow.make_set(ws)
    else:
        ws.mkdir(parents=True, exist_ok=True)
    return ws


def ensure_folders(home: Repo, dot: str) -> None:
    for sub in home.subdots(dot):
        make_stable(home, dot, sub)


def snapshot_dot(home: Repo, dot: str, writer: PackWriter | None,
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
    backend = backend_of(home)
    snap = DotSnapshot({}, {}, {})
    for sub in home.subdots(dot):
        top = home.stable(dot, sub)
        watch = watcher.watcher(sub, str(top)) if watcher else None
        if after is not None and sub in after.results:
            prev = after.results[sub]
            if changes is not None:
                from dotmesh.capture.changes import Changes

                ch = changes.get(sub) or Changes()
                res = backend.update(top, home.packs, writer, prev, ch.names, ch.fresh,
                                     progress, defer, watch)
            else:
                res = backend.snapshot(top, home.packs, writer, prev.cache, progress, defer,
                                       watch)
            snap.roots[sub], snap.results[sub], snap.caches[sub] = res.root, res, \
                after.caches[sub]
            continue
        cache = home.load_cache(dot, branch, sub)
        res = backend.snapshot(top, home.packs, writer, cache, progress, watch=watch)
        snap.roots[sub], snap.results[sub], snap.caches[sub] = res.root, res, cache
    return snap


def save_caches(home: Repo, c: sqlite3.Connection, dot: str, branch: str,
                snap: DotSnapshot) -> None:
    for sub, res in snap.results.items():
        home.save_cache(c, dot, branch, sub, snap.caches[sub], res.cache)


def empty_root(writer: PackWriter | None) -> Root:
    data = EMPTY_TREE.encode()
    oid = writer.put(KIND_TREE, data) if writer else object_id(data)
    return Root(oid, 0o755, os.getuid(), os.getgid(), time.time_ns())


def target_roots(home: Repo, dot: str, commit: Commit | None,
                 writer: PackWriter) -> dict[str, Root]:
    """What each subdot should hold for ``commit``; subdots it lacks become empty."""
    roots = dict(commit.subdots) if commit else {}
    for sub in roots:
        home.add_subdot(dot, sub)
    for sub in home.subdots(dot):
        if sub not in roots:  # (not setdefault: that would store an empty tree every time)
            roots[sub] = empty_root(writer)
    return roots


def policy_for(home: Repo, dot: str, commit: bytes | None) -> Policy:
    """States that came from a remote are restored as tar restores a stranger's archive (no
    setuid bits, the umask applied, files owned by whoever runs dm), unless the dot was
    cloned or pulled with ``--same-owner``."""
    from dotmesh.workdir.restore import Policy

    if commit is None or not home.is_fetched(commit):
        return Policy()
    return Policy() if home.dot_option(dot, "same_owner") == "1" else Policy.for_stranger()


def restore_folders(home: Repo, dot: str, target: ObjectId, snap: DotSnapshot,
                    writer: PackWriter, progress: Progress | None = None,
                    before_touching: Callable[[], None] | None = None,
                    keep_replaced: Path | None = None) -> dict[str, StatCache | Encoded]:
    """Make the stable folders hold ``target`` (``snap``: what they hold now); returns each
    subdot's new stat cache.

    Every subdot is prepared first: its data read, verified and staged, folders that do not
    exist built aside. Only then (after ``before_touching``, which journals the restore) is
    any folder changed, so a damaged object leaves every folder as it was.
    ``keep_replaced``: where a working set swapped out whole goes instead of the trash (a
    reset's discarded state, named by the journal; a snapshot backend only)."""
    from dotmesh.workdir.restore import merge_cache

    roots = target_roots(home, dot, home.commit(target), writer)
    writer.flush()
    policy = policy_for(home, dot, target)
    backend = backend_of(home)
    cow = _set_mode(home, dot)
    if cow is not None:
        return _restore_set(home, dot, cow, target, roots, policy, snap, progress,
                            before_touching, keep_replaced)
    assert keep_replaced is None, "only a working set swapped whole is kept when replaced"
    staged: dict[str, Prepared] = {}
    built: dict[str, tuple[Path, RestoreResult]] = {}
    scratches: list[Path] = []
    try:
        for sub, root in roots.items():
            top = home.stable(dot, sub)
            scratch = home.scratch(dot) / uuid.uuid4().hex
            scratches.append(scratch)
            if top.is_dir() and sub in snap.roots:
                staged[sub] = backend.prepare_restore(top, home.packs, root, snap.roots[sub],
                                                      scratch, policy, progress,
                                                      snap.results[sub].cache)
            else:
                built[sub] = (scratch, backend.build_aside(scratch, home.packs, root, policy,
                                                           progress))
    except BaseException:
        for p in staged.values():
            p.abort()
        for tmp in scratches:  # a half-built folder (a full disk) goes at once
            backend.discard(tmp)
        raise
    if before_touching is not None:
        before_touching()
    caches: dict[str, StatCache | Encoded] = {}
    for sub, prepared in staged.items():
        base = snap.results[sub].cache if sub in snap.results else {}
        caches[sub] = merge_cache(base, prepared.apply())
    for sub, (tmp, res) in built.items():
        backend.swap_in(tmp, home.stable(dot, sub))
        caches[sub] = merge_cache({}, res)
    return caches


def materialize(home: Repo, dot: str, branch: str, commit: ObjectId | None, writer: PackWriter,
                progress: Progress | None = None) -> None:
    """Build the parked folders of ``branch`` from ``commit`` (built aside, then renamed in)."""
    roots = target_roots(home, dot, home.commit(commit) if commit else None, writer)
    writer.flush()
    backend = backend_of(home)
    cow = _set_mode(home, dot)
    if cow is not None:
        _materialize_set(home, dot, cow, branch, commit, roots, progress)
        return
    from dotmesh.workdir.restore import merge_cache

    policy = policy_for(home, dot, commit)
    for sub, root in roots.items():
        final = home.parked(dot, branch, sub)
        if final.exists():
            continue
        tmp = home.scratch(dot) / uuid.uuid4().hex
        try:
            cache = merge_cache({}, backend.build_aside(tmp, home.packs, root, policy,
                                                        progress))
        except BaseException:
            backend.discard(tmp)
            raise
        with Tx(home.conn) as c:
            home.save_cache(c, dot, branch, sub, home.load_cache(dot, branch, sub), cache)
        (home.dot_dir(dot) / "branches").mkdir(mode=0o700, exist_ok=True)
        final.parent.mkdir(exist_ok=True, mode=0o700)
        backend.swap_in(tmp, final)


def finish_restore(home: Repo, dot: str, progress: Progress | None = None) -> bool:
    """Finish a journaled restore that a killed dm left (a reset, a pull, a clone): the
    folders are made to hold its target, then the branch moves. Returns whether there was one."""
    j = home.pending_restore(dot)
    if j is None:
        return False
    try:
        writer = home.packs.writer()
        snap = snapshot_dot(home, dot, writer, progress)
        caches = restore_folders(home, dot, j.target, snap, writer, progress)
        with Tx(home.conn) as tx:
            head = home.head(dot, j.branch)
            message = f"{j.message} (finished after an interruption)"
            if head != j.target:
                home.set_head(tx, dot, j.branch, j.old, j.target, j.action, j.saved, message,
                              logged=j.kind != "clone")
            elif j.kind != "clone":
                home.log_ref(tx, dot, j.branch, j.action, j.old, j.target, j.saved, message)
            refs.link_discarded(tx, dot, j.target)
            for sub, cache in caches.items():
                home.save_cache(tx, dot, j.branch, sub, snap.caches.get(sub, {}), cache)
            home.end_restore(tx, dot)
    except DotmeshError as e:
        back = j.saved or j.old
        way = (f"dm reset --hard {back.hex()[:12]} puts back the state from before it"
               if back and j.kind != "clone" else
               f"dm dot delete -f {dot} and clone it again")
        raise type(e)(f"dot {dot!r} has an unfinished {j.action} to {j.target.hex()[:12]} "
                      f"that cannot be finished: {e}. {way}") from None
    return True


def swap(home: Repo, dot: str, to_branch: str) -> None:
    """Park the current branch's folders and bring ``to_branch``'s in, crash-safely."""
    from_branch = home.branch(dot)
    with Tx(home.conn) as c:
        refs.begin_swap(c, dot, from_branch, to_branch)
    settle(home, dot)


def settle(home: Repo, dot: str) -> None:
    """Finish a swap that a killed dm left half done (always rolls forward)."""
    pending = refs.pending_swap(home.conn, dot)
    if pending is None:
        return
    from_branch, to_branch = pending
    backend = backend_of(home)
    cow = _set_mode(home, dot)
    if cow is not None:  # the working set moves whole
        stable, old, new = (working_set(home, dot), home.parked_set(dot, from_branch),
                            home.parked_set(dot, to_branch))
        if stable.exists() and not old.exists() and new.exists():
            old.parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(stable, old)
        if not stable.exists():
            if new.exists():
                os.rename(new, stable)
            else:
                cow.make_set(stable)
    for sub in home.subdots(dot):
        stable = home.stable(dot, sub)
        old, new = home.parked(dot, from_branch, sub), home.parked(dot, to_branch, sub)
        if stable.exists() and not old.exists() and new.exists():
            (home.dot_dir(dot) / "branches").mkdir(mode=0o700, exist_ok=True)
            old.parent.mkdir(exist_ok=True, mode=0o700)
            backend.swap_in(stable, old)
        if not stable.exists():
            if new.exists():
                backend.swap_in(new, stable)
            else:
                make_stable(home, dot, sub)
    with Tx(home.conn) as c:
        refs.end_swap(c, dot, to_branch)
    leftover = home.parked_set(dot, to_branch)
    if leftover.exists() and not any(leftover.iterdir()):
        leftover.rmdir()


def recover(home: Repo, dot: str, finish: bool = True) -> None:
    """Run under the dot's lock before any change: finish swaps, drop half-built folders,
    and (``finish``) finish a journaled restore."""
    settle(home, dot)
    backend = backend_of(home)
    backend.discard(home.dot_dir(dot) / "tmp")
    trash.recover(home.trash(dot))
    kept.recover(home, dot, backend)
    kept.finish_discarding(home, dot, working_set(home, dot))
    parked = home.dot_dir(dot) / "branches"
    for folder in [working_set(home, dot), *(parked.iterdir() if parked.is_dir() else [])]:
        if folder.is_dir():  # what a killed build inside a set left
            for entry in os.scandir(folder):
                if entry.name.startswith(BUILDING):
                    backend.discard(Path(entry.path))
    if finish:
        finish_restore(home, dot)


def _for_encoded_copy(cache: Encoded, made: Stats | None) -> StatCache | Encoded:
    """:func:`_for_copy` of a cache as stored: passed on as it is for a snapshot."""
    return cache if made is None else _for_copy(decode_or_empty(cache), made)


def _for_copy(cache: StatCache, made: Stats | None) -> StatCache:
    """A stat cache, for a writable copy of its folder: as is for a snapshot (same
    inodes); for a reflinked copy (new inodes), each entry moved to its new file's stat."""
    if made is None:
        return cache
    out: StatCache = {}
    for rel, entry in cache.items():
        st = made.get(rel)
        if st is not None and st.st_size == entry[0] and st.st_mtime_ns == entry[1]:
            out[rel] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, entry[4],
                        entry[5])
    return out


@dataclass
class Frozen:
    """A dot's working set copied read-only in a freeze (``staging``, see :func:`kept.begin`):
    when (``taken``), and each subdot's files' stats where the copy has new inodes."""

    staging: Path
    taken: int
    subdots: list[str]
    copied: dict[str, Stats | None]
    whole: bool  # the working set was copied in one piece (not an older layout's subdots)

    def folder(self, sub: str) -> Path:
        return self.staging / kept.SET / sub


Settle = Callable[[], None]  # run last before writers stop: writes out what they dirtied
Freezer = Callable[[Settle], AbstractContextManager[Any]]  # stops the writers for its block


@contextmanager
def _settled(settle: Settle) -> Iterator[None]:
    """No writers to stop: only settle."""
    settle()
    yield


@contextmanager
def writers_stopped(settle: Settle) -> Iterator[None]:
    """For a command that stopped or refused every writer first (a reset, a checkout): no
    settling, since nothing writes meanwhile; the snapshot writes out what is dirty itself,
    in one btrfs transaction instead of two."""
    yield


def freeze_set(home: Repo, dot: str, cow: SnapshotBackend, freeze: Freezer = _settled,
               before_settle: Callable[[], None] | None = None) -> Frozen:
    """Copy every subdot read-only inside ``freeze`` (milliseconds, whatever the writers did).
    ``before_settle``: run before the disk is settled for writers to be stopped, if any
    are."""
    ensure_folders(home, dot)
    subs = home.subdots(dot)
    staging = kept.begin(home, dot)
    try:
        copied: dict[str, Stats | None] = {}
        whole = cow.is_set(working_set(home, dot))
        into = staging / kept.SET
        # a reflinked tree is copied first and only brought up to date in the freeze
        pre = None
        if whole and not cow.instant_copies:  # a copy's files may be links to the head's state
            earlier = kept.earlier_copy(home, dot, home.head(dot, home.branch(dot)))
            pre = cow.prepare_copy(working_set(home, dot), into, earlier)

        def settle() -> None:  # run by the freezer just before it stops writers, if any
            if before_settle is not None:
                before_settle()
            if pre is not None and pre.ahead is not None:
                pre.ahead()
            _quiet_disk(home.dot_dir(dot))

        with freeze(settle):
            taken = time.time_ns()
            if whole:  # one call: one instant, one btrfs transaction
                made = cow.freeze_copy(working_set(home, dot), into, pre)
                copied = {sub: _within(made, sub) for sub in subs}
            else:  # an older layout: subdot by subdot
                into.mkdir()
                for sub in subs:
                    copied[sub] = cow.freeze_copy(home.stable(dot, sub), into / sub)
    except BaseException:
        cow.discard(staging)
        raise
    return Frozen(staging, taken, subs, copied, whole)


def _quiet_disk(path: Path, rounds: int = 8, short: float = 0.005) -> None:
    """Write out what the writers dirtied, again while rounds get shorter: the snapshot in
    the freeze (which must write what is dirty first) then writes only what they dirtied
    in the last round's few milliseconds, not since the command started. Under a steady
    writer the rounds settle at what it dirties in one round; more would not shorten the
    freeze."""
    last = float("inf")
    for _ in range(rounds):
        started = time.monotonic()
        btrfs.syncfs(path)
        took = time.monotonic() - started
        if took < short or took > 0.9 * last:
            return
        last = took


def scan_set_cached(home: Repo, dot: str, writer: PackWriter | None, taken_ns: int
                    ) -> tuple[DotSnapshot | None, dict[str, Encoded]]:
    """The working set's state if its stat caches vouch for every file (one walk, no file
    read), else None; and the caches, as stored. For a command whose writers are stopped (a
    reset): the set then holds still, so it is walked where it is, not copied first."""
    from dotmesh.workdir import snapshot as scan

    ensure_folders(home, dot)
    branch = home.branch(dot)
    none = Encoded(encode_cache({}))  # every subdot is named, with no cache row too
    encoded = {sub: home.load_encoded_cache(dot, branch, sub) or none
               for sub in home.subdots(dot)}
    for sub, blob in encoded.items():  # a changed state is mostly told from its largest files
        if not scan.largest_unchanged(home.stable(dot, sub), largest_files(blob, 16)):
            return None, encoded
    snap = DotSnapshot({}, {}, {})
    for sub, blob in encoded.items():
        cache = decode_or_empty(blob)
        got = scan.snapshot_cached(home.stable(dot, sub), home.packs, writer, cache, taken_ns)
        if got is None:
            return None, encoded
        snap.roots[sub], snap.results[sub], snap.caches[sub] = got.root, got, cache
    return snap, encoded


def scan_frozen(home: Repo, dot: str, cow: SnapshotBackend, frozen: Frozen,
                writer: PackWriter | None, progress: Progress | None = None,
                ahead: Ahead | None = None) -> DotSnapshot:
    """Scan a frozen copy: a paged file is read only where its blocks are not shared with the
    head's kept state. ``ahead``: what :func:`look_ahead` prepared before the freeze."""
    from dotmesh.workdir.snapshot import since_reference

    if ahead is None:
        ahead = look_ahead(home, dot, cow, frozen.subdots, warm=False)
    for sub in frozen.subdots:  # every subdot's reads start before the first walk
        reference = ahead[sub][1]
        if reference is not None:
            reference.read_ahead(home.packs, writer, frozen.folder(sub))
    snap = DotSnapshot({}, {}, {})
    source = working_set(home, dot)
    told: dict[tuple[Path, Path], Changed | None] = {}  # a whole set's is asked once
    for sub in frozen.subdots:
        cache, reference = ahead[sub]
        res = None
        if reference is not None and frozen.copied[sub] is None:  # a true snapshot
            pair = ((frozen.staging, reference.folder.parent) if frozen.whole
                    else (frozen.folder(sub), reference.folder))
            if pair not in told:
                told[pair] = cow.changed_inodes(
                    frozen.folder(sub), reference.folder,
                    source if frozen.whole else home.stable(dot, sub))
            changed = told[pair]
            if changed is not None:  # only what changed is looked at (no walk)
                res = since_reference(frozen.folder(sub), home.packs, writer, cache,
                                      reference, changed.inodes, frozen.taken, progress,
                                      changed.where(frozen.folder(sub)))
        if res is None:
            res = cow.snapshot(frozen.folder(sub), home.packs, writer, cache, progress,
                               reference=reference, taken_ns=frozen.taken,
                               stats=frozen.copied[sub])
        snap.roots[sub], snap.results[sub], snap.caches[sub] = res.root, res, cache
    return snap


# Each subdot's stat cache and the head's kept state of it to compare with (if any)
Ahead = dict[str, "tuple[StatCache, Reference | None]"]


def look_ahead(home: Repo, dot: str, cow: SnapshotBackend, subs: list[str],
               warm: bool = True, live: bool = False) -> Ahead:
    """Each subdot's stat cache and reference (the head's kept state of it). With ``warm``,
    the reference's side of the comparisons of the paged files that changed is read on the
    I/O pool meanwhile: before a freeze, it runs while the snapshot is being taken. With
    ``live`` (no writer is known to run), changed pages may be read from the working files
    (see :func:`snapshot._patch_live`)."""
    from dotmesh.workdir.snapshot import Reference, changed_paged

    branch = home.branch(dot)
    head = home.head(dot, branch)
    state = kept.folder(home, dot, head)
    before = home.commit(head) if head is not None and state is not None else None
    out: Ahead = {}
    try:
        for sub in subs:
            cache = home.load_cache(dot, branch, sub)
            reference = None
            if before is not None and state is not None and sub in before.subdots \
                    and kept.sub_path(state, sub).is_dir():
                # a true snapshot's files are the working files' inodes: their pages in
                # memory may be read instead, where the extents prove them unchanged
                reference = Reference(kept.sub_path(state, sub), before.subdots[sub].tree,
                                      live=home.stable(dot, sub)
                                      if live and cow.instant_copies else None)
                if warm:
                    reference.warm(home.packs, changed_paged(home.stable(dot, sub), cache))
                    reference.warm_trees(home.packs)
            out[sub] = cache, reference
    except BaseException:  # what a subdot before started must not outlive the command
        _settle_ahead(out)
        raise
    return out


def _wait_ahead(ahead: Ahead) -> None:
    """Wait until what was started ahead has ended (its results are kept)."""
    for _, reference in ahead.values():
        if reference is not None:
            reference.wait()


def _settle_ahead(ahead: Ahead) -> None:
    for _, reference in ahead.values():
        if reference is not None:
            reference.settle()


def snapshot_dot_frozen(home: Repo, dot: str, cow: SnapshotBackend, writer: PackWriter,
                        progress: Progress | None = None, freeze: Freezer = _settled,
                        quiet: bool = False) -> tuple[Path, DotSnapshot]:
    """:func:`freeze_set`, then :func:`scan_frozen`. Returns the snapshots' folder (for
    :func:`kept.keep` once the commit exists) and what they hold. ``quiet``: no writer is
    known to run (changed pages may then be read from the working files, which writers
    would make a wasted read)."""
    ahead = look_ahead(home, dot, cow, home.subdots(dot), live=quiet)
    try:
        # with writers to stop, what was started ahead ends before the disk is settled: in
        # the freeze, the snapshot must not wait for the GIL
        frozen = freeze_set(home, dot, cow, freeze, lambda: _wait_ahead(ahead))
        try:
            snap = scan_frozen(home, dot, cow, frozen, writer, progress, ahead=ahead)
        except BaseException:
            cow.discard(frozen.staging)
            raise
    finally:
        _settle_ahead(ahead)
    return frozen.staging, snap


BUILDING = ".dm-"  # a folder being built or staged inside a working set


def _within(stats: Stats | None, sub: str) -> Stats | None:
    """A working set copy's file stats, for one subdot (paths relative to its folder)."""
    if stats is None:
        return None
    prefix = os.fsencode(sub) + b"/"
    return {rel[len(prefix):]: st for rel, st in stats.items() if rel.startswith(prefix)}


def _restore_set(home: Repo, dot: str, cow: SnapshotBackend, target: ObjectId,
                 roots: dict[str, Root], policy: Policy, snap: DotSnapshot,
                 progress: Progress | None,
                 before_touching: Callable[[], None] | None,
                 keep_replaced: Path | None = None) -> dict[str, StatCache | Encoded]:
    """:func:`restore_folders` for a working set copied whole: a new set is made aside (a
    writable copy of the target's kept state, else of the current set, patched), every
    subdot folder in it made to hold the target, then the sets are swapped by two renames.
    The current set is not touched until the swap, so a kill leaves it or the new one. The
    set replaced goes to the trash, or to ``keep_replaced``."""
    from dotmesh.workdir.restore import merge_cache

    state = kept.folder(home, dot, target)
    new = home.scratch(dot) / uuid.uuid4().hex
    staged: dict[str, Prepared] = {}
    seen: dict[str, StatCache] = {}  # what each staged folder holds, by its own files' stats
    built: dict[str, RestoreResult] = {}
    caches: dict[str, StatCache | Encoded] = {}
    try:
        if state is not None:
            made = cow.writable_copy(state / kept.SET, new)  # shares every block
            state_caches = kept.encoded_caches(home, dot, target)
        else:
            made = cow.writable_copy(working_set(home, dot), new)
            state_caches = {}
        for sub, root in roots.items():
            folder = new / sub
            if state is not None and sub in state_caches and folder.is_dir():
                caches[sub] = _for_encoded_copy(state_caches[sub], _within(made, sub))
            elif state is None and folder.is_dir() and sub in snap.roots:
                # a copy's files are new inodes: judged by theirs (None: the same inodes)
                seen[sub] = _for_copy(snap.results[sub].cache, _within(made, sub))
                staged[sub] = cow.prepare_restore(folder, home.packs, root, snap.roots[sub],
                                                  new / f"{BUILDING}staging-{sub}", policy,
                                                  progress, seen[sub])
            else:
                if folder.exists():
                    cow.discard(folder)
                aside = new / f"{BUILDING}build-{sub}"
                built[sub] = cow.build_aside(aside, home.packs, root, policy, progress)
    except BaseException:
        for p in staged.values():
            p.abort()
        cow.discard(new)
        raise
    if before_touching is not None:
        before_touching()
    for sub, prepared in staged.items():
        caches[sub] = merge_cache(seen[sub], prepared.apply())
    for sub, res in built.items():
        os.rename(new / f"{BUILDING}build-{sub}", new / sub)
        caches[sub] = merge_cache({}, res)
    ws = working_set(home, dot)
    old = keep_replaced or home.scratch(dot) / uuid.uuid4().hex
    if ws.exists():
        os.rename(ws, old)  # a kill from here on: the journal finishes the restore
    os.rename(new, ws)
    if keep_replaced is None:
        home.throw_away(dot, old)  # a copy of nothing now: the reset need not wait
    if os.statvfs(home.root).f_fsid != os.statvfs(home.dot_dir(dot)).f_fsid:
        # The store's database is elsewhere (dots/ is a pool, or a mount): its fsync will
        # not write the renames, so the folder is fsync'd (on btrfs, a commit of the pool's
        # transaction, which a subvolume's rename requires; on XFS, a log force).
        kept.sync_dir(home.dot_dir(dot))
    return caches


def _materialize_set(home: Repo, dot: str, cow: SnapshotBackend, branch: str,
                     commit: ObjectId | None, roots: dict[str, Root],
                     progress: Progress | None) -> None:
    """:func:`materialize` for a working set copied whole: the branch's parked set is a
    writable copy of the commit's kept state (no data copied) or a new set; the subdot
    folders it lacks are built inside it, then renamed into place."""
    parked = home.parked_set(dot, branch)
    state = kept.folder(home, dot, commit)
    state_caches = kept.encoded_caches(home, dot, commit) if state is not None and commit \
        else {}
    made: Stats | None = None
    if not parked.exists():
        tmp = home.scratch(dot) / uuid.uuid4().hex
        try:
            if state is not None:
                made = cow.writable_copy(state / kept.SET, tmp)
            else:
                cow.make_set(tmp)
                state_caches = {}
        except BaseException:
            cow.discard(tmp)
            raise
        parked.parent.mkdir(mode=0o700, exist_ok=True)
        os.rename(tmp, parked)
    else:
        state_caches = {}
    for sub, root in roots.items():
        final = parked / sub
        if final.exists():
            if sub in state_caches:
                with Tx(home.conn) as c:
                    home.save_cache(c, dot, branch, sub, home.load_cache(dot, branch, sub),
                                    _for_encoded_copy(state_caches[sub], _within(made, sub)))
            continue
        aside = parked / f"{BUILDING}build-{uuid.uuid4().hex}"
        try:
            from dotmesh.workdir.restore import merge_cache  # only for what a state lacks

            cache = merge_cache({}, cow.build_aside(aside, home.packs, root,
                                                    policy_for(home, dot, commit), progress))
        except BaseException:
            cow.discard(aside)
            raise
        with Tx(home.conn) as c:
            home.save_cache(c, dot, branch, sub, home.load_cache(dot, branch, sub), cache)
        os.rename(aside, final)
