"""Objects and their canonical encodings (see docs/format.md).

An object's id is the BLAKE3 hash of its encoded bytes. Chunks are raw file bytes; the other kinds
start with a 4-byte magic so they can be told apart and versioned. Decoding validates everything a
hostile or corrupted store could put there (names, kinds, sizes), so the rest of the code may trust
what it gets.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain, starmap
from operator import itemgetter
from typing import Any, cast

from dotmesh.errors import Corrupt, InvalidName
from dotmesh.model.ids import ID_LEN, ObjectId, object_id, parse_hex_id
from dotmesh.model.names import check_metadata_key, check_name

KIND_CHUNK, KIND_FILELIST, KIND_TREE, KIND_COMMIT = 0, 1, 2, 3
KIND_NAMES = {KIND_CHUNK: "chunk", KIND_FILELIST: "file list", KIND_TREE: "tree",
              KIND_COMMIT: "commit"}
MAGIC_FILELIST, MAGIC_TREE, MAGIC_COMMIT = b"DMF1", b"DMT1", b"DMC1"

# The largest object of each kind that dm itself makes (docs/format.md lists them). Everything
# that comes from outside is held to these before it is decompressed or parsed.
MAX_CHUNK = 256 << 10  # FastCDC's largest cut; small files and pages are smaller
MAX_FILELIST = 64 << 20  # 1.8 million chunks: files up to ~14 GiB of pages, ~450 GiB of CDC
MAX_TREE = 64 << 20  # about 500,000 entries in one folder
MAX_COMMIT = 1 << 20
MAX_SIZE = {KIND_CHUNK: MAX_CHUNK, KIND_FILELIST: MAX_FILELIST, KIND_TREE: MAX_TREE,
            KIND_COMMIT: MAX_COMMIT}
MAX_NAME_BYTES = 255  # NAME_MAX: a longer file name cannot be restored anywhere
MAX_LINK_BYTES = 4095  # PATH_MAX - 1: the longest symlink target Linux accepts
MAX_MESSAGE = 64 << 10
MAX_AUTHOR = 256
MAX_METADATA = 256  # keys of one commit
MAX_PARENTS = 64
MAX_SUBDOTS = 1024
MAX_DEPTH = 256  # folders nested in a subdot
INT64 = 1 << 63
UINT32 = 1 << 32

# Tree entry kinds.
FILE, DIR, SYMLINK = "f", "d", "l"


def _ref_id(text: str) -> ObjectId:
    """parse_hex_id for the many ids of a tree, without a regex per id."""
    try:
        raw = bytes.fromhex(text) if len(text) == 2 * ID_LEN else b""
    except ValueError:
        raw = b""
    if len(raw) != ID_LEN:
        raise Corrupt(f"bad object id {text[:80]!r}")
    return ObjectId(raw)


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ---------------------------------------------------------------- file lists

_FL_HEAD = struct.Struct("<4sQI")
_FL_ENTRY = struct.Struct(f"<{ID_LEN}sI")
_FL_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class FileList:
    """A file's content as an ordered list of (chunk id, length); HOLE ids are zero runs."""

    chunks: tuple[tuple[ObjectId, int], ...]

    @cached_property
    def size(self) -> int:
        """The file's bytes (worked out once: a restore's plan asks each list several
        times, and a 266 MiB file's list has 34,000 chunks)."""
        return sum(map(itemgetter(1), self.chunks))

    def encode(self) -> bytes:
        return encode_filelist(self.chunks)

    @staticmethod
    def size_of(data: bytes) -> int:
        """The file size an encoded list's header states (true of a list that :meth:`decode`
        or :func:`paged_blocks` accepted)."""
        return int(_FL_HEAD.unpack_from(data)[1])

    @classmethod
    def decode(cls, data: bytes) -> FileList:
        """Parse and check a file list: every chunk 1..MAX_CHUNK bytes (holes too, as dm cuts
        them), the total what the header says."""
        if len(data) < _FL_HEAD.size:
            raise Corrupt("file list object is truncated")
        if len(data) > MAX_FILELIST:
            raise Corrupt(f"file list object of {len(data)} bytes is over the "
                          f"{MAX_FILELIST}-byte limit")
        magic, size, count = _FL_HEAD.unpack_from(data)
        if magic != MAGIC_FILELIST or len(data) != _FL_HEAD.size + count * _FL_ENTRY.size:
            raise Corrupt("file list object is malformed")
        # ObjectId is bytes at run time: the rows are used as they are unpacked (a call per
        # chunk costs a 2 GiB file's 262,144 chunks about 80 ms).
        chunks = cast(tuple[tuple[ObjectId, int], ...],
                      tuple(_FL_ENTRY.iter_unpack(data[_FL_HEAD.size:])))
        lengths = list(map(itemgetter(1), chunks))
        if chunks and not 0 < min(lengths) <= max(lengths) <= MAX_CHUNK:
            raise Corrupt(f"file list object names a chunk of a length dm never makes "
                          f"(0 or over {MAX_CHUNK} bytes)")
        if sum(lengths) != size:
            raise Corrupt("file list object's size does not match its chunks")
        return cls(chunks)


def encode_filelist(chunks: Sequence[tuple[bytes, int]]) -> bytes:
    """:meth:`FileList.encode` of ``chunks`` without making the FileList: a commit assembles
    lists of 68,000 blocks, and a loop per block took 40 ms of each (now 7-13 ms, most of
    it the result's fresh memory, for a paged file's list, whose blocks all have one length;
    14-18 ms for another)."""
    return filelist_of_entries([filelist_entries(chunks)], len(chunks),
                               sum(map(itemgetter(1), chunks)))


def filelist_entries(chunks: Sequence[tuple[bytes, int]]) -> bytes:
    """The entries of :func:`encode_filelist`'s list, without its header: a part of a list
    made where its chunks were read (a child process), joined by
    :func:`filelist_of_entries`."""
    if not chunks:
        return b""
    lengths = list(map(itemgetter(1), chunks))
    if lengths.count(lengths[0]) != len(lengths):
        return b"".join(starmap(_FL_ENTRY.pack, chunks))
    # every entry is an id and the one length: the ids joined by it, and it once more
    length = _FL_LENGTH.pack(lengths[0])
    return length.join(chain(map(itemgetter(0), chunks), (b"",)))


def filelist_of_entries(parts: Sequence[bytes], count: int, size: int) -> bytes:
    """The encoded list of ``count`` chunks of ``size`` bytes in all, whose entries are
    ``parts`` (from :func:`filelist_entries`), in order."""
    return b"".join(chain((_FL_HEAD.pack(MAGIC_FILELIST, size, count),), parts))


def filelist_chunks(data: bytes) -> list[tuple[ObjectId, int]]:
    """The (id, length) pairs of a list this process encoded (unchecked: see
    :meth:`FileList.decode` for one read from a store)."""
    return cast(list[tuple[ObjectId, int]],
                list(_FL_ENTRY.iter_unpack(memoryview(data)[_FL_HEAD.size:])))


def chunk_ids(data: bytes) -> Iterator[bytes]:
    """The chunk ids of an encoded file list, in order, holes included; only its framing is
    checked (Corrupt if wrong): for walks that visit millions of entries and need nothing
    else of them, at the speed of ``struct``."""
    if len(data) < _FL_HEAD.size:
        raise Corrupt("file list object is truncated")
    magic, _, count = _FL_HEAD.unpack_from(data)
    if magic != MAGIC_FILELIST or len(data) != _FL_HEAD.size + count * _FL_ENTRY.size:
        raise Corrupt("file list object is malformed")
    return map(itemgetter(0), _FL_ENTRY.iter_unpack(memoryview(data)[_FL_HEAD.size:]))


def paged_blocks(data: bytes, block: int) -> int | None:
    """How many blocks an encoded file list holds if every one is exactly ``block`` bytes
    (a paged file's list), else None. Checked with strided slices, not a loop per block, so
    that a commit can patch a 65,536-block list in place instead of decoding it."""
    if len(data) < _FL_HEAD.size or len(data) > MAX_FILELIST:
        return None
    magic, size, count = _FL_HEAD.unpack_from(data)
    if magic != MAGIC_FILELIST or len(data) != _FL_HEAD.size + count * _FL_ENTRY.size \
            or size != count * block:
        return None
    length = struct.pack("<I", block)
    lengths = memoryview(data)[_FL_HEAD.size + ID_LEN:]
    for k in range(4):  # each byte of every length field
        if bytes(lengths[k::_FL_ENTRY.size]).count(length[k]) != count:
            return None
    return int(count)


def differing_blocks(old: bytes, new: bytes) -> list[tuple[int, ObjectId, int]] | None:
    """The (offset, id, length) of every block of the encoded list ``new`` that ``old`` does
    not hold at the same offset, if both are lists of blocks of one length (paged files'
    lists, checked as :func:`paged_blocks` checks them), else None.

    Runs of entries are compared as bytes, and only the runs that differ are looked into
    more finely: a restore over a 1% change of a 532 MiB file finds its 700 blocks in 6-17 ms,
    where decoding both lists and comparing them entry by entry took 50 ms."""
    if len(new) < _FL_HEAD.size + _FL_ENTRY.size:
        return None
    block = int(_FL_ENTRY.unpack_from(new, _FL_HEAD.size)[1])
    if not 0 < block <= MAX_CHUNK:  # (a length dm never makes: decode names the fault)
        return None
    had, count = paged_blocks(old, block), paged_blocks(new, block)
    if had is None or count is None:
        return None
    head, size = _FL_HEAD.size, _FL_ENTRY.size
    runs = [(0, min(had, count))]
    for step in (256, 16, 1):
        finer = []
        for lo, hi in runs:
            for i in range(lo, hi, step):
                j = min(i + step, hi)
                if old[head + i * size:head + j * size] != new[head + i * size:head + j * size]:
                    finer.append((i, j))
        runs = finer
    found = [i for i, _ in runs]
    found.extend(range(had, count))  # what the file grew by
    return [(i * block, ObjectId(new[head + i * size:head + i * size + ID_LEN]), block)
            for i in found]


def patched_filelist(base: bytes, count: int, block: int,
                     changes: dict[int, ObjectId]) -> bytes:
    """The encoded list of ``count`` blocks of ``block`` bytes whose ids are ``base``'s (a
    list :func:`paged_blocks` accepted) but at the positions in ``changes``; every position
    past the end of ``base`` must be in ``changes``. Byte for byte what :meth:`FileList.encode`
    gives for the same blocks."""
    had = (len(base) - _FL_HEAD.size) // _FL_ENTRY.size
    missing = [i for i in range(had, count) if i not in changes]
    if missing or any(not 0 <= i < count for i in changes):
        raise ValueError("a patched file list would have blocks of unknown content")
    keep = min(had, count)
    # Joined from pieces: one allocation and one copy of the 2.4 MB list of a 266 MiB file
    # (each fresh page of memory is a fault, and these were three)
    entries = memoryview(base)[_FL_HEAD.size:]
    parts: list[bytes | memoryview] = [_FL_HEAD.pack(MAGIC_FILELIST, count * block, count)]
    at = 0  # the first block not yet placed
    for i in sorted(changes):
        if at < min(i, keep):
            parts.append(entries[at * _FL_ENTRY.size:min(i, keep) * _FL_ENTRY.size])
        parts.append(_FL_ENTRY.pack(changes[i], block))
        at = i + 1
    if at < keep:
        parts.append(entries[at * _FL_ENTRY.size:keep * _FL_ENTRY.size])
    return b"".join(parts)


# ---------------------------------------------------------------- trees


def _fs_bytes(text: str) -> bytes | None:
    """The bytes a name or link text stands for on disk (file names that are not UTF-8 appear
    as lone surrogates \\udc80-\\udcff); None if it stands for none."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


def check_entry_name(name: str) -> None:
    """Reject names that could escape the folder a tree is restored into, that no folder could
    hold, or that spell bytes otherwise than a snapshot does (valid UTF-8 as characters, other
    bytes as lone surrogates): one name, one spelling, so two spellings never alias."""
    raw = _fs_bytes(name)
    if (raw is None or name in ("", ".", "..") or b"/" in raw or b"\x00" in raw
            or len(raw) > MAX_NAME_BYTES or os.fsdecode(raw) != name):
        raise Corrupt(f"tree entry has an unsafe name {name[:80]!r}")


def check_link_target(name: str, target: str) -> None:
    """A symlink's text must be one Linux can hold (its escapes are judged elsewhere, against
    the whole tree: see remote.graph.SymlinkCheck)."""
    raw = _fs_bytes(target)
    if raw is None or not raw or b"\x00" in raw or len(raw) > MAX_LINK_BYTES:
        raise Corrupt(f"symlink {name[:80]!r} has a malformed target")


def _is_int(n: object, low: int, high: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and low <= n < high


@dataclass(frozen=True, slots=True)
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
        """Parse one row, holding it to what dm writes: the kind's fields only, numbers in the
        ranges the kernel takes, a file's size matching what its content id can be."""
        if not (isinstance(row, list) and len(row) == 9 and isinstance(row[0], str)
                and all(_is_int(n, -INT64, INT64) for n in row[2:7])
                and isinstance(row[8], int) and not isinstance(row[8], bool)):
            raise Corrupt(f"tree entry is malformed: {str(row)[:80]}")
        return _entry(row)[0]


def _entry(row: list[Any]) -> tuple[Entry, bytes]:
    """An entry from a row whose fields have the right types (checked by the caller), and the
    bytes of its name (its sort key)."""
    name, kind, mode, uid, gid, mtime_ns, size, ref, chunked = row
    raw = _fs_bytes(name)
    if (raw is None or raw in (b"", b".", b"..") or b"/" in raw or b"\x00" in raw
            or len(raw) > MAX_NAME_BYTES or os.fsdecode(raw) != name):
        raise Corrupt(f"tree entry has an unsafe name {name[:80]!r}")
    if (kind not in (FILE, DIR, SYMLINK) or not 0 <= mode < 0o10000 or not 0 <= uid < UINT32
            or not 0 <= gid < UINT32 or not -INT64 <= mtime_ns < INT64
            or not 0 <= size < INT64 or chunked not in (0, 1)):
        raise Corrupt(f"tree entry is malformed: {str(row)[:80]}")
    oref: ObjectId | str | None
    if kind == SYMLINK:
        if not isinstance(ref, str) or size or chunked:
            raise Corrupt(f"symlink {name[:80]!r} is malformed")
        check_link_target(name, ref)
        oref = ref
    elif kind == DIR:
        if not isinstance(ref, str) or size or chunked:
            raise Corrupt(f"folder {name[:80]!r} is malformed")
        oref = _ref_id(ref)
    elif ref is None:
        if size or chunked:
            raise Corrupt(f"entry {name[:80]!r} lacks its content id")
        oref = None
    else:
        if not isinstance(ref, str) or not size or (not chunked and size > MAX_CHUNK):
            raise Corrupt(f"file {name[:80]!r} has a size its content cannot have")
        oref = _ref_id(ref)
    return Entry(name, kind, mode, uid, gid, mtime_ns, size, oref, bool(chunked)), raw


def _row_key(row: list[object]) -> bytes:
    return str(row[0]).encode("utf-8", "surrogateescape")


def encode_tree_rows(rows: list[list[object]]) -> bytes:
    """The canonical tree encoding of rows shaped like :meth:`Entry.to_json` (sorts ``rows``).

    The snapshot builds rows directly, skipping Entry objects, so this is the one definition.
    """
    rows.sort(key=_row_key)
    return MAGIC_TREE + b"\n" + json.dumps(rows, separators=(",", ":"), ensure_ascii=True).encode()


# The shape of a tree row, checked before json.loads builds anything: exactly nine fields of
# the right types. Rows are parsed a batch at a time and held to their order as they come, so
# what a tree costs to parse follows its entries, whatever JSON or repetition a sender tries
# (``[[],[],...]`` or one row a million times, which zstd shrinks to nothing).
_STR = rb'"[^"\\\x00-\x1f\x80-\xff]*(?:\\[^\x00-\x1f\x80-\xff][^"\\\x00-\x1f\x80-\xff]*)*"'
_UINT = rb"(?:0|[1-9][0-9]{0,19})"
_ROW = re.compile(rb'\[' + _STR + rb',"[fdl]",' + _UINT + rb"," + _UINT + rb"," + _UINT
                  + rb",-?" + _UINT + rb"," + _UINT + rb",(?:" + _STR + rb"|null),[01]\]")
_ROWS_PER_BATCH = 2048


@dataclass(frozen=True)
class Tree:
    entries: tuple[Entry, ...]

    def encode(self) -> bytes:
        return encode_tree_rows([e.to_json() for e in self.entries])

    @classmethod
    def decode(cls, data: bytes) -> Tree:
        if not data.startswith(MAGIC_TREE + b"\n"):
            raise Corrupt("tree object is malformed")
        if len(data) > MAX_TREE:
            raise Corrupt(f"tree object of {len(data)} bytes is over the {MAX_TREE}-byte limit")
        body = memoryview(data)[5:]
        bad = Corrupt("tree object is not a sorted list of tree entries")
        if len(body) == 2 and bytes(body) == b"[]":
            return EMPTY_TREE
        if bytes(body[:1]) != b"[":
            raise bad
        entries: list[Entry] = []
        last = b""
        expect = batch = 1
        rows = 0

        def take(end: int) -> None:
            nonlocal last
            try:
                parsed = json.loads(b"[" + bytes(body[batch:end]) + b"]")
            except (ValueError, RecursionError):
                raise bad from None
            for row in parsed:  # its shape was checked: the field types are right
                e, key = _entry(row)
                if entries and key <= last:
                    raise bad
                last = key
                entries.append(e)

        for m in _ROW.finditer(body, 1):
            if m.start() != expect:
                raise bad
            end = m.end()
            sep = bytes(body[end:end + 1])
            rows += 1
            if sep == b"]":
                if end + 1 != len(body):
                    raise bad
                take(end)
                return cls(tuple(entries))
            if sep != b",":
                raise bad
            expect = end + 1
            if rows % _ROWS_PER_BATCH == 0:
                take(end)
                batch = end + 1
        raise bad


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
        if not (isinstance(d, dict) and set(d) == {"tree", "mode", "uid", "gid", "mtime_ns"}
                and _is_int(d["mode"], 0, 0o10000) and _is_int(d["uid"], 0, UINT32)
                and _is_int(d["gid"], 0, UINT32) and _is_int(d["mtime_ns"], -INT64, INT64)):
            raise Corrupt("commit object has a malformed subdot")
        return cls(parse_hex_id(d["tree"]), d["mode"], d["uid"], d["gid"], d["mtime_ns"])


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
        """The canonical bytes; a commit dm could not decode itself is never written."""
        try:
            for sub in self.subdots:
                check_name(sub, "subdot name")
            for key in self.metadata:
                check_metadata_key(key)
        except InvalidName as e:
            raise Corrupt(f"a commit cannot name that: {e}") from None
        data = MAGIC_COMMIT + b"\n" + _canonical_json({
            "parents": [p.hex() for p in self.parents],
            "subdots": {k: v.to_json() for k, v in self.subdots.items()},
            "message": self.message,
            "author": self.author,
            "timestamp_ns": self.timestamp_ns,
            "metadata": self.metadata,
        })
        if len(data) > MAX_COMMIT:
            raise Corrupt(f"a commit of {len(data)} bytes is over the {MAX_COMMIT}-byte limit")
        return data

    @classmethod
    def decode(cls, data: bytes) -> Commit:
        """Parse a commit, holding every name to the rules local input follows (a subdot name
        becomes a folder name: it must never be a path)."""
        if not data.startswith(MAGIC_COMMIT + b"\n") or len(data) > MAX_COMMIT:
            raise Corrupt("commit object is malformed")
        try:
            d = json.loads(data[5:])
        except (ValueError, RecursionError):
            raise Corrupt("commit object is not valid JSON") from None
        if not (isinstance(d, dict) and set(d) == {"parents", "subdots", "message", "author",
                                                   "timestamp_ns", "metadata"}
                and isinstance(d["parents"], list) and isinstance(d["subdots"], dict)
                and isinstance(d["metadata"], dict) and isinstance(d["message"], str)
                and isinstance(d["author"], str) and _is_int(d["timestamp_ns"], -INT64, INT64)):
            raise Corrupt("commit object is malformed")
        parents = tuple(parse_hex_id(p) for p in d["parents"])
        if len(parents) > MAX_PARENTS or len(set(parents)) != len(parents):
            raise Corrupt("commit object has too many or repeated parents")
        if (len(d["subdots"]) > MAX_SUBDOTS or len(d["metadata"]) > MAX_METADATA
                or len(d["message"]) > MAX_MESSAGE or len(d["author"]) > MAX_AUTHOR):
            raise Corrupt("commit object is over the limits of a commit")
        try:
            for sub in d["subdots"]:
                check_name(sub, "subdot name")
            for key in d["metadata"]:
                check_metadata_key(key)
        except InvalidName as e:
            raise Corrupt(f"commit object names something badly: {e}") from None
        if not all(isinstance(v, str) for v in d["metadata"].values()):
            raise Corrupt("commit object has malformed metadata")
        subdots = {k: Root.from_json(v) for k, v in d["subdots"].items()}
        return cls(parents, subdots, d["message"], d["author"], d["timestamp_ns"],
                   dict(d["metadata"]))


def is_dirty(roots: dict[str, Root], head: Commit | None, whole: bool = False) -> bool:
    """Does the working state differ from ``head`` (in contents, modes or owners)?
    ``whole``: ``roots`` are all the working state's subdots, so one that ``head`` has and
    they lack (a volume removed) is a difference too."""
    committed = head.subdots if head else {}
    empty = object_id(EMPTY_TREE.encode())
    if whole and any(sub not in roots and c.tree != empty for sub, c in committed.items()):
        return True
    for sub, root in roots.items():
        c = committed.get(sub)
        if c is None:
            if root.tree != empty:
                return True
        elif (root.tree, root.mode, root.uid, root.gid) != (c.tree, c.mode, c.uid, c.gid):
            return True
    return False
