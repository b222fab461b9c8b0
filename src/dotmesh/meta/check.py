"""What ``dm fsck`` reads and repairs in meta.db, row by row: dots, subdots, branches, the
reflog, unfinished restores, remote refs, remotes and stat caches; and what a rebuild copies
out of a damaged meta.db.

Rows are returned as stored, unchecked (fsck judges each one: a damaged row must be reported,
not crash the check), with the rowid where a row has no key fsck can trust. Repairs run inside
the caller's transaction, if any (fsck makes one per problem, so that each repair lands whole or
not at all).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

Row = tuple[Any, ...]  # as sqlite3 returns it: checked by the reader

# Tables of rows that belong to one dot (column ``dot``), in the order fsck reports them.
DOT_TABLES = ("subdots", "branches", "statcache", "swaps", "restores", "hooks", "mounts",
              "dot_remotes", "remote_refs", "dot_options", "reflog", "tags")

# Tables a rebuild copies from a damaged meta.db; the object index is made again from the
# packs, and stat caches and fingerprints are only caches.
SALVAGED = ("meta", "dots", "subdots", "branches", "reflog", "hooks", "swaps", "remotes",
            "dot_remotes", "remote_refs", "mounts", "restores", "fetched", "dot_options", "tags")


# ------------------------------------------------------------------ the whole file
def quick_check(conn: sqlite3.Connection) -> list[object]:
    """SQLite's own check of the file's structure: ``["ok"]`` or what is wrong (raises
    sqlite3.DatabaseError when the file cannot be read at all)."""
    return [r[0] for r in conn.execute("PRAGMA quick_check")]


# ------------------------------------------------------------------ dots and subdots
def dot_rows(conn: sqlite3.Connection) -> list[Row]:
    """(rowid, name, branch) of every dot."""
    return conn.execute("SELECT rowid, name, branch FROM dots").fetchall()


def drop_dot_row(conn: sqlite3.Connection, rowid: object) -> None:
    """Forget a dot row whose name is damaged (by rowid: the name cannot be trusted)."""
    conn.execute("DELETE FROM dots WHERE rowid=?", (rowid,))


def count_orphans(conn: sqlite3.Connection, table: str) -> int:
    """How many rows of ``table`` (one of DOT_TABLES) belong to no dot: an older dm's dot
    delete left them."""
    if table not in DOT_TABLES:
        raise ValueError(f"{table} is not a table of per-dot rows")
    return int(conn.execute(f"SELECT count(*) FROM {table} WHERE dot NOT IN "
                            "(SELECT name FROM dots)").fetchone()[0])


def drop_orphans(conn: sqlite3.Connection, table: str) -> None:
    """Forget the rows of ``table`` (one of DOT_TABLES) that belong to no dot."""
    if table not in DOT_TABLES:
        raise ValueError(f"{table} is not a table of per-dot rows")
    conn.execute(f"DELETE FROM {table} WHERE dot NOT IN (SELECT name FROM dots)")


def readd_dot(conn: sqlite3.Connection, dot: str, branch: str) -> None:
    """A dot whose folders survived its rows, on ``branch`` (made empty unless it exists)."""
    conn.execute("INSERT INTO dots VALUES (?, ?, ?)", (dot, branch, time.time_ns()))
    add_branch_if_missing(conn, dot, branch)


def set_dot_branch(conn: sqlite3.Connection, dot: str, branch: str) -> None:
    """Put a dot on ``branch`` (whose row exists), without touching any folder."""
    conn.execute("UPDATE dots SET branch=? WHERE name=?", (branch, dot))


def subdot_rows(conn: sqlite3.Connection) -> list[Row]:
    """(rowid, dot, name) of every subdot."""
    return conn.execute("SELECT rowid, dot, name FROM subdots").fetchall()


def drop_subdot_row(conn: sqlite3.Connection, rowid: object) -> None:
    """Forget a subdot row whose name is damaged."""
    conn.execute("DELETE FROM subdots WHERE rowid=?", (rowid,))


# ------------------------------------------------------------------ branches
def branch_rows(conn: sqlite3.Connection) -> list[Row]:
    """(rowid, dot, name, head) of every branch of every dot."""
    return conn.execute("SELECT rowid, dot, name, head FROM branches").fetchall()


def drop_branch_row(conn: sqlite3.Connection, rowid: object) -> None:
    """Forget a branch row whose name is damaged."""
    conn.execute("DELETE FROM branches WHERE rowid=?", (rowid,))


def move_branch_row(conn: sqlite3.Connection, rowid: object, head: bytes | None) -> None:
    """Set a branch's head whatever it was (no compare-and-swap: fsck moves a head that cannot
    be read back to one that can, or to none)."""
    conn.execute("UPDATE branches SET head=? WHERE rowid=?", (head, rowid))


def add_branch_if_missing(conn: sqlite3.Connection, dot: str, branch: str) -> None:
    """A branch with no commit yet, unless the dot has one of that name."""
    conn.execute("INSERT OR IGNORE INTO branches VALUES (?, ?, NULL)", (dot, branch))


def put_branch(conn: sqlite3.Connection, dot: str, branch: str, head: bytes) -> None:
    """A branch at ``head``, whether or not a row of that name was there (a rebuild brings
    back heads its reflog or the packs still name)."""
    conn.execute("INSERT OR REPLACE INTO branches VALUES (?, ?, ?)", (dot, branch, head))


# ------------------------------------------------------------------ the reflog
def reflog_rows(conn: sqlite3.Connection) -> list[Row]:
    """(rowid, dot, branch, ts_ns, action, old, new, saved, message) of every reflog entry."""
    return conn.execute("SELECT rowid, dot, branch, ts_ns, action, old, new, saved, message "
                        "FROM reflog").fetchall()


def drop_reflog_row(conn: sqlite3.Connection, rowid: object) -> None:
    """Forget a reflog entry that is damaged."""
    conn.execute("DELETE FROM reflog WHERE rowid=?", (rowid,))


def forget_reflog_id(conn: sqlite3.Connection, rowid: object, column: str) -> None:
    """Make a reflog entry stop naming a commit that cannot be read whole (``column`` is
    ``old``, ``new`` or ``saved``); the rest of the entry stays."""
    if column not in ("old", "new", "saved"):
        raise ValueError(f"{column} is not a commit column of the reflog")
    conn.execute(f"UPDATE reflog SET {column}=NULL WHERE rowid=?", (rowid,))


def reflog_moves(conn: sqlite3.Connection, dot: str, branch: str) -> list[Row]:
    """(old, new) of each reflog entry of a branch, newest first: where a lost head can go
    back to."""
    return conn.execute("SELECT old, new FROM reflog WHERE dot=? AND branch=? ORDER BY seq DESC",
                        (dot, branch)).fetchall()


def reflog_branches(conn: sqlite3.Connection, dot: str) -> list[Any]:
    """Every branch name the dot's reflog mentions (a rebuild looks for their heads)."""
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT branch FROM reflog WHERE dot=? AND branch != ''", (dot,))]


# ------------------------------------------------------------------ journals and remotes
def restore_rows(conn: sqlite3.Connection) -> list[Row]:
    """(dot, old, target, saved) of every unfinished restore."""
    return conn.execute("SELECT dot, old, target, saved FROM restores").fetchall()


def remote_ref_rows(conn: sqlite3.Connection) -> list[Row]:
    """(rowid, dot, remote, branch, head) of every head last seen on a remote."""
    return conn.execute("SELECT rowid, dot, remote, branch, head FROM remote_refs").fetchall()


def tag_rows(conn: sqlite3.Connection) -> list[Row]:
    """(rowid, dot, name, commit) of every tag of every dot."""
    return conn.execute("SELECT rowid, dot, name, commit_id FROM tags").fetchall()


def drop_tag_row(conn: sqlite3.Connection, rowid: object) -> None:
    """Forget a tag whose name is damaged or whose commit cannot be read."""
    conn.execute("DELETE FROM tags WHERE rowid=?", (rowid,))


def drop_remote_ref_row(conn: sqlite3.Connection, rowid: object) -> None:
    """Forget a head seen on a remote that cannot be read (the next pull or push sees it
    again)."""
    conn.execute("DELETE FROM remote_refs WHERE rowid=?", (rowid,))


def remote_rows(conn: sqlite3.Connection) -> list[Row]:
    """(name, kind, options) of every remote."""
    return conn.execute("SELECT name, kind, options FROM remotes").fetchall()


def drop_remote_row(conn: sqlite3.Connection, name: object) -> None:
    """Forget a damaged remote (its row only: what was tracked through it stays)."""
    conn.execute("DELETE FROM remotes WHERE name=?", (name,))


# ------------------------------------------------------------------ stat caches
def statcache_rows(conn: sqlite3.Connection) -> list[Row]:
    """(dot, branch, subdot, data) of every stat cache."""
    return conn.execute("SELECT dot, branch, subdot, data FROM statcache").fetchall()


def drop_statcache(conn: sqlite3.Connection, dot: object, branch: object,
                   subdot: object) -> None:
    """Forget a stat cache that is damaged or names what the store lacks (the next commit
    reads every file again)."""
    conn.execute("DELETE FROM statcache WHERE dot=? AND branch=? AND subdot=?",
                 (dot, branch, subdot))


# ------------------------------------------------------------------ rebuilding meta.db
def open_damaged(path: Path) -> sqlite3.Connection:
    """A connection to a damaged meta.db kept aside, for reading what rows it still has
    (sqlite3.Error if not even its table list can be read)."""
    src = sqlite3.connect(path)
    src.execute("SELECT count(*) FROM sqlite_master").fetchone()
    return src


def copy_table(src: sqlite3.Connection, dst: sqlite3.Connection, table: str) -> tuple[int, str]:
    """Copy every row of ``table`` that can still be read from ``src`` into ``dst`` (rows
    ``dst`` has already win), with the columns ``dst`` has; returns (rows copied, the error
    that stopped the copy or "")."""
    if table not in SALVAGED:
        raise ValueError(f"{table} is not a table a rebuild copies")
    cols = [r[1] for r in dst.execute(f"PRAGMA table_info({table})")]
    copied, failed = 0, ""
    try:
        for row in src.execute(f"SELECT {', '.join(cols)} FROM {table}"):
            dst.execute(f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})", row)
            copied += 1
    except sqlite3.Error as e:
        failed = str(e)
    return copied, failed
