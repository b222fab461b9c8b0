"""Running apps: which processes use a dot, its hooks, and stopping writers for a restore."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dotmesh.capture.containers import Container, containers_using
from dotmesh.capture.containers import start as start_containers
from dotmesh.capture.containers import stop as stop_containers
from dotmesh.capture.hooks import Hook, check_stage
from dotmesh.capture.writers import Writer, find_writers
from dotmesh.errors import Conflict, DotmeshError, NotFound, UsageError
from dotmesh.model.names import check_name
from dotmesh.ops.home import Home


def writers_of(home: Home, dot: str) -> list[Writer]:
    return find_writers(home.stable(dot, s) for s in home.subdots(dot))


def containers_of(home: Home, dot: str) -> list[Container]:
    """Containers (any state) that mount one of the dot's volumes through the dm driver."""
    return containers_using([dot])[dot]


def running_containers(home: Home, dot: str) -> list[Container]:
    return [c for c in containers_of(home, dot) if c.state == "running"]


@dataclass
class Stopped:
    """What a restore stopped: processes (dm does not restart them) and containers (started
    again on the restored data once the restore succeeded)."""

    processes: list[Writer] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)


@contextmanager
def stopped_for_restore(home: Home, dot: str, stop: bool, what: str,
                        timeout: float = 10.0) -> Iterator[Stopped]:
    """Run the block with nothing using the dot. Containers are stopped and, when the block
    succeeds, started again: dockerd shows a volume's new contents only to a started
    container. Host processes make it refuse, unless ``stop``: then they are stopped
    (SIGTERM, then SIGKILL after ``timeout``) and left stopped."""
    processes = writers_of(home, dot)
    containers = [c for c in containers_of(home, dot) if c.state in ("running", "paused")]
    if processes and not stop:
        names = ", ".join(map(str, processes))
        raise Conflict(f"dot {dot!r} is in use by {names}: stop them before {what}, or add "
                       "--stop-writers to have dm stop them")
    stop_processes(processes, timeout)
    stop_containers(containers, int(timeout))
    try:
        yield Stopped(processes, containers)
    except DotmeshError as e:
        if containers:
            names = " ".join(c.name for c in containers)
            raise type(e)(f"{e} (the dot's containers were stopped for {what} and are not "
                          f"started on a partial state: docker start {names} when done)"
                          ) from None
        raise
    start_containers(containers)


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
