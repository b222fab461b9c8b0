"""Running apps: which processes use a dot, its hooks, and stopping writers for a restore."""

from __future__ import annotations

import os
import signal
import time

from dotmesh.capture.hooks import Hook, check_stage
from dotmesh.capture.writers import Writer, find_writers
from dotmesh.errors import Conflict, NotFound, UsageError
from dotmesh.model.names import check_name
from dotmesh.ops.home import Home


def writers_of(home: Home, dot: str) -> list[Writer]:
    return find_writers(home.stable(dot, s) for s in home.subdots(dot))


def refuse_if_running(home: Home, dot: str, stop: bool, what: str,
                      timeout: float = 10.0) -> list[Writer]:
    """Before a restore: refuse while writers run, or stop them (SIGTERM, then SIGKILL)."""
    writers = writers_of(home, dot)
    if not writers:
        return []
    names = ", ".join(map(str, writers))
    if not stop:
        raise Conflict(f"dot {dot!r} is in use by {names}: stop them before {what}, or add "
                       "--stop-writers to have dm stop them")
    stop_processes(writers, timeout)
    return writers


def stop_processes(writers: list[Writer], timeout: float) -> None:
    for w in writers:
        _signal(w.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        _signal(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(w.pid) for w in writers):
        time.sleep(0.02)
    for w in writers:
        if _alive(w.pid):
            _signal(w.pid, signal.SIGKILL)
    while any(_alive(w.pid) for w in writers):
        time.sleep(0.01)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# ------------------------------------------------------------------ hooks


def hooks(home: Home, dot: str) -> list[Hook]:
    return [Hook(*r) for r in home.conn.execute(
        "SELECT id, dot, subdot, stage, command, timeout FROM hooks WHERE dot=? ORDER BY id",
        (dot,))]


def add_hook(home: Home, dot: str, stage: str, command: str, subdot: str | None,
             timeout: float) -> int:
    home.require_dot(dot)
    check_stage(stage)
    if subdot is not None:
        check_name(subdot, "subdot name")
        if subdot not in home.subdots(dot):
            raise NotFound(f"dot {dot!r} has no subdot {subdot!r}")
    if not command.strip():
        raise UsageError("the hook command is empty")
    if timeout <= 0:
        raise UsageError("the hook timeout must be positive")
    cur = home.conn.execute(
        "INSERT INTO hooks (dot, subdot, stage, command, timeout) VALUES (?, ?, ?, ?, ?)",
        (dot, subdot, stage, command, timeout))
    return int(cur.lastrowid or 0)


def remove_hook(home: Home, dot: str, hook_id: int) -> None:
    if not home.conn.execute("DELETE FROM hooks WHERE dot=? AND id=?", (dot, hook_id)).rowcount:
        raise NotFound(f"dot {dot!r} has no hook #{hook_id} (dm hook list shows them)")
