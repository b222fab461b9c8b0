"""Which blocks two snapshots of a file share, judged from extent maps, and a paged file's
chunking that skips them: the ids must be exactly those of reading everything."""

from __future__ import annotations

import os
import random
import struct
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dotmesh.fs import _extents, btrfs
from dotmesh.fs.btrfs import (
    blocks_touching,
    changed_ranges,
    same_within,
    shared_ranges,
    unchanged_blocks,
)
from dotmesh.model import objects
from dotmesh.model.ids import ID_LEN, object_id
from dotmesh.model.objects import (
    FileList,
    differing_blocks,
    encode_filelist,
    paged_blocks,
    patched_filelist,
)
from dotmesh.store import chunker

SHARED, DELALLOC, ENCODED = 0x2000, 0x4, 0x8


def test_the_same_address_is_the_same_bytes_and_a_new_one_is_not() -> None:
    old = [(0, 1000, 300, 0), (300, 5000, 100, 0)]
    new = [(0, 1000, 100, SHARED), (100, 9000, 50, 0), (150, 1150, 150, SHARED),
           (300, 5000, 100, 1)]
    assert shared_ranges(old, new, 400) == [(0, 100), (150, 400)]


def test_holes_in_both_are_the_same_and_untrusted_extents_are_not() -> None:
    assert shared_ranges([(100, 7, 10, 0)], [(100, 7, 10, DELALLOC)], 200) == [(0, 100),
                                                                                (110, 200)]
    assert shared_ranges([(0, 7, 10, ENCODED)], [(0, 7, 10, ENCODED)], 10) == []
    assert shared_ranges([], [(0, 50, 10, 0)], 20) == [(10, 20)]


def test_only_whole_blocks_count() -> None:
    assert unchanged_blocks([(0, 8192 * 2 + 1), (8192 * 3 + 5, 8192 * 5)], 8192) == {0, 1, 4}


blocks_st = st.lists(st.binary(min_size=1, max_size=1).map(lambda b: b * chunker.PAGE_BLOCK),
                     min_size=9, max_size=40)


@settings(max_examples=40, deadline=None)
@given(old=blocks_st, flips=st.lists(st.integers(0, 39), max_size=10),
       told=st.sets(st.integers(0, 39)))
@pytest.mark.slow
def test_skipping_blocks_known_equal_gives_the_ids_of_a_full_read(
        old: list[bytes], flips: list[int], told: set[int]) -> None:
    """``same`` may name any blocks that really are equal; the result is what reading and
    hashing everything gives (fingerprints may only be unknown, never wrong)."""
    new = list(old)
    for i in flips:
        if i < len(new):
            new[i] = bytes([(new[i][0] + 1) % 256]) * chunker.PAGE_BLOCK
    equal = {i for i in told if i < len(new) and new[i] == old[i]}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, data in (("old", old), ("new", new)):
            p = os.path.join(tmp, name)
            with open(p, "wb") as f:
                f.write(b"".join(data))
            paths.append(p)
        buf = bytearray(chunker.SEGMENT)
        fd_old = os.open(paths[0], os.O_RDONLY)
        fd_new = os.open(paths[1], os.O_RDONLY)
        try:
            size = len(old) * chunker.PAGE_BLOCK
            base = chunker.chunk_paged(fd_old, 0, size, buf, frozenset(), lambda ids: set(ids))
            prev = chunker.Previous(base.ids, base.fingerprints)
            full = chunker.chunk_paged(fd_new, 0, len(new) * chunker.PAGE_BLOCK, buf,
                                       frozenset(), lambda ids: set(ids))
            part = chunker.chunk_paged(fd_new, 0, len(new) * chunker.PAGE_BLOCK, buf,
                                       frozenset(base.ids), lambda ids: set(ids), prev,
                                       same=frozenset(equal))
        finally:
            os.close(fd_old)
            os.close(fd_new)
    assert part.ids == full.ids
    assert part.skipped == len(equal) * chunker.PAGE_BLOCK
    for k in range(len(full.fingerprints) // chunker.FP_LEN):
        got = part.fingerprints[k * chunker.FP_LEN:(k + 1) * chunker.FP_LEN]
        assert got in (full.fingerprints[k * chunker.FP_LEN:(k + 1) * chunker.FP_LEN],
                       chunker.UNKNOWN_FP)


def _naive_shared(old: list[tuple[int, int, int, int]], new: list[tuple[int, int, int, int]],
                  size: int) -> set[int]:
    """Byte by byte: the offsets both maps put at the same disk address, or leave unmapped."""
    def where(ext: list[tuple[int, int, int, int]]) -> dict[int, int]:
        return {lo + k: ph + k for lo, ph, n, _ in ext for k in range(n)}
    a, b = where(old), where(new)
    return {x for x in range(size) if a.get(x) == b.get(x)}


def _extent_map(cuts: list[int], fresh: set[int], size: int) -> list[tuple[int, int, int, int]]:
    """An extent map of ``size`` bytes cut at ``cuts``; extents in ``fresh`` move elsewhere."""
    bounds = sorted({0, size, *[c for c in cuts if 0 < c < size]})
    return [(lo, lo + (10_000 if i in fresh else 0), hi - lo, 0)
            for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False))]


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 300), old_cuts=st.lists(st.integers(0, 300), max_size=8),
       new_cuts=st.lists(st.integers(0, 300), max_size=8),
       moved=st.sets(st.integers(0, 10), max_size=4))
def test_shared_ranges_agree_with_a_byte_by_byte_comparison(
        size: int, old_cuts: list[int], new_cuts: list[int], moved: set[int]) -> None:
    """Splitting one extent map into pieces (what a write does to a copy) and moving some of
    them: what is found shared is exactly the bytes at the same address."""
    old = _extent_map(old_cuts, set(), size)
    new = _extent_map(old_cuts + new_cuts, moved, size)
    got = {x for s, e in shared_ranges(old, new, size) for x in range(s, e)}
    assert got == _naive_shared(old, new, size)
    differ = {x for s, e in changed_ranges(old, new, size) for x in range(s, e)}
    assert differ == set(range(size)) - got


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 300), old_cuts=st.lists(st.integers(0, 300), max_size=8),
       new_cuts=st.lists(st.integers(0, 300), max_size=8),
       moved=st.sets(st.integers(0, 10), max_size=4),
       holes=st.tuples(st.sets(st.integers(0, 10)), st.sets(st.integers(0, 10))),
       flagged=st.tuples(st.sets(st.integers(0, 10), max_size=2),
                         st.sets(st.integers(0, 10), max_size=2)),
       flag=st.sampled_from([DELALLOC, ENCODED, 0x800, 0x100 | 0x200]),
       spans=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 40)), max_size=5))
def test_same_within_takes_only_bytes_both_maps_put_at_one_trusted_address(
        size: int, old_cuts: list[int], new_cuts: list[int], moved: set[int],
        holes: tuple[set[int], set[int]], flagged: tuple[set[int], set[int]], flag: int,
        spans: list[tuple[int, int]]) -> None:
    """A live file's pages are taken for a snapshot's only where both maps put every byte at
    the same disk address, by extents that can be trusted to say so: a hole (even in both:
    it has no address to hold on to), a compressed, inline, unwritten or delayed extent on
    either side refuses the range. Checked byte by byte, however the maps are split."""
    def made(cuts: list[int], move: set[int], hole: set[int], odd: set[int]
             ) -> list[tuple[int, int, int, int]]:
        return [(lo, ph, n, flag if i in odd else f)
                for i, (lo, ph, n, f) in enumerate(_extent_map(cuts, move, size))
                if i not in hole]

    old = made(old_cuts, set(), holes[0], flagged[0])
    new = made(old_cuts + new_cuts, moved, holes[1], flagged[1])
    ranges: list[tuple[int, int]] = []
    for lo, n in sorted(spans):
        lo, hi = min(lo, size), min(lo + n, size)
        if lo >= hi:
            continue
        if ranges and lo <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], hi))
        else:
            ranges.append((lo, hi))

    def where(ext: list[tuple[int, int, int, int]]) -> dict[int, int | None]:
        return {lo + k: None if f else ph + k for lo, ph, n, f in ext for k in range(n)}

    a, b = where(old), where(new)
    vouched = all(a.get(x) is not None and a.get(x) == b.get(x)
                  for lo, hi in ranges for x in range(lo, hi))
    assert same_within(old, new, ranges) == vouched
    assert same_within(new, old, ranges) == vouched
    # never where the whole maps see a change
    differ = {x for s, e in changed_ranges(old, new, size) for x in range(s, e)}
    assert not vouched or not differ & {x for lo, hi in ranges for x in range(lo, hi)}


@given(ranges=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 60)), max_size=6),
       count=st.integers(0, 25))
def test_the_blocks_touching_a_change_are_those_not_known_unchanged(
        ranges: list[tuple[int, int]], count: int) -> None:
    merged: list[tuple[int, int]] = []
    for s, n in sorted(ranges):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], s + n))
        else:
            merged.append((s, s + n))
    same = {b for b in unchanged_blocks(merged, 8) if b < count}
    changed, pos = [], 0  # the complement of ``merged`` in the file's bytes
    for s, e in merged:
        if s > pos:
            changed.append((pos, s))
        pos = max(pos, e)
    if pos < count * 8:
        changed.append((pos, count * 8))
    runs = blocks_touching(changed, 8, count)
    assert [b for lo, hi in runs for b in range(lo, hi)] == [b for b in range(count)
                                                             if b not in same]
    assert all(lo < hi for lo, hi in runs)


def test_only_lists_of_whole_page_blocks_are_patched() -> None:
    a, b = bytes(range(32)), bytes(32)
    paged = FileList(((a, 8192), (b, 8192))).encode()
    assert paged_blocks(paged, 8192) == 2
    assert paged_blocks(FileList(((a, 8192), (b, 4096))).encode(), 8192) is None
    assert paged_blocks(FileList(((a, 4096), (b, 12288))).encode(), 8192) is None
    assert paged_blocks(paged[:-1], 8192) is None
    assert patched_filelist(paged, 3, 8192, {2: a}) == FileList(
        ((a, 8192), (b, 8192), (a, 8192))).encode()
    assert patched_filelist(paged, 1, 8192, {0: b}) == FileList(((b, 8192),)).encode()
    with pytest.raises(ValueError):
        patched_filelist(paged, 3, 8192, {})  # the third block's content is unknown


@settings(max_examples=40, deadline=None)
@given(old=blocks_st, flips=st.lists(st.integers(0, 45), max_size=10),
       grow=st.integers(-5, 5), told=st.sets(st.integers(0, 45)), small_buffer=st.booleans())
@pytest.mark.slow
def test_patching_the_previous_list_gives_what_a_full_read_gives(
        old: list[bytes], flips: list[int], grow: int, told: set[int],
        small_buffer: bool) -> None:
    """The changed runs may name more blocks than changed (never fewer); the list is byte
    for byte the one reading everything makes, fingerprints only ever unknown, never wrong."""
    new = list(old[:len(old) + grow]) if grow < 0 else old + [b"\x07" * chunker.PAGE_BLOCK] * grow
    for i in flips:
        if i < len(new):
            new[i] = bytes([(new[i][0] + 1) % 256]) * chunker.PAGE_BLOCK
    unchanged = {i for i in range(min(len(old), len(new))) if new[i] == old[i] and i not in told}
    runs = blocks_touching([(i * 8192, (i + 1) * 8192) for i in range(len(new))
                            if i not in unchanged], 8192, len(new))
    with tempfile.TemporaryDirectory() as tmp:
        fds = []
        for name, data in (("old", old), ("new", new)):
            p = os.path.join(tmp, name)
            with open(p, "wb") as f:
                f.write(b"".join(data))
            fds.append(os.open(p, os.O_RDONLY))
        buf = bytearray(chunker.PAGE_BLOCK * 3 if small_buffer else chunker.SEGMENT)
        try:
            size = len(new) * chunker.PAGE_BLOCK
            before = chunker.chunk_paged(fds[0], 0, len(old) * chunker.PAGE_BLOCK,
                                         bytearray(chunker.SEGMENT), frozenset(), set)
            base = FileList(tuple(zip(before.ids, before.lengths, strict=True))).encode()
            full = chunker.chunk_paged(fds[1], 0, size, bytearray(chunker.SEGMENT),
                                       frozenset(), set)
            got = chunker.patch_paged(fds[1], size, base, before.fingerprints, runs, buf,
                                      lambda ids: set(ids))
        finally:
            for fd in fds:
                os.close(fd)
    assert got is not None
    assert got.filelist == FileList(tuple(zip(full.ids, full.lengths, strict=True))).encode()
    assert got.read == sum(hi - lo for lo, hi in runs) * chunker.PAGE_BLOCK
    assert len(got.fingerprints) == len(full.fingerprints)
    for k in range(len(full.fingerprints) // chunker.FP_LEN):
        part = got.fingerprints[k * chunker.FP_LEN:(k + 1) * chunker.FP_LEN]
        assert part in (full.fingerprints[k * chunker.FP_LEN:(k + 1) * chunker.FP_LEN],
                        chunker.UNKNOWN_FP)


def _search_result(offset: int, body: bytes, objectid: int = 300) -> bytes:
    """One result of a btrfs tree search: its header, then the item."""
    return btrfs._SEARCH_HEADER.pack(9, objectid, offset, btrfs._EXTENT_DATA_KEY,
                                     len(body)) + body


def test_tree_search_results_become_extents_as_fiemap_maps_them() -> None:
    """Inline, regular, a hole, preallocated and compressed items among each other, as the
    compiled reader (fs/_extents.c) takes them; the last item's offset is where the next
    search starts."""
    head, disk = btrfs._FILE_EXTENT, btrfs._DISK_EXTENT
    body = (_search_result(0, head.pack(7, 100, 0, 0, 0, 0) + b"x" * 100)  # inline
            + _search_result(4096, head.pack(7, 8192, 0, 0, 0, 1)
                             + disk.pack(1 << 20, 8192, 0, 8192))
            + _search_result(12288, head.pack(7, 4096, 0, 0, 0, 1) + disk.pack(0, 0, 0, 4096))
            + _search_result(16384, head.pack(7, 8192, 0, 0, 0, 2)
                             + disk.pack(2 << 20, 8192, 4096, 4096))
            + _search_result(20480, head.pack(7, 131072, 1, 0, 0, 1)
                             + disk.pack(3 << 20, 4096, 0, 8192)))
    out: list[btrfs.Extent] = []
    assert btrfs._add_items(memoryview(body), 5, 300, out) == 20480
    assert out == [(0, 0, 100, 0x300), (4096, 1 << 20, 8192, 0),
                   (16384, (2 << 20) + 4096, 4096, 0x800), (20480, 3 << 20, 8192, 0x8)]
    # offsets and addresses past 2**63 come back whole (unsigned 64-bit)
    assert btrfs._add_items(memoryview(_search_result(
        2**63, head.pack(7, 8192, 0, 0, 0, 1) + disk.pack(2**64 - 8192, 8192, 0, 8192))),
        1, 300, out) == 2**63
    assert out[-1] == (2**63, 2**64 - 8192, 8192, 0)


@pytest.mark.parametrize("body, count", [
    (_search_result(0, b"x" * 53, objectid=301), 1),  # another file's item
    (_search_result(0, btrfs._FILE_EXTENT.pack(7, 8192, 0, 0, 0, 3) + bytes(32)), 1),  # kind
    (_search_result(0, btrfs._FILE_EXTENT.pack(7, 8192, 0, 0, 0, 1) + bytes(8)), 1),  # short
    (_search_result(0, btrfs._FILE_EXTENT.pack(7, 8192, 0, 0, 0, 1) + bytes(32)), 2),  # count
    (_search_result(0, btrfs._FILE_EXTENT.pack(7, 8192, 0, 0, 0, 1) + bytes(32))[:60], 1),
    (_search_result(0, btrfs._FILE_EXTENT.pack(7, 8192, 0, 0, 0, 1)  # address past 2**64
                    + btrfs._DISK_EXTENT.pack(2**64 - 4096, 8192, 8192, 8192)), 1),
    (b"", -1),  # a negative count
])
def test_tree_search_results_that_are_not_a_files_extents_are_refused(body: bytes,
                                                                       count: int) -> None:
    """Refused with ValueError (the caller then asks FIEMAP), never read past the buffer."""
    with pytest.raises(ValueError):
        btrfs._add_items(memoryview(body), count, 300, [])


def _item(objectid: int, kind: int, body: bytes, offset: int = 0) -> bytes:
    return btrfs._SEARCH_HEADER.pack(9, objectid, offset, kind, len(body)) + body


def _inode_item(transid: int, mode: int = 0o100644) -> bytes:
    # generation, transid, size, nbytes, block group; nlink, uid, gid, mode; the rest
    return struct.pack("<5Q4I", 5, transid, 0, 0, 0, 1, 0, 0, mode) + bytes(104)


def test_inodes_written_after_a_transaction_are_told_from_their_items() -> None:
    """Only inode items count, each by its own transid (a leaf rewritten for another item's
    sake holds items of older transactions); the last result's objectid is where the next
    search starts."""
    body = (_item(256, 1, _inode_item(40, 0o40755))  # written in the reference's transaction
            + _item(256, 12, b"ref")
            + _item(257, 1, _inode_item(41))
            + _item(257, 108, bytes(53), offset=4096)
            + _item(2**64 - 300, 1, _inode_item(2**63, 0o40700))
            + _item(2**64 - 299, 96, b"x"))
    assert _extents.inodes_since(body, 6, 40) == ([257, 2**64 - 300], [2**64 - 300],
                                                  2**64 - 299)
    assert _extents.inodes_since(body, 6, 39) == ([256, 257, 2**64 - 300], [256, 2**64 - 300],
                                                  2**64 - 299)
    assert _extents.inodes_since(body, 2, 40) == ([], [], 256)
    assert _extents.inodes_since(b"", 0, 40) == ([], [], 0)


@pytest.mark.parametrize("body, count", [
    (_item(256, 1, bytes(55)), 1),  # an inode item too short for its mode
    (_item(256, 1, _inode_item(50))[:100], 1),  # runs past the buffer
    (_item(256, 1, _inode_item(50)), 2),  # more results than the buffer holds
    (b"", -1),
])
def test_search_results_that_cannot_hold_what_they_say_are_refused(body: bytes,
                                                                   count: int) -> None:
    with pytest.raises(ValueError):
        _extents.inodes_since(body, count, 40)


def test_an_inode_number_is_never_cut_to_64_bits() -> None:
    item = _search_result(0, btrfs._FILE_EXTENT.pack(7, 8192, 0, 0, 0, 1)
                          + btrfs._DISK_EXTENT.pack(1 << 20, 8192, 0, 8192))
    with pytest.raises(OverflowError):
        btrfs._add_items(memoryview(item), 1, 300 + 2**64, [])


def test_the_compiled_ioctl_fills_the_buffer_and_raises_what_the_kernel_says() -> None:
    """``_extents.ioctl`` (fcntl.ioctl without the GIL, for tree searches, FIEMAP and
    snapshots): the kernel writes into the caller's buffer, and a refusal is an OSError with
    its errno, as fcntl.ioctl gives them (the callers tell EPERM and ENOENT apart)."""
    import errno
    import termios

    r, w = os.pipe()
    try:
        os.write(w, b"12345")
        count = bytearray(4)
        assert _extents.ioctl(r, termios.FIONREAD, count) == 0
        assert int.from_bytes(count, "little") == 5
        with pytest.raises(OSError) as refused:
            _extents.ioctl(r, btrfs.TREE_SEARCH_V2, bytearray(4096))  # not a btrfs file
        assert refused.value.errno == errno.ENOTTY
        os.close(w)
        w = -1
        with pytest.raises(OSError) as closed:
            _extents.ioctl(-1, termios.FIONREAD, count)
        assert closed.value.errno == errno.EBADF
        with pytest.raises(TypeError):
            _extents.ioctl(r, termios.FIONREAD, b"1234")  # type: ignore[arg-type]  # read-only
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _split_by_sets(old: list[btrfs.Extent], new: list[btrfs.Extent]
                   ) -> tuple[list[btrfs.Extent], list[btrfs.Extent], set[btrfs.Extent]]:
    """What ``_extents.common`` replaced: the split by Python's sets."""
    both = set(old).intersection(new)
    return [e for e in old if e not in both], [e for e in new if e not in both], both


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 300), old_cuts=st.lists(st.integers(0, 300), max_size=8),
       new_cuts=st.lists(st.integers(0, 300), max_size=8),
       moved=st.sets(st.integers(0, 10), max_size=4),
       holes=st.tuples(st.sets(st.integers(0, 10)), st.sets(st.integers(0, 10))),
       flagged=st.sets(st.integers(0, 10), max_size=3), shuffle=st.randoms())
def test_the_extents_both_maps_hold_are_found_as_sets_find_them(
        size: int, old_cuts: list[int], new_cuts: list[int], moved: set[int],
        holes: tuple[set[int], set[int]], flagged: set[int], shuffle: random.Random) -> None:
    """The merge by offset in C finds exactly the extents a set intersection finds, keeps the
    rest in order, and the changed ranges come out the same; maps out of order (which no
    search or FIEMAP gives) may leave more to the walk, never a different answer."""
    old = [e for i, e in enumerate(_extent_map(old_cuts, set(), size)) if i not in holes[0]]
    new = [(lo, ph, n, DELALLOC if i in flagged else f)
           for i, (lo, ph, n, f) in enumerate(_extent_map(old_cuts + new_cuts, moved, size))
           if i not in holes[1]]
    old_rest, new_rest, both = _extents.common(old, new)
    want_old, want_new, want_both = _split_by_sets(old, new)
    assert (old_rest, new_rest, set(both)) == (want_old, want_new, want_both)
    assert len(both) == len(want_both)

    def where(ext: list[btrfs.Extent]) -> dict[int, tuple[int, bool]]:
        return {lo + k: (ph + k, bool(f)) for lo, ph, n, f in ext for k in range(n)}

    a, b = where(old), where(new)
    differ = {x for x in range(size) if a.get(x) != b.get(x)
              or x in a and a[x][1] or x in b and b[x][1]}  # a delayed extent vouches for none
    assert {x for s, e in changed_ranges(old, new, size) for x in range(s, e)} == differ
    shuffled = old[:]
    shuffle.shuffle(shuffled)
    if shuffled != old:  # out of order: refused, and the caller splits by sets
        with pytest.raises(ValueError):
            _extents.common(shuffled, new)
        with pytest.raises(ValueError):
            _extents.common(new, shuffled)


@pytest.mark.parametrize("old, new, size, expected", [  # what the split by sets gave
    ([(0, 1000, 50, 0)] * 2, [(0, 1000, 50, 0)], 50, []),  # an offset twice
    ([(27, 1027, 25, 1), (0, 818, 27, 0)], [(0, 818, 27, 0)], 100, [(27, 52)]),
    ([(47, 9047, 16, 0), (0, 1000, 161, 0)], [(0, 1000, 161, 0)], 184, [(47, 63)]),
    ([(11, 7011, 10, 0), (11, 1011, 10, 0), (21, 2872, 20, 0)],
     [(11, 1011, 10, 0), (21, 2872, 20, 0)], 100, [(11, 21)]),
])
def test_maps_out_of_order_are_compared_as_before(old: list[btrfs.Extent],
                                                  new: list[btrfs.Extent], size: int,
                                                  expected: list[tuple[int, int]]) -> None:
    """No FIEMAP or tree search gives such maps; were one to, the answer is the one the split
    by sets gave (a merge would pair their extents differently, and report less changed)."""
    assert changed_ranges(old, new, size) == expected


def test_an_extent_map_of_something_else_is_refused() -> None:
    """Only tuples of four from an int offset, exactly: comparing anything else could run
    code that changes the lists while they are read."""
    class Offset(int):
        pass

    for old, new in [([(0, 1, 2)], [(0, 1, 2, 0)]), ([], [(0, 1, 2, 0), None]),
                     ([(Offset(5), 1, 2, 0)], [(3, 1, 2, 0)])]:
        with pytest.raises(TypeError):
            _extents.common(old, new)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _extents.common((), [])  # type: ignore[arg-type]


@pytest.mark.parametrize("count", [0, 1, 150, 199, 200, 230])
def test_a_patched_list_is_the_list_encoded_afresh(count: int) -> None:
    """First, last, neighbouring and grown-into blocks changed, as a list shrinks or grows."""
    rng = random.Random(count)
    old = [rng.randbytes(ID_LEN) for _ in range(200)]
    base = FileList(tuple((b, 8192) for b in old)).encode()
    changed = {i for i in (0, 1, 2, 57, 149, 150, 198, 199) if i < count}
    changed |= set(range(200, count))
    changes = {i: object_id(b"%d" % i) for i in changed}
    want = [changes.get(i, old[i] if i < 200 else b"") for i in range(count)]
    assert patched_filelist(base, count, 8192, changes) == FileList(
        tuple((b, 8192) for b in want)).encode()


def _ids(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(ID_LEN) for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 700), grow=st.integers(-300, 300),
       flips=st.lists(st.integers(0, 999), max_size=40), runs=st.lists(
           st.tuples(st.integers(0, 999), st.integers(1, 300)), max_size=3))
def test_differing_blocks_are_those_an_entry_by_entry_comparison_finds(
        count: int, grow: int, flips: list[int], runs: list[tuple[int, int]]) -> None:
    """Runs of entries compared as bytes, then the runs that differ more finely (256, 16, 1):
    every block the plain comparison finds, at group edges too, and the blocks grown."""
    old = _ids(count, 1)
    new = old[:max(1, count + grow)] + _ids(max(0, grow), 2)
    for i in flips + [k for lo, n in runs for k in range(lo, lo + n)]:
        if i < len(new):
            new[i] = bytes(ID_LEN) if new[i] != bytes(ID_LEN) else b"\x01" * ID_LEN
    a = FileList(tuple((c, 8192) for c in old)).encode()
    b = FileList(tuple((c, 8192) for c in new)).encode()
    want = [(i * 8192, c, 8192) for i, c in enumerate(new) if i >= len(old) or old[i] != c]
    assert differing_blocks(a, b) == want


def test_differing_blocks_leaves_lists_of_other_blocks_to_the_full_comparison() -> None:
    a, b = _ids(2, 3)
    paged = FileList(((a, 8192), (b, 8192))).encode()
    assert differing_blocks(paged, FileList(((a, 8192), (b, 4096))).encode()) is None
    assert differing_blocks(FileList(((a, 4096), (b, 4096))).encode(), paged) is None
    assert differing_blocks(paged, FileList(()).encode()) is None
    assert differing_blocks(paged[:-1], paged) is None  # not a list at all
    assert differing_blocks(paged, paged) == []
    huge = FileList(((a, 1 << 30), (b, 1 << 30))).encode()  # holes of 1 GiB: never made
    assert differing_blocks(huge, huge) is None  # (so FileList.decode refuses them)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.sampled_from([8192, 8192, 8192, 1, 4096, 65536]), max_size=80))
def test_a_list_encoded_at_once_is_what_entry_by_entry_gives(lengths: list[int]) -> None:
    chunks = list(zip(_ids(len(lengths), 4), lengths, strict=True))
    one_by_one = bytearray(FileList(()).encode()[:4])
    one_by_one += sum(lengths).to_bytes(8, "little") + len(lengths).to_bytes(4, "little")
    for cid, n in chunks:
        one_by_one += cid + n.to_bytes(4, "little")
    assert encode_filelist(chunks) == bytes(one_by_one)
    assert FileList.decode(bytes(one_by_one)).chunks == tuple(chunks)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.sampled_from([8192, 8192, 8192, 1, 4096, 65536]), max_size=80),
       cuts=st.lists(st.integers(0, 80), max_size=4))
def test_a_list_joined_from_parts_encoded_apart_is_the_whole_list(lengths: list[int],
                                                                 cuts: list[int]) -> None:
    """A child process encodes its segments' entries; the parent joins them under one
    header: the bytes of the list encoded whole, whatever the cuts."""
    chunks = list(zip(_ids(len(lengths), 5), lengths, strict=True))
    edges = [0, *sorted(min(c, len(chunks)) for c in cuts), len(chunks)]
    parts = [objects.filelist_entries(chunks[a:b])
             for a, b in zip(edges[:-1], edges[1:], strict=True)]
    whole = objects.filelist_of_entries(parts, len(chunks), sum(lengths))
    assert whole == encode_filelist(chunks)
    assert objects.filelist_chunks(whole) == chunks
