"""Objects and their canonical encodings (see docs/format.md).

An object's id is the BLAKE3 hash of its encoded bytes. Chunks are raw file bytes; the other kinds
start with a 4-byte magic so they can be told apart and versioned. Decoding validates everything a
hostile or corrupted store could put there (names, kinds, sizes), so the rest of the code may trust
what it gets.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import NewType

import blake3

from dotmesh.errors import Corrupt

ObjectId = NewType("ObjectId", bytes)
ID_LEN = 32
HOLE = ObjectId(bytes(ID_LEN))  # a run of zero bytes, restored as a sparse hole

KIND_CHUNK, KIND_FILELIST, KIND_TREE, KIND_COMMIT = 0, 1, 2, 3
MAGIC_FILELIST, MAGIC_TREE, MAGIC_COMMIT = b"DMF1", b"DMT1", b"DMC1"

# Tree entry kinds.
FILE, DIR, SYMLINK = "f", "d", "l"


def object_id(data: bytes | memoryview) -> ObjectId:
    return ObjectId(blake3.blake3(data).digest())


def parse_hex_id(text: str) -> ObjectId:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise Corrupt(f"bad object id {text!r}") from None
    if len(raw) != ID_LEN:
        raise Corrupt(f"bad object id {text!r}")
    return ObjectId(raw)


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ---------------------------------------------------------------- file lists

_FL_HEAD = struct.Struct("<4sQI")
_FL_ENTRY = struct.Struct(f"<{ID_LEN}sI")


@dataclass(frozen=True)
class FileList:
    """A file's content as an ordered list of (chunk id, length); HOLE ids are zero runs."""

    chunks: tuple[tuple[ObjectId, int], ...]

    @property
    def size(self) -> int:
        return sum(n for _, n in self.chunks)

    def encode(self) -> bytes:
        out = bytearray(_FL_HEAD.pack(MAGIC_FILELIST, self.size, len(self.chunks)))
        for cid, n in self.chunks:
            out += _FL_ENTRY.pack(cid, n)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> FileList:
        if len(data) < _FL_HEAD.size:
            raise Corrupt("file list object is truncated")
        magic, size, count = _FL_HEAD.unpack_from(data)
        if magic != MAGIC_FILELIST or len(data) != _FL_HEAD.size + count * _FL_ENTRY.size:
            raise Corrupt("file list object is malformed")
        chunks = tuple(
            (ObjectId(cid), n) for cid, n in _FL_ENTRY.iter_unpack(data[_FL_HEAD.size:])
        )
        fl = cls(chunks)
        if fl.size != size:
            raise Corrupt("file list object's size does not match its chunks")
        return fl


# ---------------------------------------------------------------- trees


def check_entry_name(name: str) -> None:
    """Reject names that could escape the folder a tree is restored into."""
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise Corrupt(f"tree entry has an unsafe name {name!r}")


@dataclass(frozen=True)
class Entry:
    """One name in a directory.

    ``ref`` is a content id for files (a chunk id for single-chunk files, else a file list id;
    None for empty files), a tree id for directories and the link text for symlinks.
    ``chunked`` tells which kind of content id a file has.
    """

    name: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    ref: ObjectId | str | None
    chunked: bool = False

    def to_json(self) -> list[object]:
        ref = self.ref.hex() if isinstance(self.ref, bytes) else self.ref
        return [self.name, self.kind, self.mode, self.uid, self.gid, self.mtime_ns, self.size,
                ref, int(self.chunked)]

    @classmethod
    def from_json(cls, row: object) -> Entry:
        try:
            assert isinstance(row, list) and len(row) == 9
            name, kind, mode, uid, gid, mtime_ns, size, ref, chunked = row
            assert isinstance(name, str) and kind in (FILE, DIR, SYMLINK)
            for n in (mode, uid, gid, mtime_ns, size, chunked):
                assert isinstance(n, int) and not isinstance(n, bool)
            assert 0 <= mode < 0o10000 and uid >= 0 and gid >= 0 and size >= 0
        except AssertionError:
            raise Corrupt(f"tree entry is malformed: {str(row)[:80]}") from None
        check_entry_name(name)
        oref: ObjectId | str | None
        if kind == SYMLINK:
            if not isinstance(ref, str) or "\x00" in ref:
                raise Corrupt(f"symlink {name!r} has a malformed target")
            oref = ref
        elif ref is None:
            if kind == DIR or size:
                raise Corrupt(f"entry {name!r} lacks its content id")
            oref = None
        else:
            if not isinstance(ref, str):
                raise Corrupt(f"entry {name!r} has a malformed content id")
            oref = parse_hex_id(ref)
        return cls(name, kind, mode, uid, gid, mtime_ns, size, oref, bool(chunked))


def _row_key(row: list[object]) -> bytes:
    return str(row[0]).encode("utf-8", "surrogateescape")


def encode_tree_rows(rows: list[list[object]]) -> bytes:
    """The canonical tree encoding of rows shaped like :meth:`Entry.to_json` (sorts ``rows``).

    The snapshot builds rows directly, skipping Entry objects, so this is the one definition.
    """
    rows.sort(key=_row_key)
    return MAGIC_TREE + b"\n" + json.dumps(rows, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Tree:
    entries: tuple[Entry, ...]

    def encode(self) -> bytes:
        return encode_tree_rows([e.to_json() for e in self.entries])

    @classmethod
    def decode(cls, data: bytes) -> Tree:
        if not data.startswith(MAGIC_TREE + b"\n"):
            raise Corrupt("tree object is malformed")
        try:
            rows = json.loads(data[5:])
        except ValueError:
            raise Corrupt("tree object is not valid JSON") from None
        if not isinstance(rows, list):
            raise Corrupt("tree object is malformed")
        entries = tuple(Entry.from_json(r) for r in rows)
        if len({e.name for e in entries}) != len(entries):
            raise Corrupt("tree object has duplicate names")
        return cls(entries)


EMPTY_TREE = Tree(())


# ---------------------------------------------------------------- commits


@dataclass(frozen=True)
class Root:
    """A subdot's top folder: its tree and its own attributes (PostgreSQL insists on 0700)."""

    tree: ObjectId
    mode: int
    uid: int
    gid: int
    mtime_ns: int

    def to_json(self) -> dict[str, object]:
        return {"tree": self.tree.hex(), "mode": self.mode, "uid": self.uid, "gid": self.gid,
                "mtime_ns": self.mtime_ns}

    @classmethod
    def from_json(cls, d: object) -> Root:
        if not isinstance(d, dict):
            raise TypeError
        ints = [d["mode"], d["uid"], d["gid"], d["mtime_ns"]]
        if not all(isinstance(n, int) and n >= 0 for n in ints[:3]) or not isinstance(ints[3], int):
            raise TypeError
        if ints[0] >= 0o10000:
            raise TypeError
        return cls(parse_hex_id(d["tree"]), *ints)


@dataclass(frozen=True)
class Commit:
    """A consistent state of every subdot of a dot."""

    parents: tuple[ObjectId, ...]
    subdots: dict[str, Root]
    message: str
    author: str
    timestamp_ns: int
    metadata: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return MAGIC_COMMIT + b"\n" + _canonical_json({
            "parents": [p.hex() for p in self.parents],
            "subdots": {k: v.to_json() for k, v in self.subdots.items()},
            "message": self.message,
            "author": self.author,
            "timestamp_ns": self.timestamp_ns,
            "metadata": self.metadata,
        })

    @classmethod
    def decode(cls, data: bytes) -> Commit:
        if not data.startswith(MAGIC_COMMIT + b"\n"):
            raise Corrupt("commit object is malformed")
        try:
            d = json.loads(data[5:])
            parents = tuple(parse_hex_id(p) for p in d["parents"])
            subdots = {str(k): Root.from_json(v) for k, v in d["subdots"].items()}
            meta = {str(k): str(v) for k, v in d["metadata"].items()}
            ts = d["timestamp_ns"]
            if not isinstance(ts, int):
                raise TypeError
            return cls(parents, subdots, str(d["message"]), str(d["author"]), ts, meta)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise Corrupt("commit object is malformed") from None
