"""``dm hook``: commands run around a dot's commits (see ``capture/hooks.py``)."""

from __future__ import annotations

from dotmesh.capture.hooks import Hook, check_stage
from dotmesh.errors import NotFound, UsageError
from dotmesh.model.names import check_name
from dotmesh.store.repo import Repo


def hooks(home: Repo, dot: str) -> list[Hook]:
    return [Hook(*r) for r in home.conn.execute(
        "SELECT id, dot, subdot, stage, command, timeout FROM hooks WHERE dot=? ORDER BY id",
        (dot,))]


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
    cur = home.conn.execute(
        "INSERT INTO hooks (dot, subdot, stage, command, timeout) VALUES (?, ?, ?, ?, ?)",
        (dot, subdot, stage, command, timeout))
    return int(cur.lastrowid or 0)


def remove_hook(home: Repo, dot: str, hook_id: int) -> None:
    if not home.conn.execute("DELETE FROM hooks WHERE dot=? AND id=?", (dot, hook_id)).rowcount:
        raise NotFound(f"dot {dot!r} has no hook #{hook_id} (dm hook list shows them)")
