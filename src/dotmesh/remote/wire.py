"""How objects travel between stores: batches in the pack file format (docs/format.md).

A batch is ``DMPACK1\\n`` followed by records (kind, flags, id, raw length, stored length,
payload), compressed as they are stored, so neither side recompresses. :func:`decode` is the
only way in from the network, and it trusts nothing: every record must be one that was asked
for, of the kind asked for, no larger than the limits, decompress to exactly its stated
length and hash to its id; trees, file lists and commits must also parse.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import zstandard

from dotmesh.errors import DotmeshError
from dotmesh.model import objects
from dotmesh.model.ids import ObjectId, object_id
from dotmesh.model.objects import (
    KIND_CHUNK,
    KIND_COMMIT,
    KIND_FILELIST,
    KIND_TREE,
    MAX_FILELIST,
    MAX_SIZE,
    Commit,
    FileList,
    Tree,
)
from dotmesh.store.packs import FLAG_ZSTD, PACK_MAGIC, RECORD, ZSTD_SLACK, decompress

KIND_FILELIST_DELTA = 4  # on the wire only: a file list as changes to one the receiver has
MAX_BATCH = 64 << 20  # bytes of one request or answer; senders aim at BATCH_TARGET
MAX_INFLATED = 256 << 20  # bytes its objects may take once decompressed (deltas rebuilt)
BATCH_TARGET = 24 << 20
KIND_NAMES = {**objects.KIND_NAMES, KIND_FILELIST_DELTA: "file list delta"}
_RAW_LIMIT = {**MAX_SIZE, KIND_FILELIST_DELTA: MAX_FILELIST}
Get = Callable[[ObjectId], bytes]


class BadTransfer(DotmeshError, answers_status=True):
    """The other side sent something malformed, unasked for or not matching its id; nothing
    from it was kept and no ref moved."""

    exit_code = 7
    http_status = 422


@dataclass(frozen=True)
class Record:
    """One object as it travels: its stored payload (zstd-compressed if ``zstd``)."""

    kind: int
    oid: ObjectId  # from decode: the hash it computed of the object's bytes
    raw_len: int
    payload: bytes | memoryview
    zstd: bool

    def raw(self) -> bytes:
        """The object's bytes (decompressed); only for verified records."""
        if not self.zstd:
            return bytes(self.payload)
        return decompress(self.payload, self.raw_len)


def encode(records: Iterable[Record]) -> bytes:
    out = bytearray(PACK_MAGIC)
    for r in records:
        out += RECORD.pack(r.kind, FLAG_ZSTD if r.zstd else 0, r.oid, r.raw_len,
                           len(r.payload))
        out += r.payload
    return bytes(out)


def batches(records: Iterable[Record], target: int = BATCH_TARGET) -> Iterator[list[Record]]:
    """Group records into batches of about ``target`` stored bytes."""
    batch: list[Record] = []
    size = 0
    for r in records:
        batch.append(r)
        size += RECORD.size + len(r.payload)
        if size >= target:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def decode(data: bytes | memoryview, expected: dict[ObjectId, int] | None,
           source: str = "the remote", base: Get | None = None) -> list[Record]:
    """Parse and verify a batch. ``expected``: the ids asked for and their kinds (None: the
    sender chooses, as in a push to a server, which then checks everything else). ``base``
    reads the file lists that deltas refer to; without it, deltas are refused. Deltas come
    out as whole file lists.

    Every header is checked before anything is decompressed: kinds, sizes within what dm
    makes (so no frame can make this allocate more than the largest object of its kind), no
    object twice, and no more than MAX_INFLATED bytes for the whole batch."""
    view = memoryview(data)
    if bytes(view[:len(PACK_MAGIC)]) != PACK_MAGIC:
        raise BadTransfer(f"{source} sent something that is not a batch of objects")
    if len(view) > MAX_BATCH:
        raise BadTransfer(f"{source} sent {len(view)} bytes at once, over the "
                          f"{MAX_BATCH}-byte limit")
    heads: list[tuple[int, bool, bytes, int, memoryview]] = []
    seen: set[bytes] = set()
    inflated = 0
    pos = len(PACK_MAGIC)
    while pos < len(view):
        if pos + RECORD.size > len(view):
            raise BadTransfer(f"{source} sent a truncated object header")
        kind, flags, oid, raw_len, stored_len = RECORD.unpack_from(view, pos)
        pos += RECORD.size
        short = oid.hex()[:16]
        if kind not in KIND_NAMES or flags & ~FLAG_ZSTD:
            raise BadTransfer(f"{source} sent object {short} of an unknown kind")
        if oid in seen:
            raise BadTransfer(f"{source} sent object {short} twice")
        seen.add(oid)
        if expected is not None:
            want = expected.get(ObjectId(oid))  # the id claimed, looked up only
            if want is None:
                raise BadTransfer(f"{source} sent object {short}, which was not asked for")
            if want != kind and not (want == KIND_FILELIST and kind == KIND_FILELIST_DELTA):
                raise BadTransfer(f"{source} sent object {short} as a {KIND_NAMES[kind]}, "
                                  f"where a {KIND_NAMES[want]} was expected")
        zstd = bool(flags & FLAG_ZSTD)
        limit = _RAW_LIMIT[kind]
        if raw_len > limit or stored_len > raw_len + ZSTD_SLACK or (
                not zstd and stored_len != raw_len) or (kind != KIND_FILELIST_DELTA
                                                        and not raw_len):
            raise BadTransfer(f"{source} sent {KIND_NAMES[kind]} {short} of {raw_len} bytes "
                              f"({stored_len} stored), over the {limit}-byte limit of its "
                              "kind or not a size dm makes")
        if pos + stored_len > len(view):
            raise BadTransfer(f"{source} sent a truncated object {short}")
        inflated += raw_len
        heads.append((kind, zstd, oid, raw_len, view[pos:pos + stored_len]))
        pos += stored_len
    if inflated > MAX_INFLATED:
        raise BadTransfer(f"{source} sent objects of {inflated} bytes in all, over the "
                          f"{MAX_INFLATED}-byte limit of one batch")
    out: list[Record] = []
    for kind, zstd, oid, raw_len, payload in heads:
        short = oid.hex()[:16]
        try:
            raw = decompress(payload, raw_len) if zstd else payload
        except zstandard.ZstdError:
            raise BadTransfer(f"{source} sent object {short}, which does not "
                              "decompress") from None
        if len(raw) != raw_len:
            raise BadTransfer(f"{source} sent object {short}, whose length is not the one "
                              "stated")
        if kind == KIND_FILELIST_DELTA:
            if base is None:
                raise BadTransfer(f"{source} sent a file list delta, which is not taken here")
            raw = apply_delta(bytes(raw), base, short, source)
            inflated += len(raw)
            if inflated > MAX_INFLATED:
                raise BadTransfer(f"{source} sent file list deltas that grow past the "
                                  f"{MAX_INFLATED}-byte limit of one batch")
            payload = memoryview(zstandard.ZstdCompressor(level=1).compress(raw))
            zstd, kind, raw_len = True, KIND_FILELIST, len(raw)
        verified = object_id(raw)
        if verified != oid:
            raise BadTransfer(f"{source} sent object {short}, whose content does not match "
                              "its id")
        _parse(kind, bytes(raw) if kind != KIND_CHUNK else b"", short, source)
        out.append(Record(kind, verified, raw_len, bytes(payload), zstd))
    return out


# ------------------------------------------------------------------ file list deltas
# A changed database file keeps most of its 8 KiB blocks, and its file list (36 bytes per
# block) would cost more to send than the changed blocks; so a file list can travel as
# changes to another the receiver has: the base's id, then operations that copy runs of the
# base's entries or give new ones. The receiver rebuilds the list and checks its id.
_DELTA_HEAD = struct.Struct("<32sI")
_COPY = struct.Struct("<cII")  # b"C", first entry of the base, count
_LIT = struct.Struct("<cI")  # b"L", count, then count entries (id, length)
_ENTRY = struct.Struct("<32sI")


def encode_delta(base_id: ObjectId, base: FileList, new: FileList) -> bytes:
    """``new`` as operations on ``base`` (uncompressed)."""
    where: dict[tuple[ObjectId, int], int] = {}
    for i, e in enumerate(base.chunks):
        where.setdefault(e, i)
    ops: list[bytes] = []
    lits: list[tuple[ObjectId, int]] = []
    copy_at, copy_n = 0, 0

    def flush() -> None:
        nonlocal copy_n
        if copy_n:
            ops.append(_COPY.pack(b"C", copy_at, copy_n))
            copy_n = 0
        if lits:
            ops.append(_LIT.pack(b"L", len(lits)) + b"".join(_ENTRY.pack(*e) for e in lits))
            lits.clear()

    for e in new.chunks:
        nxt = copy_at + copy_n
        if copy_n and nxt < len(base.chunks) and base.chunks[nxt] == e:
            copy_n += 1
            continue
        at = where.get(e)
        if at is None:
            if copy_n:
                flush()
            lits.append(e)
            continue
        flush()
        copy_at, copy_n = at, 1
    flush()
    return _DELTA_HEAD.pack(base_id, len(ops)) + b"".join(ops)


def apply_delta(data: bytes, base: Get, short: str, source: str) -> bytes:
    """The file list that a delta describes (encoded); BadTransfer if it is malformed."""
    bad = BadTransfer(f"{source} sent a malformed file list delta for {short}")
    if len(data) < _DELTA_HEAD.size:
        raise bad
    base_id, nops = _DELTA_HEAD.unpack_from(data)
    try:
        old = FileList.decode(base(ObjectId(base_id))).chunks  # a claimed id, looked up
    except DotmeshError:
        raise BadTransfer(f"{source} sent {short} as changes to file list "
                          f"{base_id.hex()[:16]}, which is not here") from None
    out: list[tuple[bytes, int]] = []
    pos = _DELTA_HEAD.size
    limit = MAX_FILELIST // _ENTRY.size
    try:
        for _ in range(nops):
            op = data[pos:pos + 1]
            if op == b"C":
                _, first, count = _COPY.unpack_from(data, pos)
                pos += _COPY.size
                if first + count > len(old):
                    raise bad
                out.extend(old[first:first + count])
            elif op == b"L":
                _, count = _LIT.unpack_from(data, pos)
                pos += _LIT.size
                end = pos + count * _ENTRY.size
                if end > len(data):
                    raise bad
                out.extend(_ENTRY.iter_unpack(data[pos:end]))
                pos = end
            else:
                raise bad
            if len(out) > limit:
                raise BadTransfer(f"{source} sent a file list delta for {short} that grows "
                                  "past the size limit")
    except struct.error:
        raise bad from None
    if pos != len(data):
        raise bad
    return FileList(tuple((ObjectId(c), n) for c, n in out)).encode()


def _parse(kind: int, raw: bytes, short: str, source: str) -> None:
    """Trees, file lists and commits must parse (names are checked by Tree.decode)."""
    try:
        if kind == KIND_TREE:
            Tree.decode(raw)
        elif kind == KIND_FILELIST:
            FileList.decode(raw)
        elif kind == KIND_COMMIT:
            Commit.decode(raw)
    except DotmeshError as e:
        raise BadTransfer(f"{source} sent {KIND_NAMES[kind]} {short}: {e}") from None
