"""The one reader of ``/proc/PID/stat`` and the one sender of signals: processes come and go
at any moment, so every call here treats a vanished process as an answer, not an error."""

from __future__ import annotations

import os

_acting_for: set[int] = set()


def acting_for(pid: int) -> None:
    """This process runs a command for ``pid`` (the ``dm`` the daemon forked for): that
    caller, whose working folder may be inside a dot, is dm itself, not a user to stop."""
    _acting_for.add(pid)


def own() -> set[int]:
    """This process and the ``dm`` it runs for."""
    return {os.getpid(), *_acting_for}


def _stat_fields(pid: int) -> list[str] | None:
    """The fields after the command name (which may itself hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def state(pid: int) -> str | None:
    """The process's state letter (R, S, T, Z...); None once it is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def alive(pid: int) -> bool:
    """Running or stopped, not a zombie and not gone."""
    return state(pid) not in (None, "Z", "X")


def stopped(pid: int) -> bool:
    """Stopped, traced, or gone (nothing left that could run)."""
    return state(pid) in (None, "T", "t", "Z", "X")


def parent(pid: int) -> int:
    fields = _stat_fields(pid)
    try:
        return int(fields[1]) if fields else 0
    except (ValueError, IndexError):
        return 0


def send(pid: int, sig: int) -> None:
    """Signal ``pid``; one that is already gone needs nothing more."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
