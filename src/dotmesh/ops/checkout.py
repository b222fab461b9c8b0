"""``dm checkout``, ``dm checkout -b`` and ``dm reset --hard``.

Each branch keeps its own working folders, so a checkout parks the current ones and never loses
uncommitted work. A hard reset first stores the working state it is about to discard and records
it in the reflog, so a mistyped reset can always be undone.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from dotmesh.capture.stop import Stopped, stopped_for_restore
from dotmesh.errors import Conflict, DotmeshError, UsageError
from dotmesh.meta import refs
from dotmesh.meta.db import Tx
from dotmesh.meta.statcache import Encoded
from dotmesh.model.ids import ObjectId
from dotmesh.model.names import check_branch
from dotmesh.model.objects import KIND_COMMIT, Commit, is_dirty
from dotmesh.store.repo import Journal, Repo
from dotmesh.workdir import kept
from dotmesh.workdir.branches import (
    DotSnapshot,
    Progress,
    backend_of,
    finish_restore,
    freeze_set,
    materialize,
    recover,
    restore_folders,
    scan_frozen,
    scan_set_cached,
    snapshot_dot,
    snapshots_of,
    swap,
    working_set,
    writers_stopped,
)


@dataclass
class ResetResult:
    old: ObjectId | None
    new: ObjectId
    saved: ObjectId | None  # the discarded working state, when it differed from the old head
    stopped: Stopped  # what the reset stopped (dm restarts containers, not processes)
    kept_as: str | None = None  # the discarded working state, kept unread (moved aside)


def checkout(home: Repo, dot: str, branch: str, create: bool = False,
             progress: Progress | None = None, stop_writers: bool = False,
             start: str | None = None) -> tuple[bool, Stopped]:
    """Switch the dot to ``branch``; returns whether it moved, and the writers it stopped.
    ``create``: make it first, at ``start`` (any ref of the dot; default HEAD)."""
    check_branch(branch)
    if start is not None and not create:
        raise UsageError(f"a start point ({start}) is for a new branch: dm checkout -b "
                         f"{branch} {start}")
    with home.lock(dot, "checkout"):
        recover(home, dot)
        current = home.branch(dot)
        if not create and branch == current:
            return False, Stopped()
        # Bad requests fail before anything is stopped.
        if not create:
            home.head(dot, branch)
        else:
            home.check_new_branch(dot, branch)
            at = home.resolve(dot, start) if start is not None else home.head(dot, current)
        with stopped_for_restore(home.stable_folders(dot), dot, stop_writers,
                                 "switching branches") as stopped:
            writer = home.packs.writer()
            if create:
                # The branch exists only once its folders are built: a full disk leaves none.
                home.drop_parked(dot, branch)
                try:
                    materialize(home, dot, branch, at, writer, progress)
                    with Tx(home.conn) as tx:
                        home.add_branch(tx, dot, branch, at)
                        home.log_ref(tx, dot, branch, "branch", None, at, None,
                                     f"branched from {start or current}")
                except BaseException:  # no row: the folders built for it go too
                    home.drop_parked(dot, branch)
                    raise
            else:
                materialize(home, dot, branch, home.head(dot, branch), writer, progress)
            swap(home, dot, branch)
        return True, stopped


def reset(home: Repo, dot: str, ref: str, hard: bool = True,
          progress: Progress | None = None, stop_writers: bool = False) -> ResetResult:
    """``dm reset``: every reset is hard, with or without ``--hard`` (there is no index whose
    state a soft reset would keep; Dotmesh's ``dm reset REF`` worked the same way). Nothing is
    lost: the working state replaced is stored first."""
    del hard  # accepted for the command's sake: both spellings mean the same reset
    return reset_hard(home, dot, ref, progress, stop_writers)


def reset_hard(home: Repo, dot: str, ref: str, progress: Progress | None = None,
               stop_writers: bool = False, expect_old: bytes | None | bool = False,
               action: str = "reset", message: str | None = None) -> ResetResult:
    """Move the current branch to ``ref`` and make the working state match. ``expect_old``
    (unless False): fail if the branch is not at that head any more (a pull decided on it).

    The working state is stored first (nothing is lost; on a snapshot backend resetting to a
    kept state, a changed working set is itself kept, moved aside at the swap, and read only
    when asked for: see :class:`kept.Discarded`), then everything the target needs is read,
    verified and staged; only then is the restore journaled and the folders changed,
    and the branch moved and the reflog written once they hold the target. A kill in between
    is finished by the next command; a damaged object fails before any folder is touched."""
    with home.lock(dot, "reset"):
        recover(home, dot, finish=False)
        _supersede(home, dot)
        branch = home.branch(dot)
        old = home.head(dot, branch)
        if expect_old is not False and old != expect_old:
            raise Conflict(f"branch {branch} moved while this command ran; run it again")
        target_id = _target(home, dot, ref)
        home.commit(target_id)
        message = message or f"reset --hard {ref}"
        with stopped_for_restore(home.stable_folders(dot), dot, stop_writers, "a reset") as stopped:
            writer = home.packs.writer()
            cow = snapshots_of(home)
            staging: Path | None = None
            keep_as: str | None = None  # a name for the discarded state, kept unread
            keep_caches: dict[str, Encoded] = {}
            taken = time.time_ns()
            moves = cow is not None and cow.is_set(working_set(home, dot)) \
                and kept.folder(home, dot, target_id) is not None
            if moves:
                # To a kept state, a reset need not read or copy what it discards: with the
                # writers stopped the set holds still, so it is walked where it is, and if
                # any file changed, the set itself is kept (moved aside at the swap).
                found, keep_caches = scan_set_cached(home, dot, writer, taken)
                if found is None:
                    keep_as = kept.new_discarded_name()
                snap = found or DotSnapshot({}, {}, {})
            elif cow is not None:  # the working state is kept as a snapshot, too
                frozen = freeze_set(home, dot, cow, writers_stopped)
                staging = frozen.staging
                try:
                    snap = scan_frozen(home, dot, cow, frozen, writer, progress)
                except BaseException:
                    cow.discard(staging)
                    raise
            else:
                snap = snapshot_dot(home, dot, writer, progress)
            saved: ObjectId | None = None
            if keep_as is None and is_dirty(snap.roots, home.commit(old) if old else None):
                saved = writer.put(KIND_COMMIT, Commit(
                    parents=(old,) if old else (), subdots=snap.roots,
                    message=f"working state discarded by {action} to {ref}",
                    author=_author(), timestamp_ns=time.time_ns(), metadata={},
                ).encode())
            writer.flush()
            keep_replaced: Path | None = None  # where the swap moves the set it replaces
            if keep_as is not None:
                keep_replaced = kept.discarded_set(home, dot, keep_as)
            elif moves and saved is not None:  # stored from its stat caches alone (files
                staging = kept.begin(home, dot)  # deleted): the set is kept as its state
                keep_replaced = staging / kept.SET

            def journal() -> None:  # what is about to be discarded is named before it goes
                if keep_as is not None:  # a kill from here on: recover removes it until the row
                    kept.begin_discarded(home, dot, keep_as, keep_caches)
                with Tx(home.conn) as tx:
                    home.begin_restore(tx, dot, Journal("reset", branch, old, target_id, saved,
                                                        action, message))
                    if keep_as is not None:
                        refs.add_discarded(tx, dot, keep_as, branch, old, target_id, taken,
                                           _author(),
                                           f"working state discarded by {action} to {ref}")

            try:
                caches = restore_folders(home, dot, target_id, snap, writer, progress,
                                         journal, keep_replaced)
                with Tx(home.conn) as tx:
                    home.set_head(tx, dot, branch, old, target_id, action, saved, message)
                    refs.link_discarded(tx, dot, target_id)
                    for sub, cache in caches.items():
                        base = snap.caches.get(sub, {})
                        home.save_cache(tx, dot, branch, sub, base, cache)
                    home.end_restore(tx, dot)
            except BaseException:
                if cow is not None and staging is not None:
                    cow.discard(staging)
                raise
            if cow is not None:
                if keep_replaced is not None and staging is not None:
                    cow.seal(keep_replaced)  # the moved set, kept: written by nothing now
                kept.settle(home, dot, staging, saved or old,
                            {s: r.cache for s, r in snap.results.items()}, cow)
        return ResetResult(old, target_id, saved, stopped, keep_as)


def _author() -> str:
    from dotmesh.ops.commit import default_author  # and the capture code: only when needed

    return default_author()


def _target(home: Repo, dot: str, ref: str) -> ObjectId:
    """The commit ``ref`` names; a discarded state kept unread is read into one first."""
    if not kept.is_discarded_ref(ref):
        return home.resolve(dot, ref)  # only ever finds commits of this dot
    d = kept.find_discarded(home, dot, ref)
    stored = kept.store_discarded(home, dot, d, backend_of(home))
    target = stored or d.old
    if target is None:
        raise UsageError(f"{d.name} was the state of an empty branch: nothing to reset to")
    return target


def _supersede(home: Repo, dot: str) -> None:
    """A reset replaces a restore that a kill interrupted: its working state was saved and is
    named in the reflog, and the half-restored folders are saved by this reset in turn."""
    j = home.pending_restore(dot)
    if j is None:
        return

    def replaced(tx: sqlite3.Connection) -> None:
        home.log_ref(tx, dot, j.branch, f"{j.action} (interrupted)", j.old, j.target, j.saved,
                     f"{j.message}: interrupted, replaced by a later reset")
        refs.link_discarded(tx, dot, j.target)
        home.end_restore(tx, dot)

    moved = snapshots_of(home) is not None and (
        kept.moved_discarded(home, dot) or not working_set(home, dot).exists())
    if j.kind == "clone" or moved:
        # (a reset that had moved the working set away, into its discarded state: finished,
        # so that this one starts from a working set, not from none it would save as empty)
        try:
            finish_restore(home, dot)
            return
        except DotmeshError:  # it cannot be: the working set is put back, and replaced
            if j.kind == "clone":
                raise
            if kept.undo_discarding(home, dot, working_set(home, dot), backend_of(home),
                                    j.target, replaced):
                return
            if kept.moved_discarded(home, dot):
                raise  # a set that cannot be put back (the working set holds files)
            # no set was moved (a kill between the swap's renames): replaced, as before
    with Tx(home.conn) as tx:
        replaced(tx)
