"""Reading a hub without cloning: ``dm list --remote``, ``dm log --remote``,
``dm branch --remote`` (the hub's JSON API, through remote/hubread.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dotmesh.errors import UsageError
from dotmesh.model.ids import ObjectId
from dotmesh.model.objects import Commit
from dotmesh.ops import remotes
from dotmesh.remote.hubread import DotSummary
from dotmesh.remote.transport import HubTransport
from dotmesh.store.repo import Repo

LOG_PAGE = 200  # commits asked for at once


@dataclass(frozen=True)
class RemoteLog:
    remote_dot: str
    commits: list[tuple[ObjectId, Commit]]


@contextmanager
def _hub(home: Repo, remote: str, given: str | None, dot: str | None
         ) -> Iterator[HubTransport]:
    """The hub ``remote`` at ``given`` (NAMESPACE/DOT), else at the dot that ``dot`` pushes
    to there (None: no dot, for the listing)."""
    r = remotes.get(home, remote)
    if r.kind != remotes.HUB:
        raise UsageError(f"--remote reads a hub, and {remote} is an S3 bucket: clone from it "
                         "instead (dm clone)")
    rdot = ""
    if given:
        rdot = remotes.check_remote_dot(r, given)
    elif dot is not None:
        rdot = remotes.remote_dot_for(home, r, dot, None)
    t = HubTransport(r.url, r.user, r.secret, rdot, r.verify())
    try:
        yield t
    finally:
        t.close()


def dots(home: Repo, remote: str) -> list[DotSummary]:
    """The dots the remote's user may read there."""
    with _hub(home, remote, None, None) as t:
        return t.list_dots()


def log(home: Repo, remote: str, given: str | None, dot: str | None, ref: str | None,
        limit: int | None = None) -> RemoteLog:
    """Commits from ``ref`` (default: the dot's default branch there), newest first, read a
    page at a time."""
    with _hub(home, remote, given, dot) as t:
        out: list[tuple[ObjectId, Commit]] = []
        after: ObjectId | None = None
        while limit is None or len(out) < limit:
            want = LOG_PAGE if limit is None else min(LOG_PAGE, limit - len(out))
            page, after = t.log(ref, want, after)
            out.extend(page)
            if after is None:
                break
        return RemoteLog(t.remote_dot, out)


def heads(home: Repo, remote: str, given: str | None, dot: str | None
          ) -> tuple[str, dict[str, ObjectId]]:
    """The remote dot's name there and its branches' heads."""
    with _hub(home, remote, given, dot) as t:
        return t.remote_dot, t.heads()
