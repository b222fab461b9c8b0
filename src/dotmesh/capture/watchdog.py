"""``python -m dotmesh.capture.watchdog FD TIMEOUT PID...``: thaw PIDs when FD closes or
TIMEOUT seconds pass, whichever is first. Started by :mod:`dotmesh.capture.freeze`."""

from __future__ import annotations

import os
import select
import signal
import sys
import time


def main(argv: list[str]) -> None:
    fd, timeout, pids = int(argv[0]), float(argv[1]), [int(p) for p in argv[2:]]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if ready and not os.read(fd, 64):
            break  # dm closed its end, or died
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass


if __name__ == "__main__":
    main(sys.argv[1:])
