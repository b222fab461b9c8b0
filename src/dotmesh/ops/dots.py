"""Dots and subdots: ``dm init``, ``dm switch``, ``dm path``, ``dm list``, ``dm dot show``,
``dm dot delete``."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dotmesh.errors import Conflict, NotFound, UsageError
from dotmesh.fs import trash
from dotmesh.meta import config, refs
from dotmesh.model.ids import ObjectId
from dotmesh.model.names import VolumeName, check_name
from dotmesh.model.objects import is_dirty
from dotmesh.ops import history
from dotmesh.store.repo import Repo
from dotmesh.workdir import kept
from dotmesh.workdir.branches import backend_of, choose, detect, make_stable, recover, snapshot_dot

if TYPE_CHECKING:
    from dotmesh.capture.containers import Container
    from dotmesh.capture.stop import Stopped
    from dotmesh.capture.writers import Writer

# What uses a dot (capture/*: /proc, the Docker engine) is looked up by the functions that
# need it, not by every command that imports this module.


def init(home: Repo, dot: str, backend: str | None = None) -> bool:
    """Create ``dot``; returns True if it became the current dot (there was none).
    ``backend``: the store's folder backend, which only a store without dots can choose."""
    check_name(dot, "dot name")
    if backend is not None:
        choose(home, backend)
    home.create_dot(dot)
    if home.current_dot() is None:
        home.set_current_dot(dot)
        return True
    return False


def store_backend(root: Path) -> str:
    """The backend of the store at ``root`` (without making one): its setting, or what a
    store made there would get."""
    if (root / "meta.db").exists():
        home = Repo(root)
        try:
            return backend_of(home).name
        finally:
            home.close()
    return detect(root / "dots")


def switch(home: Repo, dot: str) -> None:
    home.require_dot(dot)
    home.set_current_dot(dot)


def path(home: Repo, name: str, owner: str | None = None) -> Path:
    """The stable folder of ``DOT[.SUBDOT]``, adding the subdot to the dot if it is new.
    The dot must exist: a typo must not make one (dm init does). ``owner`` (``USER`` or
    ``USER:GROUP``): the folder is given to that user, who must be able to reach it."""
    vol = VolumeName.parse(name)
    home.require_dot(vol.dot)
    ids = _user_ids(owner) if owner is not None else None
    with home.lock(vol.dot, "path"):
        recover(home, vol.dot)
        home.add_subdot(vol.dot, vol.subdot)
        folder = make_stable(home, vol.dot, vol.subdot)
    if ids is not None:
        os.chown(folder, *ids)
        closed = [p for p in folder.parents if not _passable(p, *ids)]
        if closed:
            raise UsageError(f"{folder} is {owner}'s now, but {owner} cannot reach it: "
                             f"{closed[0]} is closed to it (chmod o+x {closed[0]}, or keep "
                             "the store elsewhere with DM_HOME)")
    return folder


def _user_ids(owner: str) -> tuple[int, int]:
    """``USER[:GROUP]`` as (uid, gid), the user's own group by default. Only root gives a
    folder to another user."""
    import grp
    import pwd

    user, _, group = owner.partition(":")
    try:
        pw = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError:
        raise NotFound(f"no such user or group: {owner!r}") from None
    if os.geteuid() != 0 and pw.pw_uid != os.geteuid():
        raise UsageError(f"only root can give a folder to another user ({owner})")
    return pw.pw_uid, gid


def _passable(folder: Path, uid: int, gid: int) -> bool:
    """Whether ``uid`` (with group ``gid``) may pass through ``folder`` (by its mode bits:
    other groups the user is in are not counted, so this may say no where it could)."""
    st = folder.stat()
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def delete(home: Repo, dot: str, force: bool, stop_writers: bool = False) -> Stopped:
    """Forget the dot and remove its folders. Refused while processes or containers use it
    (they would be left on folders that are gone), unless ``stop_writers``: then they are
    stopped, and not started again. Returns what was stopped."""
    from dotmesh.capture.containers import stop as stop_containers
    from dotmesh.capture.stop import Stopped, active_containers, stop_processes
    from dotmesh.capture.writers import find_writers

    home.require_dot(dot)
    if not force:
        raise UsageError(f"deleting dot {dot!r} removes its data and history: add -f to confirm")
    mounted = [str(r[0]) for r in refs.view_rows(home.conn, dot)]
    if mounted:
        raise Conflict(f"dot {dot!r} has a commit mounted at {mounted[0]}: dm umount "
                       f"{mounted[0]} first")
    with home.lock(dot, "dot delete"):
        processes = find_writers(home.stable_folders(dot))
        containers = active_containers(dot)
        mounts = config.mount_count(home.conn, dot)
        users = [*map(str, processes), *map(str, containers)]
        if mounts and not containers:
            users.append(f"{mounts} Docker mount(s) of its volumes")
        if users and not stop_writers:
            raise Conflict(f"dot {dot!r} is in use by {', '.join(users)}: stop them first, or "
                           "add --stop-writers to have dm stop them")
        stop_processes(processes, 10.0)
        stop_containers(containers, 10)
        trash.empty(home.trash(dot), wait=True)  # no reaper may still work in the folder
        home.delete_dot(dot)
    return Stopped(processes, containers)


@dataclass
class DotStatus:
    name: str
    current: bool
    branch: str
    head: ObjectId | None
    head_message: str | None
    head_timestamp_ns: int | None
    state: str  # clean, dirty, busy, or "unfinished reset" (a kill: the next command finishes)
    dirty: bool | None  # None when the working state is not looked at (busy, unfinished)
    size: int | None
    busy: tuple[int, str] | None = None  # (pid, command) of the dm working on it
    subdots: dict[str, Path] = field(default_factory=dict)
    branches: list[str] = field(default_factory=list)
    writers: list[Writer] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)
    remotes: dict[str, str] = field(default_factory=dict)  # remote -> the dot's name there
    backend: str = "plain"  # how its folders are kept (plain folders, btrfs subvolumes)
    kept_states: int = 0  # commits whose folders a snapshot backend keeps as snapshots
    commits: int = 0  # in the current branch's history
    uncommitted: int | None = None  # bytes of files added or changed since the head
    changes: list[history.Change] = field(default_factory=list)  # since the head, if dirty


def statuses(home: Repo, dots: list[str] | None = None) -> list[DotStatus]:
    """The status of each dot (default: all), asking the Docker engine once for them all."""
    from dotmesh.capture.containers import containers_using

    names = home.dots() if dots is None else dots
    found = containers_using(names)
    return [status(home, d, found[d]) for d in names]


def unsettled(home: Repo, dot: str) -> str | None:
    """Why the working state cannot be looked at now: another dm changing it, or an operation
    a kill interrupted (which the next command that changes the dot finishes); else None."""
    busy = home.holder(dot)
    if busy is not None:
        return "busy"
    j = home.pending_restore(dot)
    if j is not None:
        return f"unfinished {j.action}"
    if home.swapping(dot):
        return "unfinished checkout"
    return None


def status(home: Repo, dot: str, containers: list[Container] | None = None) -> DotStatus:
    """What ``dm list`` and ``dm dot show`` print; hashes only files whose stat changed. Takes
    no lock: while another dm works on the dot, its working state shows as busy."""
    from dotmesh.capture.stop import containers_of
    from dotmesh.capture.writers import find_writers

    home.require_dot(dot)
    branch = home.branch(dot)
    head = home.head(dot, branch)
    c = home.commit(head) if head else None
    state = unsettled(home, dot)
    dirty: bool | None = None
    size: int | None = None
    uncommitted: int | None = None
    changes: list[history.Change] = []
    if state is None:
        snap = snapshot_dot(home, dot, None)
        dirty = is_dirty(snap.roots, c, whole=True)
        size = sum(r.total_size for r in snap.results.values())
        state = "dirty" if dirty else "clean"
        uncommitted = 0
        if dirty:
            trees = {k: v for r in snap.results.values() for k, v in r.unstored_trees.items()}
            changes = history.changes_between(home, dict(c.subdots) if c else {}, snap.roots,
                                              trees)
            uncommitted = history.uncommitted_bytes(changes)
    return DotStatus(
        name=dot, current=home.current_dot() == dot, branch=branch, head=head,
        head_message=c.message if c else None, head_timestamp_ns=c.timestamp_ns if c else None,
        state=state, dirty=dirty, size=size, busy=home.holder(dot) if state == "busy" else None,
        subdots={s: home.stable(dot, s) for s in home.subdots(dot)},
        branches=list(home.branches(dot)),
        writers=find_writers(home.stable_folders(dot)),
        containers=containers_of(dot) if containers is None else containers,
        remotes=config.remote_dots(home.conn, dot),
        backend=backend_of(home).name, kept_states=len(kept.kept_ids(home, dot)),
        commits=history.commit_count(home, head), uncommitted=uncommitted,
        changes=changes,
    )
