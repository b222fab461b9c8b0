"""Freeze writers with SIGSTOP and always thaw them with SIGCONT.

Before stopping anything, dm starts a watchdog process that holds the other end of a pipe, and
waits until it says it runs. When dm closes the pipe (it is done, it failed, or it was killed
with -9 and the kernel closed it) or the freeze timeout passes after dm said it stops them, the
watchdog sends SIGCONT to every frozen process and unpauses every paused container. So no
writer can stay stopped after dm is gone. When dm thaws them itself it says so on the pipe
first, and the watchdog just exits.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from dotmesh.capture import proc, watchdog
from dotmesh.capture.containers import Container, engine_url, pause, unpause
from dotmesh.capture.watchdog import THAWED
from dotmesh.capture.writers import Writer
from dotmesh.errors import DotmeshError


class FreezeTimeout(DotmeshError):
    """The freeze was not made in time (the capture took longer than the freeze timeout, or
    its watchdog did not start); writers were thawed or never stopped, nothing committed."""

    exit_code = 8


@dataclass
class Freeze:
    started: float = 0.0
    ended: float = 0.0

    @property
    def ms(self) -> float:
        return (self.ended - self.started) * 1000


def _continue_stopped(pids: list[int], grace: float = 0.05) -> None:
    """Continue those of ``pids`` that stopped meanwhile, giving late ones ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while pids:
        for pid in pids:
            if proc.stopped(pid):
                proc.send(pid, signal.SIGCONT)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.002)


def _bystanders(pids: list[int]) -> list[int]:
    """Running parents of the writers. A supervisor such as su or runuser stops itself when
    its child stops (job control); these must be continued too, or they stay stopped."""
    parents = {proc.parent(p) for p in pids} - set(pids) - {0, 1, *proc.own()}
    return sorted(p for p in parents if not proc.stopped(p))


def _await_watchdog(ready: int, limit: float = 5.0) -> None:
    """Wait until the watchdog says it runs, so that nothing is stopped without it and its
    start (a Python interpreter) does not compete with the capture in the freeze."""
    got = b""
    if select.select([ready], [], [], limit)[0]:
        got = os.read(ready, 1)
    if got != watchdog.READY:
        raise FreezeTimeout(f"the freeze watchdog (python -m {watchdog.__name__}) did not "
                            f"start within {limit:.0f} s: no writer was stopped and nothing "
                            "was committed")


@contextmanager
def frozen(writers: list[Writer], timeout: float, containers: Sequence[Container] = (),
           settle: Callable[[], None] | None = None) -> Iterator[Freeze]:
    """Stop ``writers`` and pause ``containers`` for the block, all at once; the watchdog thaws
    them after ``timeout`` regardless, or as soon as dm is gone. ``settle`` runs last before
    they stop, once the watchdog is up (it writes out what they dirtied, say): what it does
    is then not left for the freeze."""
    pids = [w.pid for w in writers]
    bystanders = _bystanders(pids)
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    ids = ",".join(c.id for c in containers)
    try:
        dog = subprocess.Popen(
            [sys.executable, "-m", watchdog.__name__, str(read_end), str(ready_write),
             str(timeout), engine_url() if ids else "", ids, *map(str, pids + bystanders)],
            pass_fds=(read_end, ready_write), stdin=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        os.close(write_end)
        os.close(ready_read)
        raise
    finally:
        os.close(read_end)
        os.close(ready_write)
    freeze = Freeze()
    stopping = paused = False
    try:
        try:
            if settle is not None:
                settle()  # meanwhile the watchdog starts, on another core
            _await_watchdog(ready_read)
        finally:
            os.close(ready_read)
        try:
            os.write(write_end, watchdog.stopping_at(time.monotonic()))
        except BrokenPipeError:
            raise FreezeTimeout("the freeze watchdog ended before the freeze: no writer was "
                                "stopped and nothing was committed") from None
        stopping = True
        freeze.started = time.monotonic()
        for pid in pids:
            proc.send(pid, signal.SIGSTOP)
        paused = bool(containers)
        pause(list(containers))  # in parallel; the processes stop meanwhile
        deadline = time.monotonic() + min(timeout, 5.0)
        while not all(proc.stopped(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.0005)
        yield freeze
    finally:
        if stopping:  # never a process dm did not stop (a job its user paused, say)
            for pid in pids:
                proc.send(pid, signal.SIGCONT)
        try:
            if paused:
                unpause(list(containers))
            with contextlib.suppress(BrokenPipeError):  # gone: the timeout made it thaw
                os.write(write_end, THAWED)  # the watchdog has nothing left to do
        finally:  # if unpausing failed, the watchdog tries again as the pipe closes
            freeze.ended = time.monotonic()
            if stopping:
                _continue_stopped(bystanders)
            os.close(write_end)
            if not stopping:
                dog.kill()  # nothing to guard (it may not even have started)
            dog.wait()
    if freeze.ms > timeout * 1000:
        raise FreezeTimeout(f"the capture took {freeze.ms:.0f} ms, over the freeze timeout "
                            f"of {timeout * 1000:.0f} ms; writers were thawed and nothing was "
                            "committed (raise --freeze-timeout or use hooks to quiesce)")
