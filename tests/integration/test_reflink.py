"""The reflink backend on a real XFS filesystem (``reflink=1``, a loop device): commits copy
the subdots as reflinked trees in the freeze and read only the blocks that changed; resets and
branches at kept states are reflinked copies. Content ids stay those of plain folders."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from dotmesh.fs import reflink
from tests.conftest import DM, capture
from tests.integration.test_btrfs import (
    KILLS,
    _commit,
    _kept,
    _paged_file,
    _rewrite_pages,
    _same_as_plain,
    killed_around_the_move_loses_nothing,
)

PAGE = 8192


@pytest.fixture
def xdm(xfs_mount: Path) -> DM:
    return DM(xfs_mount / uuid.uuid4().hex / "home")


def test_a_store_on_xfs_with_reflinks_uses_the_reflink_backend(xdm: DM) -> None:
    assert json.loads(xdm.ok("version", "--json"))["backend"] == "reflink"
    xdm.ok("init", "app")
    assert json.loads(xdm.ok("dot", "show", "--json"))["backend"] == "reflink"


@pytest.mark.slow
def test_commits_read_what_changed_and_match_plain_folders(xdm: DM, tmp_path: Path) -> None:
    xdm.ok("init", "app")
    db = xdm.path("app.db")
    _paged_file(db / "table", 2048)
    (db / "up").mkdir()
    for i in range(50):
        (db / "up" / f"f{i}").write_bytes(os.urandom(3000))
    os.symlink("up/f1", db / "link")
    time.sleep(0.2)  # past the racy window, or the next commit reads every file again
    first = _commit(xdm, "one")
    assert _kept(xdm.home) == {first["id"]}
    changed = _rewrite_pages(db / "table", every=50, start=3)
    (db / "up" / "f7").write_bytes(b"seven")
    time.sleep(0.2)  # past the racy window: a file changed just before is read again later
    second = _commit(xdm, "two")
    assert second["bytes_read"] == changed + 5  # the stat cache holds across copies
    assert _commit(xdm, "nothing")["bytes_read"] == 0
    _same_as_plain(xdm, db, str(second["id"]), tmp_path)


@pytest.mark.slow
def test_reset_and_branches_at_kept_states(xdm: DM) -> None:
    xdm.ok("init", "app")
    db = xdm.path("app.db")
    _paged_file(db / "table", 256)
    (db / "a.txt").write_text("one")
    time.sleep(0.2)  # past the racy window: a file changed just before is read again later
    _commit(xdm, "one")
    one = capture(db)
    _rewrite_pages(db / "table", every=3)
    (db / "a.txt").write_text("two")
    _commit(xdm, "two")
    two = capture(db)
    out = xdm.ok("reset", "--hard", "HEAD^")
    assert capture(db) == one and "saved" not in out
    assert json.loads(xdm.ok("dot", "show", "--json"))["state"] == "clean"
    assert _commit(xdm, "again")["bytes_read"] == 0  # the cache moved to the copy's files
    xdm.ok("checkout", "-b", "feature")
    assert capture(db) == one
    xdm.ok("checkout", "master")
    assert capture(db) == one
    xdm.ok("reset", "--hard", _second(xdm))
    assert capture(db) == two
    assert json.loads(xdm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
def test_a_reset_keeps_what_it_discards_as_a_reflinked_copy(xdm: DM) -> None:
    """As on btrfs: the discarded working state is kept unread (the working set itself,
    moved aside with its stat caches: no file is copied), and read only when asked for."""
    xdm.ok("init", "app")
    db = xdm.path("app.db")
    _paged_file(db / "table", 256)
    (db / "a.txt").write_text("one")
    time.sleep(0.2)  # past the racy window: a file changed just before is read again later
    _commit(xdm, "one")
    one = capture(db)
    _rewrite_pages(db / "table", every=9)
    (db / "b.txt").write_text("new")
    work = capture(db)
    table = os.stat(db / "table").st_ino
    out = xdm.ok("reset", "--hard", "HEAD")
    name = out.split("kept as ")[1].split()[0]
    assert capture(db) == one and name in _kept(xdm.home)
    moved = xdm.home / "dots" / "app" / "snaps" / name / "subdots" / "db" / "table"
    assert os.stat(moved).st_ino == table
    back = json.loads(xdm.ok("reset", "--hard", name, "--json"))
    assert capture(db) == work
    assert json.loads(xdm.ok("dot", "show", "--json"))["state"] == "clean"
    # the table is not read again (b.txt, written just before the reset, may be: too recent
    # for its stat to be trusted)
    assert _commit(xdm, "again")["bytes_read"] <= 3
    assert back["new"] in _kept(xdm.home)
    assert json.loads(xdm.ok("fsck", "--json"))["ok"]


@pytest.mark.parametrize(("at", "then"), KILLS)
def test_a_reset_killed_around_moving_the_discarded_set_loses_nothing(xdm: DM, at: str,
                                                                       then: str) -> None:
    killed_around_the_move_loses_nothing(xdm, at, then)


def _second(dm: DM) -> str:
    for line in dm.ok("reflog").splitlines():
        if "commit: two" in line:
            return line.split()[3]
    raise AssertionError("commit two is not in the reflog")


@pytest.mark.slow
def test_without_kept_states_a_reset_patches_a_reflinked_copy(xdm: DM) -> None:
    xdm.ok("init", "app")
    xdm.ok("config", "snapshots.keep-commits", "0")
    xdm.ok("config", "snapshots.keep-days", "0")
    db = xdm.path("app.db")
    _paged_file(db / "table", 64)
    (db / "a.txt").write_text("one")
    time.sleep(0.2)  # past the racy window: a file changed just before is read again later
    _commit(xdm, "one")
    one = capture(db)
    _rewrite_pages(db / "table", every=4)
    (db / "a.txt").write_text("two")
    (db / "b.txt").write_text("new")
    _commit(xdm, "two")
    assert _kept(xdm.home) == set()
    xdm.ok("reset", "--hard", "HEAD^")
    assert capture(db) == one
    assert json.loads(xdm.ok("dot", "show", "--json"))["state"] == "clean"
    assert _commit(xdm, "again")["bytes_read"] == 0
    xdm.ok("checkout", "-b", "other")
    assert capture(db) == one


def test_a_copy_made_before_the_freeze_is_brought_up_to_date_in_it(xfs_mount: Path) -> None:
    """The reflink backend copies the tree before the freeze and, in it, clones again only
    what changed since: the result is the tree as it is in the freeze, every kind of change
    included, and files left alone keep their earlier clone."""
    src, dst = xfs_mount / uuid.uuid4().hex, xfs_mount / uuid.uuid4().hex
    (src / "d" / "gone").mkdir(parents=True)
    (src / "d" / "gone" / "x").write_text("x")
    for name in ("same", "edited", "chmodded", "removed", "becomes-dir"):
        (src / name).write_text(name)
    os.symlink("same", src / "link")
    time.sleep(reflink.RACY_NS / 1e9 + 0.05)  # older than the copy by more than a tick
    started = time.time_ns()
    before, _ = reflink.copy_tree(src, dst)
    kept_clone = os.open(dst / "same", os.O_RDONLY)
    (src / "edited").write_text("edited, and longer")
    os.chmod(src / "chmodded", 0o600)
    (src / "removed").unlink()
    (src / "becomes-dir").unlink()
    (src / "becomes-dir").mkdir()
    (src / "becomes-dir" / "inner").write_text("inner")
    shutil.rmtree(src / "d" / "gone")
    (src / "new").write_bytes(os.urandom(10_000))
    (src / "link").unlink()
    os.symlink("edited", src / "link")
    try:
        stats = reflink.refresh_tree(src, dst, before, started)
        assert os.fstat(kept_clone).st_nlink == 1  # not cloned again
    finally:
        os.close(kept_clone)
    assert capture(dst) == capture(src)
    assert set(stats) == {b"same", b"edited", b"chmodded", b"new", b"becomes-dir/inner"}
    assert stats[b"edited"].st_size == len("edited, and longer")
    # A file written just before the copy may change again within the same clock tick
    # without its stat showing it: it is cloned again in the freeze, whatever its stat says.
    (src / "fresh").write_text("written just now")
    started = time.time_ns()
    dst2 = xfs_mount / uuid.uuid4().hex
    before, _ = reflink.copy_tree(src, dst2)
    fresh = os.open(dst2 / "fresh", os.O_RDONLY)
    same = os.open(dst2 / "same", os.O_RDONLY)
    try:
        reflink.refresh_tree(src, dst2, before, started)
        assert os.fstat(fresh).st_nlink == 0  # replaced by a new clone
        assert os.fstat(same).st_nlink == 1  # kept
    finally:
        os.close(fresh)
        os.close(same)
    assert capture(dst2) == capture(src)


@pytest.mark.parametrize("mapped_before", [False, True])
def test_a_big_file_changed_since_the_copy_is_cloned_again_only_where_it_changed(
        xfs_mount: Path, mapped_before: bool) -> None:
    """In the freeze a big file is not cloned whole again (a clone costs its whole extent
    map): only the ranges it no longer shares with its copy are. Every kind of change comes
    through: pages rewritten and not yet flushed, a hole punched, a file grown to an odd
    size and one shrunk, a file replaced by another (which may reuse its inode number: its
    blocks are all new, so all of it is cloned). The copy's extent maps may be made before
    the freeze (``mapped_before``), or in it."""
    src, dst = xfs_mount / uuid.uuid4().hex, xfs_mount / uuid.uuid4().hex
    src.mkdir()
    size = 4 * reflink.RANGED_MIN
    for name in ("pages", "grown", "shrunk", "holed", "replaced"):
        (src / name).write_bytes(os.urandom(size))
    time.sleep(reflink.RACY_NS / 1e9 + 0.05)
    started = time.time_ns()
    before, after = reflink.copy_tree(src, dst)
    maps = reflink.map_copies(dst, after) if mapped_before else None
    if maps is not None:
        assert set(maps) == {b"pages", b"grown", b"shrunk", b"holed", b"replaced"}
    held = {name: os.open(dst / name, os.O_RDONLY)
            for name in ("pages", "grown", "shrunk", "holed")}
    try:
        fd = os.open(src / "pages", os.O_WRONLY)
        for page in (0, 7, 8, 300, 511):  # first, neighbours, middle, last
            os.pwrite(fd, os.urandom(PAGE), page * PAGE)
        os.close(fd)
        with open(src / "grown", "ab") as f:
            f.write(os.urandom(3 * PAGE + 123))
        os.truncate(src / "shrunk", size // 3 + 77)
        fd = os.open(src / "holed", os.O_WRONLY)
        os.posix_fallocate(fd, 0, 1)  # a no-op: the punch below is what changes
        _punch(fd, 64 * PAGE, 16 * PAGE)
        os.close(fd)
        (src / "replaced").unlink()
        (src / "replaced").write_bytes(os.urandom(size))
        stats = reflink.refresh_tree(src, dst, before, started, maps)
        for name, fd in held.items():
            assert os.fstat(fd).st_nlink == 1, name  # the same copy, patched
    finally:
        for fd in held.values():
            os.close(fd)
    assert capture(dst) == capture(src)
    assert maps is None or not maps  # each map is used once: the copy changes
    assert stats[b"grown"].st_size == size + 3 * PAGE + 123
    with open(dst / "holed", "rb") as f:
        f.seek(64 * PAGE)
        assert f.read(16 * PAGE) == bytes(16 * PAGE)


def _punch(fd: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    punch_hole, keep_size = 0x02, 0x01
    if libc.fallocate(fd, punch_hole | keep_size, ctypes.c_longlong(offset),
                      ctypes.c_longlong(length)) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


def test_a_freeze_with_writers_maps_the_copy_first_and_catches_what_they_wrote(
        xdm: DM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit with writers to stop maps its copy's big files before stopping them, so the
    freeze maps only the originals; pages written between the copy and the freeze are in
    the frozen copy. Without writers to stop (a reset, a quiet commit) nothing is mapped."""
    from contextlib import contextmanager

    from dotmesh.store.repo import Repo
    from dotmesh.workdir import branches
    from dotmesh.workdir.backend import REFLINK

    xdm.ok("init", "app")
    db = xdm.path("app.db")
    _paged_file(db / "table", 512)  # 4 MiB
    (db / "small").write_text("small")
    time.sleep(reflink.RACY_NS / 1e9 + 0.05)
    mapped: list[int] = []
    real = reflink.map_copies
    monkeypatch.setattr(reflink, "map_copies",
                        lambda dest, stats: mapped.append(1) or real(dest, stats))

    @contextmanager
    def writers_write_then_stop(settle):  # what a freeze with a busy writer sees
        settle()
        with open(db / "table", "r+b") as f:
            for page in (3, 200, 511):
                f.seek(page * PAGE)
                f.write(os.urandom(PAGE))
        yield

    home = Repo(xdm.home)
    try:
        frozen = branches.freeze_set(home, "app", REFLINK, writers_write_then_stop)
        assert mapped == [1]
        assert capture(frozen.folder("db")) == capture(db)
        REFLINK.discard(frozen.staging)
        frozen = branches.freeze_set(home, "app", REFLINK, branches.writers_stopped)
        assert mapped == [1]
        assert capture(frozen.folder("db")) == capture(db)
        REFLINK.discard(frozen.staging)
    finally:
        home.close()


def test_a_commit_shares_unchanged_files_with_the_heads_kept_state_and_never_writes_them(
        xdm: DM) -> None:
    """A commit's copy links the files its head's kept state already holds unchanged (a
    link costs a third of a clone) and clones the others. Files changed between the copy and
    the freeze are replaced in the copy, never patched: the earlier state keeps its bytes."""
    from contextlib import contextmanager

    from dotmesh.store.repo import Repo
    from dotmesh.workdir import branches
    from dotmesh.workdir.backend import REFLINK

    xdm.ok("init", "app")
    db = xdm.path("app.db")
    _paged_file(db / "table", 512)  # 4 MiB: would be patched by ranges if it were not shared
    _paged_file(db / "big", 512)
    (db / "small").write_text("small")
    (db / "edited").write_text("one")
    (db / "d").mkdir()
    (db / "d" / "inner").write_text("inner")
    time.sleep(reflink.RACY_NS / 1e9 + 0.05)
    first = _commit(xdm, "one")["id"]
    state = xdm.home / "dots" / "app" / "snaps" / str(first) / "subdots" / "db"
    one = capture(state)
    (db / "edited").write_text("two")
    time.sleep(reflink.RACY_NS / 1e9 + 0.05)
    second = _commit(xdm, "two")["id"]
    copy = xdm.home / "dots" / "app" / "snaps" / str(second) / "subdots" / "db"
    for name in ("table", "big", "small", "d/inner"):
        assert os.stat(copy / name).st_ino == os.stat(state / name).st_ino, name
    assert os.stat(copy / "edited").st_ino != os.stat(state / "edited").st_ino
    assert capture(state) == one and capture(copy) == capture(db)

    @contextmanager
    def writers_write_then_stop(settle):  # what a freeze with a busy writer sees
        settle()
        with open(db / "table", "r+b") as f:
            f.seek(100 * PAGE)
            f.write(os.urandom(PAGE))
        (db / "small").write_text("changed in the freeze's window")
        yield

    two = capture(copy)
    home = Repo(xdm.home)
    try:
        frozen = branches.freeze_set(home, "app", REFLINK, writers_write_then_stop)
        assert capture(frozen.folder("db")) == capture(db)
        assert os.stat(frozen.folder("db") / "big").st_ino == os.stat(copy / "big").st_ino
        REFLINK.discard(frozen.staging)
    finally:
        home.close()
    assert capture(copy) == two and capture(state) == one  # the kept states are untouched
    xdm.ok("checkout", "-b", "back", str(first))
    assert capture(db) == one
    assert json.loads(xdm.ok("fsck", "--json"))["ok"]


def test_a_big_file_written_during_its_refresh_is_cloned_whole(
        xfs_mount: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranges cloned one by one are not one instant of a file: if something writes it while
    they are (a writer the freeze did not stop), the file is cloned whole instead."""
    src, dst = xfs_mount / uuid.uuid4().hex, xfs_mount / uuid.uuid4().hex
    src.mkdir()
    (src / "db").write_bytes(os.urandom(4 * reflink.RANGED_MIN))
    time.sleep(reflink.RACY_NS / 1e9 + 0.05)
    started = time.time_ns()
    before, after = reflink.copy_tree(src, dst)
    maps = reflink.map_copies(dst, after)  # so the refresh maps only the original
    held = os.open(dst / "db", os.O_RDONLY)
    with open(src / "db", "r+b") as f:
        f.seek(5 * PAGE)
        f.write(os.urandom(PAGE))
    real = reflink.btrfs.extents

    def mapped_then_written(fd: int) -> list[tuple[int, int, int, int]]:
        out = real(fd)
        monkeypatch.setattr(reflink.btrfs, "extents", real)
        with open(src / "db", "r+b") as f:  # after the map: not among its changed ranges
            f.seek(300 * PAGE)
            f.write(os.urandom(PAGE))
        return out

    monkeypatch.setattr(reflink.btrfs, "extents", mapped_then_written)
    try:
        reflink.refresh_tree(src, dst, before, started, maps)
        assert os.fstat(held).st_nlink == 0  # replaced by a whole clone
    finally:
        os.close(held)
    assert capture(dst) == capture(src)
