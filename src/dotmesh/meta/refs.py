"""Refs: branches and their heads, the reflog, journaled restores and swaps, and what was
seen on remotes. A head moves only by compare-and-swap, with its reflog row in the same call,
inside the caller's transaction (so that it lands with whatever else the command records).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from dotmesh.errors import Conflict

Row = tuple[Any, ...]  # as sqlite3 returns it: checked by the reader


# ------------------------------------------------------------------ branches
def current_branch(conn: sqlite3.Connection, dot: str) -> object | None:
    """The dot's checked-out branch as stored (None: no such dot)."""
    row = conn.execute("SELECT branch FROM dots WHERE name=?", (dot,)).fetchone()
    return None if row is None else row[0]


def branch_rows(conn: sqlite3.Connection, dot: str) -> list[Row]:
    """(name, head) of each branch, by name."""
    return conn.execute("SELECT name, head FROM branches WHERE dot=? ORDER BY name",
                        (dot,)).fetchall()


def head_row(conn: sqlite3.Connection, dot: str, branch: str) -> Row | None:
    """(head,) of the branch, or None when it does not exist."""
    row: Row | None = conn.execute("SELECT head FROM branches WHERE dot=? AND name=?",
                                   (dot, branch)).fetchone()
    return row


def tag_rows(conn: sqlite3.Connection, dot: str) -> list[Row]:
    """(name, commit, message, tagger, ts_ns) of each tag, by name (unchecked)."""
    return conn.execute("SELECT name, commit_id, message, tagger, ts_ns FROM tags WHERE dot=? "
                        "ORDER BY name", (dot,)).fetchall()


def add_tag(conn: sqlite3.Connection, dot: str, name: str, commit: bytes, message: str,
            tagger: str, ts_ns: int) -> None:
    conn.execute("INSERT INTO tags VALUES (?, ?, ?, ?, ?, ?)",
                 (dot, name, commit, message, tagger, ts_ns))


def delete_tag(conn: sqlite3.Connection, dot: str, name: str) -> bool:
    return conn.execute("DELETE FROM tags WHERE dot=? AND name=?", (dot, name)).rowcount > 0


def view_rows(conn: sqlite3.Connection, dot: str | None = None) -> list[Row]:
    """(dir, dot, commit, pid, created_ns) of each commit mounted by ``dm mount``."""
    if dot is None:
        return conn.execute("SELECT dir, dot, commit_id, pid, created_ns FROM views "
                            "ORDER BY dir").fetchall()
    return conn.execute("SELECT dir, dot, commit_id, pid, created_ns FROM views WHERE dot=? "
                        "ORDER BY dir", (dot,)).fetchall()


def add_view(conn: sqlite3.Connection, folder: str, dot: str, commit: bytes, ts_ns: int) -> None:
    conn.execute("INSERT INTO views VALUES (?, ?, ?, 0, ?)", (folder, dot, commit, ts_ns))


def set_view_pid(conn: sqlite3.Connection, folder: str, pid: int) -> None:
    conn.execute("UPDATE views SET pid=? WHERE dir=?", (pid, folder))


def delete_view(conn: sqlite3.Connection, folder: str) -> None:
    conn.execute("DELETE FROM views WHERE dir=?", (folder,))


def branch_exists(conn: sqlite3.Connection, dot: str, branch: str) -> bool:
    return head_row(conn, dot, branch) is not None


def add_branch(conn: sqlite3.Connection, dot: str, branch: str, head: bytes | None) -> None:
    conn.execute("INSERT INTO branches VALUES (?, ?, ?)", (dot, branch, head))


def set_head(conn: sqlite3.Connection, dot: str, branch: str, old: bytes | None,
             new: bytes, action: str, saved: bytes | None, message: str,
             logged: bool = True) -> None:
    """Move the branch from ``old`` to ``new`` and log it (unless not ``logged``: a clone's
    row is written when it starts); Conflict if it is not at ``old`` any more (another dm
    moved it meanwhile)."""
    cur = head_row(conn, dot, branch)
    if cur is None or (cur[0] or None) != old:
        raise Conflict(f"branch {branch!r} of {dot!r} moved while this command ran; rerun it")
    conn.execute("UPDATE branches SET head=? WHERE dot=? AND name=?", (new, dot, branch))
    if logged:
        log(conn, dot, branch, action, old, new, saved, message)


def log(conn: sqlite3.Connection, dot: str, branch: str, action: str, old: bytes | None,
        new: bytes | None, saved: bytes | None, message: str) -> None:
    """A reflog row for a change that moved no existing head (a new branch, a clone...)."""
    conn.execute("INSERT INTO reflog (dot, branch, ts_ns, action, old, new, saved, message) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (dot, branch, time.time_ns(), action, old, new, saved, message))


def reflog_rows(conn: sqlite3.Connection, dot: str, limit: int | None) -> list[Row]:
    """(seq, branch, ts_ns, action, old, new, saved, message), newest first."""
    return conn.execute(
        "SELECT seq, branch, ts_ns, action, old, new, saved, message FROM reflog WHERE dot=? "
        "ORDER BY seq DESC LIMIT ?", (dot, -1 if limit is None else limit)).fetchall()


def logged_ids(conn: sqlite3.Connection, dot: str) -> list[bytes]:
    """Every commit id the reflog and the restore journal of ``dot`` name: all of them stay
    reachable (dm reset --hard can name a discarded state)."""
    return [x for row in conn.execute(
        "SELECT old, new, saved FROM reflog WHERE dot=? UNION ALL "
        "SELECT old, target, saved FROM restores WHERE dot=? UNION ALL "
        "SELECT old, target, NULL FROM discarded WHERE dot=?", (dot, dot, dot))
        for x in row if x]


# ------------------------------------------------------------------ discarded states
# A working state a reset discarded on a snapshot backend, kept as a read-only snapshot
# (``snaps/NAME``) and not yet stored as a commit; ``seq`` is its reflog row (NULL while the
# reset that made it is journaled and not finished).

def add_discarded(conn: sqlite3.Connection, dot: str, name: str, branch: str,
                  old: bytes | None, target: bytes, taken_ns: int, author: str,
                  message: str) -> None:
    conn.execute("INSERT INTO discarded VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                 (dot, name, branch, old, target, taken_ns, author, message))


def link_discarded(conn: sqlite3.Connection, dot: str, target: bytes | None) -> None:
    """Tie the discarded states of the restore to ``target`` just finished (None: of the
    dot's one unfinished restore, whatever it names) to its reflog row (the dot's newest),
    in the transaction that wrote it."""
    conn.execute("UPDATE discarded SET seq=(SELECT MAX(seq) FROM reflog WHERE dot=?) "
                 "WHERE dot=? AND seq IS NULL AND (? IS NULL OR target=?)",
                 (dot, dot, target, target))


def drop_restore(conn: sqlite3.Connection, dot: str, readable: frozenset[bytes]) -> None:
    """Drop an unfinished restore that cannot be finished (dm fsck --repair), keeping what it
    discarded named: a reflog row says it was interrupted (naming, of its states, those in
    ``readable``), and its discarded states (maybe the only copy of a working state) are
    tied to that row."""
    row = pending_restore(conn, dot)
    if row is not None:
        kind, branch, old, target, saved, action, message = row
        if kind != "clone":
            old, target, saved = (x if x in readable else None for x in (old, target, saved))
            log(conn, dot, branch if isinstance(branch, str) else "?",
                f"{action if isinstance(action, str) else 'restore'} (interrupted)", old,
                target, saved, "an unfinished restore that could not be finished, dropped "
                "by dm fsck --repair")
            link_discarded(conn, dot, None)
    end_restore(conn, dot)


def discarded_rows(conn: sqlite3.Connection, dot: str) -> list[Row]:
    """(name, branch, old, target, taken_ns, seq, author, message), unchecked, oldest first."""
    return conn.execute(
        "SELECT name, branch, old, target, taken_ns, seq, author, message FROM discarded "
        "WHERE dot=? ORDER BY taken_ns", (dot,)).fetchall()


def stored_discarded(conn: sqlite3.Connection, dot: str, name: str, seq: int | None,
                     saved: bytes | None, branch: str, old: bytes | None, target: bytes,
                     message: str) -> None:
    """A discarded state became a commit (``saved``; None: it was the head's state after
    all): its reflog row names it like any saved state, and its row goes. Without such a
    row (dropped by fsck as damaged, or naming another saved state), a row of its own names
    it: nothing else would keep that commit from gc."""
    if saved is not None:
        named = seq is not None and conn.execute(
            "UPDATE reflog SET saved=? WHERE dot=? AND seq=? AND saved IS NULL",
            (saved, dot, seq)).rowcount
        if not named:
            log(conn, dot, branch, "reset", old, target, saved,
                f"{message} (kept as {name}; its reflog entry was lost)")
    conn.execute("DELETE FROM discarded WHERE dot=? AND name=?", (dot, name))


def log_orphan_discarded(conn: sqlite3.Connection, dot: str, name: str, branch: str,
                         old: bytes | None, target: bytes) -> None:
    """A reflog entry for a discarded state named by none (dm fsck --repair)."""
    log(conn, dot, branch, "reset (interrupted)", old, target, None,
        f"a working state kept as {name}, named again by dm fsck --repair")
    conn.execute("UPDATE discarded SET seq=(SELECT MAX(seq) FROM reflog WHERE dot=?) "
                 "WHERE dot=? AND name=?", (dot, dot, name))


def drop_discarded(conn: sqlite3.Connection, dot: str, name: str) -> None:
    conn.execute("DELETE FROM discarded WHERE dot=? AND name=?", (dot, name))


def gc_roots(conn: sqlite3.Connection) -> list[tuple[str, object]]:
    """(where, id as stored) of every commit a ref names, in every dot: branch heads, the
    reflog's old, new and saved states, unfinished restores, heads seen on remotes, tags and
    mounted commits (dm mount).
    Unchecked (gc refuses a damaged one). Rows of deleted dots are included: gc keeps more,
    never less."""
    q = ("SELECT 'branch ' || dot || '@' || name, head FROM branches WHERE head IS NOT NULL "
         "UNION ALL SELECT 'reflog of ' || dot, old FROM reflog WHERE old IS NOT NULL "
         "UNION ALL SELECT 'reflog of ' || dot, new FROM reflog WHERE new IS NOT NULL "
         "UNION ALL SELECT 'reflog of ' || dot, saved FROM reflog WHERE saved IS NOT NULL "
         "UNION ALL SELECT 'unfinished restore of ' || dot, x FROM (SELECT dot, old AS x "
         "FROM restores UNION ALL SELECT dot, target FROM restores UNION ALL SELECT dot, "
         "saved FROM restores) WHERE x IS NOT NULL "
         "UNION ALL SELECT 'remote head of ' || dot, head FROM remote_refs "
         "UNION ALL SELECT 'tag ' || dot || ':' || name, commit_id FROM tags "
         "UNION ALL SELECT 'mounted view of ' || dot, commit_id FROM views "
         "UNION ALL SELECT 'discarded state of ' || dot, old FROM discarded "
         "WHERE old IS NOT NULL "
         "UNION ALL SELECT 'discarded state of ' || dot, target FROM discarded")
    return [(str(w), x) for w, x in conn.execute(q)]


def expiring_reflog(conn: sqlite3.Connection, before_ns: int) -> int:
    """How many reflog rows are older than ``before_ns``."""
    return int(conn.execute("SELECT count(*) FROM reflog WHERE ts_ns < ?",
                            (before_ns,)).fetchone()[0])


def expire_reflog(conn: sqlite3.Connection, before_ns: int) -> int:
    """Forget the reflog rows older than ``before_ns`` (every dot), and the discarded states
    they name (whose snapshots the next command on their dot removes); returns how many."""
    conn.execute("DELETE FROM discarded WHERE seq IN (SELECT seq FROM reflog WHERE ts_ns < ?)",
                 (before_ns,))
    return conn.execute("DELETE FROM reflog WHERE ts_ns < ?", (before_ns,)).rowcount


def delete_branch(conn: sqlite3.Connection, dot: str, branch: str) -> None:
    conn.execute("DELETE FROM branches WHERE dot=? AND name=?", (dot, branch))


# ------------------------------------------------------------------ journals
def pending_restore(conn: sqlite3.Connection, dot: str) -> Row | None:
    """(kind, branch, old, target, saved, action, message) of an unfinished restore."""
    row: Row | None = conn.execute(
        "SELECT kind, branch, old, target, saved, action, message FROM restores WHERE dot=?",
        (dot,)).fetchone()
    return row


def begin_restore(conn: sqlite3.Connection, dot: str, kind: str, branch: str,
                  old: bytes | None, target: bytes, saved: bytes | None, action: str,
                  message: str) -> None:
    conn.execute("INSERT OR REPLACE INTO restores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (dot, kind, branch, old, target, saved, action, message, time.time_ns()))


def end_restore(conn: sqlite3.Connection, dot: str) -> None:
    conn.execute("DELETE FROM restores WHERE dot=?", (dot,))


def begin_swap(conn: sqlite3.Connection, dot: str, from_branch: str, to_branch: str) -> None:
    conn.execute("INSERT OR REPLACE INTO swaps VALUES (?, ?, ?)", (dot, from_branch, to_branch))


def pending_swap(conn: sqlite3.Connection, dot: str) -> tuple[str, str] | None:
    """(from_branch, to_branch) of a swap of the dot's folders a killed dm left."""
    row = conn.execute("SELECT from_branch, to_branch FROM swaps WHERE dot=?",
                       (dot,)).fetchone()
    return None if row is None else (row[0], row[1])


def end_swap(conn: sqlite3.Connection, dot: str, to_branch: str) -> None:
    """The swap is done: ``to_branch`` is the checked-out branch."""
    conn.execute("UPDATE dots SET branch=? WHERE name=?", (to_branch, dot))
    conn.execute("DELETE FROM swaps WHERE dot=?", (dot,))


# ------------------------------------------------------------------ remotes
def remote_head_rows(conn: sqlite3.Connection, dot: str) -> list[Row]:
    """(remote, branch, head) last seen on remotes."""
    return conn.execute("SELECT remote, branch, head FROM remote_refs WHERE dot=?",
                        (dot,)).fetchall()


def track(conn: sqlite3.Connection, dot: str, remote: str, remote_dot: str, branch: str,
          head: bytes | None) -> None:
    """Remember where the dot is shared and the head seen there."""
    conn.execute("INSERT OR REPLACE INTO dot_remotes VALUES (?, ?, ?)", (dot, remote, remote_dot))
    if head is not None:
        conn.execute("INSERT OR REPLACE INTO remote_refs VALUES (?, ?, ?, ?)",
                     (dot, remote, branch, head))


def mark_fetched(conn: sqlite3.Connection, commits: Iterable[bytes]) -> None:
    conn.executemany("INSERT OR IGNORE INTO fetched VALUES (?)", [(c,) for c in commits])


def forget_fetched(conn: sqlite3.Connection, commits: Iterable[bytes]) -> None:
    """Commits gc removed: whether they came from a remote no longer matters."""
    conn.executemany("DELETE FROM fetched WHERE commit_id=?", [(c,) for c in commits])


def is_fetched(conn: sqlite3.Connection, commit: bytes) -> bool:
    return conn.execute("SELECT 1 FROM fetched WHERE commit_id=?",
                        (commit,)).fetchone() is not None
