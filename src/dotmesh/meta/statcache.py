"""The stat cache: per branch and subdot, what each file's stat was when its content had a
given id, so that a commit reads only files whose stat changed."""

from __future__ import annotations

import os
import sqlite3
import struct
from typing import NamedTuple

import xxhash

StatCache = dict[bytes, tuple[int, int, int, int, bytes, int]]  # laid out as CacheEntry
NO_CONTENT = bytes(32)
HAS_CONTENT, CHUNKED, HINT_ONLY, FOLDER = 2, 1, 4, 8
_CACHE_RECORD = struct.Struct("<QqqQ32sB")


class CacheEntry(NamedTuple):
    """What a file's stat was when its content had a given id.

    A plain tuple in the layout of its on-disk record, so that loading 200,000 of them and
    comparing them stays in C: ``raw`` is the content id (zeros if none), ``flags`` has
    HAS_CONTENT and CHUNKED bits.

    A folder has an entry too, under its path and a ``/`` (``b"/"`` for the top), flagged
    FOLDER|HAS_CONTENT: ``raw`` is its tree, still right while the folder's ``ctime_ns`` and
    ``ino`` are these, each file in it matches its own entry, and no entry in it has a ctime
    at or past ``mtime_ns`` (the snapshot's start, less the racy margin). A no-change commit
    then stores no tree again (see :func:`folder_key` and the snapshot's walk).
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    raw: bytes
    flags: int

    @classmethod
    def of(cls, size: int, mtime_ns: int, ctime_ns: int, ino: int, content: bytes | None,
           chunked: bool) -> CacheEntry:
        return cls(size, mtime_ns, ctime_ns, ino, content or NO_CONTENT,
                   (HAS_CONTENT if content else 0) | (CHUNKED if chunked else 0))

    @property
    def content(self) -> bytes | None:
        return self.raw if self.flags & HAS_CONTENT else None

    @property
    def chunked(self) -> bool:
        return bool(self.flags & CHUNKED)


def folder_key(rel: str) -> bytes:
    """The key of a folder's entry: no file's path ends with a slash."""
    return os.fsencode(rel) + b"/"


CACHE_MAGIC = b"DMSC2"


def encode_cache(cache: StatCache) -> bytes:
    """One blob per subdot: NUL-separated paths, then fixed-size records in the same order,
    behind a checksum: an entry decides whether a file is read at all, so a damaged one
    must never be trusted (it would record a content id the store does not have)."""
    paths = list(cache)
    names = b"\0".join(paths)
    pack = _CACHE_RECORD.pack
    body = (struct.pack("<II", len(paths), len(names)) + names
            + b"".join(pack(*cache[p]) for p in paths))
    return CACHE_MAGIC + xxhash.xxh3_64_digest(body) + body


def decode_cache(blob: bytes) -> StatCache:
    """The cache in ``blob``; ValueError if it is damaged (or of an older format): it is then
    dropped, which only costs reading every file once."""
    head = len(CACHE_MAGIC) + 8
    body = memoryview(blob)[head:]
    if blob[:len(CACHE_MAGIC)] != CACHE_MAGIC or xxhash.xxh3_64_digest(body) != blob[
            len(CACHE_MAGIC):head]:
        raise ValueError("stat cache is damaged")
    count, names_len = struct.unpack_from("<II", body)
    if not count:
        return {}
    if len(body) != 8 + names_len + count * _CACHE_RECORD.size:
        raise ValueError("stat cache is damaged")
    paths = bytes(body[8:8 + names_len]).split(b"\0")  # paths never contain NUL
    records = _CACHE_RECORD.iter_unpack(body[8 + names_len:])
    return dict(zip(paths, records, strict=True))  # plain tuples: CacheEntry's layout


class Encoded(bytes):
    """A cache as :func:`encode_cache` made it, passed on without decoding (a kept state's,
    for a copy that has the same files): saved as it is, its checksum checked when loaded.
    Decoding and encoding again cost 7 ms for a folder of 5,000 files."""


_SIZE_AND_FLAGS = struct.Struct("<Q56xB")  # a record's size and flags, the rest skipped


def largest_files(blob: bytes, count: int) -> StatCache:
    """The entries of the ``count`` largest files in an encoded cache, without decoding the
    others (a reset tells a changed working state from them: 1 ms, not 5, at 5,000 files);
    empty if the blob is damaged."""
    import heapq

    head = len(CACHE_MAGIC) + 8
    body = memoryview(blob)[head:]
    try:
        if blob[:len(CACHE_MAGIC)] != CACHE_MAGIC or xxhash.xxh3_64_digest(body) != blob[
                len(CACHE_MAGIC):head]:
            return {}
        n, names_len = struct.unpack_from("<II", body)
        records = body[8 + names_len:]
        if not n or len(records) != n * _CACHE_RECORD.size:
            return {}
        files = ((size, i) for i, (size, flags) in enumerate(_SIZE_AND_FLAGS.iter_unpack(records))
                 if not flags & FOLDER)
        paths = bytes(body[8:8 + names_len]).split(b"\0")
        if len(paths) != n:
            return {}
        return {paths[i]: _CACHE_RECORD.unpack_from(records, i * _CACHE_RECORD.size)
                for _, i in heapq.nlargest(count, files)}
    except (struct.error, IndexError):
        return {}


def decode_or_empty(blob: bytes) -> StatCache:
    """:func:`decode_cache`, or an empty cache for a damaged blob (which only costs reading
    every file once)."""
    try:
        return decode_cache(blob)
    except (ValueError, struct.error, TypeError):
        return {}


def load_encoded(conn: sqlite3.Connection, dot: str, branch: str, subdot: str
                 ) -> Encoded | None:
    """The subdot's cache on ``branch`` as stored (None: there is none)."""
    row = conn.execute("SELECT data FROM statcache WHERE dot=? AND branch=? AND subdot=?",
                       (dot, branch, subdot)).fetchone()
    return Encoded(row[0]) if row is not None and isinstance(row[0], bytes) else None


def load(conn: sqlite3.Connection, dot: str, branch: str, subdot: str) -> StatCache:
    """The subdot's cache on ``branch``; empty when there is none or it is damaged."""
    blob = load_encoded(conn, dot, branch, subdot)
    return decode_or_empty(blob) if blob is not None else {}


def save(conn: sqlite3.Connection, dot: str, branch: str, subdot: str, old: StatCache,
         new: StatCache | Encoded) -> None:
    """Replace the subdot's cache (inside the caller's transaction) if it changed."""
    if isinstance(new, Encoded):
        # (a reset to the head's kept state finds the very cache it would write)
        if new != load_encoded(conn, dot, branch, subdot):
            conn.execute("INSERT OR REPLACE INTO statcache VALUES (?, ?, ?, ?)",
                         (dot, branch, subdot, bytes(new)))
    elif new != old:
        conn.execute("INSERT OR REPLACE INTO statcache VALUES (?, ?, ?, ?)",
                     (dot, branch, subdot, encode_cache(new)))


def drop_branch(conn: sqlite3.Connection, dot: str, branch: str) -> None:
    """Forget the caches of a branch whose folders go."""
    conn.execute("DELETE FROM statcache WHERE dot=? AND branch=?", (dot, branch))


def all_blobs(conn: sqlite3.Connection) -> list[object]:
    """Every stored cache, of every dot and branch, as stored (gc keeps what they name)."""
    return [r[0] for r in conn.execute("SELECT data FROM statcache")]
