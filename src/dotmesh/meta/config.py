"""What the store is set up with: its dots and their subdots, the current dot, per-dot
options, hooks, Docker mounts, and remotes (with the dots shared through them)."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

Row = tuple[Any, ...]  # as sqlite3 returns it: checked by the reader

# Tables of rows that belong to one dot (column ``dot``): a dot's delete forgets them all.
PER_DOT = ("subdots", "branches", "statcache", "swaps", "hooks", "mounts", "dot_remotes",
           "remote_refs", "reflog", "restores", "dot_options", "discarded", "tags")


# ------------------------------------------------------------------ settings
def setting(conn: sqlite3.Connection, key: str) -> str | None:
    """A store-wide setting (``current_dot``, ``default_remote``)."""
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_setting(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def set_setting_once(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Set ``key`` unless it has a value already."""
    conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))


def unset_setting(conn: sqlite3.Connection, key: str) -> None:
    conn.execute("DELETE FROM meta WHERE key=?", (key,))


def clear_setting(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Forget ``key`` if it still holds ``value``."""
    conn.execute("DELETE FROM meta WHERE key=? AND value=?", (key, value))


# ------------------------------------------------------------------ dots
def dot_exists(conn: sqlite3.Connection, dot: str) -> bool:
    return conn.execute("SELECT 1 FROM dots WHERE name=?", (dot,)).fetchone() is not None


def dot_names(conn: sqlite3.Connection) -> list[object]:
    return [r[0] for r in conn.execute("SELECT name FROM dots ORDER BY name")]


def add_dot(conn: sqlite3.Connection, dot: str, branch: str, head: bytes | None) -> None:
    """A dot on ``branch`` at ``head``; what an older dm left of a deleted dot of this name
    is dropped first."""
    for table in PER_DOT:
        conn.execute(f"DELETE FROM {table} WHERE dot=?", (dot,))
    conn.execute("INSERT INTO dots VALUES (?, ?, ?)", (dot, branch, time.time_ns()))
    conn.execute("INSERT INTO branches VALUES (?, ?, ?)", (dot, branch, head))


def delete_dot(conn: sqlite3.Connection, dot: str) -> None:
    conn.execute("DELETE FROM dots WHERE name=?", (dot,))
    for table in PER_DOT:
        conn.execute(f"DELETE FROM {table} WHERE dot=?", (dot,))


def subdot_names(conn: sqlite3.Connection, dot: str) -> list[object]:
    return [r[0] for r in conn.execute("SELECT name FROM subdots WHERE dot=? ORDER BY name",
                                       (dot,))]


def all_subdots(conn: sqlite3.Connection) -> list[Row]:
    """(dot, subdot) of every dot."""
    return conn.execute("SELECT dot, name FROM subdots ORDER BY dot, name").fetchall()


def add_subdot(conn: sqlite3.Connection, dot: str, subdot: str) -> None:
    conn.execute("INSERT OR IGNORE INTO subdots VALUES (?, ?)", (dot, subdot))


def forget_subdot(conn: sqlite3.Connection, dot: str, subdot: str) -> None:
    """The subdot and what belongs to it: stat caches, hooks, mounts."""
    for table in ("subdots", "statcache", "mounts", "hooks"):
        col = "name" if table == "subdots" else "subdot"
        conn.execute(f"DELETE FROM {table} WHERE dot=? AND {col}=?", (dot, subdot))


def dot_option(conn: sqlite3.Connection, dot: str, key: str) -> str | None:
    row = conn.execute("SELECT value FROM dot_options WHERE dot=? AND key=?",
                       (dot, key)).fetchone()
    return str(row[0]) if row else None


def set_dot_option(conn: sqlite3.Connection, dot: str, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO dot_options VALUES (?, ?, ?)", (dot, key, value))


def drop_dot_option(conn: sqlite3.Connection, dot: str, key: str) -> None:
    conn.execute("DELETE FROM dot_options WHERE dot=? AND key=?", (dot, key))


# ------------------------------------------------------------------ hooks
def hook_rows(conn: sqlite3.Connection, dot: str) -> list[Row]:
    """(id, dot, subdot, stage, command, timeout) in the order they were added."""
    return conn.execute("SELECT id, dot, subdot, stage, command, timeout FROM hooks "
                        "WHERE dot=? ORDER BY id", (dot,)).fetchall()


def add_hook(conn: sqlite3.Connection, dot: str, stage: str, command: str, subdot: str | None,
             timeout: float) -> int:
    cur = conn.execute(
        "INSERT INTO hooks (dot, subdot, stage, command, timeout) VALUES (?, ?, ?, ?, ?)",
        (dot, subdot, stage, command, timeout))
    return int(cur.lastrowid or 0)


def remove_hook(conn: sqlite3.Connection, dot: str, hook_id: int) -> bool:
    """Was there such a hook?"""
    return bool(conn.execute("DELETE FROM hooks WHERE dot=? AND id=?", (dot, hook_id)).rowcount)


# ------------------------------------------------------------------ Docker mounts
def mount_count(conn: sqlite3.Connection, dot: str, subdot: str | None = None) -> int:
    """Mounts of the dot's volumes (of one subdot if given) that dockerd has not undone."""
    if subdot is None:
        row = conn.execute("SELECT count(*) FROM mounts WHERE dot=?", (dot,)).fetchone()
    else:
        row = conn.execute("SELECT count(*) FROM mounts WHERE dot=? AND subdot=?",
                           (dot, subdot)).fetchone()
    return int(row[0])


def add_mount(conn: sqlite3.Connection, dot: str, subdot: str, mount_id: str) -> None:
    conn.execute("INSERT OR IGNORE INTO mounts VALUES (?, ?, ?, ?)",
                 (dot, subdot, mount_id, time.time_ns()))


def remove_mount(conn: sqlite3.Connection, dot: str, subdot: str, mount_id: str) -> None:
    conn.execute("DELETE FROM mounts WHERE dot=? AND subdot=? AND id=?", (dot, subdot, mount_id))


def forget_mounts(conn: sqlite3.Connection, dot: str, subdot: str) -> None:
    """Every mount of one volume (``subdot``: what its name says after ``DOT.``)."""
    conn.execute("DELETE FROM mounts WHERE dot=? AND subdot=?", (dot, subdot))


# ------------------------------------------------------------------ remotes
def remote_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM remotes WHERE name=?", (name,)).fetchone() is not None


def add_remote(conn: sqlite3.Connection, name: str, kind: str, url: str, user: str,
               secret: str, options: str) -> None:
    conn.execute("INSERT INTO remotes VALUES (?, ?, ?, ?, ?, ?)",
                 (name, kind, url, user, secret, options))


def remove_remote(conn: sqlite3.Connection, name: str) -> bool:
    """Forget the remote and what was tracked through it; was there one?"""
    if not conn.execute("DELETE FROM remotes WHERE name=?", (name,)).rowcount:
        return False
    conn.execute("DELETE FROM dot_remotes WHERE remote=?", (name,))
    conn.execute("DELETE FROM remote_refs WHERE remote=?", (name,))
    return True


def remote_rows(conn: sqlite3.Connection) -> list[Row]:
    """(name, kind, url, user, secret, options) of each remote, by name."""
    return conn.execute(
        "SELECT name, kind, url, user, secret, options FROM remotes ORDER BY name").fetchall()


def remote_dot(conn: sqlite3.Connection, dot: str, remote: str) -> str | None:
    """The dot on ``remote`` that ``dot`` was last shared with."""
    row = conn.execute("SELECT remote_dot FROM dot_remotes WHERE dot=? AND remote=?",
                       (dot, remote)).fetchone()
    return str(row[0]) if row else None


def remote_dots(conn: sqlite3.Connection, dot: str) -> dict[str, str]:
    """remote -> the dot there, for every remote ``dot`` was shared through."""
    return {str(r[0]): str(r[1]) for r in conn.execute(
        "SELECT remote, remote_dot FROM dot_remotes WHERE dot=? ORDER BY remote", (dot,))}
