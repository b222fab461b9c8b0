"""``python -m dotmesh.capture.watchdog FD TIMEOUT ENGINE CONTAINERS PID...``: thaw the PIDs
and unpause the CONTAINERS (comma-separated ids, on the Docker engine at ENGINE) when FD closes
without dm having said it thawed them itself, or when TIMEOUT seconds pass. Started by
:mod:`dotmesh.capture.freeze`."""

from __future__ import annotations

import os
import select
import signal
import sys
import time

THAWED = b"t"  # what dm writes before closing when it thawed everything itself


def main(argv: list[str]) -> None:
    fd, timeout, engine, ids = int(argv[0]), float(argv[1]), argv[2], argv[3]
    pids = [int(p) for p in argv[4:]]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deadline = time.monotonic() + timeout
    said = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            got = os.read(fd, 64)
            said += got
            if not got:
                break  # dm closed its end, or died
    if said.endswith(THAWED):
        return
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
