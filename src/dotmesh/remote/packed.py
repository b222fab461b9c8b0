"""Objects kept remotely in pack blobs (the local pack format, one blob per received batch),
found through an index of where each object sits. Used by the hub and by S3 remotes."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable

from dotmesh.errors import Corrupt
from dotmesh.model.ids import ObjectId
from dotmesh.model.objects import MAX_SIZE
from dotmesh.remote.blobs import Blobs
from dotmesh.remote.wire import MAX_BATCH, Record, encode
from dotmesh.store.packs import PACK_MAGIC, RECORD, ZSTD_SLACK, PackLocation

RUN_GAP = 256 << 10  # objects closer than this in a pack are read with one request
RUN_MAX = 16 << 20
_IDX = struct.Struct("<32sBBQII")  # id, kind, zstd, offset, stored_len, raw_len
IDX_MAGIC = b"DMIDX1\n"


def write_pack(blobs: Blobs, prefix: str,
               records: list[Record]) -> tuple[str, dict[ObjectId, PackLocation[str]]]:
    """Store ``records`` as one new pack blob under ``prefix``; returns its key and where
    each object is."""
    key = f"{prefix}{uuid.uuid4().hex}.pack"
    blobs.put(key, encode(records))
    return key, locate(key, records)


def locate(key: str, records: Iterable[Record]) -> dict[ObjectId, PackLocation[str]]:
    """Where :func:`encode` puts each record's payload."""
    out: dict[ObjectId, PackLocation[str]] = {}
    pos = len(PACK_MAGIC)
    for r in records:
        pos += RECORD.size
        out[r.oid] = PackLocation(r.kind, key, pos, len(r.payload), r.raw_len, r.zstd)
        pos += len(r.payload)
    return out


def first_within(locs: dict[ObjectId, PackLocation[str]], ids: Iterable[ObjectId],
                 limit: int) -> dict[ObjectId, PackLocation[str]]:
    """The leading ``ids`` whose payloads fit in ``limit`` bytes (at least one): an answer
    of bounded size; the asker comes back for the rest."""
    chosen: dict[ObjectId, PackLocation[str]] = {}
    size = 0
    for oid in ids:
        if chosen and size + locs[oid].stored_len > limit:
            break
        chosen[oid] = locs[oid]
        size += locs[oid].stored_len
    return chosen


def read_records(blobs: Blobs, locs: dict[ObjectId, PackLocation[str]]) -> list[Record]:
    """The records at ``locs``; neighbours in a pack are read with one request. Not verified
    here: whoever receives them checks every hash."""
    out: list[Record] = []
    by_pack: dict[str, list[tuple[ObjectId, PackLocation[str]]]] = {}
    for oid, loc in locs.items():
        by_pack.setdefault(loc.pack, []).append((oid, loc))
    for pack, items in by_pack.items():
        items.sort(key=lambda x: x[1].offset)
        run: list[tuple[ObjectId, PackLocation[str]]] = []
        for item in items:
            if run:
                start = run[0][1].offset
                end = run[-1][1].offset + run[-1][1].stored_len
                if item[1].offset - end > RUN_GAP or item[1].offset + item[1].stored_len \
                        - start > RUN_MAX:
                    out.extend(_read_run(blobs, pack, run))
                    run = []
            run.append(item)
        if run:
            out.extend(_read_run(blobs, pack, run))
    return out


def _read_run(blobs: Blobs, pack: str,
              run: list[tuple[ObjectId, PackLocation[str]]]) -> list[Record]:
    start = run[0][1].offset
    end = run[-1][1].offset + run[-1][1].stored_len
    data = blobs.get_range(pack, start, end - start)
    if len(data) != end - start:
        raise Corrupt(f"pack {pack} is shorter than its index says")
    return [Record(loc.kind, oid, loc.raw_len, data[loc.offset - start:
                                                     loc.offset - start + loc.stored_len],
                   loc.zstd) for oid, loc in run]


def encode_index(locs: dict[ObjectId, PackLocation[str]]) -> bytes:
    """A pack's index as a blob of its own (S3 remotes, which have no database)."""
    return IDX_MAGIC + b"".join(_IDX.pack(oid, loc.kind, int(loc.zstd), loc.offset,
                                          loc.stored_len, loc.raw_len)
                                for oid, loc in locs.items())


def decode_index(pack: str, data: bytes) -> dict[ObjectId, PackLocation[str]]:
    """A pack's index as stored beside it; every entry held to what a batch can hold (it is
    read from a bucket: anyone with its keys may have written it)."""
    if not data.startswith(IDX_MAGIC) or (len(data) - len(IDX_MAGIC)) % _IDX.size:
        raise Corrupt(f"the index of {pack} is malformed")
    out: dict[ObjectId, PackLocation[str]] = {}
    for oid, kind, z, off, stored, raw in _IDX.iter_unpack(data[len(IDX_MAGIC):]):
        if (kind not in MAX_SIZE or z not in (0, 1) or not 0 < raw <= MAX_SIZE[kind]
                or not 0 < stored <= raw + ZSTD_SLACK or (not z and stored != raw)
                or off < len(PACK_MAGIC) + RECORD.size or off + stored > MAX_BATCH
                or oid in out):
            raise Corrupt(f"the index of {pack} has a malformed entry")
        out[ObjectId(oid)] = PackLocation(kind, pack, off, stored, raw, bool(z))
    return out
