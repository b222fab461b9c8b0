"""``python -m dotmesh.capture.watchdog FD READY TIMEOUT ENGINE CONTAINERS PID...``: say
:data:`READY` on the pipe READY once running; then thaw the PIDs and unpause the CONTAINERS
(comma-separated ids, on the Docker engine at ENGINE) when FD closes without dm having said it
thawed them itself, or when TIMEOUT seconds have passed since dm said it stops them. Started by
:mod:`dotmesh.capture.freeze`."""

from __future__ import annotations

import os
import select
import signal
import sys
import time

THAWED = b"t"  # what dm writes before closing when it thawed everything itself
READY = b"r"  # what the watchdog writes once it runs: dm stops nothing before
STOPPING = b"s"  # what dm writes just before it stops them (see stopping_at)


def stopping_at(now: float) -> bytes:
    """What dm writes just before it stops anything: :data:`STOPPING` and its monotonic clock
    (the same for every process), so the timeout counts from then even if the watchdog reads
    it late."""
    return STOPPING + repr(now).encode() + b"\n"


def _deadline(said: bytes, timeout: float) -> float | None:
    at = said.find(STOPPING)
    end = said.find(b"\n", at)
    if at < 0 or end < 0:
        return None
    try:
        return float(said[at + 1:end]) + timeout
    except ValueError:  # not dm's: thaw at once
        return time.monotonic()


def main(argv: list[str]) -> None:
    fd, ready, timeout = int(argv[0]), int(argv[1]), float(argv[2])
    engine, ids, pids = argv[3], argv[4], [int(p) for p in argv[5:]]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.write(ready, READY)
        os.close(ready)
    except OSError:  # dm gave up waiting, and stopped nothing
        return
    deadline: float | None = None
    said = b""
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        if select.select([fd], [], [], left)[0]:
            got = os.read(fd, 64)
            said += got
            if not got:
                break  # dm closed its end, or died
            if deadline is None:
                deadline = _deadline(said, timeout)
    if said.endswith(THAWED) or STOPPING not in said:
        return  # dm thawed them itself, or never stopped anything
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass
    if ids:
        os.environ["DOCKER_HOST"] = engine
        from dotmesh.capture.containers import Container, unpause

        try:
            unpause([Container(i, i[:12], "paused") for i in ids.split(",")])
        except Exception as e:  # noqa: BLE001 - report, there is nobody else to tell
            print(f"dm watchdog: {e}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
