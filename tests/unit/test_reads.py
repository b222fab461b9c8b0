"""Scattered reads of one file in one call (fs/_reads.c), as patch_paged uses them."""

from __future__ import annotations

import errno
import mmap
import os
import random
from pathlib import Path

import pytest

from dotmesh.fs._reads import read_runs
from dotmesh.model.ids import object_id
from dotmesh.model.objects import FileList
from dotmesh.store import chunker, packs


def _file(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "f"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


@pytest.mark.parametrize("advise", [True, False])
def test_each_run_lands_at_its_position(tmp_path: Path, advise: bool) -> None:
    data = random.Random(1).randbytes(1 << 20)
    fd = _file(tmp_path, data)
    buf = mmap.mmap(-1, 64 << 10)
    runs = [(900_000, 8192, 0), (12_345, 100, 8192), (0, 1, 9000), (500_000, 30_000, 20_000)]
    try:
        assert read_runs(fd, buf, runs, advise) == sum(n for _, n, _ in runs)
    finally:
        os.close(fd)
    for offset, length, at in runs:
        assert buf[at:at + length] == data[offset:offset + length]


def test_reading_stops_at_the_run_the_file_ends_in(tmp_path: Path) -> None:
    fd = _file(tmp_path, b"a" * 10_000)
    buf = bytearray(b"-" * 30_000)
    try:
        got = read_runs(fd, buf, [(0, 8192, 0), (8192, 8192, 8192), (0, 8192, 16384)], False)
    finally:
        os.close(fd)
    assert got == 8192 + (10_000 - 8192)  # the third run, after the short one, is not read
    assert buf[:10_000] == b"a" * 10_000 and buf[10_000:] == b"-" * 20_000


@pytest.mark.parametrize("runs, what", [
    ([(0, 4097, 0)], "does not fit the buffer"),
    ([(0, 1, 4096)], "does not fit the buffer"),
    ([(0, 10, 1 << 62)], "does not fit the buffer"),
    ([(-1, 10, 0)], "negative"),
    ([(0, -10, 0)], "negative"),
    ([(0, 10, -1)], "negative"),
    ([((1 << 63) - 5, 10, 0)], "largest file offset"),
])
def test_a_run_outside_the_buffer_or_the_file_is_refused_before_any_read(
        tmp_path: Path, runs: list[tuple[int, int, int]], what: str) -> None:
    fd = _file(tmp_path, b"a" * 8192)
    buf = bytearray(4096)
    try:
        with pytest.raises(ValueError, match=what):
            read_runs(fd, buf, [(0, 100, 0), *runs], True)  # the good first run is not read
    finally:
        os.close(fd)
    assert buf == bytearray(4096)


def test_what_is_not_runs_or_a_writable_buffer_is_refused(tmp_path: Path) -> None:
    fd = _file(tmp_path, b"a" * 100)
    try:
        with pytest.raises(TypeError):
            read_runs(fd, b"x" * 100, [(0, 10, 0)], False)  # read-only
        with pytest.raises(TypeError):
            read_runs(fd, bytearray(100), [[0, 10, 0]], False)  # not a tuple
        with pytest.raises(TypeError):
            read_runs(fd, bytearray(100), [(0, 10)], False)
        with pytest.raises(TypeError):
            read_runs(fd, bytearray(100), 5, False)
        with pytest.raises(OverflowError):
            read_runs(fd, bytearray(100), [(1 << 64, 10, 0)], False)
    finally:
        os.close(fd)


def test_a_failed_read_raises_with_its_errno(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(IsADirectoryError):
            read_runs(fd, bytearray(100), [(0, 10, 0)], True)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as raised:
        read_runs(1 << 30, bytearray(100), [(0, 10, 0)], False)  # no such descriptor
    assert raised.value.errno == errno.EBADF


def test_runs_that_change_while_they_are_parsed_are_read_as_they_were_given(
        tmp_path: Path) -> None:
    """Parsing a field may run Python code, which may empty the list of runs: the runs are
    copied first (the list's items were read after being freed)."""
    data = bytes(range(256)) * 4
    fd = _file(tmp_path, data)

    class Run(tuple):  # type: ignore[type-arg]  # not on the tuple free list: really freed
        pass

    runs: list[object] = []

    class Shrinking:
        def __index__(self) -> int:
            del runs[1:]
            return 0

    runs.extend([(Shrinking(), 10, 0), *(Run((i, 1, 10 + i)) for i in range(64))])
    buf = bytearray(100)
    try:
        assert read_runs(fd, buf, runs, False) == 10 + 64
    finally:
        os.close(fd)
    assert bytes(buf[:74]) == data[:10] + data[:64]


def test_a_file_that_shrank_under_a_read_says_where_it_ends(tmp_path: Path,
                                                              monkeypatch) -> None:
    """chunk_paged's read around blocks known unchanged, of a file shorter than its stat said
    a moment before: the bytes it has, and where it ends."""
    data = random.Random(2).randbytes(5 * 8192 + 100)
    fd = _file(tmp_path, data)
    real = os.fstat

    class Longer:
        def __init__(self, st: os.stat_result) -> None:
            self.st_size = 8 * 8192

    monkeypatch.setattr(os, "fstat", lambda f: Longer(real(f)) if f == fd else real(f))
    buf = bytearray(8 * 8192)
    try:
        got = chunker._read_except(fd, buf, 0, 8 * 8192, {1})
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert got == len(data)
    assert buf[:8192] == data[:8192] and buf[16384:len(data)] == data[16384:]
    assert buf[8192:16384] == bytes(8192)  # the block known unchanged is not read


@pytest.mark.parametrize("n", [1, 100, 2046, 2047, 2048, 4094, 8192, 8193, 65_536])
def test_ids_hashed_without_releasing_the_gil_are_blake3_ids(n: int) -> None:
    data = random.Random(n).randbytes(3 * n + 5)
    offsets, lengths = [0, n, 2 * n + 5], [n, n, n]
    view = memoryview(data)
    assert chunker._ids_holding_gil(view, offsets, lengths) == chunker._ids(
        view, offsets, lengths) == [object_id(data[o:o + n]) for o in offsets]


def test_no_piece_hashed_is_long_enough_for_blake3_to_release_the_gil(monkeypatch) -> None:
    real = chunker.blake3.blake3
    seen: list[int] = []

    class Recording:
        def __init__(self, data: memoryview) -> None:
            seen.append(len(data))
            self.h = real(data)

        def update(self, data: memoryview) -> None:
            seen.append(len(data))
            self.h.update(data)

        def digest(self) -> bytes:
            return self.h.digest()

    monkeypatch.setattr(chunker.blake3, "blake3", Recording)
    data = random.Random(4).randbytes(3 * 8192)
    ids = chunker._ids_holding_gil(memoryview(data), [0, 8192, 16384], [8192] * 3)
    monkeypatch.undo()
    assert ids == [object_id(data[o:o + 8192]) for o in (0, 8192, 16384)]
    assert seen and max(seen) < 2048  # blake3's GIL_MINSIZE


def test_uncompressed_pages_stay_whole_when_their_buffer_is_reused() -> None:
    """Many incompressible pages (more than a huge page of them) are copied out of the
    caller's buffer in one piece: each payload is its page, after the buffer changed."""
    rng = random.Random(3)
    pages = [rng.randbytes(8192) for _ in range(300)]
    buf = bytearray(b"".join(pages))
    out = packs.compress_many(memoryview(buf), [(i * 8192, 8192) for i in range(300)])
    buf[:] = bytes(len(buf))
    assert [(bytes(p), z) for p, z in out] == [(page, False) for page in pages]


def test_patched_blocks_are_stored_whole_across_batches(tmp_path: Path) -> None:
    """A change larger than the read buffer is read in batches into the same buffer: every
    new block handed back holds its own bytes, compressed or not."""
    rng = random.Random(5)
    old = [rng.randbytes(8192) for _ in range(12)]
    # every third page compresses, the others are stored as they are
    new = [(b"page %04d " % i * 820)[:8192] if i % 3 == 0 else rng.randbytes(8192)
           for i in range(12)]
    base = FileList(tuple((object_id(b), 8192) for b in old)).encode()
    fd = _file(tmp_path, b"".join(new))
    try:
        got = chunker.patch_paged(fd, 12 * 8192, base, None, [(0, 12)],
                                  bytearray(3 * 8192), lambda ids: set(ids))
    finally:
        os.close(fd)
    assert got is not None and got.read == 12 * 8192
    stored = {oid: (bytes(payload), zstd) for _, oid, _, payload, zstd in got.new}
    for block in new:
        payload, zstd = stored[object_id(block)]
        assert (packs.decompress(payload, 8192) if zstd else payload) == block


def test_a_file_shorter_than_its_change_is_not_patched(tmp_path: Path) -> None:
    base = FileList(tuple((object_id(bytes([i]) * 8192), 8192) for i in range(4))).encode()
    fd = _file(tmp_path, b"z" * (3 * 8192))  # shrank after its size was taken
    try:
        assert chunker.patch_paged(fd, 4 * 8192, base, None, [(2, 4)], bytearray(1 << 20),
                                   lambda ids: set(ids)) is None
    finally:
        os.close(fd)
