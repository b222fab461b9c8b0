"""The wire format, file list deltas, and the graph walks that push and pull rely on."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dotmesh.model.ids import ObjectId, object_id
from dotmesh.model.objects import (
    DIR,
    FILE,
    KIND_CHUNK,
    KIND_FILELIST,
    SYMLINK,
    FileList,
    encode_tree_rows,
)
from dotmesh.remote import graph
from dotmesh.remote.wire import (
    KIND_FILELIST_DELTA,
    BadTransfer,
    Record,
    batches,
    decode,
    encode,
    encode_delta,
)
from dotmesh.store.packs import compress

IDS = [object_id(bytes([i])) for i in range(40)]


def _record(kind: int, data: bytes) -> Record:
    payload, z = compress(data)
    return Record(kind, object_id(data), len(data), bytes(payload), z)


def test_a_batch_round_trips_and_checks_what_was_asked():
    recs = [_record(KIND_CHUNK, os.urandom(100)), _record(KIND_CHUNK, b"a" * 5000)]
    data = encode(recs)
    got = decode(data, {r.oid: KIND_CHUNK for r in recs})
    assert [r.oid for r in got] == [r.oid for r in recs]
    assert got[1].raw() == b"a" * 5000
    with pytest.raises(BadTransfer, match="not asked for"):
        decode(data, {recs[0].oid: KIND_CHUNK})
    with pytest.raises(BadTransfer, match="where a file list was expected"):
        decode(data, {r.oid: KIND_FILELIST for r in recs})


@settings(max_examples=200, deadline=None)
@given(base=st.lists(st.sampled_from(IDS), max_size=60),
       edits=st.lists(st.tuples(st.integers(0, 60), st.sampled_from(IDS + [None])),
                      max_size=20))
@pytest.mark.slow
def test_a_file_list_delta_rebuilds_the_list(base, edits):
    old = FileList(tuple((ObjectId(i), 8192) for i in base))
    new_ids = list(base)
    for pos, oid in edits:  # replace, insert or delete entries
        pos = min(pos, len(new_ids))
        if oid is None:
            if new_ids:
                del new_ids[min(pos, len(new_ids) - 1)]
        elif pos % 2:
            new_ids.insert(pos, oid)
        elif new_ids:
            new_ids[min(pos, len(new_ids) - 1)] = oid
    new = FileList(tuple((ObjectId(i), 8192 + (i[0] % 3)) for i in new_ids))
    base_id = object_id(old.encode())
    delta = encode_delta(base_id, old, new)
    rec = _record(KIND_FILELIST_DELTA, delta)
    rec = Record(KIND_FILELIST_DELTA, object_id(new.encode()), len(delta), rec.payload, rec.zstd)
    (got,) = decode(encode([rec]), {rec.oid: KIND_FILELIST},
                    base=lambda oid: old.encode() if oid == base_id else b"")
    assert got.kind == KIND_FILELIST and FileList.decode(got.raw()) == new


def test_a_delta_is_small_for_a_few_changed_pages():
    old = FileList(tuple((ObjectId(object_id(i.to_bytes(4, "big"))), 8192)
                         for i in range(65536)))
    chunks = list(old.chunks)
    for i in range(0, 65536, 4096):
        chunks[i] = (ObjectId(object_id(b"new" + i.to_bytes(4, "big"))), 8192)
    delta = encode_delta(object_id(old.encode()), old, FileList(tuple(chunks)))
    assert len(delta) < 2000 < len(old.encode()) // 1000


def test_deltas_are_refused_without_a_base_or_against_a_missing_one():
    old = FileList(((ObjectId(IDS[0]), 10),))
    new = FileList(((ObjectId(IDS[1]), 10),))
    delta = encode_delta(object_id(old.encode()), old, new)
    rec = Record(KIND_FILELIST_DELTA, object_id(new.encode()), len(delta), delta, False)
    with pytest.raises(BadTransfer, match="not taken here"):
        decode(encode([rec]), None)

    def nothing(oid: bytes) -> bytes:
        from dotmesh.errors import NotFound
        raise NotFound("no")
    with pytest.raises(BadTransfer, match="which is not here"):
        decode(encode([rec]), None, base=nothing)
    bad = Record(KIND_FILELIST_DELTA, rec.oid, 5, b"\x00" * 5, False)
    with pytest.raises(BadTransfer, match="malformed file list delta"):
        decode(encode([bad]), None, base=lambda oid: old.encode())


def test_batches_split_by_size():
    recs = [_record(KIND_CHUNK, os.urandom(1000)) for _ in range(10)]
    parts = list(batches(recs, target=3000))
    assert [len(p) for p in parts] == [3, 3, 3, 1]


def _link(name: str, target: str) -> list[object]:
    return [name, SYMLINK, 0o777, 0, 0, 1, 0, target, 0]


@pytest.mark.parametrize("rows, bad", [
    ([_link("a", "b")], None),
    ([_link("a", "../a")], "a"),
    ([_link("a", "x/y/../../../b")], "a"),
    ([_link("a", "./././b")], None),
    ([_link("a", "/etc/passwd")], "a"),
    ([_link("a", "b/../c")], "a"),  # a .. after a name: b could be a link
    # Each text alone stays inside; together they climb out (the chain).
    ([_link("s0", "."), _link("s1", "s0/.."), _link("s2", "s1/s1/s1")], "s1"),
    ([_link("s0", "."), *[_link(f"s{i}", f"s{i - 1}/..") for i in range(1, 13)],
      _link("escape", "s12/etc/passwd")], "s1"),
    ([_link("up", "d/.."), ["d", DIR, 0o755, 0, 0, 1, 0, object_id(
        encode_tree_rows([])).hex(), 0]], "up"),  # harmless here, but of the refused shape
    ([_link("l", "f/.."), ["f", FILE, 0o644, 0, 0, 1, 0, None, 0]], "l"),
    ([_link("a", "./x//y/."), _link("b", "x/y")], None),
    # The link is named "é"; the text spells the same bytes (c3 a9) another way.
    ([_link("é", "."), _link("x", "\udcc3\udca9/../outside")], "x"),
])
def test_symlinks_are_followed_through_the_tree(rows, bad):
    store = {object_id(encode_tree_rows([])): encode_tree_rows([])}
    data = encode_tree_rows(list(rows))
    store[object_id(data)] = data
    check = graph.SymlinkCheck(store.__getitem__)
    assert check.check_root(object_id(data), "s") == (f"s:{bad}" if bad else None)


def test_a_chain_through_a_link_in_another_folder_is_refused():
    store: dict[bytes, bytes] = {}

    def tree(rows: list[list[object]]) -> bytes:
        data = encode_tree_rows(rows)
        store[object_id(data)] = data
        return object_id(data)

    inner = tree([_link("top", "..")])  # d/top -> .. is the subdot's top: inside
    root = tree([["d", DIR, 0o755, 0, 0, 1, 0, inner.hex(), 0],
                 _link("x", "d/top/d/top"),  # down through links only: inside
                 _link("y", "d/top/..")])  # climbs from where d/top points: out
    assert graph.SymlinkCheck(store.__getitem__).check_root(root, "s") == "s:y"


def test_symlinks_are_checked_at_the_depth_their_tree_is_restored():
    store: dict[bytes, bytes] = {}

    def tree(rows: list[list[object]]) -> bytes:
        data = encode_tree_rows(rows)
        store[object_id(data)] = data
        return object_id(data)

    up_one = tree([["l", SYMLINK, 0o777, 0, 0, 1, 0, "../x", 0]])
    safe = tree([["d", DIR, 0o755, 0, 0, 1, 0, up_one.hex(), 0]])
    check = graph.SymlinkCheck(store.__getitem__)
    assert check.check_root(safe, "s") is None  # d/l -> ../x stays inside
    assert check.check_root(up_one, "s") == "s:l"  # the same tree at the top climbs out
    deep = tree([["a", DIR, 0o755, 0, 0, 1, 0, tree([
        ["f", FILE, 0o644, 0, 0, 1, 0, None, 0],
        ["b", DIR, 0o755, 0, 0, 1, 0, tree([
            ["l", SYMLINK, 0o777, 0, 0, 1, 0, "../../../etc", 0]]).hex(), 0]]).hex(), 0]])
    assert check.check_root(deep, "s") == "s:a/b/l"


def test_a_name_has_one_spelling():
    """Bytes that are valid UTF-8 are characters in a tree, never lone surrogates: two
    spellings of one name could alias each other (on disk they are the same file)."""
    from dotmesh.errors import Corrupt
    from dotmesh.model.objects import Tree

    good = encode_tree_rows([["\u00e9", FILE, 0o644, 0, 0, 1, 0, None, 0],
                             ["\udcff", FILE, 0o644, 0, 0, 1, 0, None, 0]])
    assert len(Tree.decode(good).entries) == 2
    bad = good.replace(b"\\u00e9", b"\\udcc3\\udca9")
    with pytest.raises(Corrupt, match="unsafe name"):
        Tree.decode(bad)


def test_a_tree_shared_at_many_places_is_judged_in_linear_time():
    """A few KiB of trees can name a folder 2^40 times (two names for one child, forty
    levels), and the reviewer's variant climbs R levels everywhere from two trees per level:
    judged without walking the expansion, and refused for its expanded size."""
    import time

    store: dict[bytes, bytes] = {}

    def tree(rows: list[list[object]]) -> bytes:
        data = encode_tree_rows(rows)
        store[object_id(data)] = data
        return object_id(data)

    a = b = tree([])
    for k in range(40):
        up = [_link("l", "../" * min(k, 18))] if k else []
        a, b = (tree([["a", DIR, 0o755, 0, 0, 1, 0, a.hex(), 0],
                      ["b", DIR, 0o755, 0, 0, 1, 0, b.hex(), 0], *up]),
                tree([["a", DIR, 0o755, 0, 0, 1, 0, b.hex(), 0],
                      ["b", DIR, 0o755, 0, 0, 1, 0, a.hex(), 0], *up]))
    top = tree([["x", DIR, 0o755, 0, 0, 1, 0, a.hex(), 0]])
    started = time.monotonic()
    got = graph.SymlinkCheck(store.__getitem__).check_root(top, "s")
    assert got is not None and "entries once shared folders are counted" in got
    assert time.monotonic() - started < 5
    a = b = tree([])  # the same shape, small enough to restore, links within reach: passes
    for _ in range(8):
        up = [_link("l", "..")]
        a, b = (tree([["a", DIR, 0o755, 0, 0, 1, 0, a.hex(), 0],
                      ["b", DIR, 0o755, 0, 0, 1, 0, b.hex(), 0], *up]),
                tree([["a", DIR, 0o755, 0, 0, 1, 0, b.hex(), 0],
                      ["b", DIR, 0o755, 0, 0, 1, 0, a.hex(), 0], *up]))
    assert graph.SymlinkCheck(store.__getitem__).check_root(
        tree([["x", DIR, 0o755, 0, 0, 1, 0, a.hex(), 0]]), "s") is None
