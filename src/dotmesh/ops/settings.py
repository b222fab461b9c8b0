"""``dm config``: the store-wide settings a user may change, each with its type and default."""

from __future__ import annotations

from dataclasses import dataclass

from dotmesh.errors import UsageError
from dotmesh.meta import config
from dotmesh.meta.db import Tx
from dotmesh.ops import gc
from dotmesh.store.repo import Repo
from dotmesh.workdir import kept


@dataclass(frozen=True)
class Setting:
    key: str
    default: int
    help: str


SETTINGS = {s.key: s for s in (
    Setting(kept.KEEP_COMMITS, kept.DEFAULTS[kept.KEEP_COMMITS],
            "commits per branch (its head first) whose folders a snapshot backend keeps"),
    Setting(kept.KEEP_DAYS, kept.DEFAULTS[kept.KEEP_DAYS],
            "days a snapshot backend keeps the working states a reset discarded"),
    Setting(gc.REFLOG_EXPIRE_DAYS, gc.DEFAULTS[gc.REFLOG_EXPIRE_DAYS],
            "days dm reflog expire keeps reflog entries (and the states only they name)"),
)}


def _known(key: str) -> Setting:
    s = SETTINGS.get(key)
    if s is None:
        raise UsageError(f"unknown setting {key!r}; known: {', '.join(sorted(SETTINGS))}")
    return s


def get(home: Repo, key: str) -> int:
    s = _known(key)
    raw = config.setting(home.conn, key)
    return s.default if raw is None else int(raw)


def all_values(home: Repo) -> dict[str, int]:
    return {k: get(home, k) for k in sorted(SETTINGS)}


def set_value(home: Repo, key: str, value: str) -> int:
    _known(key)
    try:
        n = int(value, 10)
    except ValueError:
        raise UsageError(f"{key} takes a whole number, not {value!r}") from None
    if not 0 <= n <= 1_000_000:
        raise UsageError(f"{key} must be between 0 and 1000000, not {n}")
    with Tx(home.conn) as tx:
        config.set_setting(tx, key, str(n))
    return n


def unset(home: Repo, key: str) -> None:
    _known(key)
    with Tx(home.conn) as tx:
        config.unset_setting(tx, key)
