"""Folders thrown away now and removed in the background.

Removing a btrfs subvolume that was just written takes a tenth of a second to half a second
(the ioctl waits for btrfs), and a reflinked tree takes a system call per file: a reset to a
kept state would spend most of its time removing the working set it replaced, which by then
is a copy of nothing (the discarded state is kept separately). So such folders are renamed
into the dot's ``trash/`` folder (instant, same filesystem) and a detached process removes
them; ``trash/.reaper.lock`` says one is at work. A reaper that was killed leaves its work to
the next one, which :func:`recover` starts when it finds the trash full and nobody emptying it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import uuid
from pathlib import Path

from dotmesh.fs.btrfs import remove_tree

LOCK = ".reaper.lock"
_started: list[subprocess.Popen[bytes]] = []  # kept, so that no warning says one still runs


def throw_away(path: Path, trash: Path, reap: bool = True) -> bool:
    """Remove ``path`` (a folder or subvolume) soon: at once as far as anyone can see it.
    Returns whether it went to ``trash``; ``reap``: start a reaper for it now (else the
    caller does, with :func:`start_reaper`: ``Repo.throw_away``)."""
    trash.mkdir(mode=0o700, exist_ok=True)
    try:
        os.rename(path, trash / uuid.uuid4().hex)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        remove_tree(path)  # another filesystem: no rename, so now
        return False
    if reap:
        start_reaper(trash)
    return True


def start_reaper(trash: Path) -> None:
    """Start a detached reaper of ``trash``. Best effort: one that cannot start leaves the
    trash to the next command's :func:`recover`."""
    for done in [p for p in _started if p.poll() is not None]:
        _started.remove(done)
    try:
        _started.append(subprocess.Popen(
            [sys.executable, "-m", __name__, str(trash)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            cwd="/"))
    except OSError:
        pass


def empty(trash: Path, wait: bool = True) -> bool:
    """Remove everything in ``trash`` under its lock; False if another process holds the lock
    (and ``wait`` is false). Best effort: what cannot be removed now is left for next time."""
    fd = _locked(trash, wait)
    if fd is None:
        return False
    try:
        with os.scandir(trash) as entries:
            doomed = [Path(e.path) for e in entries if e.name != LOCK]
        for path in doomed:
            try:
                remove_tree(path)
            except Exception:  # noqa: BLE001, S112 - left for the next reaper
                continue
        return True
    finally:
        os.close(fd)


def recover(trash: Path) -> None:
    """Start a reaper if the trash holds something and nobody is emptying it (one was killed):
    in the background, so the command that finds it does not pay."""
    try:
        if not any(e.name != LOCK for e in os.scandir(trash)):
            return
    except OSError:
        return
    fd = _locked(trash, wait=False)
    if fd is None:
        return  # a reaper is at work (or the trash cannot be locked: left for later)
    os.close(fd)
    start_reaper(trash)


def _locked(trash: Path, wait: bool) -> int | None:
    """The trash's lock, held (a descriptor to close); None if another process holds it and
    ``wait`` is false, or it cannot be opened."""
    try:
        fd = os.open(trash / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def main() -> None:
    """``python -m dotmesh.fs.trash TRASH``: the reaper."""
    empty(Path(sys.argv[1]), wait=True)


if __name__ == "__main__":
    main()
