"""Who uses a dot's folders, and stopping them for a restore: processes get SIGTERM, then
SIGKILL; containers are stopped and started again on the restored data."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dotmesh.capture import proc
from dotmesh.capture.containers import Container, containers_using
from dotmesh.capture.containers import start as start_containers
from dotmesh.capture.containers import stop as stop_containers
from dotmesh.capture.writers import Writer, find_writers
from dotmesh.errors import Conflict, DotmeshError, InvalidName
from dotmesh.model.names import DockerVolume


def containers_of(dot: str) -> list[Container]:
    """Containers (any state) that mount one of the dot's volumes through the dm driver."""
    return containers_using([dot])[dot]


def running_containers(dot: str) -> list[Container]:
    return [c for c in containers_of(dot) if c.state == "running"]


def active_containers(dot: str) -> list[Container]:
    """Containers that would go on writing (running, or paused and about to run again)."""
    return [c for c in containers_of(dot) if c.state in ("running", "paused")]


def pinned_containers(dot: str, branch: str) -> list[Container]:
    """Active containers that mount a volume of ``dot`` pinned to ``branch``
    (``DOT[.SUBDOT]@BRANCH``): they use that branch's parked folders."""
    out = []
    for c in active_containers(dot):
        for name in c.volumes:
            try:
                pinned = DockerVolume.parse(name).branch
            except InvalidName:
                continue
            if pinned == branch:
                out.append(c)
                break
    return out


@dataclass
class Stopped:
    """What a restore stopped: processes (dm does not restart them) and containers (started
    again on the restored data once the restore succeeded)."""

    processes: list[Writer] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)


@contextmanager
def stopped_for_restore(folders: Iterable[Path], dot: str, stop: bool, what: str,
                        timeout: float = 10.0) -> Iterator[Stopped]:
    """Run the block with nothing using the dot's ``folders``. Containers are stopped and, when
    the block succeeds, started again: dockerd shows a volume's new contents only to a started
    container. Host processes make it refuse, unless ``stop``: then they are stopped
    (SIGTERM, then SIGKILL after ``timeout``) and left stopped."""
    processes = find_writers(folders)
    containers = active_containers(dot)
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
        proc.send(w.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        proc.send(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(proc.alive(w.pid) for w in writers):
        time.sleep(0.02)
    for w in writers:
        if proc.alive(w.pid):
            proc.send(w.pid, signal.SIGKILL)
    while any(proc.alive(w.pid) for w in writers):
        time.sleep(0.01)
