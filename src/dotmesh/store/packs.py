"""Pack files: append-only sequences of compressed objects, indexed in SQLite (meta/index.py).

A record is a fixed header (kind, flags, id, raw length, stored length) followed by the payload,
so a pack can be verified or re-indexed on its own. A writer owns a fresh pack file, fsyncs it and
only then commits the index rows; bytes after the last indexed record (a crash) are never read.
The writer holds an exclusive ``flock`` on each pack it makes from its creation until its rows
are committed (or it gives the pack back): gc never removes or cuts a pack someone holds
(:func:`owned`), and a pack whose rows are in is never appended to again.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import sqlite3
import struct
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, NamedTuple, TypeAlias, TypeVar, cast

import zstandard

from dotmesh.errors import Corrupt, InternalError, NotFound, OutOfSpace, TooLarge
from dotmesh.heap import HUGE_PAGE, private_buffer
from dotmesh.meta import index
from dotmesh.model.ids import ID_LEN, ObjectId, object_id
from dotmesh.model.objects import KIND_NAMES, MAX_SIZE

PACK_MAGIC = b"DMPACK1\n"
RECORD = struct.Struct(f"<BB{ID_LEN}sII")
FLAG_ZSTD = 1
PACK_ROTATE = 512 << 20
# zstd's level -1 packs half-empty pages as tightly as level 1, and text into 7% more bytes, for
# 1.2-2.3x the speed: a 2 GiB first commit stored 0.8% more for 15-26% less of its
# children's CPU, which compression was half of (bench/README.md)
ZSTD_LEVEL = -1
ZSTD_SLACK = 1024  # a zstd frame is at most this much larger than what it holds
STREAM_PIECE = 1 << 20
RUN_BUFFER = 9 << 20  # a thread's buffer for a run of records (restore.READ_RUN, 8 MiB)
DIRECT_ALIGN = 4096  # O_DIRECT's unit of offsets, lengths and buffer addresses
PREFETCH_LIMIT = 2 << 30  # pack bytes a restore asks the kernel to read ahead, at most

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """This thread's compressor (a context is reused, not made per call)."""
    c: zstandard.ZstdCompressor | None = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


SAMPLE_FROM = 1 << 20  # objects this large are first tried on a sample (see compress)
_SAMPLE = 64 << 10
_PAYS = 0.9  # what a sample must shrink to, at most, for the whole object to be compressed


def compress(data: bytes | memoryview) -> tuple[bytes | memoryview, bool]:
    """zstd at ZSTD_LEVEL unless it does not pay; returns (payload, compressed?). An object
    of SAMPLE_FROM bytes or more is first tried on 64 KiB at its start, middle and end, and
    stored as it is unless one of them shrinks 10%: a paged file's list (a random 32-byte id
    and the same length for each block) shrank by 6%, for 4-6 ms a 2.4 MB list to
    compress, and 1-2 ms again at each read (three of them in every 1% commit of the
    bench). Three samples, as a sparse file's list has runs of one id wherever its holes
    are."""
    n = len(data)
    if n >= SAMPLE_FROM:
        with memoryview(data) as view:
            starts = (0, n // 2 - _SAMPLE // 2, n - _SAMPLE)
            if not any(len(_compressor().compress(view[at:at + _SAMPLE])) <= _SAMPLE * _PAYS
                       for at in starts):
                return data, False
    out = _compressor().compress(data)
    if len(out) < len(data):
        return out, True
    return data, False


Span = tuple[int, int]  # (offset, length) of an object's bytes in a buffer


def compress_many(buf: memoryview, spans: Sequence[Span]
                  ) -> list[tuple[bytes | memoryview, bool]]:
    """:func:`compress` of each span of ``buf``, in one call into zstd: a commit compresses
    a hundred thousand 8 KiB blocks per GiB, and one call (one release of the GIL) per block
    had the two workers handing the GIL to each other at every block. An incompressible
    span comes back as a copy of its bytes (``buf`` is reused)."""
    if not spans:
        return []
    table = struct.pack(f"<{2 * len(spans)}Q", *[v for span in spans for v in span])
    frames = _compressor().multi_compress_to_buffer(zstandard.BufferWithSegments(buf, table))
    out: list[tuple[bytes | memoryview, bool]] = []
    raw: list[int] = []  # the spans stored as they are
    for i, (_, n) in enumerate(spans):
        # a view into the one buffer holding every frame (BufferSegment has the buffer
        # protocol; its stub does not say so)
        frame = memoryview(cast(bytes, frames[i]))
        if len(frame) < n:
            out.append((frame, True))
        else:
            out.append((frame, False))  # replaced below
            raw.append(i)
    if raw:
        # copied into one buffer, not a bytes object each: 730 random pages copied one by
        # one took 50-70 ms of a 1% commit, most of it faulting in fresh heap pages
        total = sum(spans[i][1] for i in raw)
        copies = memoryview(private_buffer(total) if total >= HUGE_PAGE else bytearray(total))
        at = 0
        for i in raw:
            o, n = spans[i]
            copies[at:at + n] = buf[o:o + n]
            out[i] = (copies[at:at + n], False)
            at += n
    return out


def decompress(data: bytes | memoryview, raw_len: int) -> bytes:
    """Decompress a payload that must come out ``raw_len`` bytes long, allocating no more
    than that whatever the frame says.

    A frame may declare its size: python-zstandard then allocates what it declares, so that
    must be ``raw_len`` (the caller bounds it by the object's kind). A frame that does not say
    is read as a stream, up to one byte past ``raw_len``: memory follows what really comes
    out, not what a header claims (ZstdError if the length is wrong either way)."""
    declared = zstandard.frame_content_size(data)
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    if declared == raw_len:
        return d.decompress(data)
    if declared != -1:
        raise zstandard.ZstdError(f"frame declares {declared} bytes, not {raw_len}")
    out = bytearray()
    with d.stream_reader(memoryview(data)) as reader:
        while len(out) <= raw_len:  # a piece at a time: a read allocates what it asks for
            more = reader.read(min(STREAM_PIECE, raw_len + 1 - len(out)))
            if not more:
                break
            out += more
    if len(out) != raw_len:
        raise zstandard.ZstdError(f"frame holds {'more' if len(out) > raw_len else 'less'} "
                                  f"than {raw_len} bytes")
    return bytes(out)


PackKey = TypeVar("PackKey", int, str)


class PackLocation(NamedTuple, Generic[PackKey]):
    """Where an object's payload sits in a pack, and how it is stored: the one type for the
    local index (``pack`` is the index's pack number, :data:`Location`) and for packs kept
    remotely (``pack`` is the blob's key, ``PackLocation[str]`` in remote/packed.py).
    ``offset`` is that of the payload, after its record header. A named tuple, not a frozen
    dataclass: a full restore makes one per block, and a tuple is made in a third of the
    time (1.1 -> 0.33 us)."""

    kind: int
    pack: PackKey
    offset: int
    stored_len: int
    raw_len: int
    zstd: bool


Location: TypeAlias = PackLocation[int]  # a location in the local store's packs


def _sound(oid: object, kind: object, pack: object, offset: object, stored_len: object,
           raw_len: object, zstd: object) -> bool:
    """Whether an index row can be trusted: a damaged row must not make a read allocate or
    seek wildly. (Plain comparisons: a full restore checks a hundred thousand rows.)"""
    return (type(oid) is bytes and len(oid) == ID_LEN and type(pack) is int
            and type(offset) is int and type(stored_len) is int and type(raw_len) is int
            and (zstd == 0 or zstd == 1) and kind in MAX_SIZE
            and 0 < raw_len <= MAX_SIZE[kind]
            and 0 < stored_len <= raw_len + ZSTD_SLACK and offset > len(PACK_MAGIC)
            and (zstd == 1 or stored_len == raw_len))


def _damaged(oid: object) -> Corrupt:
    shown = oid.hex()[:16] if isinstance(oid, bytes) else repr(oid)[:16]
    return Corrupt(f"the index entry of object {shown} is damaged; run dm fsck --repair")


def _location(oid: object, kind: object, pack: object, offset: object, stored_len: object,
              raw_len: object, zstd: object) -> Location:
    """An index row, checked (:func:`_sound`)."""
    if _sound(oid, kind, pack, offset, stored_len, raw_len, zstd):
        return PackLocation(kind, pack, offset, stored_len, raw_len, bool(zstd))  # type: ignore[arg-type]
    raise _damaged(oid)


def location(row: index.Row) -> Location:
    """An index row (from :meth:`PackStore.rows_all`) as a location, checked."""
    return _location(*row)


class PackStore:
    """Reads objects by id; hands out writers. Safe to read from several threads."""

    def __init__(self, root: Path, conn: sqlite3.Connection) -> None:
        self.dir = root / "packs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conn = conn
        self._fds: dict[int, int] = {}
        # Descriptors with O_DIRECT, for reading runs (a restore): -1 where refused
        self._direct: dict[int, int] = {}
        self._stale: list[int] = []
        self._lock = threading.Lock()
        self._writers: weakref.WeakSet[PackWriter] = weakref.WeakSet()
        self._on_btrfs: bool | None = None  # known at the first new pack

    def on_btrfs(self) -> bool:
        if self._on_btrfs is None:
            from dotmesh.fs import btrfs  # (not for a hub's or a reader's store)

            try:
                self._on_btrfs = btrfs.on_btrfs(self.dir)
            except OSError:
                self._on_btrfs = False
        return self._on_btrfs

    # -- index
    def locate(self, oid: ObjectId) -> Location | None:
        row = index.object_row(self.conn, oid)
        return _location(oid, *row) if row else None

    def has(self, oid: ObjectId) -> bool:
        return index.has_object(self.conn, oid)

    def count(self) -> int:
        return index.count_objects(self.conn)

    def missing(self, oids: Iterable[ObjectId]) -> set[ObjectId]:
        """The subset of ``oids`` not in the index (batched queries, or one scan of the
        index when most of it is asked about)."""
        todo = set(oids)
        if self._most_of_index(len(todo)):
            todo.difference_update(index.all_ids(self.conn))  # as they come: no second set
        else:
            todo.difference_update(index.indexed_ids(self.conn, list(todo)))
        return todo

    def _most_of_index(self, asked: int) -> bool:
        """Whether reading the whole index costs less than asking about ``asked`` ids in
        batches (an id costs about what 4 rows of a scan do)."""
        return asked >= 50_000 and asked >= self.count() // 4

    def pack_name(self, pack: int) -> str:
        row = index.pack_row(self.conn, pack)
        if row is None:
            raise Corrupt(f"pack #{pack} is missing from the index; run dm fsck")
        if not isinstance(row[0], str) or not PACK_NAME.fullmatch(row[0]):
            raise Corrupt(f"the index names pack #{pack} badly; run dm fsck --repair")
        return row[0]

    def _fd(self, pack: int) -> int:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                path = self.dir / self.pack_name(pack)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise Corrupt(f"pack file {path.name} is missing; run dm fsck") from None
                self._fds[pack] = fd
            return fd

    def _direct_fd(self, pack: int) -> int:
        """The pack opened with O_DIRECT (-1 if the filesystem refuses it)."""
        fd = self._direct.get(pack)
        if fd is None:
            path = self.dir / self.pack_name(pack)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            except FileNotFoundError:
                raise Corrupt(f"pack file {path.name} is missing; run dm fsck") from None
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                fd = -1
            with self._lock:
                if pack in self._direct:  # another thread was first
                    if fd >= 0:
                        os.close(fd)
                    return self._direct[pack]
                self._direct[pack] = fd
        return fd

    def _refuse_direct(self, pack: int) -> None:
        """Read ``pack`` through the page cache from now on: its filesystem took O_DIRECT at
        open, then refused a read. (Its descriptor is closed with the store: another thread
        may be reading through it.)"""
        with self._lock:
            fd = self._direct.get(pack, -1)
            self._direct[pack] = -1
            if fd >= 0:
                self._stale.append(fd)

    def open_packs(self, packs: Iterable[int]) -> None:
        """Open these packs now (a forked child reads through descriptors opened before the
        fork, never through the index's connection)."""
        for pack in sorted(packs):
            self._fd(pack)
            self._direct_fd(pack)

    # -- reads
    def read_located(self, oid: ObjectId, loc: Location) -> bytes:
        raw = os.pread(self._fd(loc.pack), loc.stored_len, loc.offset)
        if len(raw) != loc.stored_len:
            raise Corrupt(f"object {oid.hex()[:16]} is truncated in its pack; run dm fsck")
        return self._unpack(oid, loc, raw)

    def _unpack(self, oid: ObjectId, loc: Location, raw: bytes | memoryview) -> bytes:
        try:
            # (no copy of what is bytes already: a 2.4 MB file list is 600 fresh pages)
            data = (decompress(raw, loc.raw_len) if loc.zstd
                    else raw if type(raw) is bytes else bytes(raw))
        except zstandard.ZstdError:
            raise Corrupt(f"object {oid.hex()[:16]} does not decompress; run dm fsck") from None
        if len(data) != loc.raw_len or object_id(data) != oid:
            raise Corrupt(f"object {oid.hex()[:16]} fails its hash check; run dm fsck")
        return data

    def check_stored(self, oid: ObjectId, loc: Location, payload: bytes | memoryview) -> None:
        """Corrupt unless ``payload`` (as stored) is the object (gc checks what it copies)."""
        self._unpack(oid, loc, payload)

    def verify_located(self, oid: ObjectId, loc: Location) -> None:
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

    def get(self, oid: ObjectId) -> bytes:
        """An object by id, verified. A read that holds no lock (``dm log``, ``dm diff``) may
        meet a pack that a gc has just copied elsewhere and removed (or an open one whose
        number a new pack took): it looks the object up again and reads it afresh, once."""
        loc = self.locate(oid)
        if loc is None:
            raise NotFound(f"object {oid.hex()[:16]} is not in the store")
        try:
            return self.read_located(oid, loc)
        except Corrupt:
            self._forget(loc.pack)
            again = self.locate(oid)
            if again is None:
                raise
            return self.read_located(oid, again)

    def _forget(self, pack: int) -> None:
        """Open the pack afresh next time (the old descriptor is closed with the store: another
        thread may be reading through it)."""
        with self._lock:
            fd = self._fds.pop(pack, None)
            if fd is not None:
                self._stale.append(fd)
            fd = self._direct.pop(pack, None)
            if fd is not None and fd >= 0:
                self._stale.append(fd)

    def locate_many(self, oids: Iterable[ObjectId]) -> dict[ObjectId, Location]:
        todo = list(set(oids))
        out: dict[ObjectId, Location] = {}
        for r in index.object_rows_of(self.conn, todo):
            out[ObjectId(r[0])] = _location(*r)  # _location checks the id too
        return out

    def raw_lengths(self, oids: Iterable[ObjectId]) -> dict[ObjectId, int]:
        """The length of each of ``oids`` that is indexed, its row checked whole as
        :meth:`locate` checks it (a damaged row raises Corrupt), without making locations:
        a pull checks the lengths of 200,000 blocks it holds."""
        out: dict[ObjectId, int] = {}
        for oid, row in self.rows_all(oids).items():
            if not _sound(*row):
                raise _damaged(oid)
            out[ObjectId(oid)] = row[5]
        return out

    def locate_all(self, oids: Iterable[ObjectId]) -> dict[ObjectId, Location]:
        """Like :meth:`locate_many`, but reads the whole index when most of it is wanted."""
        return {ObjectId(oid): _location(*r) for oid, r in self.rows_all(oids).items()}

    def rows_all(self, oids: Iterable[ObjectId]) -> dict[bytes, index.Row]:
        """The index rows of ``oids`` as stored, unchecked: in batches, or the whole index in
        one scan when most of it is wanted. Each is checked by :func:`location` where it is
        used, so a forked build's children check their own instead of the parent checking
        all before forking."""
        wanted = set(oids)
        if not self._most_of_index(len(wanted)):
            rows: Iterable[index.Row] = index.object_rows_of(self.conn, list(wanted))
        else:
            rows = index.all_object_rows(self.conn)
        return {r[0]: r for r in rows if r[0] in wanted}

    def prefetch(self, locs: Iterable[Location], gap: int = 1 << 20,
                 limit: int = PREFETCH_LIMIT) -> None:
        """Ask the kernel to start reading the pack bytes of ``locs`` (stretches closer than
        ``gap`` merged, ``limit`` bytes at most: a restore larger than memory would evict
        its own prefetched pages) while the caller does other work: packs that left the
        page cache (a reboot, a big restore since) are read from disk in large sequential
        stretches instead of block by block as the workers ask. Only packs that cannot be read
        with O_DIRECT: the others are read so (:meth:`read_run`), not through the cache."""
        locs = locs if isinstance(locs, list) else list(locs)
        cached = {p for p in {loc.pack for loc in locs} if self._direct_fd(p) < 0}
        if not cached:  # all read with O_DIRECT (read_run): the page cache is not used
            return
        spans: dict[int, list[tuple[int, int]]] = {}
        for loc in locs:
            if loc.pack in cached:
                spans.setdefault(loc.pack, []).append((loc.offset, loc.offset + loc.stored_len))
        for pack, ranges in sorted(spans.items()):
            ranges.sort()
            lo, hi = ranges[0]
            for a, b in [*ranges[1:], (1 << 62, 1 << 62)]:
                if a - hi > gap:
                    length = min(hi - lo, limit)
                    os.posix_fadvise(self._fd(pack), lo, length, os.POSIX_FADV_WILLNEED)
                    limit -= length
                    if limit <= 0:
                        return
                    lo = a
                hi = max(hi, b)

    def read_run(self, run: list[tuple[ObjectId, Location]]) -> Iterator[bytes]:
        """Objects stored back to back in one pack, read with one system call into this
        thread's buffer, reused: a new bytes object of up to 8 MiB per run was new memory
        each time, faulted in and zeroed page by page (2.4% of a 2 GiB build's samples). Each
        object comes out as bytes of its own, so the next run may reuse the buffer; a run
        started while another of the thread's is still being read out gets one of its own.

        Read with O_DIRECT (whole blocks around the run), not through the page cache: packs
        are written that way (see :class:`_Appender`), so they are rarely there, and on these
        VMs every page the cache takes costs what fresh memory costs when first touched."""
        first, last = run[0][1], run[-1][1]
        start, end = first.offset, last.offset + last.stored_len
        fd = self._direct_fd(first.pack)
        lo = start - start % DIRECT_ALIGN if fd >= 0 else start
        hi = -(-end // DIRECT_ALIGN) * DIRECT_ALIGN if fd >= 0 else end
        size = -(-(hi - lo) // DIRECT_ALIGN) * DIRECT_ALIGN  # (whole pages either way)
        busy = getattr(_local, "run_busy", False)
        buf: mmap.mmap | None = getattr(_local, "run_buffer", None)
        if busy:  # another run of this thread is still being read out: a buffer of its own
            buf = private_buffer(size)
        elif buf is None or len(buf) < size:
            buf = _local.run_buffer = private_buffer(max(size, RUN_BUFFER))
        _local.run_busy = True
        try:
            view = memoryview(buf)[:hi - lo]
            got = -1
            if fd >= 0:
                try:
                    got = os.preadv(fd, [view], lo)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._refuse_direct(first.pack)  # not tried again for this pack
            if got < 0:  # no O_DIRECT here after all: through the page cache
                lo = start
                view = memoryview(buf)[:end - start]
                got = os.preadv(self._fd(first.pack), [view], start)
            if got < end - lo:
                raise Corrupt(f"pack #{first.pack} is truncated; run dm fsck")
            unpack = self._unpack
            for oid, loc in run:
                at = loc.offset - lo
                yield unpack(oid, loc, view[at:at + loc.stored_len])
        finally:
            _local.run_busy = busy

    def stored(self, oids: list[ObjectId]) -> Iterator[tuple[ObjectId, Location, bytes]]:
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

    def index_rows(self) -> list[tuple[object, ...]]:
        """The index as stored, unchecked (fsck judges each row)."""
        return index.all_object_rows(self.conn)

    def iter_index(self) -> Iterator[tuple[ObjectId, Location]]:
        for r in index.all_object_rows(self.conn):
            loc = _location(*r)  # checks the id too
            yield ObjectId(r[0]), loc

    def writer(self) -> PackWriter:
        w = PackWriter(self)
        self._writers.add(w)
        return w

    def close(self) -> None:
        """Give back what writers wrote and did not index (a command that failed elsewhere:
        a full disk met first by the index, say, while a pack was still being written out),
        then close every pack."""
        for w in list(self._writers):
            w.abandon()
        for fd in [*self._fds.values(), *self._stale, *self._direct.values()]:
            if fd >= 0:
                os.close(fd)
        self._fds.clear()
        self._direct.clear()
        self._stale.clear()


PACK_NAME = re.compile(r"[0-9a-f]{32}\.pack")


def owned(path: Path) -> bool:
    """Does a live writer hold this pack (one it is still writing, or whose rows are not
    committed yet)? Never waits; a pack that is gone is nobody's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)  # lets go of the lock at once


@dataclass
class Scanned:
    """What a pack file holds, read from the file alone (to rebuild a lost index)."""

    records: list[tuple[bytes, int, int, int, int, bool]]  # id, kind, offset, stored, raw, zstd
    damaged: int = 0  # records whose hash failed
    tail: int = 0  # bytes after the last readable record (a killed writer, or damage)


def scan_pack(path: Path) -> Scanned:
    """Every record of a pack whose header is sane and whose payload hashes to its id; reading
    stops at the first header that makes no sense."""
    out = Scanned([])
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(PACK_MAGIC):
            out.tail = size
            return out
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _scan(data, out)
    return out


def _scan(data: mmap.mmap, out: Scanned) -> None:
    if data[:len(PACK_MAGIC)] != PACK_MAGIC:
        out.tail = len(data)
        return
    pos = len(PACK_MAGIC)
    while pos + RECORD.size <= len(data):
        kind, flags, oid, raw_len, stored_len = RECORD.unpack_from(data, pos)
        end = pos + RECORD.size + stored_len
        if (kind not in MAX_SIZE or flags & ~FLAG_ZSTD or not 0 < raw_len <= MAX_SIZE[kind]
                or not 0 < stored_len <= raw_len + ZSTD_SLACK or end > len(data)):
            break
        payload = data[pos + RECORD.size:end]
        try:
            raw = decompress(payload, raw_len) if flags & FLAG_ZSTD else payload
            ok = len(raw) == raw_len and object_id(raw) == oid
        except zstandard.ZstdError:
            ok = False
        if ok:
            out.records.append((oid, kind, pos + RECORD.size, stored_len, raw_len,
                                bool(flags & FLAG_ZSTD)))
        else:
            out.damaged += 1
        pos = end
    out.tail = len(data) - pos


STAGE = 8 << 20  # bytes an appender stages before writing them out


class _Appender:
    """Appends to a pack through page-aligned buffers written out with O_DIRECT, not through
    the page cache. On these VMs a page of the page cache costs what fresh memory costs the
    first time it is touched: writing 1.3 GB buffered took 5.6-8.6 s (4.8-7.4 s of system
    time), directly 0.7 s (0.04 s). A first commit writes that much, and a 1% commit 26 MB.

    Bytes are staged in one buffer while the other is written out by a thread of its own
    (the caller goes on hashing and compressing meanwhile), whole blocks only: the partial
    last block stays staged, to be written again with what follows. :meth:`drain` puts
    everything in the file (that partial block through the page cache) before the pack is
    synced or read back. Where O_DIRECT is refused (tmpfs, some network filesystems),
    writes go through the page cache, a buffer-full at a time."""

    def __init__(self, fd: int, pos: int, head: bytes,
                 bufs: tuple[mmap.mmap, mmap.mmap]) -> None:
        """``head``: the file's bytes from the block ``pos`` falls in up to ``pos``, where
        appending starts; ``bufs``: two page-aligned buffers of the same size (a multiple of
        DIRECT_ALIGN)."""
        assert pos % DIRECT_ALIGN == len(head) and len(bufs[0]) % DIRECT_ALIGN == 0
        self.fd, self.bufs = fd, bufs
        self.buf = bufs[0]  # the one being filled
        self.base = pos - len(head)  # where buf[0] goes in the file (aligned)
        self.used = len(head)
        self.buf[:len(head)] = head
        self.direct = set_direct(fd, True)
        self._writing: threading.Thread | None = None  # writing out the other buffer
        self._failed: list[BaseException] = []

    @property
    def pos(self) -> int:
        return self.base + self.used

    def write(self, parts: Iterable[bytes | memoryview]) -> None:
        size = len(self.buf)
        for part in parts:
            view = memoryview(part)
            while len(view):
                take = min(len(view), size - self.used)
                self.buf[self.used:self.used + take] = view[:take]
                self.used += take
                view = view[take:]
                if self.used == size:
                    self._spill()

    def _spill(self) -> None:
        """Hand the whole blocks staged to a thread that writes them out, and go on filling
        the other buffer, from the partial last block."""
        whole = self.used // DIRECT_ALIGN * DIRECT_ALIGN
        if not whole:
            return
        self._wait()
        full, base = self.buf, self.base
        self.buf = self.bufs[1] if full is self.bufs[0] else self.bufs[0]
        tail = self.used - whole
        self.buf[:tail] = full[whole:self.used]
        self.base += whole
        self.used = tail

        def out() -> None:
            try:
                self._out(full, base, whole)
            except BaseException as e:  # raised by the next wait
                self._failed.append(e)

        self._writing = threading.Thread(target=out, name="dm-pack-write", daemon=True)
        self._writing.start()

    def _wait(self) -> None:
        """Wait for the buffer being written out; raise what its write met."""
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        if self._failed:
            raise self._failed[0]

    def _out(self, buf: mmap.mmap, base: int, length: int) -> None:
        """buf[:length] into the file at ``base``."""
        done = 0
        with memoryview(buf) as view:
            while done < length:
                try:
                    k = os.pwrite(self.fd, view[done:length], base + done)
                except OSError as e:
                    if e.errno != errno.EINVAL or not self.direct:
                        raise
                    self.direct = set_direct(self.fd, False)  # refused: the page cache
                    continue
                if k <= 0:
                    raise OSError(errno.EIO, "a write to a pack wrote nothing")
                if self.direct and k % DIRECT_ALIGN:  # not whole blocks: finish buffered
                    self.direct = set_direct(self.fd, False)
                done += k

    def drain(self) -> None:
        """Everything staged into the file: the whole blocks directly, the partial last one
        (which stays staged, to be written again with what follows) through the page
        cache."""
        self._wait()
        whole = self.used // DIRECT_ALIGN * DIRECT_ALIGN
        if whole:
            self._out(self.buf, self.base, whole)
            tail = self.used - whole
            self.buf[:tail] = self.buf[whole:self.used]
            self.base += whole
            self.used = tail
        if self.used:
            if self.direct:
                set_direct(self.fd, False)
            try:
                self._out(self.buf, self.base, self.used)
            finally:
                if self.direct:
                    set_direct(self.fd, True)

    def close(self) -> None:
        """Wait for the write under way (its error is not wanted: the pack is given up)."""
        if self._writing is not None:
            self._writing.join()
            self._writing = None


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; whether it is on."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    if want != flags:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, want)
        except OSError:
            return False
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


class PackWriter:
    """Appends objects to new packs; :meth:`flush` makes them durable, then indexes them.

    If writing fails (a full disk, an I/O error), the writer gives back what it wrote and was
    not indexed yet, so that the space is free again and the store usable as before; it then
    refuses further work."""

    def __init__(self, store: PackStore) -> None:
        self.store = store
        self._fd = -1
        self._pack_id = 0
        self._pos = 0
        self._pending: dict[ObjectId, tuple[int, int, int, int, int, int]] = {}
        self._files: dict[int, tuple[str, int]] = {}  # pack id -> (name, end of indexed data)
        self._held: list[int] = []  # synced packs whose rows are not in yet (locked, open)
        # fsyncs of full packs, in the background: each thread and the error it met
        self._syncing: list[tuple[threading.Thread, list[BaseException]]] = []
        self._failed: BaseException | None = None
        self._lent: dict[int, int] = {}  # packs lent to workers and not synced yet: their fds
        self._spare: dict[int, int] = {}  # ... of those, the ones to lend again: where to write
        self._ends: dict[int, int] = {}  # ... where their adopted records end
        self._ever_lent: set[int] = set()
        self.bytes_written = 0
        self.objects_written = 0
        self._lock = threading.Lock()  # workers add chunks from several threads
        self._app: _Appender | None = None  # how the pack being filled is written
        self._stage: tuple[mmap.mmap, mmap.mmap] | None = None  # its buffers, for every pack

    def _open(self) -> None:
        self._fd, self._pack_id = self._new_pack()
        self._pos = len(PACK_MAGIC)
        if self._stage is None:
            self._stage = private_buffer(STAGE), private_buffer(STAGE)
        self._app = _Appender(self._fd, self._pos, PACK_MAGIC, self._stage)

    def _new_pack(self) -> tuple[int, int]:
        """Make a new pack file and its index row: (descriptor, pack id). The file is ours
        (locked, see owned) until its rows are in."""
        name = f"{uuid.uuid4().hex}.pack"
        path = self.store.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if self.store.on_btrfs():  # its direct writes stay direct (reads check every id)
            from dotmesh.fs.btrfs import unchecksummed

            unchecksummed(fd)
        pack_id = index.add_pack(self.store.conn, name)
        self._files[pack_id] = (name, 0)
        _write_all(fd, PACK_MAGIC)
        return fd, pack_id

    def lend(self, full: int | None) -> tuple[int, str, int]:
        """A pack for a worker in another process to fill, by name, from the position given
        (:class:`PackFiller`): made, locked and indexed here, its rows taken back by
        :meth:`adopt`. A pack an earlier batch of workers left room in is lent again (each
        forked read would otherwise leave a pack per worker). ``full``: the pack that
        worker filled before, fsynced from now on in the background."""
        with self._lock:
            self._check()
            try:
                if full is not None and full in self._lent:
                    self._sync_later(self._lent.pop(full))
                if self._spare:
                    pack_id, end = self._spare.popitem()
                else:
                    fd, pack_id = self._new_pack()
                    self._lent[pack_id] = fd
                    self._ever_lent.add(pack_id)
                    end = len(PACK_MAGIC)
            except (OSError, sqlite3.OperationalError) as e:
                raise self._fail(e) from None
            self._ends[pack_id] = end
            return pack_id, self._files[pack_id][0], end

    def settle_lent(self) -> None:
        """The workers are done and every record they wrote is adopted: the packs they hold
        can be lent again from where their records end, and are fsynced meanwhile, in the
        background (:meth:`flush` syncs them once more, quickly, and waits)."""
        with self._lock:
            for pack_id, fd in self._lent.items():
                if self._ends[pack_id] <= PACK_ROTATE:
                    self._spare[pack_id] = self._ends[pack_id]
                self._sync_in_background(fd)

    def adopt(self, rows: dict[ObjectId, tuple[int, int, int, int, int, int]]) -> None:
        """Take in the records a worker wrote into lent packs (as :meth:`add_many` notes its
        own); they are made durable and indexed by :meth:`flush` like those."""
        with self._lock:
            for oid, rec in rows.items():
                kind, pack, offset, stored_len = rec[:4]
                if pack not in self._ever_lent:
                    raise InternalError(f"a worker wrote into pack #{pack}, not lent to it")
                if pack in self._ends:
                    self._ends[pack] = max(self._ends[pack], offset + stored_len)
                if oid not in self._pending:
                    self._pending[oid] = rec
                    self.bytes_written += RECORD.size + stored_len
                    self.objects_written += 1

    def __contains__(self, oid: object) -> bool:
        return oid in self._pending

    def read_pending(self, oid: ObjectId) -> bytes | None:
        """An object this writer holds and has not indexed yet (from its file, not memory),
        verified; None if it holds none by that id."""
        with self._lock:
            rec = self._pending.get(oid)
            if rec is None:
                return None
            _, pack, offset, stored_len, raw_len, zstd = rec
            name = self._files[pack][0]
            if pack == self._pack_id and self._app is not None:
                try:
                    self._app.drain()  # (what is read back must be in the file)
                except OSError as e:
                    raise self._fail(e) from None
        fd = os.open(self.store.dir / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            payload = os.pread(fd, stored_len, offset)
        finally:
            os.close(fd)
        loc = PackLocation(rec[0], pack, offset, stored_len, raw_len, bool(zstd))
        return self.store._unpack(oid, loc, payload)

    def ids(self) -> list[ObjectId]:
        with self._lock:
            return list(self._pending)

    def add(self, kind: int, oid: ObjectId, raw_len: int, payload: bytes | memoryview,
            zstd: bool) -> None:
        """Append one object (already compressed as ``zstd`` says) unless pending already."""
        self.add_many([(kind, oid, raw_len, payload, zstd)])

    def add_many(self, records: list[tuple[int, ObjectId, int, bytes | memoryview, bool]]
                 ) -> None:
        """Append several objects with as few system calls as possible (thread-safe)."""
        with self._lock:
            self._check()
            iov: list[bytes | memoryview] = []
            try:
                for kind, oid, raw_len, payload, zstd in records:
                    if oid in self._pending:
                        continue
                    _check_size(kind, raw_len)
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
            except OSError as e:
                raise self._fail(e) from None

    def abandon(self) -> None:
        """Give back every unindexed byte this writer wrote (unless it failed, which gave
        them back already), and refuse further work: its command is over."""
        with self._lock:  # (a flushed writer holds none: its packs are left as they are)
            if self._failed is None and (self._pending or self._fd >= 0 or self._lent):
                self._fail(InternalError("this writer was given up as its store closed"))

    def give_back(self, e: OSError) -> BaseException:
        """A worker that wrote into lent packs met ``e`` (a full disk): give back every
        unindexed byte, as a failed write here does; returns the error to raise."""
        with self._lock:
            return self._fail(e)

    def _check(self) -> None:
        if self._failed is not None:
            raise OutOfSpace(str(self._failed)) if isinstance(self._failed, OutOfSpace) \
                else Corrupt(f"writing to the store failed earlier: {self._failed}")

    def _fail(self, e: BaseException) -> BaseException:
        """Give back the unindexed bytes of every pack this writer made; returns the error to
        raise (one line, naming the folder)."""
        self._discard()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            err: BaseException = OutOfSpace(
                f"no space left in {self.store.dir}: free some space and run the command "
                "again (nothing was recorded)")
        elif isinstance(e, sqlite3.OperationalError) and "full" in str(e):
            err = OutOfSpace(f"no space left for the index in {self.store.dir.parent}: free "
                             "some space and run the command again (nothing was recorded)")
        elif isinstance(e, OSError):
            err = OSError(e.errno, e.strerror, str(self.store.dir))
        else:
            err = e
        self._failed = err
        return err

    def _discard(self) -> None:
        self._pending.clear()
        for pack_id, (name, indexed) in self._files.items():
            path = self.store.dir / name
            try:
                if indexed:
                    os.truncate(path, indexed)
                else:
                    os.unlink(path)
                    index.drop_pack(self.store.conn, pack_id)
            except (OSError, sqlite3.Error):
                pass  # what cannot be given back now is an unindexed tail: never read
        self._files.clear()
        if self._app is not None:
            self._app.close()
            self._app = None
        if self._fd >= 0:
            self._held.append(self._fd)
            self._fd = -1
        self._held.extend(self._lent.values())
        self._lent.clear()
        self._spare.clear()
        self._release()

    def _synced(self) -> None:
        """Wait for the background fsyncs of full packs; raises the first one's error."""
        syncing, self._syncing = self._syncing, []
        for thread, _ in syncing:
            thread.join()
        errors = [e for _, failed in syncing for e in failed]
        if errors:
            raise errors[0]

    def _release(self) -> None:
        """Let go of the packs whose rows are in (or that were given back)."""
        try:
            self._synced()  # (no fsync may still use a descriptor closed below)
        except OSError:
            pass  # the caller is giving the packs back, or already failed on this
        for fd in self._held:
            os.close(fd)
        self._held.clear()

    def _write(self, iov: list[bytes | memoryview]) -> None:
        if iov:
            assert self._app is not None
            self._app.write(iov)
            iov.clear()

    def put(self, kind: int, data: bytes) -> ObjectId:
        """Hash, compress and add a whole object; returns its id."""
        oid = object_id(data)
        if oid not in self._pending and not self.store.has(oid):
            payload, z = compress(data)
            self.add(kind, oid, len(data), payload, z)
        return oid

    def _rotate(self) -> None:
        """Start a new pack. The full one is fsynced by a thread of its own: the workers
        that add objects wait on this lock, and a 512 MiB pack's fsync took 0.3-0.4 s."""
        if self._fd >= 0:
            assert self._app is not None
            self._app.drain()
            fd, self._fd = self._fd, -1
            self._sync_later(fd)
        self._open()

    def _sync_later(self, fd: int) -> None:
        """fsync a full pack in the background (:meth:`flush` waits for it); the pack stays
        locked and open until its rows are in."""
        self._held.append(fd)
        self._sync_in_background(fd)

    def _sync_in_background(self, fd: int) -> None:
        failed: list[BaseException] = []

        def sync() -> None:
            try:
                _fsync_pack(fd, self.store.dir)
            except BaseException as e:  # reported by flush
                failed.append(e)

        thread = threading.Thread(target=sync, name="dm-pack-sync", daemon=True)
        self._syncing.append((thread, failed))
        thread.start()

    def _sync_file(self) -> None:
        assert self._app is not None
        self._app.drain()
        fd, self._fd = self._fd, -1
        self._held.append(fd)  # still locked: closed once its rows are in
        _fsync_pack(fd, self.store.dir)

    def flush(self, moving: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """Make every added object durable and visible; the writer can go on afterwards.

        ``moving``: the objects are copies of indexed ones (gc's repack): their rows replace
        the old ones, and ``moving(conn)`` runs in the same transaction (dropping what the
        copies make useless)."""
        with self._lock:
            self._check()
            try:
                self._spare.clear()
                for pack_id in list(self._lent):
                    self._sync_later(self._lent.pop(pack_id))
                if self._fd >= 0:
                    self._sync_file()
                self._synced()
                if not self._pending:
                    self._release()
                    return
                index.commit_object_rows(self.store.conn,
                                         [(k, *v) for k, v in self._pending.items()],
                                         also=moving)
            except (OSError, sqlite3.OperationalError) as e:
                raise self._fail(e) from None
            self._release()
            ends: dict[int, int] = {}
            for _, pack, offset, stored_len, _, _ in self._pending.values():
                ends[pack] = max(ends.get(pack, 0), offset + stored_len)
            for pack, end in ends.items():
                name, indexed = self._files[pack]
                self._files[pack] = (name, max(indexed, end))
            self._pending.clear()


class PackFiller:
    """Appends records, in a worker process, to packs its parent's writer lent it
    (:meth:`PackWriter.lend`): the parent makes, locks, fsyncs and indexes them; the worker
    only writes, and hands back the rows of what it wrote (:meth:`rows`) for
    :meth:`PackWriter.adopt`. The parent decides which objects are new, so no object is
    written twice by two workers."""

    def __init__(self, folder: Path, lend: Callable[[int | None], tuple[int, str, int]]
                 ) -> None:
        self._folder, self._lend = folder, lend
        self._fd = -1
        self._pack_id = 0
        self._pos = 0
        self._rows: dict[ObjectId, tuple[int, int, int, int, int, int]] = {}
        self._app: _Appender | None = None
        self._stage: tuple[mmap.mmap, mmap.mmap] | None = None

    def add_many(self, records: list[tuple[int, ObjectId, int, bytes | memoryview, bool]]
                 ) -> None:
        iov: list[bytes | memoryview] = []
        for kind, oid, raw_len, payload, zstd in records:
            _check_size(kind, raw_len)
            if self._fd < 0 or self._pos > PACK_ROTATE:
                self._write(iov)
                self._next()
            iov.append(RECORD.pack(kind, FLAG_ZSTD if zstd else 0, oid, raw_len, len(payload)))
            iov.append(payload)
            offset = self._pos + RECORD.size
            self._rows[oid] = (kind, self._pack_id, offset, len(payload), raw_len, int(zstd))
            self._pos = offset + len(payload)
        self._write(iov)

    def rows(self) -> dict[ObjectId, tuple[int, int, int, int, int, int]]:
        """The rows of what was written since the last call (in the file once the pack is
        given back for another, or :meth:`finish` has run: what the parent fsyncs)."""
        rows, self._rows = self._rows, {}
        return rows

    def finish(self) -> None:
        """Put everything written in the file: the worker's last act."""
        if self._app is not None:
            self._app.drain()

    def _next(self) -> None:
        full = self._pack_id if self._fd >= 0 else None
        if self._fd >= 0:
            assert self._app is not None
            self._app.drain()
            self._app = None
            os.close(self._fd)
            self._fd = -1
        self._pack_id, name, self._pos = self._lend(full)
        self._fd = os.open(self._folder / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        start = self._pos - self._pos % DIRECT_ALIGN
        head = os.pread(self._fd, self._pos - start, start)  # what the block holds so far
        if len(head) != self._pos - start:
            raise OSError(errno.EIO, f"pack {name} is shorter than the parent said")
        if self._stage is None:
            self._stage = private_buffer(STAGE), private_buffer(STAGE)
        self._app = _Appender(self._fd, self._pos, head, self._stage)

    def _write(self, iov: list[bytes | memoryview]) -> None:
        if iov:
            assert self._app is not None
            self._app.write(iov)
            iov.clear()


def _check_size(kind: int, raw_len: int) -> None:
    if raw_len > MAX_SIZE[kind]:
        raise TooLarge(f"a {KIND_NAMES[kind]} of {raw_len} bytes is over the "
                       f"{MAX_SIZE[kind]}-byte limit of dotmesh's format (docs/format.md)")


def _fsync_pack(fd: int, folder: Path) -> None:
    """Make a pack's bytes and its name in ``folder`` durable."""
    os.fsync(fd)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
