"""Docker volumes named ``DOT.SUBDOT``, backed by subdots: the use cases behind ``dm serve``.

dockerd holds container locks while it waits for a volume plugin, so each of these answers at
once: none reads or copies data (but the first Create of a volume pinned to a branch whose
folders were never built, which builds them), and only Remove takes the dot's lock (failing
at once if the dot is busy). A volume's mountpoint is the subdot's stable folder, whose
contents follow the dot's branch; ``dm checkout`` and ``dm reset`` restart the containers so
they see new contents.

Names are Dotmesh's (:class:`DockerVolume`): ``DOT.__root__`` is the whole dot (the working
set: a folder per subdot), ``@BRANCH`` pins a volume to a branch's folders (the stable ones
while it is checked out, its parked ones otherwise; a container is mounted on what the name
means when it starts, and checkout and reset restart the dot's containers).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dotmesh.errors import AlreadyExists, Conflict, InvalidName, NotFound, UsageError
from dotmesh.fs.btrfs import remove_tree
from dotmesh.meta import config
from dotmesh.meta.db import Tx
from dotmesh.model.names import ROOT_SUBDOT, DockerVolume, VolumeName
from dotmesh.store.repo import Repo
from dotmesh.workdir.branches import (
    make_stable,
    make_working_set,
    materialize,
    recover,
    working_set,
)


@dataclass(frozen=True)
class Volume:
    name: str
    mountpoint: str
    status: dict[str, object] = field(default_factory=dict)


def _existing(home: Repo, name: str) -> DockerVolume:
    """The volume ``name`` if dm has it; NotFound otherwise (also for names it cannot own,
    since dockerd asks every plugin about every unknown name)."""
    try:
        vol = DockerVolume.parse(name)
    except InvalidName:
        raise NotFound(f"no such volume {name!r}") from None
    if not home.dot_exists(vol.dot) or (vol.subdot is not None
                                        and vol.subdot not in home.subdots(vol.dot)):
        raise NotFound(f"no such volume {name!r}")
    if vol.branch is not None and vol.branch not in home.branches(vol.dot):
        raise NotFound(f"no such volume {name!r}: dot {vol.dot!r} has no branch "
                       f"{vol.branch!r}")
    return vol


def folder(home: Repo, vol: DockerVolume) -> Path:
    """Where the volume's data is now: the current branch's folders, or a pinned branch's
    parked ones; the working set itself for ``DOT.__root__``."""
    if vol.branch is None or vol.branch == home.branch(vol.dot):
        top = working_set(home, vol.dot)
    else:
        top = home.parked_set(vol.dot, vol.branch)
    return top if vol.subdot is None else top / vol.subdot


def _make_folders(home: Repo, vol: DockerVolume) -> None:
    """The folders the volume names, made if missing: a subdot's stable folder, the working
    set, or a parked branch's folders (built from its head if it never had any)."""
    if vol.subdot is not None:
        make_stable(home, vol.dot, vol.subdot)
    else:
        make_working_set(home, vol.dot)
    if vol.branch is None or vol.branch == home.branch(vol.dot):
        return
    with home.lock(vol.dot, "volume create"):
        recover(home, vol.dot)
        if not home.parked_set(vol.dot, vol.branch).exists():
            materialize(home, vol.dot, vol.branch, home.head(vol.dot, vol.branch),
                        home.packs.writer())
        if vol.subdot is not None:
            home.parked(vol.dot, vol.branch, vol.subdot).mkdir(exist_ok=True, mode=0o755)


def _not_swapping(home: Repo, dot: str) -> None:
    """A container must not start on folders a killed checkout or reset left half done."""
    j = home.pending_restore(dot)
    if home.swapping(dot) or j is not None:
        what = f"an interrupted {j.action}" if j is not None else "an interrupted checkout"
        raise Conflict(f"dot {dot!r} has {what} to finish: run dm path {dot} (or any dm "
                       "command that changes the dot), then retry")


def create(home: Repo, name: str, opts: dict[str, object] | None) -> Volume:
    """Make the subdot (and its dot) if missing; a dot made here becomes the current dot if
    there is none, as with dm init (the tutorial's next dm commit needs one). Creating an
    existing volume is fine, as dockerd expects."""
    try:
        vol = DockerVolume.parse(name)
    except InvalidName as e:
        raise InvalidName(f"volume name {name!r}: {e}; dm volumes are named "
                          "[admin/]DOT[.SUBDOT][@BRANCH], like app.clicks-db") from None
    if opts:
        raise UsageError(f"dm volumes take no options (got {', '.join(sorted(opts))})")
    if vol.branch is not None:  # a branch is made by dm checkout -b, not by a volume
        if not home.dot_exists(vol.dot) or vol.branch not in home.branches(vol.dot):
            raise NotFound(f"volume {name!r}: dot {vol.dot!r} has no branch {vol.branch!r} "
                           f"(dm checkout -b {vol.branch} makes one)")
    elif not home.dot_exists(vol.dot):
        try:
            home.create_dot(vol.dot)
        except AlreadyExists:
            pass  # made meanwhile by another request
        else:
            if home.current_dot() is None:
                home.set_current_dot(vol.dot)
    _not_swapping(home, vol.dot)
    if vol.subdot is not None:
        home.add_subdot(vol.dot, vol.subdot)
    _make_folders(home, vol)
    return get(home, name)


def get(home: Repo, name: str) -> Volume:
    vol = _existing(home, name)
    mounts = config.mount_count(home.conn, vol.dot, vol.key)
    return Volume(name, str(folder(home, vol)), {
        "dot": vol.dot, "subdot": vol.subdot or ROOT_SUBDOT,
        "branch": vol.branch or home.branch(vol.dot), "pinned": vol.branch is not None,
        "mounts": int(mounts)})


def list_volumes(home: Repo) -> list[Volume]:
    rows = config.all_subdots(home.conn)
    return [Volume(str(VolumeName(d, s)), str(home.stable(d, s))) for d, s in rows]


def mount(home: Repo, name: str, mount_id: str) -> Volume:
    """Record the mount (dockerd sends a random id per mount; a restarted ``dm serve`` must
    still know it) and make sure the folder is there."""
    vol = _existing(home, name)
    if not mount_id:
        raise UsageError("Mount needs an ID")
    _not_swapping(home, vol.dot)
    _make_folders(home, vol)
    config.add_mount(home.conn, vol.dot, vol.key, mount_id)
    return get(home, name)


def unmount(home: Repo, name: str, mount_id: str) -> None:
    """Forget the mount; an id this store never saw is fine (dockerd decides)."""
    vol = _existing(home, name)
    config.remove_mount(home.conn, vol.dot, vol.key, mount_id)


def remove(home: Repo, name: str) -> list[Path]:
    """``docker volume rm``: drop the subdot's folders (on every branch) from the working
    state; commits that hold it keep it, and the dot stays until ``dm dot delete``.

    The folders are moved aside at once (renamed to ``.dm-trash-*`` beside themselves);
    returns them, for the caller to delete in the background (deleting a big folder must not
    hold up dockerd); the dot's next command removes any left.

    A name that is a view of data other volumes hold (``DOT.__root__``, ``@BRANCH``) only
    forgets its mounts: nothing is deleted (``dm dot delete`` deletes a dot)."""
    vol = _existing(home, name)
    if vol.subdot is None or vol.branch is not None:
        with Tx(home.conn) as tx:
            config.forget_mounts(tx, vol.dot, vol.key)
        return []
    moved: list[Path] = []
    with home.lock(vol.dot, "volume rm"):
        recover(home, vol.dot)
        home.forget_subdot(vol.dot, vol.subdot)
        branches = home.dot_dir(vol.dot) / "branches"
        folders = [home.stable(vol.dot, vol.subdot)]
        if branches.is_dir():
            folders += [b / vol.subdot for b in branches.iterdir()]
        for folder in folders:
            if folder.exists():  # beside itself: a rename never leaves its filesystem
                target = folder.parent / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
                os.rename(folder, target)
                moved.append(target)
    with Tx(home.conn) as tx:
        home.log_ref(tx, vol.dot, home.branch(vol.dot), "volume-rm", None, None, None,
                     f"docker volume rm {name}: subdot {vol.subdot} left the working state")
    return moved


def empty_trash(root: Path) -> None:
    """Delete what :func:`remove` moved aside in the store at ``root`` (also what a killed
    ``dm serve`` left)."""
    legacy = root / "trash"  # where older versions put them
    found = list(legacy.iterdir()) if legacy.is_dir() else []
    found += root.glob(f"dots/*/subdots/{TRASH_PREFIX}*")
    found += root.glob(f"dots/*/branches/*/{TRASH_PREFIX}*")
    for item in found:
        remove_tree(item)  # by path alone: any backend's folders (subvolumes go whole)


TRASH_PREFIX = ".dm-trash-"  # starts like what workdir.branches.recover removes
