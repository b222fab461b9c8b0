"""The one SQLite database of a home (WAL mode); the only module that knows the schema.

Objects are fsynced into pack files before their index rows are committed here, and index rows
are committed before any ref that needs them, so a crash leaves at worst unreferenced data.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from dotmesh.errors import Corrupt, DamagedIndex
from dotmesh.version import FORMAT_VERSION

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    id BLOB PRIMARY KEY, kind INTEGER NOT NULL, pack INTEGER NOT NULL,
    offset INTEGER NOT NULL, stored_len INTEGER NOT NULL, raw_len INTEGER NOT NULL,
    zstd INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS recent_objects (
    id BLOB PRIMARY KEY, kind INTEGER NOT NULL, pack INTEGER NOT NULL,
    offset INTEGER NOT NULL, stored_len INTEGER NOT NULL, raw_len INTEGER NOT NULL,
    zstd INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dots (
    name TEXT PRIMARY KEY, branch TEXT NOT NULL, created_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS subdots (
    dot TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (dot, name));
CREATE TABLE IF NOT EXISTS branches (
    dot TEXT NOT NULL, name TEXT NOT NULL, head BLOB, PRIMARY KEY (dot, name));
CREATE TABLE IF NOT EXISTS reflog (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, dot TEXT NOT NULL, branch TEXT NOT NULL,
    ts_ns INTEGER NOT NULL, action TEXT NOT NULL, old BLOB, new BLOB, saved BLOB,
    message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS statcache (
    dot TEXT NOT NULL, branch TEXT NOT NULL, subdot TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (dot, branch, subdot));
CREATE TABLE IF NOT EXISTS fingerprints (
    content BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS superseded_fingerprints (
    content BLOB PRIMARY KEY, save INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, dot TEXT NOT NULL, subdot TEXT, stage TEXT NOT NULL,
    command TEXT NOT NULL, timeout REAL NOT NULL);
CREATE TABLE IF NOT EXISTS swaps (
    dot TEXT PRIMARY KEY, from_branch TEXT NOT NULL, to_branch TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS remotes (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, url TEXT NOT NULL, user TEXT NOT NULL,
    secret TEXT NOT NULL, options TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dot_remotes (
    dot TEXT NOT NULL, remote TEXT NOT NULL, remote_dot TEXT NOT NULL,
    PRIMARY KEY (dot, remote));
CREATE TABLE IF NOT EXISTS remote_refs (
    dot TEXT NOT NULL, remote TEXT NOT NULL, branch TEXT NOT NULL, head BLOB NOT NULL,
    PRIMARY KEY (dot, remote, branch));
CREATE TABLE IF NOT EXISTS restores (
    dot TEXT PRIMARY KEY, kind TEXT NOT NULL, branch TEXT NOT NULL, old BLOB, target BLOB NOT NULL,
    saved BLOB, action TEXT NOT NULL, message TEXT NOT NULL, started_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fetched (commit_id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dot_options (
    dot TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (dot, key));
CREATE TABLE IF NOT EXISTS discarded (
    dot TEXT NOT NULL, name TEXT NOT NULL, branch TEXT NOT NULL, old BLOB, target BLOB NOT NULL,
    taken_ns INTEGER NOT NULL, seq INTEGER, author TEXT NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (dot, name));
CREATE TABLE IF NOT EXISTS tags (
    dot TEXT NOT NULL, name TEXT NOT NULL, commit_id BLOB NOT NULL, message TEXT NOT NULL,
    tagger TEXT NOT NULL, ts_ns INTEGER NOT NULL, PRIMARY KEY (dot, name));
CREATE TABLE IF NOT EXISTS views (
    dir TEXT PRIMARY KEY, dot TEXT NOT NULL, commit_id BLOB NOT NULL, pid INTEGER NOT NULL,
    created_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS mounts (
    dot TEXT NOT NULL, subdot TEXT NOT NULL, id TEXT NOT NULL, created_ns INTEGER NOT NULL,
    PRIMARY KEY (dot, subdot, id));
"""


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database with the settings every caller relies on."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    version = _ensure_schema(conn)
    if version != FORMAT_VERSION:
        raise Corrupt(f"store format {version} is not supported (this dm reads {FORMAT_VERSION})")
    return conn


SCHEMA_REVISION = 7  # PRAGMA user_version once SCHEMA's tables are made; bump with a table
# Stores of these formats are brought to FORMAT_VERSION when opened: format 2 added
# ``recent_objects``, which a dm of format 1 would not read (it would think objects lost).
UPGRADABLE = ("1",)


def _ensure_schema(conn: sqlite3.Connection) -> int:
    """Create what is missing (every statement is IF NOT EXISTS, so tables added within a
    format version appear in older stores too) and return the store's format version. Only
    a store whose tables are not all made yet is written to: reads never wait on writers."""
    # (not !=: a newer dm's store is left as it is, by reads above all)
    if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_REVISION:
        conn.executescript(SCHEMA)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
        conn.execute("UPDATE meta SET value=? WHERE key='format' AND value IN ({})".format(
            ",".join("?" * len(UPGRADABLE))), (str(FORMAT_VERSION), *UPGRADABLE))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('created_ns', ?)",
                     (str(time.time_ns()),))
        conn.execute(f"PRAGMA user_version={SCHEMA_REVISION}")
    row = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
    if row is None or not isinstance(row[0], str) or not row[0].isdigit():
        raise DamagedIndex("the store's index has no readable format version: run dm fsck "
                           "--repair")
    return int(row[0])


class Tx:
    """``with Tx(conn):`` runs the block in one IMMEDIATE transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def load_fingerprints(conn: sqlite3.Connection, content: bytes) -> bytes | None:
    """A paged file's superblock fingerprints (a local cache, not part of any object)."""
    row = conn.execute("SELECT data FROM fingerprints WHERE content=?", (content,)).fetchone()
    return bytes(row[0]) if row else None


# Saves of fingerprints a superseded version's survive: a reset or a checkout brings back a
# version that a commit (or the reset's own save of the state it discards) superseded, and
# without its fingerprints the next commit hashes all of each such file (a 1% commit of 2 GiB
# after a reset: 204,000 blocks hashed, not 17,000)
KEEP_SUPERSEDED = 16


def save_fingerprints(conn: sqlite3.Connection, rows: list[tuple[bytes, bytes]],
                      superseded: list[bytes]) -> None:
    """Store new fingerprints and mark those of the versions they replace; what was marked
    KEEP_SUPERSEDED saves ago is dropped (the cache then holds each file's current version
    and those of its recent past; older ones and another branch's files are hashed in full).

    A cache, so its transaction is not waited for on disk: with ``synchronous=NORMAL`` its
    commit is not fsync'd, and the next commit that is (the new objects' index rows, in a
    commit) writes it out with its own. A crash before that loses it, and that costs reads.
    On a loop device, the fsync took 3-17 ms of a 0.3 s btrfs commit."""
    saved = {r[0] for r in rows}
    gone = [(x,) for x in dict.fromkeys(superseded) if x not in saved]
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        with Tx(conn) as c:
            c.executemany("INSERT OR REPLACE INTO fingerprints VALUES (?, ?)", rows)
            c.executemany("DELETE FROM superseded_fingerprints WHERE content=?",
                          [(x,) for x in saved])  # current again
            if gone:
                # (a damaged row, not a number, must not stop the count: it is dropped)
                save = c.execute("SELECT coalesce(max(save), 0) + 1 FROM superseded_"
                                 "fingerprints WHERE typeof(save)='integer'").fetchone()[0]
                c.executemany(f"INSERT OR REPLACE INTO superseded_fingerprints VALUES "
                              f"(?, {int(save)})", gone)
                expired = "save <= ? OR typeof(save)!='integer'"
                c.execute("DELETE FROM fingerprints WHERE content IN (SELECT content FROM "
                          f"superseded_fingerprints WHERE {expired})", (save - KEEP_SUPERSEDED,))
                c.execute(f"DELETE FROM superseded_fingerprints WHERE {expired}",
                          (save - KEEP_SUPERSEDED,))
    finally:
        conn.execute("PRAGMA synchronous=FULL")


def fingerprinted(conn: sqlite3.Connection) -> list[bytes]:
    """The content ids the fingerprint cache has entries for."""
    return [bytes(r[0]) for r in conn.execute("SELECT content FROM fingerprints")]


def drop_fingerprints(conn: sqlite3.Connection, contents: list[bytes]) -> None:
    """Forget the fingerprints of contents gc removed, inside the caller's transaction."""
    conn.executemany("DELETE FROM fingerprints WHERE content=?", [(x,) for x in contents])
    conn.executemany("DELETE FROM superseded_fingerprints WHERE content=?",
                     [(x,) for x in contents])
