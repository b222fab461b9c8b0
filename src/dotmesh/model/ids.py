"""Object ids: the BLAKE3 hash of an object's encoded bytes, a type of their own so that an id
is never confused with other bytes (a chunk's data, a key)."""

from __future__ import annotations

import re
from typing import NewType

import blake3

from dotmesh.errors import Corrupt

ObjectId = NewType("ObjectId", bytes)
ID_LEN = 32
HOLE = ObjectId(bytes(ID_LEN))  # a run of zero bytes, restored as a sparse hole


def object_id(data: bytes | memoryview) -> ObjectId:
    return ObjectId(blake3.blake3(data).digest())


_HEX_ID = re.compile(r"[0-9a-f]{64}")


def parse_hex_id(text: object) -> ObjectId:
    """An object id from its canonical text: 64 lowercase hex digits."""
    if not isinstance(text, str) or not _HEX_ID.fullmatch(text):
        raise Corrupt(f"bad object id {str(text)[:80]!r}")
    return ObjectId(bytes.fromhex(text))


def parse_id_bytes(value: object) -> ObjectId:
    """An object id as stored in meta.db: exactly ID_LEN bytes."""
    if not isinstance(value, bytes) or len(value) != ID_LEN:
        raise Corrupt(f"bad object id {value!r:.80}")
    return ObjectId(value)


__all__ = ["HOLE", "ID_LEN", "ObjectId", "object_id", "parse_hex_id", "parse_id_bytes"]
