"""Hooks: commands run before the freeze and after the thaw, for application-consistent
commits (``redis-cli BGSAVE`` and wait, ``psql -c CHECKPOINT``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from dotmesh.errors import DotmeshError, UsageError

STAGES = ("pre-freeze", "post-thaw")


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
    prints (its stdout and stderr, in order) is passed to ``show`` a line at a time, each
    prefixed ``hook #ID (STAGE): `` (stderr by default: a command's stdout is its result)."""
    for h in hooks:
        if h.stage != stage:
            continue
        env = {**os.environ, "DM_DOT": h.dot, "DM_SUBDOT": h.subdot or "",
               "DM_PATH": folders.get(h.subdot, "") if h.subdot else ""}
        try:
            p = subprocess.run(h.command, shell=True, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace",
                               timeout=h.timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            _show(h, e.stdout, show)
            raise HookFailed(f"{stage} hook {h.command!r} ran past its {h.timeout:g} s "
                             "timeout; nothing was committed") from None
        _show(h, p.stdout, show)
        if p.returncode != 0:
            detail = p.stdout.strip().splitlines()[-1:] or [""]
            raise HookFailed(f"{stage} hook {h.command!r} failed (exit {p.returncode})"
                             + (f": {detail[0]}" if detail[0] else ""))


def _show(h: Hook, output: str | bytes | None, show: Callable[[str], None]) -> None:
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    for line in (output or "").splitlines():
        show(f"hook #{h.id} ({h.stage}): {line}")
