"""The freeze's watchdog: up before anything stops, its timeout counted from the stop."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from dotmesh.capture import proc, watchdog
from dotmesh.capture.freeze import FreezeTimeout, frozen
from dotmesh.capture.writers import Writer


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _until(cond, limit: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_settle_runs_with_the_watchdog_up_and_the_writers_running(sleeper):
    seen = []

    def settle() -> None:
        dogs = [p for p in os.listdir("/proc") if p.isdigit()  # this process's own
                and proc.parent(int(p)) == os.getpid()
                and b"dotmesh.capture.watchdog" in _cmdline(int(p))]
        seen.append((proc.stopped(sleeper.pid), len(dogs)))

    with frozen([Writer(sleeper.pid, "sleep")], 5.0, settle=settle):
        assert proc.stopped(sleeper.pid)
    assert seen == [(False, 1)]
    assert _until(lambda: not proc.stopped(sleeper.pid))


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_nothing_is_stopped_when_the_watchdog_cannot_start(sleeper, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/true")  # exits at once, saying nothing
    stopped = []
    with pytest.raises(FreezeTimeout, match="watchdog .* did not start"):
        with frozen([Writer(sleeper.pid, "sleep")], 5.0,
                    settle=lambda: stopped.append(proc.stopped(sleeper.pid))):
            stopped.append("the block ran")
    assert stopped == [False]
    assert not proc.stopped(sleeper.pid)


def test_the_watchdog_timeout_counts_from_the_stop(sleeper):
    """A long settle before the stop must not eat the writers' time: the watchdog thaws
    ``timeout`` after dm says it stops them, not after its own start."""
    cmd, ready_r, ready_w = os.pipe(), *os.pipe()
    dog = subprocess.Popen(
        [sys.executable, "-m", watchdog.__name__, str(cmd[0]), str(ready_w), "0.3", "", "",
         str(sleeper.pid)], pass_fds=(cmd[0], ready_w), stdin=subprocess.DEVNULL)
    os.close(cmd[0])
    os.close(ready_w)
    try:
        assert select.select([ready_r], [], [], 10)[0] and os.read(ready_r, 1) == watchdog.READY
        time.sleep(0.6)  # longer than its timeout, before any stop
        assert dog.poll() is None, "the watchdog timed out before anything was stopped"
        os.write(cmd[1], watchdog.stopping_at(time.monotonic()))
        os.kill(sleeper.pid, signal.SIGSTOP)
        assert _until(lambda: proc.stopped(sleeper.pid))
        assert _until(lambda: not proc.stopped(sleeper.pid), 3.0), "not thawed on time"
        assert dog.wait(5) == 0
    finally:
        os.close(cmd[1])
        os.close(ready_r)
        dog.kill()
        dog.wait()


def _watchdog(pid: int, timeout: str) -> tuple[subprocess.Popen[bytes], int]:
    """A started watchdog guarding ``pid`` (its READY read) and dm's end of its pipe."""
    cmd, ready_r, ready_w = os.pipe(), *os.pipe()
    dog = subprocess.Popen(
        [sys.executable, "-m", watchdog.__name__, str(cmd[0]), str(ready_w), timeout, "", "",
         str(pid)], pass_fds=(cmd[0], ready_w), stdin=subprocess.DEVNULL)
    os.close(cmd[0])
    os.close(ready_w)
    try:
        assert select.select([ready_r], [], [], 10)[0] and os.read(ready_r, 1) == watchdog.READY
    finally:
        os.close(ready_r)
    return dog, cmd[1]


def test_the_timeout_counts_from_when_dm_said_it_stops(sleeper):
    """A watchdog that reads "stopping" late (starved of CPU) still thaws on time."""
    dog, cmd = _watchdog(sleeper.pid, "0.5")
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        os.write(cmd, watchdog.stopping_at(time.monotonic() - 10))  # said 10 s ago
        assert _until(lambda: not proc.stopped(sleeper.pid), 0.4), "thawed late"
    finally:
        os.close(cmd)
        dog.wait(5)


def test_a_process_dm_never_stopped_is_never_continued(sleeper):
    """Its user paused it (Ctrl-Z): dm gave up before stopping anything, or was killed
    then; neither dm nor the watchdog may continue it."""
    os.kill(sleeper.pid, signal.SIGSTOP)
    assert _until(lambda: proc.stopped(sleeper.pid))
    dog, cmd = _watchdog(sleeper.pid, "0.2")
    os.close(cmd)  # dm is gone, and said nothing
    assert dog.wait(5) == 0
    time.sleep(0.3)
    assert proc.stopped(sleeper.pid)

    def fails() -> None:
        raise OSError("the disk is gone")

    with pytest.raises(OSError, match="disk is gone"):
        with frozen([Writer(sleeper.pid, "sleep")], 5.0, settle=fails):
            pass
    time.sleep(0.3)
    assert proc.stopped(sleeper.pid)
