"""``dm hook``: commands run around a dot's commits (see ``capture/hooks.py``)."""

from __future__ import annotations

from dotmesh.capture.hooks import Hook, check_stage
from dotmesh.errors import NotFound, UsageError
from dotmesh.meta import config
from dotmesh.model.names import check_name
from dotmesh.store.repo import Repo


def hooks(home: Repo, dot: str) -> list[Hook]:
    return [Hook(*r) for r in config.hook_rows(home.conn, dot)]


def add_hook(home: Repo, dot: str, stage: str, command: str, subdot: str | None,
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
    return config.add_hook(home.conn, dot, stage, command, subdot, timeout)


def remove_hook(home: Repo, dot: str, hook_id: int) -> None:
    if not config.remove_hook(home.conn, dot, hook_id):
        raise NotFound(f"dot {dot!r} has no hook #{hook_id} (dm hook list shows them)")
