"""Hooks: commands run before the freeze and after the thaw, for application-consistent
commits (``redis-cli BGSAVE`` and wait, ``psql -c CHECKPOINT``)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from dotmesh.errors import DotmeshError, UsageError

STAGES = ("pre-freeze", "post-thaw")
LINE_MOST = 64 << 10  # bytes of a hook's line held before it is shown anyway


class HookFailed(DotmeshError):
    """A hook exited non-zero or ran past its timeout; the commit did not happen."""

    exit_code = 9


@dataclass(frozen=True)
class Hook:
    id: int
    dot: str
    subdot: str | None
    stage: str
    command: str
    timeout: float


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise UsageError(f"unknown hook stage {stage!r}: use {' or '.join(STAGES)}")
    return stage


def _to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_hooks(hooks: list[Hook], stage: str, folders: dict[str, str],
              show: Callable[[str], None] = _to_stderr) -> None:
    """Run ``stage``'s hooks in order, with DM_DOT, DM_SUBDOT and DM_PATH set. What a hook
    prints (its stdout and stderr, in order) is passed to ``show`` a line at a time as it
    comes, each prefixed ``hook #ID (STAGE): `` (stderr by default: a command's stdout is
    its result)."""
    for h in hooks:
        if h.stage != stage:
            continue
        env = {**os.environ, "DM_DOT": h.dot, "DM_SUBDOT": h.subdot or "",
               "DM_PATH": folders.get(h.subdot, "") if h.subdot else ""}
        prefix = f"hook #{h.id} ({h.stage}): "
        code, last = _run(h, env, lambda line: show(prefix + line))  # noqa: B023 - used here
        if code is None:
            raise HookFailed(f"{stage} hook {h.command!r} ran past its {h.timeout:g} s "
                             "timeout; nothing was committed")
        if code != 0:
            raise HookFailed(f"{stage} hook {h.command!r} failed (exit {code})"
                             + (f": {last}" if last else ""))


def _run(h: Hook, env: dict[str, str], line_out: Callable[[str], None]
         ) -> tuple[int | None, str]:
    """Run one hook in its own process group, passing its output on a line at a time as it
    is written; returns its exit code (None: killed at its timeout, with everything it
    started) and its last non-empty line."""
    proc = subprocess.Popen(h.command, shell=True, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + h.timeout
    pending, last = b"", ""

    def emit(raw: bytes) -> None:
        nonlocal last
        text = raw.decode(errors="replace").rstrip("\r")
        line_out(text)
        last = text.strip() or last

    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill_group(proc.pid)
                proc.wait()
                if pending:
                    emit(pending)
                return None, last
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                emit(raw)
            if len(pending) > LINE_MOST:  # a line without end is shown in pieces
                emit(pending)
                pending = b""
        if pending:
            emit(pending)
        try:
            return proc.wait(max(0.0, deadline - time.monotonic())), last
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            return None, last
    finally:
        proc.stdout.close()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # all gone already
