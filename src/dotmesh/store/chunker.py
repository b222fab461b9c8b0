"""How a file is cut into chunks, and the hot loop that hashes and compresses them.

Policy (measured in bench/, see docs/format.md):
- files up to SMALL_FILE bytes are one chunk;
- "paged" files (a multiple of PAGE bytes, like PostgreSQL, SQLite or InnoDB files, which
  rewrite pages in place) are cut into fixed PAGE_BLOCK blocks aligned to the pages, so a page
  write costs one block;
- everything else uses FastCDC (avg CDC_AVG), which survives insertions and shifts.
All the byte work happens in compiled code that releases the GIL (pyfastcdc, blake3, zstd), so
two threads use both cores; but a patch's few scattered pages are read in one call and hashed
holding the GIL (patch_paged), where a release per page cost a wait for the GIL per page.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias, cast

import blake3
import xxhash
from pyfastcdc import FastCDC

from dotmesh.fs._reads import read_runs
from dotmesh.model.ids import HOLE, ObjectId, object_id
from dotmesh.model.objects import KIND_CHUNK, paged_blocks, patched_filelist
from dotmesh.store.packs import Span, compress_many

if FastCDC.__module__ != "pyfastcdc.cy.fastcdc":  # the pure-Python fallback is 400x slower
    raise ImportError("pyfastcdc's compiled extension is not available")

SMALL_FILE = 64 * 1024
PAGE = 8192
PAGE_BLOCK = 8192
CDC_AVG = 64 * 1024
CDC = FastCDC(avg_size=CDC_AVG)
SEGMENT = 32 << 20  # bytes per task for paged files; also the CDC read window
SUPER = 64 * 1024  # superblock: the unit of the unchanged-region prefilter
FP_LEN = 16
UNKNOWN_FP = bytes(FP_LEN)  # a superblock whose bytes were not all read


def is_paged(size: int) -> bool:
    return size > SMALL_FILE and size % PAGE == 0


def page_lengths(lengths: Sequence[int]) -> bool:
    """Whether a file list's blocks are a paged file's: all page blocks but the last."""
    rest = list(lengths[:-1])
    return rest.count(PAGE_BLOCK) == len(rest)


# A worker's read buffer: an anonymous mapping costs only the pages a command touches (a
# 32 MiB bytearray is zeroed at once: 25-36 ms a thread, paid by every small commit)
Buffer: TypeAlias = bytearray | mmap.mmap
Record = tuple[int, ObjectId, int, bytes | memoryview, bool]  # what PackWriter.add_many takes


@dataclass
class Chunks:
    """A run of chunks as computed by a worker: ids and lengths in file order, the compressed
    records of those the store lacks, and (paged files) the superblock fingerprints."""

    ids: list[ObjectId]
    lengths: list[int]
    new: list[Record]
    fingerprints: bytes = b""
    skipped: int = 0  # bytes known unchanged without being read


@dataclass(frozen=True)
class Previous:
    """A paged file's previous version: its block ids and its superblocks' fingerprints.

    Re-reading a changed database file is most of a commit's cost; a superblock whose
    fingerprint (xxh3-128, 7 GB/s) is unchanged keeps its block ids without hashing each
    8 KiB block with BLAKE3 (a call per block, about 2 GB/s). Every id in ``ids`` must be in
    the store (a committed list's, or one this command stored): :func:`chunk_paged` takes
    them, and those it hashes again at their place, as known without asking the index.
    """

    ids: Sequence[ObjectId]
    fingerprints: bytes


Missing = Callable[[list[ObjectId]], set[ObjectId]]  # returns the subset of ids the store lacks
# (payload, compressed?) for each (offset, length) of a buffer, as packs.compress_many
Packer = Callable[[memoryview, Sequence[Span]], list[tuple[bytes | memoryview, bool]]]
_ZERO_IDS: dict[int, ObjectId] = {}


def _zero_id(n: int) -> ObjectId:
    z = _ZERO_IDS.get(n)
    if z is None:
        z = _ZERO_IDS[n] = object_id(bytes(n))
    return z


_PIECE = 2047  # blake3 releases the GIL for an input from 2,048 bytes (its GIL_MINSIZE)
Hasher = Callable[[memoryview, list[int], list[int]], list[ObjectId]]


def _ids(buf: memoryview, offsets: list[int], lengths: list[int]) -> list[ObjectId]:
    """BLAKE3 digests of the chunks, as object_id makes them (one cast for the list, not a
    call per chunk). blake3 releases the GIL for each chunk of 2 KiB or more."""
    b3 = blake3.blake3
    return cast(list[ObjectId],
                [b3(buf[o:o + n]).digest() for o, n in zip(offsets, lengths, strict=True)])


def _ids_holding_gil(buf: memoryview, offsets: list[int], lengths: list[int]
                     ) -> list[ObjectId]:
    """:func:`_ids`, each chunk fed to its hasher in pieces of less than blake3's 2 KiB, so
    that the GIL is never released. For a few scattered blocks hashed beside a thread that
    runs Python (a 1% commit's pages, beside the walk): each release would wait up to the
    switch interval to take the GIL back (1,440 pages: 1 s, against 6 ms alone). Costs 13 us
    a block instead of 3.5."""
    b3 = blake3.blake3
    out: list[ObjectId] = []
    for o, n in zip(offsets, lengths, strict=True):
        h = b3(buf[o:o + min(n, _PIECE)])
        for p in range(o + _PIECE, o + n, _PIECE):
            h.update(buf[p:min(p + _PIECE, o + n)])
        out.append(cast(ObjectId, h.digest()))
    return out


def _finish(buf: memoryview, offsets: list[int], lengths: list[int], known: frozenset[bytes],
            missing: Missing, pack: Packer = compress_many, hasher: Hasher = _ids) -> Chunks:
    """Hash the chunks of ``buf``, then compress those the store lacks."""
    ids = hasher(buf, offsets, lengths)
    for i, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
        if buf[o] == 0 and buf[o + n - 1] == 0 and ids[i] == _zero_id(n):
            ids[i] = HOLE
    unknown = [x for x in ids if x not in known and x != HOLE]
    need = missing(unknown) if unknown else set()
    new: list[Record] = []
    if need:
        picked: list[tuple[ObjectId, int]] = []
        spans: list[tuple[int, int]] = []
        for x, o, n in zip(ids, offsets, lengths, strict=True):
            if x in need:
                need.discard(x)  # compress a repeated chunk once
                picked.append((x, n))
                spans.append((o, n))
        new = [(KIND_CHUNK, x, n, payload, z)
               for (x, n), (payload, z) in zip(picked, pack(buf, spans), strict=True)]
    return Chunks(ids, lengths, new)


def read_exact(fd: int, buf: Buffer | memoryview, n: int, offset: int) -> int:
    """Fill ``buf[:n]`` from ``offset``; returns how many bytes the file really had."""
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:n]], offset + got)
        if k == 0:
            break
        got += k
    return got


def chunk_paged(fd: int, start: int, length: int, buf: Buffer, known: frozenset[bytes],
                missing: Missing, prev: Previous | None = None,
                pack: Packer = compress_many, same: frozenset[int] = frozenset()) -> Chunks:
    """Cut ``length`` bytes from ``start`` (a multiple of SUPER) into page blocks.

    ``same``: blocks (absolute indexes) known to hold the same bytes as in ``prev``, as a
    copy-on-write filesystem's extent maps tell: they are not even read. A superblock only
    partly known gets an unknown fingerprint (it never matches, so it is hashed next time).
    A block hashed again that ``prev`` holds at its place is known (no lookup): ``known``
    need not hold ``prev``'s ids."""
    per = SUPER // PAGE_BLOCK
    first_block, first_super = start // PAGE_BLOCK, start // SUPER
    old_supers = len(prev.fingerprints) // FP_LEN if prev else 0
    skip: set[int] = set()
    if prev is not None and same:
        end = min(first_block + (length + PAGE_BLOCK - 1) // PAGE_BLOCK, len(prev.ids))
        skip = {b - first_block for b in same if first_block <= b < end}
    got = (_read_except(fd, buf, start, length, skip) if skip
           else read_exact(fd, buf, length, start))
    mv = memoryview(buf)
    ids = [ObjectId(b"")] * ((got + PAGE_BLOCK - 1) // PAGE_BLOCK)  # all filled below
    lengths = [PAGE_BLOCK] * len(ids)
    if ids and got % PAGE_BLOCK:
        lengths[-1] = got % PAGE_BLOCK
    fps: list[bytes] = []
    todo: list[int] = []  # indexes of blocks that need hashing
    fp_of = xxhash.xxh3_128_digest
    skipped = 0
    for k, so in enumerate(range(0, got, SUPER)):
        n = min(SUPER, got - so)
        si = first_super + k
        b0, b1 = k * per, min(k * per + per, len(ids))
        known_here = [b for b in range(b0, b1) if b in skip] if skip else []
        if known_here:
            assert prev is not None
            for b in known_here:
                ids[b] = prev.ids[first_block + b]
            skipped += len(known_here) * PAGE_BLOCK
            if len(known_here) == b1 - b0 and n == SUPER and si < old_supers:
                fps.append(prev.fingerprints[si * FP_LEN:(si + 1) * FP_LEN])
            else:
                fps.append(UNKNOWN_FP)
                todo.extend(b for b in range(b0, b1) if b not in skip)
            continue
        fp = fp_of(mv[so:so + n])
        fps.append(fp)
        if (prev is not None and n == SUPER and si < old_supers
                and prev.fingerprints[si * FP_LEN:(si + 1) * FP_LEN] == fp):
            ids[b0:b0 + per] = prev.ids[first_block + b0:first_block + b0 + per]
        else:
            todo.extend(range(b0, b1))
    if prev is not None and todo:  # what the previous version held where a block is hashed
        # is in the store: most blocks of a changed superblock are as they were
        old_ids, last = prev.ids, len(prev.ids) - first_block
        known = known | frozenset([old_ids[first_block + i] for i in todo if i < last])
    chunks = _finish(mv, [i * PAGE_BLOCK for i in todo], [lengths[i] for i in todo], known,
                     missing, pack)
    for i, oid in zip(todo, chunks.ids, strict=True):
        ids[i] = oid
    return Chunks(ids, lengths, chunks.new, b"".join(fps), skipped)


@dataclass
class Patched:
    """A paged file's new version made from its previous one's file list (see
    :func:`patch_paged`): the encoded list, its superblocks' fingerprints, the compressed
    records of new blocks the store lacks, and how many bytes were read."""

    filelist: bytes
    fingerprints: bytes
    new: list[Record]
    read: int


def patch_paged(fd: int, size: int, base: bytes, base_fps: bytes | None,
                changed: list[tuple[int, int]], buf: Buffer, missing: Missing,
                pack: Packer = compress_many, advise: bool = True) -> Patched | None:
    """Cut a paged file of ``size`` bytes whose blocks are ``base``'s (an encoded file list of
    the previous version) but in the runs ``changed`` ([first, end) block indexes, sorted;
    blocks past ``base``'s end must be in them), reading and hashing only those runs: the
    work follows what changed, not the file's size. None when ``base`` is not a list of page
    blocks or the file is shorter than ``size`` (the caller then reads it all).

    A batch of runs is read in one call and hashed without releasing the GIL (see
    :func:`_ids_holding_gil`); ``advise``: tell the kernel of the batch's runs first (for a
    file whose pages are likely on disk, not in memory)."""
    had = paged_blocks(base, PAGE_BLOCK)
    if had is None or size % PAGE_BLOCK:
        return None
    count = size // PAGE_BLOCK
    per = SUPER // PAGE_BLOCK
    supers = (size + SUPER - 1) // SUPER
    old_supers = (had * PAGE_BLOCK + SUPER - 1) // SUPER
    fps = bytearray(base_fps if base_fps and len(base_fps) == old_supers * FP_LEN
                    else UNKNOWN_FP * old_supers)
    del fps[supers * FP_LEN:]
    fps += UNKNOWN_FP * (supers - len(fps) // FP_LEN)
    if count != had and supers:  # the last superblock now ends elsewhere
        fps[-FP_LEN:] = UNKNOWN_FP
    limit = len(buf) // PAGE_BLOCK
    pieces: list[tuple[int, int]] = []  # runs cut to fit the buffer
    for first, end in changed:
        for lo in range(max(0, first), min(end, count), limit):
            pieces.append((lo, min(lo + limit, end, count)))
    changes: dict[int, ObjectId] = {}
    new: list[Record] = []
    read = 0
    mv = memoryview(buf)
    fp_of = xxhash.xxh3_128_digest
    i = 0
    while i < len(pieces):
        batch: list[tuple[int, int, int]] = []  # (first block, end block, position in buf)
        pos = 0
        while i < len(pieces) and pos + (pieces[i][1] - pieces[i][0]) * PAGE_BLOCK <= len(buf):
            lo, hi = pieces[i]
            batch.append((lo, hi, pos))
            pos += (hi - lo) * PAGE_BLOCK
            i += 1
        # scattered blocks, asked for at once: the disk serves them in its own order
        wanted = [(lo * PAGE_BLOCK, (hi - lo) * PAGE_BLOCK, at) for lo, hi, at in batch]
        if read_runs(fd, buf, wanted, advise) < pos:
            return None
        read += pos
        offsets: list[int] = []
        blocks: list[int] = []
        for lo, hi, at in batch:
            n = (hi - lo) * PAGE_BLOCK
            offsets.extend(range(at, at + n, PAGE_BLOCK))
            blocks.extend(range(lo, hi))
            for si in range((lo + per - 1) // per, (hi + per - 1) // per):
                b0, b1 = si * per, min(si * per + per, count)
                fps[si * FP_LEN:(si + 1) * FP_LEN] = (
                    fp_of(mv[at + (b0 - lo) * PAGE_BLOCK:at + (b1 - lo) * PAGE_BLOCK])
                    if b0 >= lo and b1 <= hi else UNKNOWN_FP)
            if lo % per:  # the superblock the run starts inside is only partly read
                si = lo // per
                fps[si * FP_LEN:(si + 1) * FP_LEN] = UNKNOWN_FP
        got = _finish(mv, offsets, [PAGE_BLOCK] * len(offsets), frozenset(), missing, pack,
                      _ids_holding_gil)
        changes.update(zip(blocks, got.ids, strict=True))
        new.extend(got.new)
    try:
        filelist = patched_filelist(base, count, PAGE_BLOCK, changes)
    except ValueError:
        return None
    return Patched(filelist, bytes(fps), new, read)


def _read_except(fd: int, buf: Buffer, start: int, length: int, skip: set[int]) -> int:
    """Read ``length`` bytes from ``start`` into ``buf`` but the blocks in ``skip`` (indexes
    from ``start``); returns how many bytes the file has in that range."""
    size = min(length, max(0, os.fstat(fd).st_size - start))
    count = (size + PAGE_BLOCK - 1) // PAGE_BLOCK
    runs: list[tuple[int, int]] = []
    k = 0
    while k < count:
        if k in skip:
            k += 1
            continue
        end = k + 1
        while end < count and end not in skip:
            end += 1
        runs.append((k * PAGE_BLOCK, min(end * PAGE_BLOCK, size)))
        k = end
    # Scattered blocks of a snapshot are seldom in the page cache: ask for all of them at
    # once, so the disk serves them in its own order, then read them (one call: read_runs).
    left = read_runs(fd, buf, [(start + lo, hi - lo, lo) for lo, hi in runs], True)
    for lo, hi in runs:
        if left < hi - lo:  # the file ends in this run
            return lo + left
        left -= hi - lo
    return size


def chunk_cdc(fd: int, buf: Buffer, known: frozenset[bytes], missing: Missing,
              pack: Packer = compress_many) -> Iterator[Chunks]:
    """Cut a whole file with FastCDC, window by window.

    Each window's last chunk is re-cut with the next window, so the cut points are exactly
    those of cutting the whole file at once.
    """
    pos = 0
    while True:
        got = read_exact(fd, buf, len(buf), pos)
        if got == 0:
            return
        cuts = cdc_cuts(memoryview(buf)[:got])
        at_end = got < len(buf)
        if not at_end and len(cuts) > 1:
            cuts.pop()
        yield _finish(memoryview(buf), [o for o, _ in cuts], [n for _, n in cuts], known,
                      missing, pack)
        pos += cuts[-1][0] + cuts[-1][1]
        if at_end:
            return


def cdc_cuts(data: memoryview) -> list[tuple[int, int]]:
    """Where FastCDC cuts ``data``: (offset, length) of each chunk."""
    return [(c.offset, c.length) for c in CDC.cut_buf(data)]


def chunk_files(buf: memoryview, offsets: list[int], lengths: list[int],
                known: frozenset[bytes], missing: Missing, pack: Packer = compress_many) -> Chunks:
    """Many small files laid side by side in ``buf``, one chunk each: one index lookup for
    the whole batch instead of one per file."""
    return _finish(buf, offsets, lengths, known, missing, pack)
