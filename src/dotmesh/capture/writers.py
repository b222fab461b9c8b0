"""Find the processes that use a dot's folders, from /proc (open files and working folder).

Nothing is declared: a process is a writer if it has a file open under a subdot's folder, or its
working folder is there (PostgreSQL and Redis both chdir into their data folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dotmesh.capture import proc


@dataclass(frozen=True)
class Writer:
    pid: int
    name: str
    paths: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid})"


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def find_writers(folders: Iterable[Path], exclude: Iterable[int] = ()) -> list[Writer]:
    """Processes (other than ``exclude`` and this one) using anything under ``folders``."""
    roots = tuple(os.path.realpath(p) for p in folders)
    if not roots:
        return []
    skip = {*proc.own(), *exclude}
    found: list[Writer] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        pid = int(entry.name)
        hits: list[str] = []
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            if _inside(cwd, roots):
                hits.append(cwd)
            for fd in os.scandir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith("/") and _inside(target.removesuffix(" (deleted)"), roots):
                    hits.append(target)
        except OSError:  # gone, or not ours to look at
            continue
        if hits:
            found.append(Writer(pid, _comm(pid), tuple(sorted(set(hits)))))
    return sorted(found, key=lambda w: w.pid)


def shared_mappings(pids: Iterable[int], folders: Iterable[Path]) -> set[str]:
    """Files under ``folders`` that the processes map shared and writable: writes through such
    a mapping change the file without a write call, so neither inotify nor mtime tells."""
    roots = tuple(os.path.realpath(p) for p in folders)
    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    fields = line.split(None, 5)
                    if len(fields) < 6 or fields[1][1] != "w" or fields[1][3] != "s":
                        continue
                    path = fields[5].rstrip("\n").removesuffix(" (deleted)")
                    if _inside(path, roots):
                        found.add(path)
        except OSError:
            continue
    return found
