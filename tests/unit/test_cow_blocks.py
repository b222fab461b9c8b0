"""Which blocks two snapshots of a file share, judged from extent maps, and a paged file's
chunking that skips them: the ids must be exactly those of reading everything."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from dotmesh.fs.btrfs import shared_ranges, unchanged_blocks
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
