"""Pack files: append-only sequences of compressed objects, indexed in SQLite.

A record is a fixed header (kind, flags, id, raw length, stored length) followed by the payload,
so a pack can be verified or re-indexed on its own. A writer owns a fresh pack file, fsyncs it and
only then commits the index rows; bytes after the last indexed record (a crash) are never read.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from dotmesh.errors import Corrupt, NotFound
from dotmesh.model.objects import ID_LEN, ObjectId, object_id

PACK_MAGIC = b"DMPACK1\n"
RECORD = struct.Struct(f"<BB{ID_LEN}sII")
FLAG_ZSTD = 1
MAX_OBJECT = 1 << 30
PACK_ROTATE = 512 << 20
ZSTD_LEVEL = 1

_local = threading.local()


def compress(data: bytes | memoryview) -> tuple[bytes | memoryview, bool]:
    """zstd level 1 unless it does not pay; returns (payload, compressed?)."""
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    out = c.compress(data)
    if len(out) < len(data):
        return out, True
    return data, False


def decompress(data: bytes | memoryview, raw_len: int) -> bytes:
    """Decompress a payload that must come out ``raw_len`` bytes long.

    zstd frames may declare their size, and python-zstandard then allocates what they
    declare, whatever ``max_output_size`` says: a 16 KiB frame can claim gigabytes. So the
    declared size is checked first (ZstdError if it is not ``raw_len``)."""
    declared = zstandard.frame_content_size(data)
    if declared not in (raw_len, -1):
        raise zstandard.ZstdError(f"frame declares {declared} bytes, not {raw_len}")
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d.decompress(data, max_output_size=raw_len)


@dataclass(frozen=True)
class Location:
    kind: int
    pack: int
    offset: int
    stored_len: int
    raw_len: int
    zstd: bool


class PackStore:
    """Reads objects by id; hands out writers. Safe to read from several threads."""

    def __init__(self, root: Path, conn: sqlite3.Connection) -> None:
        self.dir = root / "packs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conn = conn
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    # -- index
    def locate(self, oid: bytes) -> Location | None:
        row = self.conn.execute(
            "SELECT kind, pack, offset, stored_len, raw_len, zstd FROM objects WHERE id=?", (oid,)
        ).fetchone()
        return Location(row[0], row[1], row[2], row[3], row[4], bool(row[5])) if row else None

    def has(self, oid: bytes) -> bool:
        return self.conn.execute("SELECT 1 FROM objects WHERE id=?", (oid,)).fetchone() is not None

    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM objects").fetchone()[0])

    def missing(self, oids: Iterable[bytes]) -> set[bytes]:
        """The subset of ``oids`` not in the index (batched queries)."""
        todo = list(set(oids))
        found: set[bytes] = set()
        for i in range(0, len(todo), 500):
            batch = todo[i:i + 500]
            q = "SELECT id FROM objects WHERE id IN ({})".format(",".join("?" * len(batch)))
            found.update(r[0] for r in self.conn.execute(q, batch))
        return set(todo) - found

    def pack_name(self, pack: int) -> str:
        row = self.conn.execute("SELECT name FROM packs WHERE id=?", (pack,)).fetchone()
        if row is None:
            raise Corrupt(f"pack #{pack} is missing from the index; run dm fsck")
        return str(row[0])

    def _fd(self, pack: int) -> int:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                path = self.dir / self.pack_name(pack)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise Corrupt(f"pack file {path.name} is missing; run dm fsck") from None
                self._fds[pack] = fd
            return fd

    # -- reads
    def read_located(self, oid: bytes, loc: Location) -> bytes:
        raw = os.pread(self._fd(loc.pack), loc.stored_len, loc.offset)
        if len(raw) != loc.stored_len:
            raise Corrupt(f"object {oid.hex()[:16]} is truncated in its pack; run dm fsck")
        return self._unpack(oid, loc, raw)

    def _unpack(self, oid: bytes, loc: Location, raw: bytes | memoryview) -> bytes:
        try:
            data = decompress(raw, loc.raw_len) if loc.zstd else bytes(raw)
        except zstandard.ZstdError:
            raise Corrupt(f"object {oid.hex()[:16]} does not decompress; run dm fsck") from None
        if len(data) != loc.raw_len or object_id(data) != oid:
            raise Corrupt(f"object {oid.hex()[:16]} fails its hash check; run dm fsck")
        return data

    def verify_located(self, oid: bytes, loc: Location) -> None:
        """What fsck checks: the record header agrees with the index, and the payload hashes."""
        head = os.pread(self._fd(loc.pack), RECORD.size, loc.offset - RECORD.size)
        if len(head) != RECORD.size:
            raise Corrupt(f"object {oid.hex()[:16]} has a truncated record header")
        kind, flags, hid, raw_len, stored_len = RECORD.unpack(head)
        if (kind, bool(flags & FLAG_ZSTD), hid, raw_len, stored_len) != (
                loc.kind, loc.zstd, oid, loc.raw_len, loc.stored_len):
            raise Corrupt(f"object {oid.hex()[:16]} has a record header that disagrees with "
                          "the index")
        self.read_located(oid, loc)

    def get(self, oid: bytes) -> bytes:
        loc = self.locate(oid)
        if loc is None:
            raise NotFound(f"object {oid.hex()[:16]} is not in the store")
        return self.read_located(oid, loc)

    def locate_many(self, oids: Iterable[bytes]) -> dict[bytes, Location]:
        todo = list(set(oids))
        out: dict[bytes, Location] = {}
        for i in range(0, len(todo), 500):
            batch = todo[i:i + 500]
            q = ("SELECT id, kind, pack, offset, stored_len, raw_len, zstd FROM objects "
                 "WHERE id IN ({})".format(",".join("?" * len(batch))))
            for r in self.conn.execute(q, batch):
                out[r[0]] = Location(r[1], r[2], r[3], r[4], r[5], bool(r[6]))
        return out

    def locate_all(self, oids: Iterable[bytes]) -> dict[bytes, Location]:
        """Like :meth:`locate_many`, but reads the whole index when most of it is wanted."""
        wanted = set(oids)
        if len(wanted) < 50_000 or len(wanted) < self.count() // 4:
            return self.locate_many(wanted)
        return {oid: loc for oid, loc in self.iter_index() if oid in wanted}

    def read_run(self, run: list[tuple[bytes, Location]]) -> Iterator[bytes]:
        """Objects stored back to back in one pack, read with one system call."""
        first, last = run[0][1], run[-1][1]
        start, end = first.offset, last.offset + last.stored_len
        raw = os.pread(self._fd(first.pack), end - start, start)
        if len(raw) != end - start:
            raise Corrupt(f"pack #{first.pack} is truncated; run dm fsck")
        view = memoryview(raw)
        for oid, loc in run:
            part = view[loc.offset - start:loc.offset - start + loc.stored_len]
            yield self._unpack(oid, loc, part)

    def stored(self, oids: list[bytes]) -> Iterator[tuple[bytes, Location, bytes]]:
        """(id, location, stored payload) of each object, as kept (compressed or not), for
        sending elsewhere without recompressing; neighbours are read with one call. Raises
        NotFound for an id not in the store."""
        locs = self.locate_many(oids)
        lost = [o for o in oids if o not in locs]
        if lost:
            raise NotFound(f"object {lost[0].hex()[:16]} is not in the store")
        order = sorted(oids, key=lambda o: (locs[o].pack, locs[o].offset))
        i = 0
        while i < len(order):
            run = [order[i]]
            while (i + len(run) < len(order)
                   and locs[order[i + len(run)]].pack == locs[run[0]].pack
                   and locs[order[i + len(run)]].offset == locs[run[-1]].offset
                   + locs[run[-1]].stored_len + RECORD.size
                   and locs[run[-1]].offset - locs[run[0]].offset < 8 << 20):
                run.append(order[i + len(run)])
            first, last = locs[run[0]], locs[run[-1]]
            raw = os.pread(self._fd(first.pack), last.offset + last.stored_len - first.offset,
                           first.offset)
            if len(raw) != last.offset + last.stored_len - first.offset:
                raise Corrupt(f"pack #{first.pack} is truncated; run dm fsck")
            for oid in run:
                loc = locs[oid]
                yield oid, loc, raw[loc.offset - first.offset:
                                    loc.offset - first.offset + loc.stored_len]
            i += len(run)

    def iter_index(self) -> Iterator[tuple[bytes, Location]]:
        for r in self.conn.execute(
            "SELECT id, kind, pack, offset, stored_len, raw_len, zstd FROM objects"
        ).fetchall():
            yield r[0], Location(r[1], r[2], r[3], r[4], r[5], bool(r[6]))

    def writer(self) -> PackWriter:
        return PackWriter(self)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class PackWriter:
    """Appends objects to a new pack; :meth:`flush` makes them durable, then indexes them."""

    def __init__(self, store: PackStore) -> None:
        self.store = store
        self._fd = -1
        self._pack_id = 0
        self._pos = 0
        self._pending: dict[bytes, tuple[int, int, int, int, int, int]] = {}
        self.bytes_written = 0
        self.objects_written = 0
        self._lock = threading.Lock()  # workers add chunks from several threads

    def _open(self) -> None:
        name = f"{uuid.uuid4().hex}.pack"
        path = self.store.dir / name
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(self._fd, PACK_MAGIC)
        self._pos = len(PACK_MAGIC)
        conn = self.store.conn
        self._pack_id = conn.execute("INSERT INTO packs (name) VALUES (?)", (name,)).lastrowid or 0

    def __contains__(self, oid: bytes) -> bool:
        return oid in self._pending

    def add(self, kind: int, oid: bytes, raw_len: int, payload: bytes | memoryview,
            zstd: bool) -> None:
        """Append one object (already compressed as ``zstd`` says) unless pending already."""
        self.add_many([(kind, oid, raw_len, payload, zstd)])

    def add_many(self, records: list[tuple[int, bytes, int, bytes | memoryview, bool]]) -> None:
        """Append several objects with as few system calls as possible (thread-safe)."""
        with self._lock:
            iov: list[bytes | memoryview] = []
            for kind, oid, raw_len, payload, zstd in records:
                if oid in self._pending:
                    continue
                if raw_len > MAX_OBJECT:
                    raise Corrupt(f"object of {raw_len} bytes exceeds the {MAX_OBJECT} byte limit")
                if self._fd < 0 or self._pos > PACK_ROTATE:
                    self._write(iov)
                    self._rotate()
                iov.append(RECORD.pack(kind, FLAG_ZSTD if zstd else 0, oid, raw_len,
                                       len(payload)))
                iov.append(payload)
                offset = self._pos + RECORD.size
                self._pending[oid] = (kind, self._pack_id, offset, len(payload), raw_len,
                                      int(zstd))
                self._pos = offset + len(payload)
                self.bytes_written += RECORD.size + len(payload)
                self.objects_written += 1
            self._write(iov)

    def _write(self, iov: list[bytes | memoryview]) -> None:
        for i in range(0, len(iov), 1024):  # IOV_MAX
            part = iov[i:i + 1024]
            want = sum(len(x) for x in part)
            done = os.writev(self._fd, part)
            if done != want:  # a short write: finish it piece by piece
                rest = b"".join(bytes(x) for x in part)[done:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
        iov.clear()

    def put(self, kind: int, data: bytes) -> ObjectId:
        """Hash, compress and add a whole object; returns its id."""
        oid = object_id(data)
        if oid not in self._pending and not self.store.has(oid):
            payload, z = compress(data)
            self.add(kind, oid, len(data), payload, z)
        return oid

    def _rotate(self) -> None:
        if self._fd >= 0:
            self._sync_file()
        self._open()

    def _sync_file(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        dfd = os.open(self.store.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def flush(self) -> None:
        """Make every added object durable and visible; the writer can go on afterwards."""
        if self._fd >= 0:
            self._sync_file()
        if self._pending:
            conn = self.store.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR IGNORE INTO objects VALUES (?,?,?,?,?,?,?)",
                    [(k, *v) for k, v in self._pending.items()],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._pending.clear()
