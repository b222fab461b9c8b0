"""How a file is cut into chunks, and the hot loop that hashes and compresses them.

Policy (measured in bench/, see docs/format.md):
- files up to SMALL_FILE bytes are one chunk;
- "paged" files (a multiple of PAGE bytes, like PostgreSQL, SQLite or InnoDB files, which
  rewrite pages in place) are cut into fixed PAGE_BLOCK blocks aligned to the pages, so a page
  write costs one block;
- everything else uses FastCDC (avg CDC_AVG), which survives insertions and shifts.
All the byte work happens in compiled code that releases the GIL (pyfastcdc, blake3, zstd), so
two threads use both cores.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import blake3
from pyfastcdc import FastCDC

from dotmesh.model.objects import HOLE, ObjectId
from dotmesh.store.packs import compress

if FastCDC.__module__ != "pyfastcdc.cy.fastcdc":  # the pure-Python fallback is 400x slower
    raise ImportError("pyfastcdc's compiled extension is not available")

SMALL_FILE = 64 * 1024
PAGE = 8192
PAGE_BLOCK = 8192
CDC_AVG = 64 * 1024
CDC = FastCDC(avg_size=CDC_AVG)
SEGMENT = 32 << 20  # bytes per task for paged files; also the CDC read window


def is_paged(size: int) -> bool:
    return size > SMALL_FILE and size % PAGE == 0


@dataclass
class ChunkResult:
    """One chunk as computed by a worker; ``payload`` is None when the store has it already."""

    oid: ObjectId
    length: int
    payload: bytes | memoryview | None = None
    zstd: bool = False


Known = Callable[[list[bytes]], set[bytes]]  # returns the subset of ids that are missing


def _zero_id(n: int, cache: dict[int, bytes] = {}) -> bytes:  # noqa: B006 - deliberate memo
    z = cache.get(n)
    if z is None:
        z = cache[n] = blake3.blake3(bytes(n)).digest()
    return z


def _finish(buf: memoryview, cuts: list[tuple[int, int]], known: frozenset[bytes],
            missing: Known) -> list[ChunkResult]:
    """Hash the chunks at ``cuts`` of ``buf``, then compress those the store lacks."""
    out: list[ChunkResult] = []
    for off, n in cuts:
        view = buf[off:off + n]
        digest = blake3.blake3(view).digest()
        if view[0] == 0 and view[n - 1] == 0 and digest == _zero_id(n):
            out.append(ChunkResult(HOLE, n))
        else:
            out.append(ChunkResult(ObjectId(digest), n))
    unknown = [r.oid for r in out if r.oid != HOLE and r.oid not in known]
    need = missing(unknown) if unknown else set()
    for r, (off, n) in zip(out, cuts, strict=False):
        if r.oid in need:
            need.discard(r.oid)  # compress a repeated chunk once
            payload, r.zstd = compress(buf[off:off + n])
            r.payload = bytes(payload) if isinstance(payload, memoryview) else payload
    return out


def _read_exact(fd: int, buf: bytearray, n: int, offset: int) -> int:
    """Fill ``buf[:n]`` from ``offset``; returns how many bytes the file really had."""
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:n]], offset + got)
        if k == 0:
            break
        got += k
    return got


def chunk_paged(fd: int, start: int, length: int, buf: bytearray, known: frozenset[bytes],
                missing: Known) -> list[ChunkResult]:
    got = _read_exact(fd, buf, length, start)
    cuts = [(o, min(PAGE_BLOCK, got - o)) for o in range(0, got, PAGE_BLOCK)]
    return _finish(memoryview(buf), cuts, known, missing)


def chunk_cdc(fd: int, size: int, buf: bytearray, known: frozenset[bytes],
              missing: Known) -> Iterator[list[ChunkResult]]:
    """Cut a whole file with FastCDC, window by window.

    Each window's last chunk is re-cut with the next window, so the cut points are exactly
    those of cutting the whole file at once.
    """
    pos = 0
    while True:
        got = _read_exact(fd, buf, len(buf), pos)
        if got == 0:
            return
        view = memoryview(buf)[:got]
        cuts = [(c.offset, c.length) for c in CDC.cut_buf(view)]
        at_end = got < len(buf) or pos + got >= size
        if not at_end and len(cuts) > 1:
            cuts.pop()
        yield _finish(memoryview(buf), cuts, known, missing)
        consumed = cuts[-1][0] + cuts[-1][1]
        pos += consumed
        if at_end:
            return


def chunk_small(data: bytes, known: frozenset[bytes], missing: Known) -> ChunkResult:
    return _finish(memoryview(data), [(0, len(data))], known, missing)[0]
