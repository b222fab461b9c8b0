import errno
import os
import random
import sqlite3
import threading

import pytest

from dotmesh.errors import Corrupt, OutOfSpace
from dotmesh.meta import index
from dotmesh.meta.db import connect
from dotmesh.model.ids import HOLE, object_id
from dotmesh.model.objects import KIND_CHUNK
from dotmesh.store import chunker, packs
from dotmesh.store.packs import PackStore


@pytest.fixture
def store(tmp_path):
    s = PackStore(tmp_path, connect(tmp_path / "meta.db"))
    yield s
    s.close()


def test_put_get_and_dedup(store):
    w = store.writer()
    data = os.urandom(1000) + b"a" * 5000
    oid = w.put(KIND_CHUNK, data)
    assert w.put(KIND_CHUNK, data) == oid
    assert not store.has(oid)  # not visible until flushed
    w.flush()
    assert store.get(oid) == data
    assert store.missing([oid, object_id(b"other")]) == {object_id(b"other")}
    assert store.count() == 1


def test_flipped_byte_is_detected(store, tmp_path):
    w = store.writer()
    oid = w.put(KIND_CHUNK, os.urandom(4096))
    w.flush()
    loc = store.locate(oid)
    pack = next((tmp_path / "packs").iterdir())
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + 10] ^= 0xFF
    pack.write_bytes(bytes(raw))
    store.close()
    with pytest.raises(Corrupt, match="hash check"):
        store.get(oid)


def test_unflushed_tail_is_ignored(store, tmp_path):
    w = store.writer()
    a = w.put(KIND_CHUNK, b"kept" * 100)
    w.flush()
    w.put(KIND_CHUNK, b"lost" * 100)  # a crash before flush: bytes in a pack, no index row
    assert store.count() == 1
    assert store.get(a) == b"kept" * 100


def test_windowed_cdc_matches_whole_file(tmp_path, monkeypatch):
    rng = random.Random(5)
    data = rng.randbytes(3_000_000) + bytes(300_000) + rng.randbytes(777_777)
    p = tmp_path / "f"
    p.write_bytes(data)
    whole = [c.length for c in chunker.CDC.cut_buf(data)]
    fd = os.open(p, os.O_RDONLY)
    try:
        buf = bytearray(1 << 20)  # much smaller than the file: many windows
        parts = list(chunker.chunk_cdc(fd, buf, frozenset(), lambda ids: set()))
    finally:
        os.close(fd)
    got = [n for part in parts for n in part.lengths]
    assert got == whole
    assert sum(got) == len(data)


def test_zero_blocks_become_holes(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(bytes(8192) + b"x" * 8192)
    fd = os.open(p, os.O_RDONLY)
    try:
        res = chunker.chunk_paged(fd, 0, 16384, bytearray(16384), frozenset(), lambda ids: set())
    finally:
        os.close(fd)
    assert res.ids[0] == HOLE and res.ids[1] != HOLE


def test_only_missing_chunks_are_compressed(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(os.urandom(8192 * 4))
    fd = os.open(p, os.O_RDONLY)
    try:
        first = chunker.chunk_paged(fd, 0, 8192 * 4, bytearray(8192 * 4), frozenset(),
                                    lambda ids: set(ids[:1]))
    finally:
        os.close(fd)
    assert [r[1] for r in first.new] == first.ids[:1]


def test_prefetch_asks_for_needed_ranges_up_to_a_limit(store, monkeypatch):
    """Where packs cannot be read with O_DIRECT, their pages are asked for ahead; where they
    can (read_run reads them so), nothing is."""
    from dotmesh.store import packs

    w = store.writer()
    ids = [w.put(KIND_CHUNK, random.Random(i).randbytes(5000)) for i in range(20)]
    w.flush()
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(packs.os, "posix_fadvise", lambda fd, off, n, advice: asked.append(
        (off, n)))
    locs = [store.locate(oid) for oid in ids]
    store.prefetch(locs)
    assert asked == []  # read directly
    monkeypatch.setattr(store, "_direct_fd", lambda pack: -1)
    store.prefetch(locs)
    assert len(asked) == 1 and asked[0][1] >= 20 * 5000  # neighbours merged into one range
    asked.clear()
    store.prefetch(locs, gap=0, limit=12_000)  # no merging across record headers
    assert sum(n for _, n in asked) == 12_000


def test_compress_many_compresses_what_pays_and_copies_the_rest():
    rng = random.Random(9)
    buf = bytearray(rng.randbytes(8192) + b"page " * 1638 + b"xy" + bytes(8192))
    spans = [(0, 8192), (8192, 8192), (16384, 8192)]
    out = packs.compress_many(memoryview(buf), spans)
    assert [z for _, z in out] == [False, True, True]
    assert bytes(out[0][0]) == bytes(buf[:8192])
    buf[:8192] = bytes(8192)  # the caller reuses its buffer: an uncompressed span is a copy
    assert bytes(out[0][0]) != bytes(8192)
    for (o, n), (payload, _) in zip(spans[1:], out[1:], strict=True):
        assert len(payload) < n and packs.decompress(bytes(payload), n) == bytes(buf[o:o + n])
    assert packs.compress_many(memoryview(buf), []) == []


def test_a_large_object_is_compressed_only_if_a_sample_of_it_shrinks_enough():
    rng = random.Random(5)
    # a paged file's list: random ids, one repeated length (6% smaller compressed)
    ids = b"".join(rng.randbytes(32) + b"\x00\x20\x00\x00" for _ in range(40_000))
    assert len(ids) >= packs.SAMPLE_FROM
    payload, z = packs.compress(ids)
    assert not z and payload is ids
    text = b"".join(b'["%05d.txt","f",420,0,0,1,%d,null,0],' % (i, i) for i in range(40_000))
    payload, z = packs.compress(text)
    assert z and packs.decompress(bytes(payload), len(text)) == text
    # a sparse file's list: one id over and over at its end only, where one sample sees it
    sparse = ids[:len(ids) // 2] + (b"\x11" * 32 + b"\x00\x20\x00\x00") * 20_000
    payload, z = packs.compress(sparse)
    assert z and len(payload) < len(sparse) * 0.6
    # below the size, zstd is asked as before: the 6% are taken
    small = ids[:packs.SAMPLE_FROM // 2]
    payload, z = packs.compress(small)
    assert z and len(payload) < len(small)


def test_a_full_pack_is_synced_in_the_background_and_its_objects_read(store, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(packs, "PACK_ROTATE", 20_000)
    synced: list[str] = []
    real = packs._fsync_pack
    monkeypatch.setattr(packs, "_fsync_pack",
                        lambda fd, folder: (synced.append(threading.current_thread().name),
                                            real(fd, folder))[1])
    w = store.writer()
    blobs = [os.urandom(6000) for _ in range(12)]
    ids = [w.put(KIND_CHUNK, b) for b in blobs]
    w.flush()
    assert len(list((tmp_path / "packs").iterdir())) >= 3
    assert "dm-pack-sync" in synced and synced[-1] == threading.current_thread().name
    assert [store.get(i) for i in ids] == blobs
    assert not [t for t in threading.enumerate() if t.name == "dm-pack-sync"]


def test_a_background_sync_that_fails_gives_every_pack_back(store, tmp_path, monkeypatch):
    monkeypatch.setattr(packs, "PACK_ROTATE", 20_000)
    real = packs._fsync_pack

    def fsync(fd: int, folder) -> None:
        if threading.current_thread().name == "dm-pack-sync":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, folder)

    monkeypatch.setattr(packs, "_fsync_pack", fsync)
    w = store.writer()
    for _ in range(8):
        w.put(KIND_CHUNK, os.urandom(6000))
    with pytest.raises(OutOfSpace, match="no space left"):
        w.flush()
    assert list((tmp_path / "packs").iterdir()) == [] and store.count() == 0
    with pytest.raises(OutOfSpace):  # the writer refuses further work
        w.put(KIND_CHUNK, b"more" * 100)
    again = store.writer()  # the store is as before
    oid = again.put(KIND_CHUNK, b"after" * 100)
    monkeypatch.setattr(packs, "_fsync_pack", real)
    again.flush()
    assert store.get(oid) == b"after" * 100


def _table(store: PackStore, table: str) -> set[bytes]:
    return {r[0] for r in store.conn.execute(f"SELECT id FROM {table}")}


def test_a_commits_rows_go_to_the_small_table_until_it_is_full_then_all_move(
        store, monkeypatch):
    """Each id sits in one table; every lookup reads both; past RECENT_LIMIT rows the recent
    ones move into ``objects`` with the commit's own."""
    monkeypatch.setattr(index, "RECENT_LIMIT", 5)
    w = store.writer()
    first = [w.put(KIND_CHUNK, b"first %d" % i) for i in range(3)]
    w.flush()
    assert _table(store, "recent_objects") == set(first) and not _table(store, "objects")
    for oid in first:
        assert store.has(oid) and store.get(oid).startswith(b"first")
    assert store.count() == 3 and not store.missing(first)
    assert {r[0] for r in index.object_rows_of(store.conn, first)} == set(first)
    assert {r[0] for r in index.all_object_rows(store.conn)} == set(first)
    second = [w.put(KIND_CHUNK, b"second %d" % i) for i in range(3)]  # 3 + 3 > 5
    w.flush()
    assert _table(store, "objects") == set(first + second)
    assert not _table(store, "recent_objects")
    third = w.put(KIND_CHUNK, b"third")
    w.flush()
    assert _table(store, "recent_objects") == {third}
    # An id already in one table is not indexed again in the other, either way
    index.commit_object_rows(store.conn, [(first[0], KIND_CHUNK, 99, 1, 1, 1, 0)])
    index.add_object_rows(store.conn, [(third, KIND_CHUNK, 99, 1, 1, 1, 0)])
    assert store.count() == 7 and store.get(first[0]) == b"first 0"
    assert store.get(third) == b"third"


def test_many_rows_go_to_the_small_table_by_statements_of_several_but_no_id_twice(
        store, monkeypatch):
    monkeypatch.setattr(index, "ROWS_PER_INSERT", 4)
    # ids chosen so that the rows objects has fall in the statements of several (the rows
    # go in sorted): 11 rows, 2 statements of 4, then 3 alone
    old = [bytes([1, i]) + bytes(30) for i in range(3)]
    index.commit_object_rows(store.conn, [(oid, KIND_CHUNK, 5, 1, 1, 1, 0) for oid in old])
    index.merge_recent(store.conn)
    rows = [(bytes([2, i]) + os.urandom(30), KIND_CHUNK, 77, i, 1, 1, 0) for i in range(8)]
    rows += [(oid, KIND_CHUNK, 77, 9, 1, 1, 0) for oid in old]
    index.commit_object_rows(store.conn, rows)
    assert _table(store, "recent_objects") == {r[0] for r in rows[:8]}
    assert _table(store, "objects") == set(old)
    assert all(index.object_row(store.conn, oid)[1] == 5 for oid in old)
    assert store.count() == 11


def test_replacing_and_dropping_rows_reach_both_tables(store):
    w = store.writer()
    old = w.put(KIND_CHUNK, b"old")
    w.flush()
    index.merge_recent(store.conn)
    recent = w.put(KIND_CHUNK, b"recent")
    w.flush()
    assert _table(store, "objects") == {old} and _table(store, "recent_objects") == {recent}
    row = index.object_row(store.conn, recent)
    index.replace_object_rows(store.conn, [(recent, *row)])  # as fsck's re-index does
    assert _table(store, "objects") == {old, recent} and not _table(store, "recent_objects")
    again = w.put(KIND_CHUNK, b"again")
    w.flush()
    index.drop_object_rows(store.conn, [old, again])
    assert store.missing([old, again, recent]) == {old, again}
    one, two = w.put(KIND_CHUNK, b"one"), w.put(KIND_CHUNK, b"two")  # one pack
    w.flush()
    index.replace_object_rows(store.conn, [(one, *index.object_row(store.conn, one))])
    assert one in _table(store, "objects") and two in _table(store, "recent_objects")
    index.drop_pack_rows(store.conn, index.object_row(store.conn, two)[1])
    assert store.missing([one, two, recent]) == {one, two}
    index.clear(store.conn)
    assert store.count() == 0


def test_a_failed_move_leaves_both_tables_as_they_were(store, monkeypatch):
    monkeypatch.setattr(index, "RECENT_LIMIT", 2)
    w = store.writer()
    kept = [w.put(KIND_CHUNK, b"kept %d" % i) for i in range(2)]
    w.flush()

    def failing(conn, rows):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(index, "_add_rows_after_merge", failing)
    w.put(KIND_CHUNK, b"more")
    with pytest.raises(sqlite3.OperationalError):
        w.flush()
    assert _table(store, "recent_objects") == set(kept) and not _table(store, "objects")


def test_a_store_of_format_1_is_brought_to_format_2_and_a_newer_one_refused(tmp_path):
    path = tmp_path / "meta.db"
    connect(path).close()
    with sqlite3.connect(path) as db:  # as a dm of format 1 left it
        db.execute("DROP TABLE recent_objects")
        db.execute("UPDATE meta SET value='1' WHERE key='format'")
        db.execute("PRAGMA user_version=5")
    conn = connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()[0] == "2"
    assert index.count_objects(conn) == 0
    conn.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='3' WHERE key='format'")
        db.execute("PRAGMA user_version=5")
    with pytest.raises(Corrupt, match="store format 3 is not supported"):
        connect(path)


def test_runs_read_out_side_by_side_on_one_thread_each_come_out_whole(store):
    """A run is read into its thread's reused buffer; a second run begun before the first is
    read out must not write over it (the hash check would call a healthy store damaged)."""
    w = store.writer()
    ids = [w.put(KIND_CHUNK, os.urandom(5000)) for _ in range(4)]
    w.flush()
    locs = store.locate_many(ids)
    first = store.read_run([(oid, locs[oid]) for oid in ids[:2]])
    second = store.read_run([(oid, locs[oid]) for oid in ids[2:]])
    got = [next(first), next(second), next(first), next(second)]
    assert [object_id(x) for x in got] == [ids[0], ids[2], ids[1], ids[3]]
    again = store.read_run([(oid, locs[oid]) for oid in ids])  # the thread's buffer again
    assert [object_id(x) for x in again] == ids


def test_many_rows_go_in_by_statements_of_several_each_exactly_once(store, monkeypatch):
    """Past RECENT_LIMIT, rows go into ``objects`` ROWS_PER_INSERT to a statement, the rest one
    by one: every id once, and of two rows with one id the first is kept, as before."""
    monkeypatch.setattr(index, "RECENT_LIMIT", 10)
    monkeypatch.setattr(index, "ROWS_PER_INSERT", 4)
    ids = [object_id(b"%d" % i) for i in range(23)]
    rows = [(oid, KIND_CHUNK, 1, 100 + i, 10, 10, 0) for i, oid in enumerate(ids)]
    twice = (ids[5], KIND_CHUNK, 2, 999, 10, 10, 0)  # a second row for one id, after it
    index.commit_object_rows(store.conn, [*rows, twice])
    got = {r[0]: r for r in store.conn.execute("SELECT * FROM objects")}
    assert set(got) == set(ids) and not _table(store, "recent_objects")
    assert got[ids[5]][2:4] == (1, 105)


@pytest.mark.parametrize("direct", [True, False])
def test_an_appender_puts_every_byte_where_it_belongs_from_any_start(tmp_path, monkeypatch,
                                                                    direct):
    """Pack bytes go out through aligned buffers with O_DIRECT (one written out by a thread
    while the other fills), whole blocks at a time, the partial last block through the page
    cache on a drain and written again later; from an unaligned start (a pack lent again),
    with buffers spilled mid-part, and where O_DIRECT is refused, the file holds exactly
    what was appended."""
    if not direct:
        monkeypatch.setattr(packs, "set_direct", lambda fd, on: False)
    rng = random.Random(5)
    path = tmp_path / "p"
    before = rng.randbytes(5000)  # what an earlier writer left: 5000 is not aligned
    path.write_bytes(before)
    fd = os.open(path, os.O_RDWR)
    try:
        start = len(before) - len(before) % packs.DIRECT_ALIGN
        app = packs._Appender(fd, len(before), before[start:],
                              (packs.private_buffer(3 * packs.DIRECT_ALIGN),
                               packs.private_buffer(3 * packs.DIRECT_ALIGN)))
        assert app.direct is direct
        expect = bytearray(before)
        for n in range(40):
            parts = [rng.randbytes(rng.choice([1, 17, 4096, 5000, 13000]))
                     for _ in range(rng.randrange(1, 4))]
            app.write([memoryview(p) if n % 2 else p for p in parts])
            for p in parts:
                expect += p
            assert app.pos == len(expect)
            if n % 7 == 0:
                app.drain()
                assert path.read_bytes() == expect  # (read back: a pending object)
        app.drain()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == expect


def test_a_writers_packs_bypass_the_page_cache_and_read_back_whole(store, tmp_path):
    """A commit's packs are written with O_DIRECT where the filesystem allows it (ext4 here);
    what a writer holds can be read back before it is flushed, and after."""
    w = store.writer()
    rng = random.Random(6)
    datas = [rng.randbytes(rng.randrange(1, 30000)) for _ in range(300)]
    ids = [w.put(KIND_CHUNK, d) for d in datas]
    assert w._app is not None and w._app.direct
    assert os.fstat(w._fd).st_size < sum(map(len, datas))  # still staged in part
    assert w.read_pending(ids[-1]) == datas[-1]
    assert w.read_pending(ids[0]) == datas[0]
    more = [rng.randbytes(1000) for _ in range(10)]
    ids += [w.put(KIND_CHUNK, d) for d in more]
    w.flush()
    for oid, data in zip(ids, datas + more, strict=True):
        assert store.get(oid) == data


@pytest.mark.parametrize("direct", [True, False])
def test_runs_are_read_whole_with_o_direct_or_without(store, monkeypatch, direct):
    """A restore's runs of records come in with O_DIRECT (whole blocks around them, from
    any offset), or through the page cache where O_DIRECT is refused; a truncated pack is
    named as such either way."""
    if not direct:
        monkeypatch.setattr(store, "_direct_fd", lambda pack: -1)
    w = store.writer()
    rng = random.Random(8)
    datas = [rng.randbytes(rng.randrange(1, 20000)) for _ in range(60)]
    ids = [w.put(KIND_CHUNK, d) for d in datas]
    w.flush()
    locs = [store.locate(oid) for oid in ids]
    for a, b in ((0, 60), (7, 9), (13, 14), (59, 60), (30, 45)):
        run = list(zip(ids[a:b], locs[a:b], strict=True))
        assert list(store.read_run(run)) == datas[a:b]
    assert (store._direct_fd(locs[0].pack) >= 0) is direct
    path = store.dir / store.pack_name(locs[0].pack)
    os.truncate(path, locs[-1].offset + 10)
    with pytest.raises(Corrupt, match="truncated"):
        list(store.read_run([(ids[-1], locs[-1])]))


def test_a_pack_whose_direct_reads_are_refused_is_read_through_the_cache_from_then_on(
        store, monkeypatch):
    """A filesystem may take O_DIRECT at open and refuse the read: the run is read through
    the page cache, and that pack's later runs are not tried directly again."""
    w = store.writer()
    datas = [random.Random(i).randbytes(7000) for i in range(6)]
    ids = [w.put(KIND_CHUNK, d) for d in datas]
    w.flush()
    locs = [store.locate(oid) for oid in ids]
    direct = store._direct_fd(locs[0].pack)
    assert direct >= 0
    tried: list[int] = []
    real = os.preadv

    def refusing(fd, bufs, at):
        if fd == direct:
            tried.append(at)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, at)

    monkeypatch.setattr(packs.os, "preadv", refusing)
    for a, b in ((0, 3), (3, 6), (1, 5)):
        run = list(zip(ids[a:b], locs[a:b], strict=True))
        assert list(store.read_run(run)) == datas[a:b]
    assert len(tried) == 1
    assert store._direct_fd(locs[0].pack) == -1


def test_a_drain_writes_the_whole_blocks_once_and_only_the_last_block_again(tmp_path):
    """Reading back what a writer holds drains it each time: what was written out stays
    written, and only the partial last block goes out again (a fetch reads back every tree
    and file list it takes in)."""
    path = tmp_path / "p"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    written = []
    real = os.pwrite

    def noting(fd, data, at):
        written.append(len(data))
        return real(fd, data, at)

    try:
        app = packs._Appender(fd, 0, b"", (packs.private_buffer(4 * packs.DIRECT_ALIGN),
                                             packs.private_buffer(4 * packs.DIRECT_ALIGN)))
        app.write([b"x" * (3 * packs.DIRECT_ALIGN + 100)])
        packs.os.pwrite = noting
        for _ in range(5):
            app.drain()
        app.write([b"y" * 50])
        app.drain()
    finally:
        packs.os.pwrite = real
        os.close(fd)
    assert written == [3 * packs.DIRECT_ALIGN, 100, 100, 100, 100, 100, 150]
    assert path.read_bytes() == b"x" * (3 * packs.DIRECT_ALIGN + 100) + b"y" * 50


def test_a_full_disk_met_reading_back_gives_the_packs_back(store, monkeypatch):
    w = store.writer()
    before = set(store.dir.iterdir())
    ids = [w.put(KIND_CHUNK, random.Random(i).randbytes(3000)) for i in range(5)]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packs._Appender, "_out", full)
    with pytest.raises(OutOfSpace, match="no space left"):
        w.read_pending(ids[0])
    assert set(store.dir.iterdir()) == before


def test_a_store_closed_under_a_writer_gives_back_what_was_not_indexed(tmp_path):
    """A command that fails elsewhere (the index meeting a full disk first, say, while a
    pack was still being written out by its thread) leaves no pack bytes behind: the store's
    close gives back what its writers did not index, and leaves what they did."""
    s = PackStore(tmp_path, connect(tmp_path / "meta.db"))
    done = s.writer()
    kept = done.put(KIND_CHUNK, random.Random(1).randbytes(10_000))
    done.flush()
    before = {p.name: p.stat().st_size for p in s.dir.iterdir()}
    failed = s.writer()
    rng = random.Random(2)
    for _ in range(100):  # 20 MiB: some written out, the rest staged
        failed.put(KIND_CHUNK, rng.randbytes(200_000))
    assert len(list(s.dir.iterdir())) == 2
    s.close()
    assert {p.name: p.stat().st_size for p in s.dir.iterdir()} == before
    again = PackStore(tmp_path, connect(tmp_path / "meta.db"))
    try:
        assert again.get(kept) == random.Random(1).randbytes(10_000)
    finally:
        again.close()


def test_an_encoded_stat_cache_is_stored_as_it_is_and_checked_when_loaded(tmp_path):
    """A kept state's cache passed on without decoding (statcache.Encoded) is saved as it is,
    even over an equal decoded one; one damaged on the way loads as empty (reads, not data)."""
    from dotmesh.meta import statcache
    from dotmesh.meta.db import Tx
    from dotmesh.meta.statcache import CacheEntry, Encoded, encode_cache

    conn = connect(tmp_path / "meta.db")
    cache = {b"a": CacheEntry.of(1, 2, 3, 4, bytes(range(32)), False),
             b"dir/b": CacheEntry.of(5, 6, 7, 8, None, True)}
    blob = Encoded(encode_cache(cache))
    with Tx(conn) as tx:
        statcache.save(tx, "app", "master", "db", cache, blob)
    assert statcache.load_encoded(conn, "app", "master", "db") == blob
    assert statcache.load(conn, "app", "master", "db") == cache
    writes = conn.total_changes
    with Tx(conn) as tx:  # the same blob again (a reset to the head's state): no write
        statcache.save(tx, "app", "master", "db", {}, Encoded(bytes(blob)))
    assert conn.total_changes == writes
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with Tx(conn) as tx:
        statcache.save(tx, "app", "master", "db", {}, Encoded(damaged))
    assert statcache.load(conn, "app", "master", "db") == {}
    assert statcache.load_encoded(conn, "app", "master", "other") is None
    conn.close()


def test_a_kept_states_caches_file_read_without_decoding_is_framed_or_nothing(tmp_path):
    from dotmesh.meta.statcache import CacheEntry, Encoded, encode_cache
    from dotmesh.workdir import kept

    cache = {b"f": CacheEntry.of(1, 2, 3, 4, bytes(32), False)}
    kept._write_caches(tmp_path, {"db": cache, "redis": Encoded(encode_cache({}))},
                       durable=False)
    got = kept._read_encoded(tmp_path)
    assert got == {"db": encode_cache(cache), "redis": encode_cache({})}
    assert all(isinstance(v, Encoded) for v in got.values())
    assert kept._read_caches(tmp_path) == {"db": cache, "redis": {}}
    whole = (tmp_path / kept.CACHES).read_bytes()
    (tmp_path / kept.CACHES).write_bytes(whole[:-3])  # a body cut short: nothing trusted
    assert kept._read_encoded(tmp_path) == {} and kept._read_caches(tmp_path) == {}


def test_the_largest_files_of_an_encoded_cache_are_those_of_the_decoded_one():
    import heapq

    from dotmesh.meta.statcache import FOLDER, CacheEntry, decode_cache, encode_cache, largest_files

    rng = random.Random(5)
    cache = {f"f{i}".encode(): CacheEntry.of(rng.randrange(1 << 40), i, i, i, None, False)
             for i in range(300)}
    cache[b"big/"] = CacheEntry(1 << 50, 0, 0, 0, bytes(32), FOLDER)  # folders do not count
    blob = encode_cache(cache)
    want = dict(heapq.nlargest(16, ((k, v) for k, v in decode_cache(blob).items()
                                    if not v[5] & FOLDER), key=lambda kv: kv[1][0]))
    assert largest_files(blob, 16) == want and len(want) == 16
    assert largest_files(blob[:-1], 16) == {} and largest_files(b"junk", 16) == {}


def test_an_unfinished_reset_dropped_by_fsck_keeps_its_discarded_state_named(tmp_path):
    """fsck --repair drops a restore that cannot be finished; a discarded state it had named
    (maybe the only copy of a working state) is tied to a reflog row saying so, and a later
    restore to another target does not take it over."""
    from dotmesh.meta import refs
    from dotmesh.meta.db import Tx

    conn = connect(tmp_path / "meta.db")
    old, target, other = object_id(b"old"), object_id(b"target"), object_id(b"other")
    with Tx(conn) as tx:
        refs.begin_restore(tx, "app", "reset", "master", old, target, None, "reset", "m")
        refs.add_discarded(tx, "app", "discarded-0123456789abcdef", "master", old, target, 1,
                           "me", "discarded")
    with Tx(conn) as tx:
        refs.log(tx, "app", "master", "reset", old, other, None, "a later restore")
        refs.link_discarded(tx, "app", other)  # not its target: left alone
    assert refs.discarded_rows(conn, "app")[0][5] is None
    with Tx(conn) as tx:  # its target is what could not be read: not named again
        refs.drop_restore(tx, "app", frozenset({old}))
    assert refs.pending_restore(conn, "app") is None
    [row] = refs.discarded_rows(conn, "app")
    newest = conn.execute("SELECT seq, action, old, new FROM reflog ORDER BY seq DESC"
                          ).fetchone()
    assert row[5] == newest[0] and newest[1:] == ("reset (interrupted)", old, None)
    conn.close()


def test_a_discarded_state_stored_without_its_reflog_entry_is_named_by_one_of_its_own(
        tmp_path):
    """The reflog entry of a discarded state gone (fsck dropped it as damaged): the commit it
    is stored as still has a reflog entry naming it, so gc keeps it."""
    from dotmesh.meta import refs
    from dotmesh.meta.db import Tx

    conn = connect(tmp_path / "meta.db")
    old, target, saved = object_id(b"old"), object_id(b"target"), object_id(b"saved")
    with Tx(conn) as tx:
        refs.stored_discarded(tx, "app", "discarded-0123456789abcdef", 12345, saved, "master",
                              old, target, "working state discarded")
    assert saved in refs.logged_ids(conn, "app")
    conn.close()


def test_fingerprints_are_saved_without_an_fsync_and_every_other_commit_keeps_one(tmp_path):
    """The fingerprint cache's transaction is not waited for on disk; the connection is
    back to synchronous=FULL after it, failed or not, so no ref or index row loses its."""
    from dotmesh.meta.db import load_fingerprints, save_fingerprints

    conn = connect(tmp_path / "meta.db")
    full = conn.execute("PRAGMA synchronous").fetchone()[0]
    assert full == 2
    seen = []
    conn.set_trace_callback(lambda sql: seen.append(
        conn.execute("PRAGMA synchronous").fetchone()[0]) if sql == "COMMIT" else None)
    save_fingerprints(conn, [(b"c" * 32, b"f" * 16)], [])
    conn.set_trace_callback(None)
    assert seen == [1]  # NORMAL while it commits
    assert load_fingerprints(conn, b"c" * 32) == b"f" * 16
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == full
    with pytest.raises(sqlite3.Error):
        save_fingerprints(conn, [(b"c" * 32,)], [])  # type: ignore[list-item]
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == full
    assert conn.execute("SELECT count(*) FROM fingerprints").fetchone()[0] == 1
    conn.close()


@pytest.mark.parametrize("scan", [False, True], ids=["in batches", "one scan of the index"])
def test_what_is_held_and_its_lengths_are_the_same_asked_either_way(store, monkeypatch, scan):
    """A pull asks about every block of the file lists it fetched: most of the index, read
    then in one scan (PackStore._most_of_index); a small ask goes in batches. Both tables are
    read either way, and a damaged row is refused, not compared."""
    w = store.writer()
    old = [w.put(KIND_CHUNK, b"old %d" % i) for i in range(3)]
    w.flush()
    index.merge_recent(store.conn)
    recent = w.put(KIND_CHUNK, b"recent!")
    w.flush()
    assert _table(store, "objects") == set(old) and _table(store, "recent_objects") == {recent}
    monkeypatch.setattr(store, "_most_of_index", lambda asked: scan)
    absent = object_id(b"absent")
    assert store.missing([*old, recent, absent, absent]) == {absent}
    assert store.raw_lengths([old[0], recent, absent]) == {old[0]: 5, recent: 7}
    store.conn.execute("UPDATE objects SET raw_len=? WHERE id=?", (4096, old[1]))
    assert store.raw_lengths([old[0]]) == {old[0]: 5}  # only the rows asked about are judged
    with pytest.raises(Corrupt, match="is damaged"):  # stored 5 bytes, not compressed: whole
        store.raw_lengths([old[1]])  # rows are checked, not lengths alone
    with pytest.raises(Corrupt, match="is damaged"):
        store.locate_all([old[1]])


def test_fingerprints_of_a_superseded_version_last_a_number_of_saves(tmp_path):
    """A version's fingerprints outlive its superseding by KEEP_SUPERSEDED saves that
    supersede something (a reset may bring it back meanwhile); saved again, it is current
    and stays; gc's drop forgets both."""
    from dotmesh.meta.db import (
        KEEP_SUPERSEDED,
        drop_fingerprints,
        fingerprinted,
        load_fingerprints,
        save_fingerprints,
    )

    conn = connect(tmp_path / "meta.db")
    v = [bytes([i]) * 32 for i in range(KEEP_SUPERSEDED + 3)]
    save_fingerprints(conn, [(v[0], b"f0")], [])
    save_fingerprints(conn, [(v[1], b"f1")], [v[0]])  # v0 superseded by v1
    save_fingerprints(conn, [(v[0], b"f0")], [v[1]])  # v0 back (a reset), v1 superseded
    for i in range(2, KEEP_SUPERSEDED + 1):
        save_fingerprints(conn, [(v[i], b"f%d" % i)], [v[i - 1] if i > 2 else v[0]])
    # v1 was superseded KEEP_SUPERSEDED - 1 saves ago, v0 (current again, then superseded
    # by v2) one save later
    assert load_fingerprints(conn, v[1]) == b"f1" and load_fingerprints(conn, v[0]) == b"f0"
    save_fingerprints(conn, [(v[KEEP_SUPERSEDED + 1], b"x")], [v[KEEP_SUPERSEDED]])
    assert load_fingerprints(conn, v[1]) is None and load_fingerprints(conn, v[0]) == b"f0"
    save_fingerprints(conn, [(v[KEEP_SUPERSEDED + 2], b"y")], [v[KEEP_SUPERSEDED + 1]])
    assert load_fingerprints(conn, v[0]) is None and load_fingerprints(conn, v[2]) == b"f2"
    save_fingerprints(conn, [(v[2], b"f2")], [])  # current again: no longer marked
    for _ in range(KEEP_SUPERSEDED + 1):
        save_fingerprints(conn, [], [v[KEEP_SUPERSEDED + 2]])
    assert load_fingerprints(conn, v[2]) == b"f2"
    with conn:
        drop_fingerprints(conn, [v[2], v[KEEP_SUPERSEDED + 2]])
    assert v[2] not in fingerprinted(conn)
    assert conn.execute("SELECT count(*) FROM superseded_fingerprints").fetchone()[0] == 0
    # A damaged mark (not a number) neither stops the count nor stays
    z = b"z" * 32
    save_fingerprints(conn, [(z, b"fz")], [])
    with conn:
        conn.execute("INSERT INTO superseded_fingerprints VALUES (?, 'x')", (z,))
    for i in range(KEEP_SUPERSEDED + 4):
        save_fingerprints(conn, [(b"n" * 31 + bytes([i]), b"f")],
                          [b"n" * 31 + bytes([i - 1])] if i else [])
        assert (load_fingerprints(conn, z) is None) == (i > 0)
    assert conn.execute("SELECT count(*) FROM fingerprints").fetchone()[0] <= KEEP_SUPERSEDED + 2
    conn.close()


def test_a_changed_superblock_asks_the_index_only_of_blocks_not_where_they_were(tmp_path):
    """Each block of a superblock whose fingerprint changed is hashed again; those that hold
    what the previous version held at their place are known by position, so the index is
    asked only of the page that changed (no set of every previous block is made)."""
    p = tmp_path / "f"
    data = bytearray(os.urandom(chunker.SUPER * 4))
    p.write_bytes(data)
    size = len(data)

    def cut(asked: list[list[bytes]], prev: chunker.Previous | None) -> chunker.Chunks:
        fd = os.open(p, os.O_RDONLY)
        try:
            return chunker.chunk_paged(fd, 0, size, bytearray(size), frozenset(),
                                       lambda ids: asked.append(ids) or set(ids), prev)
        finally:
            os.close(fd)

    first = cut([], None)
    data[chunker.SUPER + 8192:chunker.SUPER + 16384] = os.urandom(8192)  # one page
    p.write_bytes(data)
    asked: list[list[bytes]] = []
    second = cut(asked, chunker.Previous(first.ids, first.fingerprints))
    assert [b for ids in asked for b in ids] == [second.ids[chunker.SUPER // 8192 + 1]]
    assert second.ids[:9] == first.ids[:9] and second.ids[10:] == first.ids[10:]


def test_a_patched_files_blocks_read_by_several_threads_come_back_whole_and_in_order(store):
    """A reset's scattered blocks are read in pieces on several threads (read_apart): the
    same blocks as one reader gives, holes between them included, each checked as read."""
    from dotmesh.model.ids import HOLE
    from dotmesh.model.objects import FILE, Entry
    from dotmesh.workdir.restore import SCATTERED_PIECE, Policy, _File, _Writer, check_file

    w = store.writer()
    rng = random.Random(5)
    blocks = [rng.randbytes(8192) for _ in range(5 * SCATTERED_PIECE)]
    ids = [w.put(KIND_CHUNK, b) for b in blocks]
    w.flush()
    wanted = [(i * 8192, HOLE if i % 7 == 3 else ids[i], 8192) for i in range(len(ids))]
    f = _File((), "heap", b"heap", Entry("heap", FILE, 0o644, 0, 0, 1, 8192 * len(wanted),
                                         ids[0], True), True, wanted)
    writer = _Writer(store, Policy(), None)
    writer.locate([f])
    check_file(f, writer)
    got = writer.read_apart(f)
    assert got == list(writer.read(f))
    assert [(off, n) for off, n, _ in got] == [(off, n) for off, _, n in wanted]
    assert all((data is None) == (i % 7 == 3) and (data is None or data == blocks[i])
               for i, (_, _, data) in enumerate(got))


def test_a_file_no_longer_paged_knows_its_previous_blocks_by_set():
    """chunk_paged knows a paged file's previous blocks by position; a file cut otherwise
    now gets them as a set (else each would be looked up in the index)."""
    from dotmesh.workdir.snapshot import _as_known

    ids = [bytes([i]) * 32 for i in range(3)]
    prev = chunker.Previous(ids, b"")
    assert _as_known((frozenset(), prev), 3 * 8192 * 64) == (frozenset(), prev)  # paged
    assert _as_known((frozenset(), prev), 100_001) == (frozenset(ids), prev)
    assert _as_known((frozenset(ids[:1]), None), 100_001) == (frozenset(ids[:1]), None)


def test_a_forked_child_reads_with_readers_of_its_own():
    """The daemon's commands are forks: a pool of reader threads made before the fork has
    no threads in the child, so the child makes its own."""
    from dotmesh.workdir import restore

    assert restore._readers().submit(lambda: 1).result(timeout=30) == 1
    pid = os.fork()
    if pid == 0:
        try:
            ok = restore._readers().submit(lambda: 42).result(timeout=20) == 42
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
