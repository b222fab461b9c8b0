"""Run something on a named state, then put back exactly the state that was there before:
``with dot.at("bug-42"):`` in the Python API and the pytest plugin.

Both moves are resets, so each costs what ``dm reset --hard`` costs (on a plain folder, the
files that differ; on btrfs or XFS, a snapshot) and loses nothing: the working state found on
entry is saved as a reset saves it (a commit, or a kept snapshot read only if asked for), and
put back on exit; what the block left is saved the same way (``dm reflog`` lists both). The
branch ends where it was, at the head it had, with exactly the working state it had.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dotmesh.errors import Conflict, NotFound
from dotmesh.meta.db import Tx
from dotmesh.model.ids import ObjectId
from dotmesh.model.names import check_branch
from dotmesh.ops import checkout as checkout_ops
from dotmesh.ops import commit as commit_ops
from dotmesh.store.repo import Repo
from dotmesh.workdir.branches import Progress, recover


@dataclass
class Visit:
    """What ``at`` did, for the caller to report: where it went, what it saved."""

    ref: str
    target: ObjectId
    branch: str
    head: ObjectId
    entered: checkout_ops.ResetResult | None = None
    left: checkout_ops.ResetResult | None = None
    kept_on: str | None = None  # the branch the block's state was committed on (keep_on)
    notes: list[str] = field(default_factory=list)


@contextmanager
def at(home: Repo, dot: str, ref: str, stop_writers: bool = False,
       fetch: bool = True, progress: Progress | None = None) -> Iterator[Visit]:
    """Reset the dot's working state to ``ref`` (a tag, branch or commit; fetched from the
    default remote if it is not here and ``fetch``) for the block, then back. Call
    :func:`keep_on` inside the block to commit what it left on a branch before it goes."""
    branch = home.branch(dot)
    head = home.head(dot, branch)
    if head is None:
        raise NotFound(f"dot {dot!r} has no commit on {branch} to come back to: commit first")
    try:
        target = home.resolve(dot, ref)
    except NotFound:
        from dotmesh.ops import remotes, sync  # noqa: PLC0415 - network code, when needed

        if not fetch or remotes.default(home) is None:
            raise
        target = sync.fetch_ref(home, dot, ref)
    visit = Visit(ref, target, branch, head)
    visit.entered = checkout_ops.reset_hard(home, dot, target.hex(), progress, stop_writers,
                                            expect_old=head, action="at",
                                            message=f"at {ref}")
    try:
        yield visit
    finally:
        back = visit.entered.saved.hex() if visit.entered.saved else (
            visit.entered.kept_as or head.hex())
        if home.branch(dot) != branch:
            raise Conflict(f"dot {dot!r} moved to branch {home.branch(dot)} during "
                           f"at({ref}): {branch} stays at {ref}; dm checkout {branch} && "
                           f"dm reset --hard {back[:16]} brings back what it had")
        now = home.head(dot, branch)
        visit.left = checkout_ops.reset_hard(home, dot, back, progress, stop_writers,
                                             expect_old=now, action="at",
                                             message=f"back from {ref}")
        _restore_head(home, dot, branch, head, ref)


def keep_on(home: Repo, dot: str, visit: Visit, branch: str, message: str) -> ObjectId:
    """Commit the working state inside an ``at`` block on a new branch ``branch`` (the
    current branch is not moved by it): a failed test's state, to share with ``dm push``."""
    check_branch(branch)
    home.check_new_branch(dot, branch)
    res = commit_ops.commit(home, dot, message)
    with home.lock(dot, "at"):
        with Tx(home.conn) as tx:
            home.add_branch(tx, dot, branch, res.id)
            home.log_ref(tx, dot, branch, "branch", None, res.id, None, message)
    visit.kept_on = branch
    return res.id


def _restore_head(home: Repo, dot: str, branch: str, head: ObjectId, ref: str) -> None:
    """The exit's reset put back the working state; the branch goes back to its head (a
    move of the ref alone: the folders already hold what they held before)."""
    with home.lock(dot, "at"):
        recover(home, dot)
        now = home.head(dot, branch)
        if now == head:
            return
        if home.branch(dot) != branch or now is None:
            raise Conflict(f"dot {dot!r} moved to another branch during at({ref}): its "
                           f"branch {branch} stays where it is")  # a race: another dm
        with Tx(home.conn) as tx:
            home.set_head(tx, dot, branch, now, head, "at", None, f"back from {ref}")


__all__ = ["Visit", "at", "keep_on"]
