"""The folder backend seam, on its first implementation (plain folders)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dotmesh.meta import index
from dotmesh.meta.db import connect
from dotmesh.model.objects import Root
from dotmesh.store.packs import PackStore
from dotmesh.workdir.backend import PLAIN, FolderBackend
from dotmesh.workdir.restore import Policy


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = PackStore(tmp_path, connect(tmp_path / "meta.db"))
    yield s
    s.close()


def _files(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*"))
            if p.is_file()}


def test_a_folder_goes_round_the_seam(tmp_path: Path, store: PackStore) -> None:
    backend: FolderBackend = PLAIN
    folder = tmp_path / "dots" / "app" / "subdots" / "db"
    backend.make(folder)
    backend.make(folder)  # making one that exists is a no-op
    (folder / "a.txt").write_bytes(b"one")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 100)
    writer = store.writer()
    first = backend.snapshot(folder, store, writer, {})
    writer.flush()

    aside = tmp_path / "aside"
    backend.build_aside(aside, store, first.root, Policy())
    assert _files(aside) == _files(folder)

    (folder / "a.txt").write_bytes(b"two")
    (folder / "new").write_bytes(b"x")
    second = backend.snapshot(folder, store, writer, first.cache)
    writer.flush()
    assert second.root.tree != first.root.tree
    staged = backend.prepare_restore(folder, store, first.root, second.root,
                                     tmp_path / "staging", Policy(), None, second.cache)
    assert (folder / "a.txt").read_bytes() == b"two"  # nothing changes before apply
    staged.apply()
    assert _files(folder) == _files(aside)

    other = tmp_path / "other"
    other.mkdir()  # an empty folder in the way is replaced
    backend.swap_in(aside, other)
    assert not aside.exists() and _files(other) == _files(folder)


def test_a_cached_only_walk_stops_at_the_first_folder_with_a_change(tmp_path: Path,
                                                                     store: PackStore) -> None:
    """A reset tells a changed working state from its first changed folder: it does not stat
    the rest (a clean state is still walked whole, and then snapshotted from the cache)."""
    from dotmesh.workdir import snapshot as scan

    folder = tmp_path / "set"
    for d in range(20):
        (folder / f"d{d}").mkdir(parents=True)
        (folder / f"d{d}" / "f").write_text(str(d))
    (folder / "top").write_text("top")
    time.sleep(scan.RACY_NS / 1e9 * 1.5)  # stats old enough for the cache to trust them
    writer = store.writer()
    first = scan.snapshot(folder, store, writer, {})
    writer.flush()
    clean = scan.snapshot_cached(folder, store, writer, first.cache, time.time_ns())
    assert clean is not None and clean.root.tree == first.root.tree

    (folder / "top").write_text("changed")
    walk = scan._Walk(str(folder), first.cache, None)
    listed = walk.tree("", until_a_read=True)
    assert listed == [""] and [f.rel for f in walk.reads] == [b"top"]
    assert scan.snapshot_cached(folder, store, writer, first.cache, time.time_ns()) is None


def test_a_changed_large_file_is_told_without_a_walk(tmp_path: Path, store: PackStore,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from dotmesh.workdir import snapshot as scan

    folder = tmp_path / "set"
    for d in range(5):
        (folder / f"d{d}").mkdir(parents=True)
        (folder / f"d{d}" / "small").write_text(str(d))
    (folder / "d4" / "table").write_bytes(b"p" * 100_000)
    time.sleep(scan.RACY_NS / 1e9 * 1.5)
    writer = store.writer()
    first = scan.snapshot(folder, store, writer, {})
    writer.flush()
    with open(folder / "d4" / "table", "r+b") as f:  # a page written in place
        f.write(b"q" * 8192)

    def no_walk(*_args: object, **_kwargs: object) -> list[str]:
        raise AssertionError("walked")

    monkeypatch.setattr(scan._Walk, "tree", no_walk)
    assert scan.snapshot_cached(folder, store, writer, first.cache, time.time_ns()) is None
    (folder / "d4" / "table").unlink()
    assert scan.snapshot_cached(folder, store, writer, first.cache, time.time_ns()) is None


def test_large_files_restored_by_direct_writes_are_byte_exact(tmp_path: Path,
                                                               store: PackStore) -> None:
    """Files of 1 MiB and more are written with O_DIRECT through an aligned, zero-padded
    buffer: every size, a hole at an unaligned place and the tail must come out exact."""
    import os

    from dotmesh.workdir import restore

    folder = tmp_path / "set"
    folder.mkdir()
    sizes = [restore.DIRECT_MIN, restore.DIRECT_MIN + 1, 3 * restore.DIRECT_MIN + 4095,
             5 * restore.DIRECT_MIN + 12345]
    for i, size in enumerate(sizes):
        (folder / f"f{i}").write_bytes(os.urandom(size))
    with open(folder / "sparse", "wb") as f:  # data, an unaligned hole of 3 MiB, data
        f.write(os.urandom(restore.DIRECT_MIN + 777))
        f.seek(4 * restore.DIRECT_MIN + 1234)
        f.write(os.urandom(100_000))
    with open(folder / "paged", "wb") as f:
        f.write(os.urandom(16 * 8192 * 64))
    writer = store.writer()
    snap = PLAIN.snapshot(folder, store, writer, {})
    writer.flush()
    aside = tmp_path / "aside"
    PLAIN.build_aside(aside, store, snap.root, Policy())
    assert _files(aside) == _files(folder)
    assert os.stat(aside / "sparse").st_blocks * 512 < 2 * restore.DIRECT_MIN + 200_000


def test_a_big_file_of_chunks_of_any_length_is_written_direct_to_its_end(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file cut by CDC is written in runs of RUN_PIECES chunks; a run that began where the
    last one ended, at no aligned place, went through the page cache and so did the rest
    of the file (most of a 165 MB dump, each page of it new memory). Runs are now cut where
    they are aligned: nothing goes through the page cache, and the bytes come out exact."""
    import os

    from dotmesh.workdir import restore

    monkeypatch.setattr(restore, "RUN_PIECES", 8)
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "dump").write_bytes(os.urandom(6 * restore.DIRECT_MIN + 4321))  # ~80 chunks
    writer = store.writer()
    snap = PLAIN.snapshot(folder, store, writer, {})
    writer.flush()
    buffered: list[int] = []
    real = restore._pwritev_all

    def spy(fd: int, iov: list[bytes], offset: int) -> None:
        buffered.append(offset)
        real(fd, iov, offset)

    monkeypatch.setattr(restore, "_pwritev_all", spy)
    aside = tmp_path / "aside"
    PLAIN.build_aside(aside, store, snap.root, Policy())
    assert _files(aside) == _files(folder)
    assert buffered == []


def test_a_direct_write_of_a_long_run_goes_through_a_buffer_of_fixed_size(
        tmp_path: Path) -> None:
    """A run longer than the aligned buffer (a big file of large chunks) is written a
    buffer-full at a time: memory stays at one buffer a thread."""
    import os

    from dotmesh.workdir import restore

    blocks = [os.urandom(n) for n in (5000, restore.DIRECT_BUFFER + 12345, 777,
                                      restore.DIRECT_BUFFER // 2)]
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        restore._write_direct(fd, blocks, 0)
        os.ftruncate(fd, sum(len(b) for b in blocks))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(blocks)
    assert len(restore._direct.buf) == restore.DIRECT_BUFFER


def _change(folder: Path, how: str) -> None:
    import os

    deep = folder / "a" / "b"
    if how == "content":
        (deep / "f1").write_text("F1")  # same size, new bytes
    elif how == "chmod file":
        (deep / "f1").chmod(0o600)
    elif how == "truncate":
        (deep / "f1").write_bytes(b"")
    elif how == "add":
        (deep / "new").write_text("n")
    elif how == "remove":
        (deep / "f2").unlink()
    elif how == "rename":
        (deep / "f2").rename(deep / "f3")
    elif how == "move across":
        (deep / "f2").rename(folder / "c" / "f2")
    elif how == "chmod folder":
        deep.chmod(0o700)
    elif how == "symlink":  # a folder with a symlink is never reused: no entry vouches for it
        (folder / "c" / "link").symlink_to("elsewhere")
    elif how == "same folder again":  # a new inode with the very same names and bytes
        os.rename(deep, folder / "old")
        deep.mkdir()
        for p in (folder / "old").iterdir():
            (deep / p.name).write_bytes(p.read_bytes())
        for p in (folder / "old").iterdir():
            p.unlink()
        (folder / "old").rmdir()
    elif how == "zero-size file replaced":
        (folder / "c" / "empty").unlink()
        (folder / "c" / "empty").write_bytes(b"")
    else:
        assert how == "nothing"


@pytest.mark.parametrize("how", ["nothing", "content", "chmod file", "truncate", "add",
                                 "remove", "rename", "move across", "chmod folder", "symlink",
                                 "same folder again", "zero-size file replaced"])
def test_folders_whose_trees_the_cache_names_are_not_encoded_again(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A commit reuses an unchanged folder's tree from the stat cache; whatever changed, the
    result is the tree a walk without any cache makes."""
    from dotmesh.model import objects
    from dotmesh.workdir import snapshot as scan

    folder = tmp_path / "set"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "c").mkdir()
    (folder / "a" / "b" / "f1").write_text("f1")
    (folder / "a" / "b" / "f2").write_text("f2")
    (folder / "a" / "g").write_text("g")
    (folder / "c" / "h").write_text("h" * 20_000)
    (folder / "c" / "empty").write_bytes(b"")
    time.sleep(scan.RACY_NS / 1e9 * 1.5)
    writer = store.writer()
    first = scan.snapshot(folder, store, writer, {})
    writer.flush()
    time.sleep(scan.RACY_NS / 1e9 * 1.5)  # what changes next is past the first's entries
    _change(folder, how)
    time.sleep(scan.RACY_NS / 1e9 * 1.5)  # and the second's entries can be trusted next
    encoded: list[list[object]] = []
    real = objects.encode_tree_rows

    def counted(rows: list[list[object]]) -> bytes:
        encoded.append(rows)
        return real(rows)

    monkeypatch.setattr(scan, "encode_tree_rows", counted)
    second = scan.snapshot(folder, store, writer, first.cache)
    writer.flush()
    monkeypatch.setattr(scan, "encode_tree_rows", real)
    fresh = scan.snapshot(folder, store, None, {})
    assert second.root == fresh.root
    assert (second.root.tree == first.root.tree) == (how == "nothing")
    made = {tuple(sorted(str(r[0]) for r in rows)) for rows in encoded}
    if how == "nothing":
        assert made == set()
    elif how in ("symlink", "zero-size file replaced"):
        assert len(made) == 2  # c and the top
    elif how == "move across":
        assert len(made) == 4  # a/b, a, c and the top
    else:  # a/b changed (its entries, or it is a new folder): a/b, a and the top; c's reused
        assert len(made) == 3 and ("empty", "h") not in made
    # Again, with nothing changed since: every tree comes from the cache (but a symlink's).
    encoded.clear()
    monkeypatch.setattr(scan, "encode_tree_rows", counted)
    third = scan.snapshot(folder, store, writer, second.cache)
    assert third.root == fresh.root
    assert len(encoded) == (2 if how == "symlink" else 0)
    assert third.cache == second.cache  # so a no-change commit writes no cache either


def test_a_folder_tree_the_store_lost_is_made_again(tmp_path: Path, store: PackStore) -> None:
    from dotmesh.meta.statcache import folder_key
    from dotmesh.workdir import snapshot as scan

    folder = tmp_path / "set"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "f").write_text("f")
    time.sleep(scan.RACY_NS / 1e9 * 1.5)
    writer = store.writer()
    first = scan.snapshot(folder, store, writer, {})
    writer.flush()
    cache = dict(first.cache)
    entry = cache[folder_key("a")]
    cache[folder_key("a")] = (*entry[:4], bytes(32), entry[5])  # a tree gc took, say
    second = scan.snapshot(folder, store, writer, cache)
    assert second.root == first.root
    assert second.cache[folder_key("a")][2:] == entry[2:]  # the same tree, cached again


def _forking_set(top: Path) -> dict[str, int]:
    """Folders of files whose build goes to several child processes (one batch a folder)."""
    import os

    sizes = {}
    for i in range(5):
        (top / f"d{i}").mkdir(parents=True)
        for j, size in enumerate((0, 777, 8192 * 40, 3 << 20)):
            data = os.urandom(size // 2) + bytes(size - size // 2)
            (top / f"d{i}" / f"f{j}").write_bytes(data)
            os.chmod(top / f"d{i}" / f"f{j}", 0o640 if j % 2 else 0o600)
            sizes[f"d{i}/f{j}"] = size
    return sizes


def _stored_forking_set(top: Path, store: PackStore) -> tuple[dict[str, int], Root]:
    """:func:`_forking_set` at ``top``, stored: its files' sizes and its root."""
    sizes = _forking_set(top)
    writer = store.writer()
    root = PLAIN.snapshot(top, store, writer, {}).root
    writer.flush()
    return sizes, root


def _noting_forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids of the children forked from now on (os.fork as seen by the parent)."""
    import os

    pids: list[int] = []
    real_fork = os.fork

    def fork() -> int:
        pid = real_fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    return pids


def _all_reaped(pids: list[int]) -> None:
    """Every one of these children was waited for (the suite's process has others)."""
    import os

    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


@contextmanager
def _process_table(monkeypatch: pytest.MonkeyPatch, how: str) -> Iterator[None]:
    """No process to spare ("fork refused": the work is done on threads), or SIGCHLD
    ignored, as a parent may leave it for us (the kernel reaps the children)."""
    import errno
    import signal

    if how == "fork refused":
        def refuse() -> int:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        monkeypatch.setattr(os, "fork", refuse)
        yield
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def test_a_build_split_across_processes_is_exact_and_counted(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from dotmesh.workdir import restore

    folder = tmp_path / "set"
    sizes, root = _stored_forking_set(folder, store)
    restore._direct_buffer()  # made here before the fork, as a daemon's would be
    monkeypatch.setattr(restore, "FORK_MIN", 0)
    forks = _noting_forks(monkeypatch)
    seen: list[int] = []
    aside = tmp_path / "aside"
    result = PLAIN.build_aside(aside, store, root, Policy(), seen.append)
    monkeypatch.setattr(restore, "FORK_MIN", 1 << 60)
    assert len(forks) == restore.WORKERS
    assert _files(aside) == _files(folder)
    for rel in sizes:
        a, b = os.stat(aside / rel), os.stat(folder / rel)
        assert (a.st_mode, a.st_mtime_ns) == (b.st_mode, b.st_mtime_ns), rel
    threaded: list[int] = []
    again = PLAIN.build_aside(tmp_path / "again", store, root, Policy(), threaded.append)
    assert sum(seen) == sum(threaded) == result.bytes_written == again.bytes_written
    assert result.files_written == again.files_written == len(sizes)
    assert result.touched.keys() == again.touched.keys() == {r.encode() for r in sizes}
    for rel, e in result.touched.items():  # the children's stats came back whole
        st = os.stat(aside / rel.decode())
        assert (e.size, e.mtime_ns, e.ctime_ns, e.ino) == (
            st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    _all_reaped(forks)


def test_a_slow_child_leaves_the_other_batches_to_the_others(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches are handed out as children finish them, not shared out beforehand: while one
    child is held up in its first batch (here a sleep; on a machine, an inode allocation
    that scans recently deleted ones), the other writes every other batch."""
    import os
    import time

    from dotmesh.workdir import restore

    folder = tmp_path / "set"
    root = _stored_forking_set(folder, store)[1]
    log = tmp_path / "who-wrote"
    real = restore._Writer.new_file

    def noted(self: restore._Writer, dir_fd: int, name: str, f: restore._File
              ) -> tuple[int, os.stat_result]:
        if f.rel == b"d0/f0":  # the first file of the first batch
            time.sleep(2)
        with open(log, "a") as out:
            out.write(f"{os.getpid()} {f.rel.decode()}\n")
        return real(self, dir_fd, name, f)

    monkeypatch.setattr(restore._Writer, "new_file", noted)
    monkeypatch.setattr(restore, "FORK_MIN", 0)
    forks = _noting_forks(monkeypatch)
    PLAIN.build_aside(tmp_path / "aside", store, root, Policy())
    assert _files(tmp_path / "aside") == _files(folder)
    by: dict[str, set[str]] = {}
    for line in log.read_text().splitlines():
        pid, rel = line.split()
        by.setdefault(pid, set()).add(rel.split("/")[0])
    slow = next(pid for pid, folders in by.items() if "d0" in folders)
    assert by[slow] == {"d0"}  # one batch a folder: the slow child did its own only
    assert set().union(*(f for pid, f in by.items() if pid != slow)) == {
        "d1", "d2", "d3", "d4"}
    _all_reaped(forks)


def test_a_damaged_block_a_child_meets_fails_the_build_here(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:

    from dotmesh.errors import Corrupt
    from dotmesh.model.ids import object_id
    from dotmesh.workdir import restore

    folder = tmp_path / "set"
    root = _stored_forking_set(folder, store)[1]
    victim = object_id((folder / "d3" / "f1").read_bytes())  # a small file: one chunk
    loc = store.locate(victim)
    assert loc is not None
    pack = store.dir / store.pack_name(loc.pack)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.stored_len // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    store.close()
    monkeypatch.setattr(restore, "FORK_MIN", 0)
    forks = _noting_forks(monkeypatch)
    with pytest.raises(Corrupt, match=victim.hex()[:16]):
        PLAIN.build_aside(tmp_path / "aside", store, root, Policy())
    assert len(forks) == restore.WORKERS
    _all_reaped(forks)


@pytest.mark.parametrize("damage", ["a wrong length", "no row", "a bad kind",
                                    "a pack not a number"])
def test_a_damaged_index_row_fails_a_split_build_in_its_child(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    """A split build's parent reads the index rows unchecked; each child checks the rows of
    its files before writing them, and its error is raised here."""
    from dotmesh.errors import Corrupt, NotFound
    from dotmesh.model.ids import object_id
    from dotmesh.workdir import restore

    folder = tmp_path / "set"
    root = _stored_forking_set(folder, store)[1]
    victim = object_id((folder / "d3" / "f1").read_bytes())  # a small file: one chunk
    change = {"a wrong length": "UPDATE objects SET raw_len = raw_len + 1 WHERE id = ?",
              "no row": "DELETE FROM objects WHERE id = ?",
              "a bad kind": "UPDATE objects SET kind = 99 WHERE id = ?",
              "a pack not a number": "UPDATE objects SET pack = 'x' WHERE id = ?"}[damage]
    with store.conn:
        index.merge_recent(store.conn)  # every object's row in ``objects``
        store.conn.execute(change, (victim,))
    monkeypatch.setattr(restore, "FORK_MIN", 0)
    forks = _noting_forks(monkeypatch)
    expected = {"a wrong length": (Corrupt, "d3/f1 names a block of 777 bytes that has 778"),
                "no row": (NotFound, f"block {victim.hex()[:16]} of d3/f1 is not in"),
                "a bad kind": (Corrupt, f"index entry of object {victim.hex()[:16]}"),
                "a pack not a number": (Corrupt, f"index entry of object {victim.hex()[:16]}"),
                }[damage]
    with pytest.raises(expected[0], match=expected[1]):
        PLAIN.build_aside(tmp_path / "aside", store, root, Policy())
    assert len(forks) == restore.WORKERS
    _all_reaped(forks)


def _commit_set(top: Path, seed: int = 7) -> None:
    """Files of every kind a commit cuts: small ones (one a copy of another), one cut by
    CDC, and paged ones (the same twice) with repeated and zero blocks."""
    import random

    rng = random.Random(seed)
    (top / "small").mkdir(parents=True)
    for i in range(40):
        (top / "small" / f"f{i}").write_bytes(rng.randbytes(500 + 97 * i))
    (top / "small" / "copy").write_bytes((top / "small" / "f3").read_bytes())
    (top / "dump").write_bytes(rng.randbytes(300_000))
    for i in range(5):  # cut by CDC, read in batches
        (top / f"medium{i}").write_bytes(rng.randbytes(70_000 + 11_111 * i))
    page = rng.randbytes(8192)
    db = rng.randbytes(8192 * 40) + page * 10 + bytes(8192 * 5) + rng.randbytes(8192 * 20)
    (top / "db").write_bytes(db)
    (top / "db2").write_bytes(db)


def _records(store: PackStore) -> list[bytes]:
    """The ids of every record in the store's packs, read from the files."""
    from dotmesh.store.packs import scan_pack

    return [r[0] for p in sorted(store.dir.glob("*.pack")) for r in scan_pack(p).records]


def test_a_commit_split_across_processes_is_exact_and_stores_each_chunk_once(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read by child processes, a commit gives the ids a commit on threads gives, its
    second commit too (with previous versions, and a paged file made small), and no chunk
    is written twice, though both children meet the repeated ones."""
    import threading

    from dotmesh.store import chunker
    from dotmesh.workdir import snapshot as scan

    folder = tmp_path / "set"
    _commit_set(folder)
    monkeypatch.setattr(chunker, "SEGMENT", 256 * 1024)  # several jobs per paged file
    monkeypatch.setattr(scan, "MEDIUM_FILE", 128 * 1024)  # two to a batch
    monkeypatch.setattr(scan, "_tls", threading.local())  # buffers of that size, for now
    monkeypatch.setattr(scan, "FORK_MIN", 0)
    forks = _noting_forks(monkeypatch)
    seen: list[int] = []
    writer = store.writer()
    first = scan.snapshot(folder, store, writer, {}, seen.append)
    writer.flush()
    assert len(forks) == scan.WORKERS
    ids = _records(store)
    assert len(ids) == len(set(ids)) == writer.objects_written == store.count()
    assert sum(seen) == first.bytes_read == sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file())

    with open(folder / "db", "r+b") as f:  # pages changed, and a big file made small
        f.seek(8192 * 3)
        f.write(os.urandom(8192 * 2))
    (folder / "db2").write_bytes(b"now small")
    second = scan.snapshot(folder, store, writer, first.cache)
    writer.flush()
    assert len(forks) == 2 * scan.WORKERS

    monkeypatch.setattr(scan, "FORK_MIN", 1 << 60)
    (tmp_path / "other").mkdir()
    other = PackStore(tmp_path / "other", connect(tmp_path / "other" / "meta.db"))
    try:
        w = other.writer()
        threaded = scan.snapshot(folder, other, w, {})
        w.flush()
        assert second.root.tree == threaded.root.tree
        assert sorted(_records(other)) == sorted(set(_records(other)))
    finally:
        other.close()
    aside = tmp_path / "aside"
    PLAIN.build_aside(aside, store, second.root, Policy())
    assert _files(aside) == _files(folder)
    ids = _records(store)
    assert len(ids) == len(set(ids))
    _all_reaped(forks)


def test_a_failed_read_in_a_reading_process_fails_the_commit_here(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from dotmesh.workdir import snapshot as scan

    folder = tmp_path / "set"
    _commit_set(folder)
    real = scan._read_small

    def failing(path: str, into: memoryview) -> int:
        if os.getpid() != parent and path.endswith("medium2"):
            raise OSError(errno.EIO, "Input/output error", path)
        return real(path, into)

    parent = os.getpid()
    monkeypatch.setattr(scan, "_read_small", failing)
    monkeypatch.setattr(scan, "FORK_MIN", 0)
    forks = _noting_forks(monkeypatch)
    with pytest.raises(OSError, match="Input/output error") as got:
        scan.snapshot(folder, store, store.writer(), {})
    assert got.value.errno == errno.EIO and got.value.filename == str(folder / "medium2")
    assert len(forks) == scan.WORKERS
    _all_reaped(forks)


def test_a_full_disk_in_a_reading_process_gives_every_pack_back(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from dotmesh.errors import OutOfSpace
    from dotmesh.store import packs
    from dotmesh.workdir import snapshot as scan

    folder = tmp_path / "set"
    _commit_set(folder)
    before = {p.name for p in store.dir.iterdir()}

    def full(self: packs.PackFiller, iov: list[bytes]) -> None:
        if iov:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packs.PackFiller, "_write", full)
    monkeypatch.setattr(scan, "FORK_MIN", 0)
    forks = _noting_forks(monkeypatch)
    writer = store.writer()
    with pytest.raises(OutOfSpace, match="no space left in"):
        scan.snapshot(folder, store, writer, {})
    assert len(forks) == scan.WORKERS
    assert {p.name for p in store.dir.iterdir()} == before  # the lent packs are gone
    with pytest.raises(OutOfSpace):  # the writer refuses further work
        writer.flush()
    _all_reaped(forks)


@pytest.mark.parametrize("how", ["fork refused", "SIGCHLD ignored"])
def test_a_split_commit_copes_with_its_process_table(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """See _process_table: either way the commit stores the folder as it is."""
    from dotmesh.workdir import snapshot as scan

    folder = tmp_path / "set"
    _commit_set(folder)
    monkeypatch.setattr(scan, "FORK_MIN", 0)
    writer = store.writer()
    with _process_table(monkeypatch, how):
        result = scan.snapshot(folder, store, writer, {})
        writer.flush()
    PLAIN.build_aside(tmp_path / "aside", store, result.root, Policy())
    assert _files(tmp_path / "aside") == _files(folder)


def test_subdots_read_by_processes_share_their_lent_packs(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each forked read lends a pack to each child; the next read (a dot's next subdot,
    with the same writer) lends them again from where their records end, so a commit
    leaves no more packs than it has children, plus the writer's own."""
    from dotmesh.workdir import snapshot as scan

    monkeypatch.setattr(scan, "FORK_MIN", 0)
    roots = {}
    writer = store.writer()
    for seed, name in enumerate(("db", "cache", "uploads")):
        _commit_set(tmp_path / name, seed)
        roots[name] = scan.snapshot(tmp_path / name, store, writer, {}).root
    writer.flush()
    assert len(list(store.dir.glob("*.pack"))) <= scan.WORKERS + 1
    ids = _records(store)
    assert len(ids) == len(set(ids)) == store.count()
    for name, root in roots.items():
        PLAIN.build_aside(tmp_path / f"{name}-aside", store, root, Policy())
        assert _files(tmp_path / f"{name}-aside") == _files(tmp_path / name)


def test_a_writer_takes_back_rows_only_for_packs_it_lent(store: PackStore) -> None:
    from dotmesh.errors import InternalError
    from dotmesh.model.ids import object_id

    writer = store.writer()
    lent, _, _ = writer.lend(None)
    with pytest.raises(InternalError, match=f"pack #{lent + 1}"):
        writer.adopt({object_id(b"x"): (1, lent + 1, 8, 1, 1, 0)})


@pytest.mark.parametrize("cap", ["files", "previous versions"])
def test_a_plan_too_big_to_copy_on_write_is_read_on_threads(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch, cap: str) -> None:
    from dotmesh.workdir import snapshot as scan

    folder = tmp_path / "set"
    _commit_set(folder)
    writer = store.writer()
    first = scan.snapshot(folder, store, writer, {})
    writer.flush()
    for f in ("db", "dump", "medium1"):  # previous versions to look up
        with open(folder / f, "r+b") as out:
            out.write(b"changed")
    monkeypatch.setattr(scan, "FORK_MIN", 0)
    if cap == "files":
        monkeypatch.setattr(scan, "FORK_MAX_FILES", 2)
    else:
        monkeypatch.setattr(scan, "FORK_MAX_PREVIOUS", 10)
    forks = _noting_forks(monkeypatch)
    second = scan.snapshot(folder, store, writer, first.cache)
    writer.flush()
    assert forks == []
    PLAIN.build_aside(tmp_path / "aside", store, second.root, Policy())
    assert _files(tmp_path / "aside") == _files(folder)


def test_a_child_killed_in_a_job_fails_the_work_at_once() -> None:
    """As the OOM killer would: the error names the signal, and the other child is stopped
    rather than left to do the rest of the work alone."""
    import signal

    from dotmesh.workdir import forked

    applied: list[int] = []

    def one(k: int) -> int:
        if k == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.1)
        return k

    with pytest.raises(OSError, match="a process reading files died, killed by SIGKILL"):
        forked.run(range(30), one, lambda i, r: applied.append(i), workers=2,
                   what="reading files")
    assert len(applied) <= 2


def test_a_child_that_dies_with_an_answer_unread_fails_the_work_plainly() -> None:
    """Linux then resets the line (ECONNRESET) rather than ending it: that is a death too."""
    import signal

    from dotmesh.workdir import forked

    links: list[forked.Link] = []

    def one(k: int) -> int:
        if k == 0:
            links[0]._conn.send(("ask", ("x", 1)))  # asks, and dies before the answer
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
        return k

    with pytest.raises(OSError, match="died, killed by SIGKILL"):
        forked.run(range(6), one, lambda i, r: None, workers=2, what="reading files",
                   answer=lambda kind, v: "yes", setup=links.append)


def test_each_child_finishes_before_the_work_ends_and_a_failed_finish_fails_it(
        tmp_path: Path) -> None:
    """A child's ``finish`` (the reading children put their last pack bytes in the file
    there) runs once its jobs are done and before ``run`` returns; its error fails the work
    as a job's would."""
    from dotmesh.workdir import forked

    def finish() -> None:
        (tmp_path / str(os.getpid())).write_text("done")

    assert forked.run(range(6), lambda k: k, lambda i, r: None, workers=2,
                      what="reading files", finish=finish)
    assert len(list(tmp_path.iterdir())) == 2  # every child's, by the time it returned

    def full() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        forked.run(range(6), lambda k: k, lambda i, r: None, workers=2,
                   what="reading files", finish=full)


def test_a_child_that_dies_finishing_fails_the_work_even_with_sigchld_ignored() -> None:
    """A reading child puts its last pack bytes in the file in ``finish``, after its last
    job: dying there must fail the work. With SIGCHLD ignored by a parent of ours (it is
    inherited), exit codes all read 0, so the children's last word is what tells."""
    import signal

    from dotmesh.workdir import forked

    def dies() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    for handler in (signal.SIG_DFL, signal.SIG_IGN):
        was = signal.signal(signal.SIGCHLD, handler)
        try:
            with pytest.raises(OSError, match="ended without finishing its work"):
                forked.run(range(4), lambda k: k, lambda i, r: None, workers=2,
                           what="reading files", finish=dies)
        finally:
            signal.signal(signal.SIGCHLD, was)

def test_a_signal_the_parent_ignores_stays_ignored_in_its_children() -> None:
    """``nohup dm commit &``: a hangup must not kill the children of a command that
    ignores it, and so fail the command."""
    import signal

    from dotmesh.workdir import forked

    def one(k: int) -> int:
        if k == 0:
            os.kill(os.getpid(), signal.SIGHUP)
        return k

    was = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        got: list[int] = []
        assert forked.run(range(4), one, lambda i, r: got.append(r), workers=2,
                          what="reading files")
    finally:
        signal.signal(signal.SIGHUP, was)
    assert sorted(got) == [0, 1, 2, 3]


_FIFO_SWAP = r"""
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_backend import _commit_set
from dotmesh.meta.db import connect
from dotmesh.store.packs import PackStore
from dotmesh.workdir import snapshot as scan
from dotmesh.workdir.backend import PLAIN
from dotmesh.workdir.restore import Policy
root = Path(sys.argv[1])
folder = root / "set"
_commit_set(folder)
victims = {str(folder / "small" / "f5"), str(folder / "medium3")}
real = scan._read_small
def swapped(path, into):
    if path in victims:
        os.unlink(path)
        os.mkfifo(path)
    return real(path, into)
scan._read_small = swapped
scan.FORK_MIN = int(sys.argv[2])
store = PackStore(root, connect(root / "meta.db"))
writer = store.writer()
result = scan.snapshot(folder, store, writer, {})
writer.flush()
PLAIN.build_aside(root / "aside", store, result.root, Policy())
print(result.files_read, *sorted((root / "aside" / Path(v).relative_to(folder)).stat().st_size
                                 for v in victims))
"""


@pytest.mark.parametrize("forking", [False, True])
def test_a_file_swapped_for_a_fifo_after_the_scan_is_read_as_vanished(
        tmp_path: Path, forking: bool) -> None:
    """Between the scan and the read, a file becomes a FIFO with no writer: opening it to
    read must not wait for one (the commit hung for good). It is recorded as empty, as a
    file that vanished is (run in a process of its own: a hang fails only this test)."""
    import subprocess
    import sys

    got = subprocess.run([sys.executable, "-c", _FIFO_SWAP, str(tmp_path),
                          "0" if forking else str(1 << 60), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    files = len([p for p in (tmp_path / "set").rglob("*") if not p.is_dir()])
    assert got.stdout.split() == [str(files), "0", "0"]


_KILLED_BUILD = r"""
import os, sys, time
from pathlib import Path
from dotmesh.meta.db import connect
from dotmesh.store.packs import PackStore
from dotmesh.workdir import restore
from dotmesh.workdir.backend import PLAIN
root = Path(sys.argv[1])
store = PackStore(root, connect(root / "meta.db"))
for i in range(4):
    (root / "set" / str(i)).mkdir(parents=True)
    (root / "set" / str(i) / "f").write_bytes(os.urandom(50_000))
writer = store.writer()
snap = PLAIN.snapshot(root / "set", store, writer, {})
writer.flush()
restore.FORK_MIN = 0
def stuck(self, *args):
    os.write(1, f"{os.getpid()}\n".encode())  # one write: the two children share the pipe
    time.sleep(120)
restore._Writer.new_file = stuck
PLAIN.build_aside(root / "aside", store, snap.root, restore.Policy())
"""


def test_children_writing_a_build_die_with_their_parent(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        children = [int(proc.stdout.readline()) for _ in range(2)]
        assert proc.pid not in children
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in children)


def test_a_childs_error_is_raised_here_as_it_was() -> None:
    import errno

    from dotmesh.errors import InternalError, OutOfSpace
    from dotmesh.workdir import forked

    def again(e: BaseException) -> BaseException:
        return forked.rebuilt(*forked.portable(e))

    full = again(OSError(errno.ENOSPC, "No space left on device", "/x/f"))
    assert isinstance(full, OSError) and (full.errno, full.filename) == (errno.ENOSPC, "/x/f")
    space = again(OutOfSpace("no space left in /x"))
    assert type(space) is OutOfSpace and str(space) == "no space left in /x"
    odd = again(KeyError("k"))
    assert isinstance(odd, InternalError) and "KeyError" in str(odd)


@pytest.mark.parametrize("how", ["fork refused", "SIGCHLD ignored"])
def test_a_split_build_copes_with_its_process_table(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """See _process_table: either way the build ends well."""
    from dotmesh.workdir import restore

    folder = tmp_path / "set"
    root = _stored_forking_set(folder, store)[1]
    monkeypatch.setattr(restore, "FORK_MIN", 0)
    with _process_table(monkeypatch, how):
        result = PLAIN.build_aside(tmp_path / "aside", store, root, Policy())
    assert _files(tmp_path / "aside") == _files(folder) and result.files_written == 20


def test_a_failed_read_leaves_nothing_of_its_snapshot_running(
        tmp_path: Path, store: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a file's job fails, the other jobs given to the I/O pool are dropped if queued
    and waited for if running: none reads the store or writes the pack after the error."""
    import threading

    from dotmesh.store import chunker
    from dotmesh.workdir import snapshot as scan

    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(8):  # big files that are not paged: one job each
        (folder / f"big{i}").write_bytes(os.urandom(chunker.SMALL_FILE + 4097))
    monkeypatch.setattr(scan, "MEDIUM_FILE", chunker.SMALL_FILE)  # (not read in batches)
    events: list[str] = []
    lock = threading.Lock()
    real_cdc = chunker.chunk_cdc

    def slow_cdc(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        with lock:
            first = not events
            events.append("start")
        try:
            if first:  # the first job fails while the second runs and more are queued
                time.sleep(0.05)
                raise OSError(5, "Input/output error")
            time.sleep(0.3)
            yield from real_cdc(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                events.append("end")

    monkeypatch.setattr(chunker, "chunk_cdc", slow_cdc)
    with pytest.raises(OSError, match="Input/output error"):
        scan.snapshot(folder, store, store.writer(), {})
    with lock:
        seen = list(events)
    time.sleep(0.6)
    assert events == seen  # nothing started or ended after the error came out
    assert seen.count("start") == seen.count("end") < 8  # the queued ones never ran


def test_a_long_job_does_not_hold_back_the_ones_after_it() -> None:
    """The window of jobs given to the pool moves on as any job ends, not only the oldest:
    here the first job can only end once the sixth has run. Taken in order (the window is
    four), the other worker ran jobs two to four, then sat idle: a deadlock here, seconds
    of a first commit there."""
    import threading
    from concurrent.futures import Future, ThreadPoolExecutor

    from dotmesh.workdir.snapshot import run_windowed

    sixth_ran = threading.Event()
    ended: list[int] = []

    def job(i: int):  # type: ignore[no-untyped-def]
        def run() -> int:
            if i == 0:
                if not sixth_ran.wait(5):
                    raise TimeoutError("the jobs after the first were held back")
            if i == 5:
                sixth_ran.set()
            return i
        return run

    started: list[Future[object]] = []
    with ThreadPoolExecutor(2) as pool:
        run_windowed(pool, (job(i) for i in range(8)), started, ended.append, window=4)
    assert sorted(ended) == list(range(8))  # (the first would have raised TimeoutError)
    assert len(started) == 8


def test_the_paged_files_read_ahead_are_the_largest_whose_stat_moved(tmp_path: Path) -> None:
    """Before a freeze, only paged files the cache knows, big enough, and no longer what it
    says (or not trusted by it) have their reference read ahead: the largest few."""
    from dotmesh.meta.statcache import HINT_ONLY, CacheEntry
    from dotmesh.workdir import snapshot as scan

    mib = 1 << 20
    sizes = {"a": 4 * mib, "b": 3 * mib, "c": 2 * mib, "same": 5 * mib, "hint": mib,
             "small": mib // 2, "odd": 2 * mib + 1, "flat": 2 * mib, "gone": 6 * mib}
    cache = {}
    for name, size in sizes.items():
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
        st = os.lstat(path)
        entry = CacheEntry.of(size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, b"x" * 32,
                              chunked=name != "flat")
        if name in ("a", "b", "c", "flat", "gone", "small"):  # the file moved on since
            entry = entry._replace(mtime_ns=entry.mtime_ns - 1)
        if name == "hint":
            entry = entry._replace(flags=entry.flags | HINT_ONLY)
        cache[name.encode()] = entry
    (tmp_path / "gone").unlink()
    assert sorted(scan.changed_paged(tmp_path, cache)) == [b"a", b"b", b"c", b"hint"]
    # the largest few only (of those the cache names; then whether they moved)
    assert sorted(scan.changed_paged(tmp_path, cache, count=4)) == [b"a", b"b"]
