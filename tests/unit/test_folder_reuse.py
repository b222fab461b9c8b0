"""Folder trees reused from the stat cache, attacked: whatever happens to a folder, and
whenever, a snapshot with a cache records the tree a walk without any cache records (written
as a review of the change that brought the reuse; each "found" case failed before its fix)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dotmesh.capture.changes import ChangeWatcher
from dotmesh.meta.db import connect
from dotmesh.store.packs import PackStore
from dotmesh.workdir import snapshot as scan

SETTLE = scan.RACY_NS / 1e9 * 1.5


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = PackStore(tmp_path / "store", connect(_mk(tmp_path / "store") / "meta.db"))
    yield s
    s.close()


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _tree(top: Path) -> None:
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_text("f")
    (top / "a" / "b" / "empty").write_bytes(b"")
    (top / "a" / "g").write_text("g")
    (top / "a" / "link").symlink_to("g")
    (top / "c").mkdir()
    (top / "c" / "h").write_text("h" * 20_000)


def _same(top: Path, store: PackStore, cache: dict) -> scan.SnapshotResult:  # type: ignore[type-arg]
    writer = store.writer()
    got = scan.snapshot(top, store, writer, cache)
    writer.flush()
    fresh = scan.snapshot(top, store, None, {})
    assert got.root == fresh.root
    return got


# -- held: single-lineage changes between two snapshots, the cache then trusted -------------

def _op(top: Path, outside: Path, how: str) -> None:
    a, b = top / "a", top / "a" / "b"
    if how == "chmod empty":
        os.chmod(b / "empty", 0o600)
    elif how == "chown empty":
        os.chown(b / "empty", 1234, 5678)
    elif how == "utime old empty":
        os.utime(b / "empty", ns=(10**18, 10**18))
    elif how == "utime old folder":
        os.utime(b, ns=(10**18, 10**18))
    elif how == "chown folder":
        os.chown(b, 1234, 5678)
    elif how == "lchown symlink":
        os.lchown(a / "link", 1234, 5678)
    elif how == "utime symlink":
        os.utime(a / "link", ns=(10**18, 10**18), follow_symlinks=False)
    elif how == "symlink swap":
        os.symlink("b", a / "tmp")
        os.rename(a / "tmp", a / "link")
    elif how == "rename over":
        (a / "new").write_text("G")
        os.utime(a / "new", ns=(os.lstat(a / "g").st_mtime_ns,) * 2)
        os.rename(a / "new", a / "g")
    elif how == "hardlink outside, write":
        os.link(a / "g", outside / "g2")
        with open(outside / "g2", "r+b") as f:
            f.write(b"X")
    elif how == "hardlink outside, chmod":
        os.link(b / "empty", outside / "e2")
        os.chmod(outside / "e2", 0o600)
    elif how == "folder re-made":
        for p in (b / "f", b / "empty"):
            p.unlink()
        b.rmdir()
        b.mkdir()
        (b / "f").write_text("f")
        (b / "empty").write_bytes(b"")
    elif how == "folders swapped":
        os.rename(top / "a", top / "tmp")
        os.rename(top / "c", top / "a")
        os.rename(top / "tmp", top / "c")
    elif how == "mmap write":
        import mmap
        with open(top / "c" / "h", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[0:1] = b"X"
    elif how == "truncate same size":
        with open(a / "g", "r+b") as f:
            f.truncate(0)
            f.write(b"Z")
    elif how == "top renamed":
        pass  # done by the caller
    else:
        raise AssertionError(how)


HELD = ["chmod empty", "chown empty", "utime old empty", "utime old folder", "chown folder",
        "lchown symlink", "utime symlink", "symlink swap", "rename over",
        "hardlink outside, write", "hardlink outside, chmod", "folder re-made",
        "folders swapped", "mmap write", "truncate same size"]


@pytest.mark.parametrize("how", HELD)
def test_a_cached_snapshot_equals_a_fresh_walk_after(tmp_path: Path, store: PackStore,
                                                     how: str) -> None:
    top, outside = _mk(tmp_path / "t"), _mk(tmp_path / "out")
    _tree(top)
    time.sleep(SETTLE)
    first = _same(top, store, {})
    time.sleep(SETTLE)
    _op(top, outside, how)
    second = _same(top, store, first.cache)  # changed just now: nothing trusted
    time.sleep(SETTLE)
    third = _same(top, store, second.cache)
    _same(top, store, third.cache)


def test_a_moved_top_and_a_cp_a_copy_equal_a_fresh_walk(tmp_path: Path, store: PackStore) -> None:
    import shutil
    import subprocess
    top = _mk(tmp_path / "t")
    _tree(top)
    time.sleep(SETTLE)
    first = _same(top, store, {})
    time.sleep(SETTLE)
    moved = tmp_path / "moved"
    os.rename(top, moved)
    _same(moved, store, first.cache)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(moved), str(copy)], check=True)
    (copy / "a" / "b" / "empty").chmod(0o600)
    time.sleep(SETTLE)
    _same(copy, store, first.cache)
    shutil.rmtree(copy)


# -- found by the review, fixed -------------------------------------------------------------

def _live(tmp_path: Path, store: PackStore, change: str) -> None:
    """A live commit's pass: the change set is taken, then something changes before the
    pass's update() starts (a slow earlier subdot, a writer not frozen)."""
    top = _mk(tmp_path / "t")
    _tree(top)
    time.sleep(SETTLE)
    with ChangeWatcher() as watcher:
        watch = watcher.watcher("s", str(top))
        writer = store.writer()
        prev = scan.snapshot(top, store, writer, {}, watch=watch)
        writer.flush()
        time.sleep(SETTLE)
        (top / "a" / "b" / "f").write_text("F")  # what the pass is told about
        changes = watcher.take()
        assert changes is not None
        ch = changes["s"]
        if change == "rm":  # after take(): in no change set of this pass
            (top / "a" / "b" / "empty").unlink()
        elif change == "create empty":
            (top / "a" / "b" / "new").write_bytes(b"")
        elif change == "chmod empty":
            (top / "a" / "b" / "empty").chmod(0o600)
        time.sleep(SETTLE)  # e.g. the earlier subdot's reads
        res = scan.update(top, store, writer, prev, ch.names, ch.fresh, watch=watch)
        writer.flush()
    # The commit may miss that late change (it raced the pass); the next, plain commit may not.
    time.sleep(SETTLE)
    _same(top, store, res.cache)


@pytest.mark.parametrize("change", ["rm", "create empty", "chmod empty"])
def test_a_change_after_the_change_set_is_not_cached_by_the_pass(tmp_path: Path, store: PackStore,
                                                       change: str) -> None:
    _live(tmp_path, store, change)


def test_a_symlinked_top_is_judged_by_the_folder_it_leads_to(tmp_path: Path,
                                                             store: PackStore) -> None:
    real = _mk(tmp_path / "real")
    _tree(real)
    top = tmp_path / "top"
    top.symlink_to(real)
    time.sleep(SETTLE)
    first = _same(top, store, {})
    time.sleep(SETTLE)
    import shutil
    shutil.rmtree(real / "c")  # real's ctime changes, not the link's
    time.sleep(SETTLE)
    _same(top, store, first.cache)


# -- held: random app changes, live-commit passes (change set taken right before each pass),
# then plain commits with the resulting cache ------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402

from tests.unit.test_changes import _apply, ops  # noqa: E402


@pytest.mark.slow  # seconds of waiting for the cache to trust what it saw
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(first=ops("outside"), rounds=hst.lists(ops(), min_size=1, max_size=2), after=ops())
def test_live_passes_then_cached_commits_equal_fresh_walks(  # type: ignore[no-untyped-def]
        tmp_path: Path, store: PackStore, first, rounds, after) -> None:
    import shutil
    top, outside = tmp_path / "t", tmp_path / "outside"
    for p in (top, outside):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir()
    for op in first:
        _apply(top, outside, op)
    time.sleep(SETTLE)
    writer = store.writer()
    with ChangeWatcher() as watcher:
        watch = watcher.watcher("s", str(top))
        prev = scan.snapshot(top, store, writer, {}, watch=watch)
        writer.flush()
        for batch in rounds:
            for op in batch:
                _apply(top, outside, op)
            time.sleep(SETTLE)  # so that the pass's entries are trusted next time
            changes = watcher.take()
            assert changes is not None
            ch = changes.get("s")
            names = ch.names if ch else {}
            for rel in prev.linked:
                parent, _, name = rel.rpartition("/")
                names.setdefault(parent, set()).add(name)
            prev = scan.update(top, store, writer, prev, names, ch.fresh if ch else set(),
                               watch=watch)
            writer.flush()
    time.sleep(SETTLE)
    second = _same(top, store, prev.cache)
    for op in after:
        _apply(top, outside, op)
    time.sleep(SETTLE)
    _same(top, store, second.cache)


def test_a_file_removed_before_its_folder_is_watched_is_not_committed(
        tmp_path: Path, store: PackStore) -> None:
    """The pre-copy pass reuses a/b's cached tree on the (ctime, inode) its PARENT's listing
    saw; a/b's watch is only added later. A file removed in between is in neither the listing
    nor any event, yet in the reused tree: the live commit records it."""
    top = _mk(tmp_path / "t")
    _tree(top)
    time.sleep(SETTLE)
    first = _same(top, store, {})  # the last commit; its cache is the branch's
    time.sleep(SETTLE)
    writer = store.writer()
    with ChangeWatcher() as watcher:
        real = watcher.watcher("s", str(top))

        def watch(rel: str) -> None:
            if rel == "a/b":  # the app removes a file after a/ was listed, before a/b's watch
                b = top / "a" / "b"
                mtime = os.lstat(b).st_mtime_ns
                (b / "f").unlink()
                os.utime(b, ns=(mtime, mtime))  # (isolates this from the mtime race below)
            real(rel)

        prev = scan.snapshot(top, store, writer, first.cache, watch=watch)  # the pre-copy
        writer.flush()
        assert "f" not in {r[0] for r in prev.folders["a/b"]}  # the listing saw it gone...
        changes = watcher.take()  # ...and no event tells the freeze pass
        assert changes is not None
        ch = changes.get("s")
        res = scan.update(top, store, writer, prev, ch.names if ch else {},
                          ch.fresh if ch else set(), watch=real)
        writer.flush()
    assert res.root == scan.snapshot(top, store, None, {}).root


def test_a_symlink_loop_at_the_top_is_an_error(tmp_path: Path, store: PackStore) -> None:
    """_scan.c maps ELOOP to ENOTDIR even when following (the top): the listing is then [],
    and the snapshot records an empty folder where the old walk (os.scandir) raised ELOOP."""
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(OSError):
        scan.snapshot(tmp_path / "loop", store, None, {})


def test_a_folder_changed_before_its_watch_is_committed_as_it_is(tmp_path: Path,
                                                              store: PackStore) -> None:
    """Not new, no cache involved: a folder's row (its mtime) comes from its parent's listing;
    a change in the folder before its own watch sends no event, so the freeze pass keeps the
    parent's row and the live commit records the folder's old mtime."""
    top = _mk(tmp_path / "t")
    _tree(top)
    time.sleep(SETTLE)
    writer = store.writer()
    with ChangeWatcher() as watcher:
        real = watcher.watcher("s", str(top))

        def watch(rel: str) -> None:
            if rel == "a/b":
                (top / "a" / "b" / "f").unlink()
            real(rel)

        prev = scan.snapshot(top, store, writer, {}, watch=watch)
        changes = watcher.take()
        assert changes is not None
        ch = changes.get("s")
        res = scan.update(top, store, writer, prev, ch.names if ch else {},
                          ch.fresh if ch else set(), watch=real)
        writer.flush()
    assert res.root == scan.snapshot(top, store, None, {}).root


def test_trees_read_ahead_are_the_trees_and_stop_when_asked_or_at_their_limit(
        store: PackStore, tmp_path: Path) -> None:
    """A btrfs commit reads the head's trees while its snapshot is taken
    (``Reference.warm_trees``): what it read is what reading them later gives, it stops at its
    row limit, and once asked for what it has (``trees_read``) it reads no more."""
    top = _mk(tmp_path / "top")
    _tree(top)
    for i in range(30):
        (top / "c" / f"n{i}").write_text(str(i))
    got = _same(top, store, {})
    tree = got.root.tree
    whole = scan._folders_of(store, tree)
    assert whole is not None and set(whole) == {"", "a", "a/b", "c"}

    for i in range(50):  # folders alike share one tree: read once
        (top / "c" / f"empty{i}").mkdir()
    tree = _same(top, store, {}).root.tree
    whole = scan._folders_of(store, tree)
    assert whole is not None and len(whole) == 54
    reads: list[bytes] = []
    real_get = store.get
    store.get = lambda oid: (reads.append(oid), real_get(oid))[1]  # type: ignore[method-assign]
    ref = scan.Reference(top, tree)
    ref.warm_trees(store)
    _read_ahead(ref)
    assert len(reads) == len(set(reads)) == 5
    read = ref.trees_read()
    assert len(read) == 5
    reads.clear()
    assert scan._folders_of(store, tree, None, read) == whole and not reads
    assert scan._folders_of(store, tree, {"a"}, read) == {k: whole[k] for k in ("", "a")}
    del store.get

    short = scan.Reference(top, tree)
    short.warm_trees(store, limit=3)  # the top's 2 rows, then a's 3: no more after
    _read_ahead(short)
    assert [len(rows) for rows in short.trees_read().values()] == [2, 3]

    asked = scan.Reference(top, tree)
    asked.trees_read()  # before it starts: it reads nothing, and the caller reads its own
    asked.warm_trees(store)
    _read_ahead(asked)
    assert asked.trees_read() == {}
    asked.settle()
    late = scan.Reference(top, tree)
    late.warm_trees(store)
    late.wait()  # as before a freeze: it stops where it is
    assert late._tree_stop.is_set() and len(late.trees_read()) <= 5


def _read_ahead(ref: scan.Reference) -> None:
    """Wait for ``ref``'s trees read ahead without asking it to stop."""
    for job in ref._tree_job:
        job.result()
