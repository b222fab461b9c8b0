"""The object index: which pack holds each object, where, and how it is stored (tables
``packs``, ``objects`` and ``recent_objects``).

Rows are plain tuples as sqlite3 returns them; store/packs.py checks each one before a read
trusts it. An object's row is committed only after its pack file is fsynced, so a crash leaves
at worst pack bytes no row names (never read).

A commit's rows go to ``recent_objects``, a small table; the commit that would take it past
RECENT_LIMIT rows moves them all into ``objects`` with its own. Ids are random, so each row
inserted into a large B-tree dirties a page of its own: the 2,300 rows of a 1% commit over
220,000 rewrote 1,600 pages (6.3 MiB of WAL and as much checkpointed; 68 ms on btrfs), against
40 pages (11.5 ms) in the small table; the move then rewrites the large one once for many
commits. An id is in one table or the other, never both; every function here reads both.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

Row = tuple[Any, ...]  # as sqlite3 returns it: checked by the reader

INSERT_CACHE_KIB = 64 << 10  # SQLite's page cache while a commit inserts its rows (default 2 MiB)
BATCH = 500  # ids per ``IN (...)`` query: well under SQLite's limit on bound parameters
RECENT_LIMIT = 20_000  # rows ``recent_objects`` takes before they move into ``objects``
ROWS_PER_INSERT = 64  # rows of one INSERT statement when many go in (7 parameters each)
_COLUMNS = "id, kind, pack, offset, stored_len, raw_len, zstd"
_ROW = "kind, pack, offset, stored_len, raw_len, zstd"


def _both(select: str) -> str:
    """``select`` (a query of table ``{t}``) over both tables."""
    return f"{select.format(t='objects')} UNION ALL {select.format(t='recent_objects')}"


def _ids(count: int) -> str:
    """Numbered placeholders, so that both halves of a union bind the same values."""
    return ",".join(f"?{i}" for i in range(1, count + 1))


# ------------------------------------------------------------------ objects
def object_row(conn: sqlite3.Connection, oid: bytes) -> Row | None:
    """(kind, pack, offset, stored_len, raw_len, zstd) of one object, or None if unindexed."""
    row: Row | None = conn.execute(
        _both(f"SELECT {_ROW} FROM {{t}} WHERE id=?1"), (oid,)).fetchone()
    return row


def has_object(conn: sqlite3.Connection, oid: bytes) -> bool:
    """Is the object indexed (without reading its row)?"""
    return conn.execute(_both("SELECT 1 FROM {t} WHERE id=?1"), (oid,)).fetchone() is not None


def count_objects(conn: sqlite3.Connection) -> int:
    """How many objects are indexed (fsck's progress total, and whether to read it all)."""
    return int(conn.execute("SELECT (SELECT count(*) FROM objects) + "
                            "(SELECT count(*) FROM recent_objects)").fetchone()[0])


def indexed_ids(conn: sqlite3.Connection, oids: Sequence[bytes]) -> Iterator[bytes]:
    """Those of ``oids`` that are indexed, asked in batches (a commit asks about thousands)."""
    for i in range(0, len(oids), BATCH):
        batch = oids[i:i + BATCH]
        q = _both(f"SELECT id FROM {{t}} WHERE id IN ({_ids(len(batch))})")
        yield from (r[0] for r in conn.execute(q, batch))


def all_ids(conn: sqlite3.Connection) -> Iterator[bytes]:
    """Every indexed id, in one scan: cheaper than batches when most of the index is asked
    about (a pull of a changed 2 GiB dot asks about 200,000 block ids: 1 s in batches)."""
    return (r[0] for r in conn.execute(_both("SELECT id FROM {t}")))


def object_rows_of(conn: sqlite3.Connection, oids: Sequence[bytes]) -> Iterator[Row]:
    """(id, kind, pack, offset, stored_len, raw_len, zstd) of those of ``oids`` that are
    indexed, asked in batches."""
    for i in range(0, len(oids), BATCH):
        batch = oids[i:i + BATCH]
        q = _both(f"SELECT {_COLUMNS} FROM {{t}} WHERE id IN ({_ids(len(batch))})")
        yield from conn.execute(q, batch)


def all_object_rows(conn: sqlite3.Connection) -> list[Row]:
    """(id, kind, pack, offset, stored_len, raw_len, zstd) of every indexed object, unchecked:
    one scan is cheaper than batches when most of the index is wanted, and fsck judges every
    row."""
    return conn.execute(_both(f"SELECT {_COLUMNS} FROM {{t}}")).fetchall()


def _by_id(rows: Iterable[Row]) -> list[Row]:
    """Rows in id order (a stable sort: of two rows with one id, the first stays first)."""
    return sorted(rows, key=itemgetter(0))


def add_object_rows(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """Index objects (id, kind, pack, offset, stored_len, raw_len, zstd) in ``objects``,
    inside the caller's transaction; an id indexed already keeps its row (any copy of an
    object will do).

    Rows go in sorted by id: BLAKE3 ids are random, so unsorted inserts touch a random page
    of the table's B-tree each; sorted, neighbours share pages (130,000 rows, a first
    commit's of 1 GiB: 1.25 s unsorted, 0.73 s sorted)."""
    conn.executemany("INSERT OR IGNORE INTO objects SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 "
                     "WHERE NOT EXISTS (SELECT 1 FROM recent_objects WHERE id=?1)",
                     _by_id(rows))


def _add_rows_after_merge(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """:func:`add_object_rows` when ``recent_objects`` is empty (just merged): nothing to
    check there for each row (7% of a first commit's insert), and ROWS_PER_INSERT rows
    to a statement (sqlite3's executemany costs a round of binding and stepping per row:
    212,000 rows, a 2 GiB first commit's, 0.79-0.82 s one by one, 0.43-0.54 s by 64)."""
    _insert_by_many(conn, "INSERT OR IGNORE INTO objects VALUES {}", _by_id(rows))


def _insert_by_many(conn: sqlite3.Connection, insert: str, ordered: list[Row]) -> None:
    """``insert`` (a statement whose ``{}`` takes a list of rows of 7 values) for
    ``ordered``, ROWS_PER_INSERT rows at a time and the rest one by one."""
    whole = len(ordered) // ROWS_PER_INSERT * ROWS_PER_INSERT
    many = insert.format(",".join(["(?, ?, ?, ?, ?, ?, ?)"] * ROWS_PER_INSERT))
    for i in range(0, whole, ROWS_PER_INSERT):
        conn.execute(many, list(chain.from_iterable(ordered[i:i + ROWS_PER_INSERT])))
    if whole < len(ordered):
        conn.executemany(insert.format("(?, ?, ?, ?, ?, ?, ?)"), ordered[whole:])


def _add_recent_rows(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """Rows into ``recent_objects`` but those of ids ``objects`` has, ROWS_PER_INSERT to a
    statement (the 2,300 rows of a 1% commit: 8-11 ms one by one, 6-9 ms so)."""
    _insert_by_many(conn, "INSERT OR IGNORE INTO recent_objects SELECT * FROM (VALUES {}) "
                    "AS v WHERE NOT EXISTS (SELECT 1 FROM objects WHERE id=v.column1)",
                    _by_id(rows))


def merge_recent(conn: sqlite3.Connection) -> None:
    """Move every row of ``recent_objects`` into ``objects``, inside the caller's
    transaction (in id order: the table's own)."""
    conn.execute("INSERT OR IGNORE INTO objects SELECT * FROM recent_objects")
    conn.execute("DELETE FROM recent_objects")


def replace_object_rows(conn: sqlite3.Connection, rows: Iterable[Row]) -> None:
    """Index objects, replacing what rows of those ids there are (fsck re-indexes objects whose
    rows it dropped as damaged), inside the caller's transaction."""
    ordered = _by_id(rows)
    conn.executemany("DELETE FROM recent_objects WHERE id=?", [r[:1] for r in ordered])
    conn.executemany("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?)", ordered)


def commit_object_rows(conn: sqlite3.Connection, rows: Iterable[Row],
                       also: Callable[[sqlite3.Connection], None] | None = None) -> None:
    """Index objects already fsynced into their packs, in one transaction of its own (rolled
    back if anything fails, the COMMIT included: a full disk leaves nothing half-indexed).
    With ``also`` (gc moving objects to a new pack), the rows replace those of the same ids
    and ``also(conn)`` runs inside the transaction."""
    rows = list(rows)
    cache = conn.execute("PRAGMA cache_size").fetchone()[0]
    conn.execute(f"PRAGMA cache_size={-INSERT_CACHE_KIB}")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if also is not None:
                replace_object_rows(conn, rows)
                also(conn)
            elif len(rows) + _recent_count(conn) <= RECENT_LIMIT:
                _add_recent_rows(conn, rows)
            else:  # one pass over the large table for these and the recent ones
                merge_recent(conn)
                _add_rows_after_merge(conn, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.execute(f"PRAGMA cache_size={int(cache)}")  # and the pages above it are let go


def _recent_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM recent_objects").fetchone()[0])


def drop_object_row(conn: sqlite3.Connection, oid: object) -> None:
    """Forget an object whose row or data is damaged (its pack bytes stay: never deleted)."""
    for table in ("objects", "recent_objects"):
        conn.execute(f"DELETE FROM {table} WHERE id=?", (oid,))


def drop_object_rows(conn: sqlite3.Connection, oids: Sequence[bytes]) -> None:
    """Forget objects gc found unreachable, inside the caller's transaction."""
    for table in ("objects", "recent_objects"):
        conn.executemany(f"DELETE FROM {table} WHERE id=?", [(x,) for x in oids])


def drop_pack_rows(conn: sqlite3.Connection, pack: int) -> None:
    """Forget every object row of a pack (gc removes the pack next)."""
    for table in ("objects", "recent_objects"):
        conn.execute(f"DELETE FROM {table} WHERE pack=?", (pack,))


# ------------------------------------------------------------------ packs
def pack_row(conn: sqlite3.Connection, pack: int) -> Row | None:
    """(name,) of a pack file by its number, unchecked; None if no row has that number."""
    row: Row | None = conn.execute("SELECT name FROM packs WHERE id=?", (pack,)).fetchone()
    return row


def pack_rows(conn: sqlite3.Connection) -> list[Row]:
    """(id, name) of every pack file, unchecked (fsck judges each name)."""
    return conn.execute("SELECT id, name FROM packs").fetchall()


def add_pack(conn: sqlite3.Connection, name: str) -> int:
    """Number a new pack file (its objects' rows name it by that number); returns it. Numbers
    are never given twice: above every pack's and every dropped one's (``pack_seq``), so that
    a process holding a removed pack open by number never reads another pack through it."""
    return conn.execute(
        "INSERT INTO packs (id, name) VALUES (max((SELECT coalesce(max(id), 0) FROM packs), "
        "coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key='pack_seq'), 0)) + 1, ?)",
        (name,)).lastrowid or 0


def drop_pack(conn: sqlite3.Connection, pack: object) -> None:
    """Forget a pack file: one that was removed, or a row that names no file."""
    if isinstance(pack, int):
        conn.execute("INSERT INTO meta VALUES ('pack_seq', ?) ON CONFLICT (key) DO UPDATE SET "
                     "value=CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) "
                     "AS TEXT)", (str(pack),))
    conn.execute("DELETE FROM packs WHERE id=?", (pack,))


def clear(conn: sqlite3.Connection) -> None:
    """Empty the index (each statement on its own: a rebuild then indexes every pack file
    found, one transaction per pack)."""
    conn.execute("DELETE FROM objects")
    conn.execute("DELETE FROM recent_objects")
    conn.execute("DELETE FROM packs")
