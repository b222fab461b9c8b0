"""Which names in a dot's folders changed, learnt from inotify while a live commit copies it.

The pre-copy tells the watcher each folder just before listing it, so any later change sends an
event. A reader thread collects the changed names, deduplicated, so the kernel's queue never
fills. In the freeze only those names are looked at again: the freeze follows what changed, not
the size of the dot. Whatever inotify cannot promise (its queue overflowed, the watch limit was
reached) makes :meth:`ChangeWatcher.take` answer None, and the caller looks at everything.

Blind spots, which callers cover by always re-checking them: writes through a shared writable
mmap (no event at all) and through another hard link to a file (the event goes to that name's
folder).
"""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from inotify_simple import INotify
from inotify_simple import flags as F

MASK = (F.MODIFY | F.ATTRIB | F.CREATE | F.DELETE | F.MOVED_FROM | F.MOVED_TO
        | F.DONT_FOLLOW | F.ONLYDIR | F.EXCL_UNLINK)


@dataclass
class Changes:
    """One folder tree's changes: names per folder (relative paths, "" is the top), and the
    folders made or moved in since they were watched (to be listed whole)."""

    names: dict[str, set[str]] = field(default_factory=dict)
    fresh: set[str] = field(default_factory=set)

    def add(self, rel: str, name: str) -> None:
        self.names.setdefault(rel, set()).add(name)

    def __bool__(self) -> bool:
        return bool(self.names)


WAKE_BACKSTOP = 1.0  # s: the reader looks at its stop flag this often even unwoken


class ChangeWatcher:
    """inotify watches over several folder trees, each known by a key (the subdot)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._where: dict[int, tuple[str, str]] = {}  # watch -> (key, folder)
        self._changes: dict[str, Changes] = {}
        self._lost = False
        self._stop = threading.Event()
        try:
            self._ino: INotify | None = INotify()
        except OSError:  # too many inotify instances: fall back to looking at everything
            self._ino, self._lost = None, True
            return
        try:  # the reader waits on this too, so that close() wakes it at once: with a
            # timeout alone, every commit on plain folders waited up to its 50 ms at the end
            self._wake_r, self._wake_w = os.pipe()
        except OSError:  # out of descriptors: look at everything, as above
            self._ino.close()
            self._ino, self._lost = None, True
            return
        self._thread = threading.Thread(target=self._run, name="dm-watch", daemon=True)
        try:
            self._thread.start()
        except RuntimeError:  # no thread to be had: look at everything
            self._ino.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._ino, self._lost = None, True

    def watcher(self, key: str, top: str) -> Callable[[str], None]:
        """The callback a snapshot of ``top`` calls with each folder before listing it."""
        def watch(rel: str) -> None:
            self.watch(key, top, rel)
        return watch

    def watch(self, key: str, top: str, rel: str) -> None:
        if self._lost or self._ino is None:
            return
        try:
            wd = self._ino.add_watch(os.path.join(top, rel) if rel else top, MASK)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # gone already: the event in its parent tells
            with self._lock:
                self._lost = True  # ENOSPC: the user's watch limit
            return
        with self._lock:
            self._where[wd] = (key, rel)  # a moved folder's watch keeps its number: remap it

    def take(self) -> dict[str, Changes] | None:
        """The changes since the last call (everything queued so far), or None if some may
        have been missed."""
        with self._lock:
            self._drain()
            out, self._changes = self._changes, {}
            return None if self._lost else out

    def close(self) -> None:
        self._stop.set()
        if self._ino is not None:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._ino.close()
            self._ino = None
            os.close(self._wake_r)
            os.close(self._wake_w)

    def __enter__(self) -> ChangeWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the reader
    def _run(self) -> None:
        assert self._ino is not None
        fd = self._ino.fileno()
        while not self._stop.is_set():
            ready, _, _ = select.select([fd, self._wake_r], [], [], WAKE_BACKSTOP)
            if fd in ready:
                with self._lock:
                    self._drain()

    def _drain(self) -> None:
        if self._ino is None:
            return
        while True:
            events = self._ino.read(timeout=0)
            if not events:
                return
            for ev in events:
                if ev.mask & F.Q_OVERFLOW:
                    self._lost = True
                    continue
                where = self._where.get(ev.wd)
                if where is None:
                    continue
                if ev.mask & F.IGNORED:  # the folder is gone; its parent reported it
                    del self._where[ev.wd]
                    continue
                key, rel = where
                ch = self._changes.setdefault(key, Changes())
                if ev.name:
                    ch.add(rel, ev.name)
                    if ev.mask & F.ISDIR and ev.mask & (F.CREATE | F.MOVED_TO):
                        ch.fresh.add(f"{rel}/{ev.name}" if rel else ev.name)
                if rel:  # the folder's own entry: its mtime follows its contents
                    parent, _, base = rel.rpartition("/")
                    ch.add(parent, base)
