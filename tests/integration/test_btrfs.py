"""The btrfs backend on a real btrfs filesystem (a loop device): subdots are subvolumes,
commits are read-only snapshots read only where they changed, and resets and new branches at
kept states are writable snapshots. Content ids stay those of plain folders."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from dotmesh.fs import btrfs
from dotmesh.fs import trash as trash_mod
from dotmesh.store.repo import Repo
from tests.conftest import DM, DM_BIN, capture, kill_inside

PAGE = 8192


@pytest.fixture
def bdm(btrfs_mount: Path) -> DM:
    """A store on btrfs (so with the btrfs backend)."""
    return DM(btrfs_mount / uuid.uuid4().hex / "home")


def _paged_file(path: Path, pages: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(pages * PAGE))


def _rewrite_pages(path: Path, every: int, start: int = 0) -> int:
    """Rewrite one 8 KiB page in every ``every``; returns the bytes written."""
    pages = path.stat().st_size // PAGE
    n = 0
    with open(path, "r+b") as f:
        for p in range(start, pages, every):
            f.seek(p * PAGE)
            f.write(os.urandom(PAGE))
            n += PAGE
    return n


def _commit(dm: DM, message: str) -> dict[str, object]:
    out: dict[str, object] = json.loads(dm.ok("commit", "-m", message, "--json"))
    return out


def _kept(home: Path, dot: str = "app") -> set[str]:
    snaps = home / "dots" / dot / "snaps"
    return {p.name for p in snaps.iterdir()} if snaps.is_dir() else set()


def test_a_store_on_btrfs_uses_subvolumes_and_says_so(bdm: DM) -> None:
    assert json.loads(bdm.ok("version", "--json"))["backend"] == "btrfs"
    bdm.ok("init", "app")
    folder = bdm.path("app.db")
    assert btrfs.is_subvolume(folder.parent)  # the working set: one subvolume
    show = json.loads(bdm.ok("dot", "show", "--json"))
    assert show["backend"] == "btrfs" and show["kept_states"] == 0


@pytest.mark.slow
def test_plain_can_be_forced_and_btrfs_cannot_be_asked_for_off_btrfs(btrfs_mount: Path,
                                                                     tmp_path: Path) -> None:
    forced = DM(btrfs_mount / uuid.uuid4().hex / "home")
    forced.ok("init", "app", "--backend", "plain")
    assert not btrfs.is_subvolume(forced.path("app.db").parent)
    forced.ok("commit", "-m", "plain")
    assert not (forced.home / "dots" / "app" / "snaps").exists()
    other = DM(tmp_path / "home")
    bad = other("init", "app", "--backend", "btrfs")
    assert bad.returncode == 2 and "needs the dots' folders on btrfs" in bad.stderr
    assert bad.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_commit_reads_only_the_blocks_that_changed_and_ids_match_plain(
        bdm: DM, tmp_path: Path) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 4096)  # 32 MiB
    (db / "notes.txt").write_text("hello")
    time.sleep(0.2)  # past the racy window: a file changed just before is read again later
    first = _commit(bdm, "one")
    assert first["bytes_read"] == 4096 * PAGE + 5
    assert _kept(bdm.home) == {first["id"]}
    changed = _rewrite_pages(db / "table", every=100, start=7)
    second = _commit(bdm, "two")
    # Only the rewritten pages are read: the rest is shared with the kept snapshot of "one".
    assert second["bytes_read"] == changed
    assert _kept(bdm.home) == {first["id"], second["id"]}
    # The same folder committed as plain folders gives the same tree.
    _same_as_plain(bdm, db, str(second["id"]), tmp_path)


def _same_as_plain(dm: DM, db: Path, commit: str, tmp_path: Path) -> None:
    """The folder ``db`` committed in a plain store gives the trees ``commit`` has."""
    plain = DM(tmp_path / "plain")
    plain.ok("init", "app", "--backend", "plain")
    copy = plain.path("app.db")
    copy.rmdir()
    shutil.copytree(db, copy, symlinks=True, copy_function=shutil.copy2)
    shutil.copystat(db, copy)
    theirs = Repo(plain.home).commit(bytes.fromhex(str(_commit(plain, "same")["id"])))
    ours = Repo(dm.home).commit(bytes.fromhex(commit))
    assert ours.subdots == theirs.subdots


@pytest.mark.slow
def test_reset_swaps_in_the_kept_state_and_keeps_the_discarded_one(bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 512)
    (db / "a.txt").write_text("one")
    _commit(bdm, "one")
    before = capture(db)
    _rewrite_pages(db / "table", every=7)
    (db / "a.txt").write_text("two")
    _commit(bdm, "two")
    (db / "a.txt").write_text("not committed")
    discarding = capture(db)
    working_set = os.stat(db.parent).st_dev  # each subvolume has a device number of its own
    time.sleep(0.2)  # past the racy window: a file changed just before is read again later
    out = bdm.ok("reset", "--hard", "HEAD^")
    assert capture(db) == before
    assert btrfs.is_subvolume(db.parent)
    # What it discarded was kept, not read nor copied: the working set itself, moved aside,
    # named in the reflog, read on demand (and made read-only then, as kept states are).
    name = out.split("kept as ")[1].split()[0]
    assert name.startswith("discarded-") and name in _kept(bdm.home)
    moved = bdm.home / "dots" / "app" / "snaps" / name / "subdots"
    assert os.stat(moved).st_dev == working_set and os.stat(db.parent).st_dev != working_set
    row = json.loads(bdm.ok("reflog", "--json"))[0]
    assert row["kept_as"] == name and row["saved"] is None
    back = json.loads(bdm.ok("reset", "--hard", name[:14], "--json"))
    sealed = bdm.home / "dots" / "app" / "snaps" / back["new"] / "subdots"
    with pytest.raises(OSError):
        (sealed / "db" / "new-file").write_text("a kept state is never written")
    assert capture(db) == discarding
    assert (db / "a.txt").read_text() == "not committed"
    saved = json.loads(bdm.ok("reflog", "--json"))[1]["saved"]
    assert saved == back["new"] and saved in _kept(bdm.home) and name not in _kept(bdm.home)
    gone = bdm("reset", "--hard", name)  # read once: it is a commit now
    assert gone.returncode != 0 and "no discarded state" in gone.stderr
    # The stat cache came with the kept state: nothing to read, and a clean state.
    assert json.loads(bdm.ok("dot", "show", "--json"))["state"] == "clean"
    assert _commit(bdm, "again")["bytes_read"] == 0
    # The head a reset moved away from stays kept a while: going back to it is a swap too.
    two = json.loads(bdm.ok("log", "--json"))[0]["id"]
    bdm.ok("reset", "--hard", "HEAD^")
    assert two in _kept(bdm.home)


def test_a_reset_over_deleted_files_stores_them_and_keeps_the_set_as_that_commit(bdm: DM
                                                                              ) -> None:
    """A small file only deleted: the stat caches alone make the discarded state's commit,
    and the working set itself, moved aside, becomes that commit's kept state."""
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 64)
    for i in range(20):  # larger than b.txt: a reset first looks at the 16 largest files
        (db / f"{i}.bin").write_bytes(os.urandom(10_000))
    (db / "b.txt").write_text("gone soon")
    time.sleep(0.2)  # past the racy window: the caches vouch for every file
    _commit(bdm, "one")
    (db / "b.txt").unlink()
    time.sleep(0.2)
    without_b = capture(db)
    working_set = os.stat(db.parent).st_dev
    res = json.loads(bdm.ok("reset", "--hard", "HEAD", "--json"))
    assert res["saved"] is not None and res["kept_as"] is None
    assert (db / "b.txt").read_text() == "gone soon"
    state = bdm.home / "dots" / "app" / "snaps" / res["saved"] / "subdots"
    assert os.stat(state).st_dev == working_set
    assert res["saved"] in _kept(bdm.home)
    with pytest.raises(OSError):  # kept states are read-only, this one too
        (state / "db" / "a.txt").write_text("a late writer")
    bdm.ok("reset", "--hard", res["saved"])
    assert capture(db) == without_b
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
def test_a_new_branch_is_a_snapshot_sharing_every_block(bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 1024)
    _commit(bdm, "base")
    os.sync()  # btrfs counts space once its transaction commits
    used = shutil.disk_usage(db).used
    bdm.ok("checkout", "-b", "feature")
    os.sync()
    fd = os.open(db / "table", os.O_RDONLY)
    try:
        ext = btrfs.extents(fd)
    finally:
        os.close(fd)
    assert ext and all(flags & 0x2000 for _, _, _, flags in ext)  # FIEMAP_EXTENT_SHARED
    assert shutil.disk_usage(db).used - used < 1 << 20
    (db / "feature.txt").write_text("only here")
    _commit(bdm, "on feature")
    bdm.ok("checkout", "master")
    assert not (db / "feature.txt").exists()
    bdm.ok("checkout", "feature")
    assert (db / "feature.txt").read_text() == "only here"


def _fs_flags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, btrfs.FS_IOC_GETFLAGS, flags, True)
        return int.from_bytes(flags[:4], "little")
    finally:
        os.close(fd)


def test_packs_on_btrfs_keep_no_data_checksums(bdm: DM, tmp_path: Path) -> None:
    """A store's packs on btrfs are written in place without btrfs' data checksums, so that
    their direct writes stay direct (Linux 6.18 serves those to a checksummed file buffered,
    then flushes); every object is checked against its id when read or pushed instead
    (test_errors, test_remote)."""
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 600)
    _commit(bdm, "one")
    packs = sorted((bdm.home / "packs").glob("*.pack"))
    assert packs and all(_fs_flags(p) & btrfs.FS_NOCOW_FL for p in packs)
    bdm.ok("checkout", "-b", "again")  # read back from those packs
    # only an empty file is turned (btrfs says so), and other filesystems say no
    (db / "notes.txt").write_bytes(b"x")
    with open(db / "notes.txt", "r+b") as f:
        assert not btrfs.unchecksummed(f.fileno())
    if not btrfs.on_btrfs(tmp_path):
        with open(tmp_path / "plain", "wb") as f:
            assert not btrfs.unchecksummed(f.fileno())


def test_an_extent_map_longer_than_one_call_is_read_whole(btrfs_mount: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    path = btrfs_mount / uuid.uuid4().hex
    with open(path, "wb") as f:  # every other page written: one extent each, holes between
        for page in range(0, 40, 2):
            f.seek(page * 4096)
            f.write(os.urandom(4096))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = btrfs.extents(fd)
        monkeypatch.setattr(btrfs, "_BATCH", 3)
        paged = btrfs.extents(fd)
    finally:
        os.close(fd)
    assert len(whole) == 20 and paged == whole
    assert [e[0] for e in whole] == [p * 4096 for p in range(0, 40, 2)]


def _snapshot_pair(mount: Path) -> tuple[Path, Path, list[str]]:
    """Two read-only snapshots of a subvolume whose files have every kind of extent, with
    writes of every kind between them; the files' names."""
    sub = mount / uuid.uuid4().hex
    btrfs.create_subvolume(sub)
    names = ["paged", "sparse", "prealloc", "small", "grown", "cut"]
    _paged_file(sub / "paged", 64)
    with open(sub / "sparse", "wb") as f:  # holes between written runs
        for page in range(0, 64, 4):
            f.seek(page * PAGE)
            f.write(os.urandom(2 * PAGE))
    with open(sub / "prealloc", "wb") as f:  # allocated, never written: unwritten extents
        os.posix_fallocate(f.fileno(), 0, 32 * PAGE)
        f.write(os.urandom(PAGE))
    (sub / "small").write_bytes(b"inline")  # small enough to live in the metadata
    _paged_file(sub / "grown", 8)
    _paged_file(sub / "cut", 16)
    os.sync()
    old = mount / uuid.uuid4().hex
    btrfs.snapshot(sub, old, read_only=True)
    _rewrite_pages(sub / "paged", 5, 1)
    with open(sub / "sparse", "r+b") as f:
        f.seek(2 * PAGE)  # into a hole
        f.write(os.urandom(PAGE))
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(8 * PAGE), "--length",
                    str(PAGE), str(sub / "sparse")], check=True)  # a written page made a hole
    with open(sub / "prealloc", "r+b") as f:
        f.seek(10 * PAGE)
        f.write(os.urandom(PAGE))
    (sub / "small").write_bytes(b"in line")
    with open(sub / "grown", "ab") as f:
        f.write(os.urandom(3 * PAGE))
    os.truncate(sub / "cut", 5 * PAGE)
    os.sync()
    new = mount / uuid.uuid4().hex
    btrfs.snapshot(sub, new, read_only=True)
    return old, new, names


def _ranges_both_ways(old: Path, new: Path, names: list[str]
                      ) -> dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
    """Per file: the changed ranges by FIEMAP and by file_extents."""
    out = {}
    for name in names:
        a, b = os.open(old / name, os.O_RDONLY), os.open(new / name, os.O_RDONLY)
        try:
            size = os.fstat(b).st_size
            out[name] = (btrfs.changed_ranges(btrfs.extents(a), btrfs.extents(b), size),
                         btrfs.changed_ranges(btrfs.file_extents(a), btrfs.file_extents(b),
                                              size))
        finally:
            os.close(a)
            os.close(b)
    return out


def test_extents_read_from_the_tree_say_what_fiemap_says(btrfs_mount: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A read-only snapshot's extents come from its tree (cheaper than FIEMAP) and give the
    same changed ranges for every kind of extent and change; read in several calls too."""
    old, new, names = _snapshot_pair(btrfs_mount)
    searched: list[int] = []
    tree_extents = btrfs._tree_extents
    monkeypatch.setattr(btrfs, "_tree_extents",
                        lambda fd: searched.append(fd) or tree_extents(fd))
    both = _ranges_both_ways(old, new, names)
    assert len(searched) == 2 * len(names)
    for name, (by_fiemap, by_tree) in both.items():
        assert by_tree == by_fiemap, name
    assert both["paged"][0] and both["sparse"][0] and both["grown"][0]
    assert both["paged"][0][0] == (PAGE, 2 * PAGE)
    monkeypatch.setattr(btrfs, "_FIRST_SEARCH", 2 * btrfs._REGULAR_ITEM + 10)  # then doubled
    assert _ranges_both_ways(old, new, names) == both
    monkeypatch.setattr(btrfs, "_SEARCH_BUFFER", 2 * btrfs._REGULAR_ITEM + 10)  # not doubled
    assert _ranges_both_ways(old, new, names) == both


def test_a_subvolume_made_read_only_with_writes_in_memory_shows_them(
        btrfs_mount: Path) -> None:
    """Extent items reach the tree only once written out: the search flushes the file first
    (a snapshot does, but a subvolume can be made read-only with dirty pages)."""
    sub = btrfs_mount / uuid.uuid4().hex
    btrfs.create_subvolume(sub)
    _paged_file(sub / "f", 32)
    os.sync()
    old = btrfs_mount / uuid.uuid4().hex
    btrfs.snapshot(sub, old, read_only=True)
    with open(sub / "f", "r+b") as f:
        f.seek(8 * PAGE)
        f.write(os.urandom(PAGE))  # not flushed
    btrfs.make_read_only(sub)
    a, b = os.open(old / "f", os.O_RDONLY), os.open(sub / "f", os.O_RDONLY)
    try:
        assert btrfs.changed_ranges(btrfs.file_extents(a), btrfs.file_extents(b),
                                    32 * PAGE) == [(8 * PAGE, 9 * PAGE)]
    finally:
        os.close(a)
        os.close(b)


def test_writable_files_and_a_process_without_cap_sys_admin_use_fiemap(
        btrfs_mount: Path) -> None:
    old, new, names = _snapshot_pair(btrfs_mount)
    writable = btrfs_mount / uuid.uuid4().hex
    btrfs.snapshot(new, writable, read_only=False)
    script = ("import json, os, sys\n"
              "from dotmesh.fs import btrfs\n"
              "calls = []\n"
              "btrfs._tree_extents = lambda fd, real=btrfs._tree_extents: "
              "calls.append(fd) or real(fd)\n"
              "out = {}\n"
              "for name in sys.argv[3:]:\n"
              "    fds = [os.open(os.path.join(d, name), os.O_RDONLY) for d in sys.argv[1:3]]\n"
              "    out[name] = btrfs.changed_ranges(*map(btrfs.file_extents, fds),\n"
              "                                     os.fstat(fds[1]).st_size)\n"
              "print(json.dumps({'ranges': out, 'searched': len(calls)}))\n")
    drop = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
    expected = {n: [list(r) for r in fiemap] for n, (fiemap, _) in
                _ranges_both_ways(old, new, names).items()}
    for prefix, folders, searches in (([], [old, writable], len(names)),
                                      (drop, [old, new], 1)):
        p = subprocess.run([*prefix, sys.executable, "-c", script, *map(str, folders), *names],
                           capture_output=True, text=True, check=True)
        got = json.loads(p.stdout)
        # writable: only the old snapshot's maps are searched; no CAP_SYS_ADMIN: the first
        # search is refused, and none is tried after it
        assert got["searched"] == searches
        assert got["ranges"] == expected


def _discarded(home: Path) -> list[str]:
    return sorted(k for k in _kept(home) if k.startswith("discarded-"))


@pytest.mark.slow
def test_a_discarded_state_past_its_days_is_stored_and_fsck_notices_a_lost_one(
        bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    (db / "a.txt").write_text("one")
    first = _commit(bdm, "one")["id"]
    (db / "a.txt").write_text("changed")
    changed = capture(db)
    assert "kept as discarded-" in bdm.ok("reset", "--hard", "HEAD")
    [name] = _discarded(bdm.home)
    bdm.ok("config", "snapshots.keep-days", "0")  # its snapshot is due: stored, then pruned
    (db / "b.txt").write_text("two")
    _commit(bdm, "two")
    assert _discarded(bdm.home) == []
    rows = json.loads(bdm.ok("reflog", "--json"))
    saved = [r["saved"] for r in rows if r["action"] == "reset"][0]
    assert saved and rows[1]["kept_as"] is None
    bdm.ok("reset", "--hard", saved)
    assert capture(db) == changed
    assert json.loads(bdm.ok("log", "--json"))[1]["id"] == first  # its parent: the old head
    # A discarded state whose snapshot vanished is named by fsck; a repair forgets it.
    bdm.ok("config", "snapshots.keep-days", "7")
    (db / "c.txt").write_text("three")
    _commit(bdm, "three")  # a head with a kept state: resets to it keep what they discard
    (db / "a.txt").write_text("again")
    bdm.ok("reset", "--hard", "HEAD")
    [name] = _discarded(bdm.home)
    btrfs.remove_tree(bdm.home / "dots" / "app" / "snaps" / name)
    report = json.loads(bdm("fsck", "--json").stdout)
    assert not report["ok"] and any(name in p for p in report["problems"])
    bdm.ok("fsck", "--repair")
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]
    assert all(r["kept_as"] is None for r in json.loads(bdm.ok("reflog", "--json")))


@pytest.mark.slow
def test_gc_keeps_what_a_discarded_state_needs_and_reflog_expiry_lets_it_go(
        bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    (db / "a.txt").write_text("one")
    _commit(bdm, "one")
    (db / "a.txt").write_text("two")
    time.sleep(0.2)  # past the racy window: a file changed just before is read again later,
    # and a reset that must read what it discards keeps it as one more discarded state
    second = _commit(bdm, "two")["id"]
    bdm.ok("checkout", "-b", "side")
    bdm.ok("branch", "-D", "master")  # "two" is now named only by the reflog
    (db / "b.txt").write_text("not committed")
    discarding = capture(db)
    out = bdm.ok("reset", "--hard", "HEAD")
    name = out.split("kept as ")[1].split()[0]
    bdm.ok("gc")
    bdm.ok("reset", "--hard", name)  # read after the gc: whatever it needs is still there
    assert capture(db) == discarding
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]
    (db / "c.txt").write_text("again")
    bdm.ok("reset", "--hard", second)
    [name] = _discarded(bdm.home)
    bdm.ok("reflog", "expire", "--days", "0")
    bdm.ok("gc")
    assert all(r["kept_as"] is None for r in json.loads(bdm.ok("reflog", "--json")))
    bdm.ok("commit", "-m", "three")  # the next change removes the snapshot no row names
    assert _discarded(bdm.home) == []
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


def _one_commit(dm: DM) -> tuple[Path, str, dict[str, tuple[object, ...]]]:
    """A dot "app" with a paged file and a text file, committed: its subdot's folder, the
    commit's id and what the folder held."""
    dm.ok("init", "app")
    db = dm.path("app.db")
    _paged_file(db / "table", 256)
    (db / "a.txt").write_text("one")
    first = str(_commit(dm, "one")["id"])
    return db, first, capture(db)


@pytest.mark.slow
def test_kill_9_in_a_reset_that_keeps_the_discarded_state_loses_nothing(bdm: DM) -> None:
    """Killed before its journal names the discarded state, a reset leaves the working state
    as it was (and the next command removes the unnamed folder); after, it is finished and
    the folder brings the discarded state back."""
    db, first, one = _one_commit(bdm)
    snaps = bdm.home / "dots" / "app" / "snaps"
    for i in range(4):
        (db / "a.txt").write_text(f"work {i}")
        _rewrite_pages(db / "table", every=3 + i)
        work = capture(db)
        kill_inside(lambda: bdm.popen("reset", "--hard", str(first)),
                    lambda: any(p.name.startswith("discarded-") for p in snaps.iterdir()),
                    20, "a reset keeping the discarded state")
        bdm.ok("commit", "-m", "after the kill")  # finishes or forgets what the kill left
        now = capture(db)
        assert now in (one, work)
        kept_as = [r["kept_as"] for r in json.loads(bdm.ok("reflog", "--json"))
                   if r["kept_as"]]
        assert set(_discarded(bdm.home)) == set(kept_as)
        if now == one:  # the reset happened: what it discarded comes back
            bdm.ok("reset", "--hard", kept_as[0])
            assert capture(db) == work
        bdm.ok("reset", "--hard", str(first))
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


# ``dm ARGS`` that dies (exit 137, no cleanup, as under kill -9) when about to move the working
# set into a discarded state ("before") or right after it ("after"), before the new set is in
_DIES_AT_THE_MOVE = """
import os, sys
real, at = os.rename, sys.argv[1]
def rename(src, dst, *a, **k):
    if os.path.basename(dst) == "subdots" and "/discarded-" in os.fspath(dst):
        if at == "after":
            real(src, dst, *a, **k)
        os._exit(137)
    return real(src, dst, *a, **k)
os.rename = rename
from dotmesh.cli.main import run
sys.exit(run(sys.argv[2:]))
"""


def _dies_at_the_move(dm: DM, at: str, *args: str) -> None:
    p = subprocess.run([sys.executable, "-c", _DIES_AT_THE_MOVE, at, *args], env=dm.env,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == 137, p.stderr


def killed_around_the_move_loses_nothing(dm: DM, at: str, then: str) -> None:
    """A reset killed just before or just after it moves the working set into the discarded
    state its journal names: lockless commands say so and touch nothing, fsck --repair sees
    no lost state and drops nothing, the next command (``then``: a commit, another reset,
    or any command after a crash of the machine that lost the state's new folder) finishes
    the reset, and the discarded state comes back whole, with no empty state saved."""
    db, first, one = _one_commit(dm)
    _rewrite_pages(db / "table", every=3)
    (db / "a.txt").write_text("work")
    work = capture(db)
    _dies_at_the_move(dm, at, "reset", "--hard", first)
    shown = json.loads(dm.ok("dot", "show", "--json"))
    assert shown["state"] == "unfinished reset"
    ws = dm.home / "dots" / "app" / "subdots"
    assert ws.exists() == (at == "before")  # nothing made an empty working set meanwhile
    report = json.loads(dm.ok("fsck", "--repair", "--json"))
    assert not [p for p in report["problems"] if "discarded" in p], report
    if then == "crash":  # the folder made before the journal's row, lost with the machine
        [folder] = (dm.home / "dots" / "app" / "snaps").glob("discarded-*")
        shutil.rmtree(folder)
        then = "commit"
    if then == "commit":
        dm.ok("commit", "-m", "after the kill")  # finishes the reset
    else:
        dm.ok("reset", "--hard", first)  # finishes it, then resets from its result
    assert capture(db) == one
    rows = json.loads(dm.ok("reflog", "--json"))
    assert not [r for r in rows if r["saved"]]  # nothing else was worth saving
    [name] = [r["kept_as"] for r in rows if r["kept_as"]]
    dm.ok("reset", "--hard", name)
    assert capture(db) == work
    assert json.loads(dm.ok("fsck", "--json"))["ok"]


KILLS = [("before", "commit"), ("after", "commit"), ("before", "reset"), ("after", "reset"),
         ("before", "crash")]


@pytest.mark.parametrize(("at", "then"), KILLS)
def test_a_reset_killed_around_moving_the_discarded_set_loses_nothing(bdm: DM, at: str,
                                                                       then: str) -> None:
    killed_around_the_move_loses_nothing(bdm, at, then)


_CANNOT_FINISH = """
import os, sys
from dotmesh.errors import Corrupt
from dotmesh.ops import checkout
from dotmesh.workdir import kept
def fails(*a, **k):
    raise Corrupt("the target cannot be read")
checkout.finish_restore = fails
if sys.argv[1] == "die":  # as under kill -9, once the set is back
    real = kept.undo_discarding
    kept.undo_discarding = lambda *a, **k: real(*a, **k) and os._exit(137)
from dotmesh.cli.main import run
sys.exit(run(sys.argv[2:]))
"""


@pytest.mark.parametrize("die", [False, True])
def test_a_moved_reset_that_cannot_be_finished_is_undone_by_the_next_reset(bdm: DM,
                                                                           die: bool) -> None:
    """Killed after moving the working set into its discarded state, a reset whose target
    then cannot be restored: the next reset puts the set back and replaces it, storing the
    working state as any reset does, rather than failing for ever (killed once the set is
    back, it leaves the working state to the next command)."""
    db, first, one = _one_commit(bdm)
    (db / "a.txt").write_text("two")
    second = str(_commit(bdm, "two")["id"])
    (db / "a.txt").write_text("work")
    work = capture(db)
    _dies_at_the_move(bdm, "after", "reset", "--hard", second)
    p = subprocess.run([sys.executable, "-c", _CANNOT_FINISH, "die" if die else "live",
                        "reset", "--hard", first],
                       env=bdm.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if die:
        assert p.returncode == 137, p.stderr
        bdm.ok("commit", "-m", "after the kill")
        assert capture(db) == work and json.loads(bdm.ok("fsck", "--json"))["ok"]
        return
    assert p.returncode == 0, p.stderr
    assert capture(db) == one
    rows = json.loads(bdm.ok("reflog", "--json"))
    assert rows[0]["action"] == "reset" and "(interrupted)" in rows[1]["action"]
    assert [r["kept_as"] for r in rows if r["kept_as"]] == [rows[0]["kept_as"]]
    bdm.ok("reset", "--hard", rows[0]["kept_as"])  # the state the undone reset had moved
    assert capture(db) == work
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


def test_a_discarded_state_comes_back_whole_without_its_caches_or_stat_cache_rows(
        bdm: DM) -> None:
    """What a discarded state holds does not depend on its stat caches: a subdot added since
    the last commit (no cache row), a damaged cache row, a caches file a crash left empty
    each cost reads, never a subdot."""
    db, _, _ = _one_commit(bdm)
    (bdm.path("app.logs") / "today.log").write_text("logged")
    extra = bdm.path("app.extra")  # no commit since: no cache row
    (extra / "notes.txt").write_text("notes")
    (db / "a.txt").write_text("work")
    _commit(bdm, "two")
    (extra / "notes.txt").write_text("more notes")
    (bdm.path("app.new") / "n.txt").write_text("new subdot")  # no cache row at all
    (db / "a.txt").write_text("more work")
    with sqlite3.connect(bdm.home / "meta.db") as c:  # one row damaged on disk
        (blob,) = c.execute("SELECT data FROM statcache WHERE subdot='logs'").fetchone()
        c.execute("UPDATE statcache SET data=? WHERE subdot='logs'",
                  (blob[:-1] + bytes([blob[-1] ^ 1]),))
    for crash in (False, True):
        if crash:  # a change again, to the state the first round brought back
            (db / "a.txt").write_text("yet more work")
        work = {s: capture(bdm.path(f"app.{s}")) for s in ("db", "logs", "extra", "new")}
        name = json.loads(bdm.ok("reset", "--hard", "HEAD", "--json"))["kept_as"]
        caches = bdm.home / "dots" / "app" / "snaps" / name / ".dm-caches"
        if crash:
            caches.write_bytes(b"")
        else:  # a name damaged on disk; a folder that is no subdot in the set's root
            caches.write_bytes(caches.read_bytes().replace(b"logs", b"lo/s"))
            (caches.parent / "subdots" / "scratch").mkdir()
        bdm.ok("reset", "--hard", name)
        assert {s: capture(bdm.path(f"app.{s}")) for s in work} == work
        assert "scratch" not in json.loads(bdm.ok("dot", "show", "--json"))["subdots"]
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


def test_a_reset_killed_between_its_renames_whose_target_is_unreadable_is_replaced(
        bdm: DM) -> None:
    """No set was moved aside (a kill between the swap's two renames left none), and the
    journal's restore cannot be finished: the next reset replaces it, as before."""
    db, first, one = _one_commit(bdm)
    with sqlite3.connect(bdm.home / "meta.db") as c:  # what such a kill leaves
        c.execute("INSERT INTO restores VALUES ('app', 'reset', 'master', ?, ?, NULL, 'reset',"
                  " 'reset --hard', 0)", (bytes.fromhex(first), bytes.fromhex(first)))
    shutil.rmtree(db.parent)
    p = subprocess.run([sys.executable, "-c", _CANNOT_FINISH, "live", "reset", "--hard", first],
                       env=bdm.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert capture(db) == one
    assert "(interrupted)" in json.loads(bdm.ok("reflog", "--json"))[1]["action"]


def test_fsck_names_again_a_discarded_state_no_reflog_entry_names(bdm: DM) -> None:
    db, _, _ = _one_commit(bdm)
    (db / "a.txt").write_text("work")
    work = capture(db)
    name = json.loads(bdm.ok("reset", "--hard", "HEAD", "--json"))["kept_as"]
    with sqlite3.connect(bdm.home / "meta.db") as c:  # its link lost
        c.execute("UPDATE discarded SET seq=NULL")
    report = json.loads(bdm("fsck", "--json").stdout)
    assert [p for p in report["problems"] if name in p and "no reflog entry" in p]
    bdm.ok("fsck", "--repair")
    assert [r for r in json.loads(bdm.ok("reflog", "--json")) if r["kept_as"] == name]
    bdm.ok("reset", "--hard", name)
    assert capture(db) == work
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
def test_kill_9_in_checkout_b_leaves_the_branch_whole_or_absent(bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 256)
    (db / "a.txt").write_text("committed")
    _commit(bdm, "one")
    committed = capture(db)
    parked = bdm.home / "dots" / "app" / "branches"
    scratch = bdm.home / "dots" / "app" / "tmp"

    def busy() -> bool:
        try:
            return any(d.is_dir() and any(d.iterdir()) for d in (parked, scratch))
        except FileNotFoundError:  # removed between the two looks: busy, and about to end
            return True

    for i in range(4):
        (db / "a.txt").write_text(f"uncommitted {i}")
        work = capture(db)
        kill_inside(lambda n=i: bdm.popen("checkout", "-b", f"f{n}"), busy, 20,
                    "a checkout -b")
        bdm.ok("list")  # any command finishes (or undoes) what the kill left
        branches = {b["name"]: b for b in json.loads(bdm.ok("branch", "--json"))}
        current = [n for n, b in branches.items() if b["current"]][0]
        if current == "master":
            assert capture(db) == work
        else:  # the new branch exists whole: its folders are the head's state
            assert current == f"f{i}" and capture(db) == committed
            bdm.ok("checkout", "master")
            assert capture(db) == work
        if f"f{i}" in branches:
            bdm.ok("checkout", f"f{i}")
            assert capture(db) == committed
            bdm.ok("checkout", "master")
        bdm.ok("reset", "--hard", "HEAD")
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
def test_kill_9_while_kept_states_are_pruned_leaves_only_whole_ones(bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 256)
    bdm.ok("config", "snapshots.keep-commits", "1")
    _commit(bdm, "base")
    snaps = bdm.home / "dots" / "app" / "snaps"

    def states() -> list[Path]:
        return [p for p in snaps.iterdir() if not p.name.startswith((".", "discarded-"))]

    states_seen: list[tuple[str, dict[str, tuple[object, ...]]]] = []
    for i in range(4):
        _rewrite_pages(db / "table", every=4 + i)
        want = capture(db)
        # two states at once: the new one is kept and the old one not yet removed
        kill_inside(lambda n=i: bdm.popen("commit", "-m", f"c{n}"),
                    lambda: len(states()) >= 2, 20, "pruning after a commit")
        bdm.ok("commit", "-m", f"after kill {i}")
        states_seen.append((json.loads(bdm.ok("log", "--json"))[0]["id"], want))
        # the next command's prune finished the job: one whole state, the head's
        assert [p.name for p in states()] == [states_seen[-1][0]]
        assert (states()[0] / ".dm-caches").is_file()
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]
    for commit, want in states_seen:
        bdm.ok("reset", "--hard", commit)
        assert capture(db) == want


@pytest.mark.slow
def test_kept_states_are_pruned_to_what_is_configured(bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    bdm.ok("config", "snapshots.keep-commits", "2")
    ids = []
    for i in range(4):
        (db / "f").write_text(str(i))
        ids.append(_commit(bdm, f"c{i}")["id"])
    assert _kept(bdm.home) == set(ids[-2:])
    bdm.ok("config", "snapshots.keep-commits", "0")
    (db / "f").write_text("last")
    _commit(bdm, "last")
    assert _kept(bdm.home) == set()


@pytest.mark.slow
def test_deleting_a_dot_removes_its_read_only_snapshots(bdm: DM) -> None:
    bdm.ok("init", "app")
    (bdm.path("app.db") / "f").write_text("x")
    _commit(bdm, "one")
    bdm.ok("dot", "delete", "-f", "app")
    assert not (bdm.home / "dots" / "app").exists()


@pytest.mark.slow
def test_a_live_commit_freezes_only_for_the_snapshots(bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 8192)
    _commit(bdm, "base")
    writer = subprocess.Popen(
        [sys.executable, "-c", (
            "import os, random\n"
            "fd = os.open('table', os.O_WRONLY)\n"
            "while True:\n"
            "    os.pwrite(fd, os.urandom(8192), random.randrange(8192) * 8192)\n")],
        cwd=db, stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        c = Repo(bdm.home).commit(bytes.fromhex(str(_commit(bdm, "live")["id"])))
    finally:
        writer.kill()
        writer.wait()
    assert str(writer.pid) in c.metadata["dm.writers"]
    assert float(c.metadata["dm.freeze_ms"]) >= 0
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
def test_kill_9_in_a_commit_leaves_old_or_new_and_no_stray_snapshot(bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 2048)
    first = _commit(bdm, "one")["id"]
    snaps = bdm.home / "dots" / "app" / "snaps"
    for attempt in range(3):
        _rewrite_pages(db / "table", every=3, start=attempt)
        kill_inside(lambda: bdm.popen("commit", "-m", "killed"),
                    lambda: any(p.name.startswith(".new-") for p in snaps.iterdir()),
                    20, "a btrfs commit")
    head = json.loads(bdm.ok("dot", "show", "--json"))["head"]
    repo = Repo(bdm.home)
    assert head == first or repo.commit(bytes.fromhex(head)).message == "killed"
    repo.close()
    bdm.ok("commit", "-m", "after")  # the next command clears what the kill left
    assert not [p for p in (bdm.home / "dots" / "app" / "snaps").iterdir()
                if p.name.startswith(".new-")]
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
def test_a_pool_in_a_file_gives_a_plain_disk_the_btrfs_backend(tmp_path: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="dm-pool-", dir="/var/tmp")) / "home"
    dm = DM(home)
    try:
        bad = dm("pool", "create", "--size", "lots")
        assert bad.returncode == 2 and "bad size" in bad.stderr
        dm.ok("pool", "create", "--size", "1G")
        assert os.path.ismount(home / "dots")
        assert json.loads(dm.ok("version", "--json"))["backend"] == "btrfs"
        dm.ok("init", "app")
        db = dm.path("app.db")
        assert btrfs.is_subvolume(db.parent)
        (db / "f").write_text("kept")
        _commit(dm, "one")
        again = dm("pool", "create", "--size", "1G")
        assert again.returncode == 5 and "has a pool already" in again.stderr
        subprocess.run(["umount", str(home / "dots")], check=True)  # as a reboot leaves it
        assert "one" in dm.ok("log")  # any command mounts it again
        assert (db / "f").read_text() == "kept"
        grown = json.loads(dm.ok("pool", "grow", "--size", "2G", "--json"))
        assert grown["size"] == 2 << 30 and grown["free"] > 1 << 30
        shrink = dm("pool", "grow", "--size", "1G")
        assert shrink.returncode == 2 and "only grows" in shrink.stderr
    finally:
        subprocess.run(["umount", "-l", str(home / "dots")], capture_output=True)
        shutil.rmtree(home.parent, ignore_errors=True)


@pytest.mark.slow
def test_kill_9_in_a_reset_to_a_kept_state_leaves_old_or_new(bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 256)
    (db / "a.txt").write_text("one")
    first = _commit(bdm, "one")["id"]
    one = capture(db)
    (db / "a.txt").write_text("two")
    _rewrite_pages(db / "table", every=5)
    second = _commit(bdm, "two")["id"]
    two = capture(db)
    scratch = bdm.home / "dots" / "app" / "tmp"
    for target in (first, second, first):
        def reset(t: object = target) -> subprocess.Popen[str]:
            return bdm.popen("reset", "--hard", str(t))

        kill_inside(reset, lambda: scratch.is_dir() and any(scratch.iterdir()), 20,
                    "a reset at a kept state")
        bdm.ok("commit", "-m", "after the kill")  # finishes (or drops) what the kill left
        assert capture(db) in (one, two)  # one whole state, never a mix
        assert json.loads(bdm.ok("dot", "show", "--json"))["state"] == "clean"
    for commit, want in ((first, one), (second, two)):
        bdm.ok("reset", "--hard", str(commit))
        assert capture(db) == want
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
def test_without_kept_states_restores_go_through_the_store(bdm: DM) -> None:
    """Resets and branches at commits that have no kept state: a reset patches a writable
    snapshot of the folder and swaps it in, a new branch is built in a new subvolume."""
    bdm.ok("init", "app")
    bdm.ok("config", "snapshots.keep-commits", "0")
    bdm.ok("config", "snapshots.keep-days", "0")
    db = bdm.path("app.db")
    _paged_file(db / "table", 64)
    (db / "sub").mkdir()
    (db / "sub" / "a.txt").write_text("one")
    _commit(bdm, "one")
    one = capture(db)
    _rewrite_pages(db / "table", every=3)
    (db / "sub" / "a.txt").write_text("two")
    (db / "b.txt").write_text("new")
    _commit(bdm, "two")
    two = capture(db)
    assert _kept(bdm.home) == set()
    bdm.ok("reset", "--hard", "HEAD^")
    assert capture(db) == one and btrfs.is_subvolume(db.parent)
    assert json.loads(bdm.ok("dot", "show", "--json"))["state"] == "clean"
    assert not list(db.rglob(".dm-restore*"))
    bdm.ok("checkout", "-b", "other")
    assert capture(db) == one and btrfs.is_subvolume(db.parent)
    bdm.ok("checkout", "master")
    bdm.ok("reset", "--hard", _reflog_id(bdm, "commit: two"))
    assert capture(db) == two


def _reflog_id(dm: DM, action: str) -> str:
    """The commit id of the reflog line that says ``action``."""
    for line in dm.ok("reflog").splitlines():
        if action in line:
            return line.split()[3]
    raise AssertionError(f"{action!r} is not in the reflog")


@pytest.mark.slow
def test_states_pushed_from_btrfs_clone_onto_plain_and_back(btrfs_mount: Path,
                                                             tmp_path: Path) -> None:
    from tests.integration.remote_env import Hub

    hub = Hub(["--data", str(tmp_path / "hubdata")], tmp_path)
    key = hub.user("alice")
    hub.start()
    try:
        ours = DM(btrfs_mount / uuid.uuid4().hex / "home")
        plain = DM(tmp_path / "plain")
        for dm in (ours, plain):
            hub.join(dm, "alice", key)
        ours.ok("init", "app")
        db = ours.path("app.db")
        _paged_file(db / "table", 128)
        (db / "a.txt").write_text("from btrfs")
        _commit(ours, "on btrfs")
        ours.ok("push", "hub", "app")
        plain.ok("clone", "hub", "alice/app")
        assert capture(plain.path("app.db")) == capture(db)
        (plain.path("app.db") / "a.txt").write_text("from ext4")
        _commit(plain, "on ext4")
        plain.ok("push")
        other = DM(btrfs_mount / uuid.uuid4().hex / "home")
        hub.join(other, "alice", key)
        other.ok("clone", "hub", "alice/app")
        odb = other.path("app.db")
        assert btrfs.is_subvolume(odb.parent) and capture(odb) == capture(plain.path("app.db"))
        _rewrite_pages(odb / "table", every=9)
        assert _commit(other, "after a clone")["bytes_read"] > 0
        ours.ok("pull")
        assert (db / "a.txt").read_text() == "from ext4"
    finally:
        hub.stop()


@pytest.mark.slow
def test_a_working_set_of_an_older_layout_is_copied_by_reflinks(bdm: DM) -> None:
    """A working set that is a plain folder with data (made by an older dm, or by hand): a
    commit copies each subdot by reflinks into its kept state, and the stat cache works."""
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    btrfs.remove_tree(db.parent)
    db.mkdir(parents=True)
    _paged_file(db / "table", 64)
    (db / "a.txt").write_text("by hand")
    time.sleep(0.2)  # past the racy window: a file changed just before is read again later
    first = _commit(bdm, "one")
    assert _kept(bdm.home) == {first["id"]}
    state = bdm.home / "dots" / "app" / "snaps" / str(first["id"]) / "subdots" / "db"
    assert (state / "a.txt").read_text() == "by hand"
    assert _commit(bdm, "again")["bytes_read"] == 0
    (db / "a.txt").write_text("changed")
    bdm.ok("reset", "--hard", "HEAD")
    assert (db / "a.txt").read_text() == "by hand"
    bdm.ok("checkout", "-b", "other")
    assert (db / "a.txt").read_text() == "by hand"


@pytest.mark.slow
def test_docker_volumes_on_btrfs_commit_live_and_restore_into_restarted_containers(
        btrfs_mount: Path) -> None:
    """A container writing to two dm volumes on the btrfs backend: commits are consistent
    across both, and a reset swaps snapshots in under the same mount paths: the container,
    stopped and started again by dm, sees the restored state."""
    from tests.integration.docker_env import IMAGE, docker_world

    load = ("trap 'exit 0' TERM; i=0; while true; do i=$((i+1)); "
            "echo $i > /a/n.tmp && mv /a/n.tmp /a/n; echo $i >> /b/log; done")
    with docker_world(btrfs_mount / uuid.uuid4().hex / "home") as (dm, engine, _):
        engine.run("run", "-d", "--name", "loader", "--network", "none",
                   "--volume-driver", "dm", "-v", "load.a:/a", "-v", "load.b:/b", IMAGE,
                   "sh", "-c", load)
        dm.ok("switch", "load")
        a, b = dm.path("load.a"), dm.path("load.b")
        assert btrfs.is_subvolume(a.parent) and a.parent == b.parent
        time.sleep(0.5)
        ids = [str(_commit(dm, f"load {i}")["id"]) for i in range(5)]
        for oid in ids:
            c = Repo(dm.home).commit(bytes.fromhex(oid))
            assert "loader" in c.metadata["dm.writers"]
        dm.ok("reset", "--hard", ids[0], "--stop-writers")
        running = engine.run("inspect", "-f", "{{.State.Running}}", "loader").stdout.strip()
        assert running == "true"  # started again by dm
        (a / "marker").write_text("seen")  # in the folder swapped in: the container sees it
        assert engine.run("exec", "loader", "cat", "/a/marker").stdout == "seen"
        engine.run("rm", "-f", "loader")
        for oid in ids:
            dm.ok("reset", "--hard", oid)
            n = int((a / "n").read_text())
            last = int((b / "log").read_text().split()[-1])
            assert last in (n, n - 1), (oid, n, last)


@pytest.mark.slow
def test_fsck_reads_kept_states_and_a_repair_drops_a_damaged_one(bdm: DM) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    (db / "a.txt").write_text("one")
    first = str(_commit(bdm, "one")["id"])
    (db / "a.txt").write_text("two")
    _commit(bdm, "two")
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]
    state = bdm.home / "dots" / "app" / "snaps" / first / "subdots"
    subprocess.run(["btrfs", "property", "set", "-ts", str(state), "ro", "false"], check=True)
    (state / "db" / "a.txt").write_text("bit rot")
    bad = bdm("fsck", "--json")
    assert bad.returncode == 7 and f"kept state {first[:12]}" in bad.stdout + bad.stderr
    bdm.ok("fsck", "--repair")
    assert first not in _kept(bdm.home)
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]
    bdm.ok("reset", "--hard", first)  # from the store now
    assert (db / "a.txt").read_text() == "one"


@pytest.mark.slow
def test_without_cap_sys_admin_kept_states_are_still_removed(bdm: DM) -> None:
    """An unprivileged dm (here: root without CAP_SYS_ADMIN) may not destroy subvolumes by
    ioctl; pruning, resets and dot delete empty them and rmdir them instead."""
    drop = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]

    def run(*args: str) -> str:
        p = subprocess.run([*drop, DM_BIN, *args], env=bdm.env, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert p.returncode == 0, p.stderr
        return p.stdout

    run("init", "app")
    db = Path(run("path", "app.db").strip())
    for i in range(5):
        (db / "a").write_text(str(i))
        run("commit", "-m", f"c{i}")
    assert len(_kept(bdm.home)) == 3
    run("reset", "--hard", "HEAD^")
    assert (db / "a").read_text() == "3"
    run("checkout", "-b", "x")
    assert json.loads(run("dot", "show", "--json"))["state"] == "clean"
    run("dot", "delete", "-f", "app")
    assert not (bdm.home / "dots" / "app").exists()


@pytest.mark.slow
def test_strays_in_snaps_are_not_followed_or_trusted(bdm: DM, tmp_path: Path) -> None:
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    (db / "a").write_text("1")
    _commit(bdm, "one")
    snaps = bdm.home / "dots" / "app" / "snaps"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / ".dm-caches").write_text("not dm's")
    (victim / "subdots").mkdir()
    os.symlink(victim, snaps / ("ab" * 32))
    (snaps / ("cd" * 32)).write_text("a stray file")
    for i in range(4):
        (db / "a").write_text(str(i))
        _commit(bdm, f"c{i}")
    bdm.ok("reset", "--hard", "HEAD^")
    assert (victim / ".dm-caches").read_text() == "not dm's"
    assert (snaps / ("cd" * 32)).read_text() == "a stray file"
    assert json.loads(bdm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
def test_after_a_reset_to_an_older_state_a_commit_still_reads_only_what_changed(
        bdm: DM) -> None:
    """The older state's block fingerprints were replaced by a newer version's; its block
    ids and the extent maps are all that skipping needs."""
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    _paged_file(db / "table", 2048)
    _commit(bdm, "one")
    _rewrite_pages(db / "table", every=10)
    _commit(bdm, "two")
    bdm.ok("reset", "--hard", "HEAD^")
    changed = _rewrite_pages(db / "table", every=97, start=5)
    assert _commit(bdm, "three")["bytes_read"] == changed


def _trash_emptied(home: Path, dot: str = "app", timeout: float = 60) -> None:
    trash = home / "dots" / dot / "trash"
    deadline = time.monotonic() + timeout
    while trash.is_dir() and any(p.name != trash_mod.LOCK for p in trash.iterdir()):
        assert time.monotonic() < deadline, f"still in the trash: {list(trash.iterdir())}"
        time.sleep(0.05)


@pytest.mark.slow
def test_replaced_folders_go_in_the_background_and_a_killed_reaper_is_replaced(
        bdm: DM) -> None:
    """A reset to a kept state and the pruning of kept states do not wait for btrfs to remove
    subvolumes: those are renamed into the dot's trash, which a detached process empties."""
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    bdm.ok("config", "snapshots.keep-commits", "2")
    for i in range(4):
        (db / "f").write_text(str(i))
        _commit(bdm, f"c{i}")  # the third and fourth prune a kept state each
    bdm.ok("reset", "--hard", "HEAD^")  # replaces the working set
    assert (db / "f").read_text() == "2"
    _trash_emptied(bdm.home)
    # What a killed reaper left: the next command that recovers the dot starts another.
    bdm.ok("config", "snapshots.keep-commits", "10")  # (so the commit below prunes nothing)
    trash = bdm.home / "dots" / "app" / "trash"
    btrfs.create_subvolume(trash / "left-by-a-killed-reaper")
    (trash / "left-by-a-killed-reaper" / "data").write_bytes(b"x" * 100_000)
    btrfs.snapshot(trash / "left-by-a-killed-reaper", trash / "read-only", read_only=True)
    (db / "f").write_text("next")
    _commit(bdm, "next")
    _trash_emptied(bdm.home)
    # A dot is deleted only once no reaper works inside it.
    lock = os.open(trash / trash_mod.LOCK, os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    deleting = bdm.popen("dot", "delete", "-f", "app")
    time.sleep(1)
    assert deleting.poll() is None and (bdm.home / "dots" / "app").is_dir()
    os.close(lock)
    _, err = deleting.communicate(timeout=60)
    assert deleting.returncode == 0, err
    assert not (bdm.home / "dots" / "app").exists()


@pytest.mark.parametrize("at_close", [True, False], ids=["one command", "long-lived"])
def test_a_reset_starts_its_reaper_once_it_is_over(btrfs_mount: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   at_close: bool) -> None:
    """A reaper removing subvolumes commits btrfs transactions, which a reset's last fsyncs
    would wait for: it starts once the reset is over (its lock released), or, for dm's one
    command per process, once the store is closed (after the close's checkpoint). (The
    working state is the head's, so the set the reset replaces goes to the trash.)"""
    from dotmesh.ops import checkout as checkout_ops
    from dotmesh.ops import commit as commit_ops
    from dotmesh.ops import dots

    repo = Repo(btrfs_mount / uuid.uuid4().hex / "home")
    repo.reap_at_close = at_close
    dots.init(repo, "app")
    db = Path(dots.path(repo, "app.db"))
    commit_ops.commit(repo, "app", "one", freeze=False)
    (db / "f").write_text("two")
    time.sleep(0.15)  # the stat cache then vouches for it: the reset reads nothing
    second = commit_ops.commit(repo, "app", "two", freeze=False).id
    started: list[tuple[bool, bool]] = []  # per reaper: the store closed, the reset done

    def state() -> tuple[bool, bool]:
        try:
            moved = [r for r in repo.conn.execute("SELECT action FROM reflog")
                     if r[0] == "reset"]
        except sqlite3.ProgrammingError:
            return True, True
        return False, bool(moved)

    monkeypatch.setattr(trash_mod, "start_reaper", lambda t: started.append(state()))
    res = checkout_ops.reset_hard(repo, "app", "HEAD")
    assert (res.new, res.saved, res.kept_as) == (second, None, None)
    assert (db / "f").read_text() == "two"
    trash = repo.root / "dots" / "app" / "trash"
    assert any(p.name != trash_mod.LOCK for p in trash.iterdir())
    assert started == ([] if at_close else [(False, True)])
    repo.close()
    assert started == [(True, True)] if at_close else [(False, True)]
    assert trash_mod.empty(trash)
    _trash_emptied(repo.root)


def test_the_disk_is_settled_before_a_freeze_only_when_there_are_writers_to_stop(
        btrfs_mount: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flush rounds shorten a freeze; with nothing to stop, the snapshot writes out what is
    dirty itself (one btrfs transaction, not two)."""
    from dotmesh.ops import commit as commit_ops
    from dotmesh.ops import dots
    from dotmesh.workdir import branches

    settled: list[Path] = []
    quiet = branches._quiet_disk
    monkeypatch.setattr(branches, "_quiet_disk", lambda p: settled.append(p) or quiet(p))
    repo = Repo(btrfs_mount / uuid.uuid4().hex / "home")
    try:
        dots.init(repo, "app")
        db = Path(dots.path(repo, "app.db"))
        (db / "f").write_bytes(os.urandom(100_000))
        commit_ops.commit(repo, "app", "alone")
        assert settled == []
        holder = subprocess.Popen([sys.executable, "-c", "import time; f = open('f', 'a'); "
                                   "print(flush=True); time.sleep(60)"], cwd=db,
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            assert holder.stdout is not None and holder.stdout.readline()  # it has f open
            (db / "g").write_text("more")
            got = commit_ops.commit(repo, "app", "with a writer")
        finally:
            holder.kill()
            holder.wait()
        assert str(holder.pid) in got.commit.metadata["dm.writers"]
        assert len(settled) == 1
    finally:
        repo.close()


def _patch_pair(root: Path, pages: int, changed: list[int], punched: tuple[int, ...] = (),
                compressed: bool = False
                ) -> tuple[Path, Path, bytes, list[tuple[int, int]], list[btrfs.Extent]]:
    """A working subvolume holding a paged file "db" (``compressed``: by btrfs, of pages
    that compress), a read-only snapshot of it (the reference), ``changed`` pages rewritten
    and ``punched`` ones made holes, and a second snapshot (the commit's). Returns the
    working file, the commit's copy, the reference's file list, the runs a commit reads
    and the commit's copy's extents."""
    from dotmesh.model.objects import FileList
    from dotmesh.store import chunker

    live = root / "live"
    btrfs.create_subvolume(live)
    if compressed:
        (live / "db").touch()
        subprocess.run(["chattr", "+c", str(live / "db")], check=True)
        with open(live / "db", "r+b") as f:
            f.write(b"".join(b"%08d" % p * (PAGE // 8) for p in range(pages)))
    else:
        _paged_file(live / "db", pages)
    os.sync()
    btrfs.snapshot(live, root / "ref", read_only=True)
    with open(live / "db", "r+b") as f:
        for p in changed:
            f.seek(p * PAGE)
            f.write(b"%08x" % p * (PAGE // 8) if compressed else os.urandom(PAGE))
        for p in punched:
            _punch(f.fileno(), p)
    btrfs.snapshot(live, root / "now", read_only=True)
    fds = [os.open(root / name / "db", os.O_RDONLY) for name in ("ref", "now")]
    try:
        before = chunker.chunk_paged(fds[0], 0, pages * PAGE, bytearray(chunker.SEGMENT),
                                     frozenset(), set)
        old, new = btrfs.file_extents(fds[0]), btrfs.file_extents(fds[1])
    finally:
        for fd in fds:
            os.close(fd)
    base = FileList(tuple(zip(before.ids, before.lengths, strict=True))).encode()
    runs = btrfs.blocks_touching(btrfs.changed_ranges(old, new, pages * PAGE), PAGE, pages)
    return live / "db", root / "now" / "db", base, runs, new


def _punch(fd: int, page: int) -> None:
    """Make a page of the file a hole (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    assert libc.fallocate(fd, 3, page * PAGE, PAGE) == 0, os.strerror(ctypes.get_errno())


def test_changed_pages_come_from_the_working_file_only_while_its_extents_vouch_for_them(
        btrfs_mount: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit on btrfs reads a snapshot's changed pages from the working file it was taken
    of (in memory, where the snapshot's are on disk) only if, after the read, every byte read
    still maps where it does in the snapshot: a write since, flushed or not, inside the
    pages read refuses the read; a write elsewhere or a replaced file are told apart."""
    from dotmesh.store import chunker
    from dotmesh.workdir import snapshot as scan

    sink = scan._Sink(cast(Any, None), None)  # nothing is stored: ids only

    def expected(now: Path, base: bytes, runs: list[tuple[int, int]]) -> bytes:
        fd = os.open(now, os.O_RDONLY)
        try:
            got = chunker.patch_paged(fd, now.stat().st_size, base, None, runs,
                                      bytearray(chunker.SEGMENT), sink.missing, sink.pack)
        finally:
            os.close(fd)
        assert got is not None
        return got.filelist

    def case(name: str, after: Callable[[Path], None] | None, punched: tuple[int, ...] = (),
             compressed: bool = False, racing: Callable[[Path], None] | None = None
             ) -> chunker.Patched | None:
        root = btrfs_mount / uuid.uuid4().hex / name
        root.parent.mkdir()
        root.mkdir()
        live, now, base, runs, extents = _patch_pair(root, 64, [3, 10, 11, 40], punched,
                                                     compressed)
        if not compressed:  # (compressed extents are 128 KiB: they all count as changed)
            assert runs == [(3, 4), (10, 12), (40, 41)]
        if after is not None:
            after(live)
        if racing is not None:  # a write between the read and the look at the extents
            flushed = btrfs.flushed_extents
            monkeypatch.setattr(btrfs, "flushed_extents",
                                lambda fd: racing(live) or flushed(fd))
        got = scan._patch_live(str(live), cast(Any, os.lstat(now)), base, None, runs,
                               extents, sink)
        assert got is None or got.filelist == expected(now, base, runs), name
        return got

    def write(page: int, flush: bool) -> Callable[[Path], None]:
        def run(live: Path) -> None:
            with open(live, "r+b") as f:
                f.seek(page * PAGE)
                f.write(os.urandom(PAGE))
                if flush:
                    f.flush()
                    os.fsync(f.fileno())
        return run

    def punch(page: int) -> Callable[[Path], None]:
        def run(live: Path) -> None:
            with open(live, "r+b") as f:
                _punch(f.fileno(), page)
        return run

    def replace(live: Path) -> None:
        data = live.read_bytes()
        live.unlink()
        live.write_bytes(data)

    assert case("untouched", None) is not None
    assert case("written elsewhere", write(20, flush=True)) is not None
    assert case("written inside, in memory", write(10, flush=False)) is None
    assert case("written inside, on disk", write(40, flush=True)) is None
    assert case("replaced", replace) is None
    # a hole has no address to hold on to: written, read, and punched again, it would look
    # as it did; and compressed extents are not told apart by address
    assert case("hole written, read and punched again", write(11, flush=False), punched=(11,),
                racing=punch(11)) is None
    assert case("compressed, untouched", None, compressed=True) is None
    assert case("compressed, written inside", write(10, flush=True), compressed=True) is None


def test_a_commit_reads_its_reference_ahead_once_per_changed_paged_file(
        btrfs_mount: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Before the freeze, the reference's side of each changed paged file (its list, its
    extents) is read on the I/O pool, and the comparisons start as soon as the snapshot
    exists: each changed file is compared once, an unchanged one never, and the commit is
    what plain folders give."""
    from dotmesh import api
    from dotmesh.workdir.backend import BtrfsFolders
    from dotmesh.workdir.snapshot import Reference

    monkeypatch.setenv("DM_AUTHOR", "test")
    based: list[bytes] = []
    compared: list[bytes] = []
    steps: list[object] = []  # in the command's own thread, in order
    base, changes = Reference.base, Reference.changes
    warm, comparing, freeze = Reference.warm, Reference.comparing, BtrfsFolders.freeze_copy
    monkeypatch.setattr(Reference, "base",
                        lambda self, store, rel: based.append(rel) or base(self, store, rel))
    monkeypatch.setattr(Reference, "changes", lambda self, store, rel, path: compared.append(
        rel) or changes(self, store, rel, path))

    def warming(self: Reference, store: object, rels: Any) -> None:
        rels = list(rels)
        steps.extend(("warm", r) for r in rels)
        warm(self, store, rels)  # type: ignore[arg-type]

    def looking(self: Reference, store: object, rel: bytes, path: str) -> object:
        steps.append(("started ahead" if (rel, path) in self._ahead else "late", rel))
        return comparing(self, store, rel, path)  # type: ignore[arg-type]

    monkeypatch.setattr(Reference, "warm", warming)
    monkeypatch.setattr(Reference, "comparing", looking)
    monkeypatch.setattr(BtrfsFolders, "freeze_copy",
                        lambda *a, **k: steps.append("freeze") or freeze(*a, **k))
    home = btrfs_mount / uuid.uuid4().hex / "home"
    with api.Repo.open(home) as repo:
        dot = repo.init("app")
        db, cache = dot.path("db"), dot.path("cache")
        _paged_file(db / "hot", 256)  # 2 MiB: from WARM_MIN
        _paged_file(db / "idle", 256)
        _paged_file(cache / "warm", 512)
        time.sleep(0.2)
        dot.commit("one")
        assert not based and not compared  # nothing to compare with yet
        steps.clear()
        changed = _rewrite_pages(db / "hot", every=50) + _rewrite_pages(cache / "warm",
                                                                        every=30, start=3)
        second = dot.commit("two")
    assert sorted(based) == [b"hot", b"warm"]
    assert sorted(compared) == [b"hot", b"warm"]
    # the reference's side is asked for before the freeze, subdot by subdot (the same
    # order each time), and every comparison the read needs was started ahead
    assert steps == [("warm", b"warm"), ("warm", b"hot"), "freeze",
                     ("started ahead", b"warm"), ("started ahead", b"hot")]
    assert second.bytes_read == changed
    for sub, folder in (("db", db), ("cache", cache)):
        plain = DM(tmp_path / sub)
        plain.ok("init", "app", "--backend", "plain")
        copy = plain.path("app")
        copy.rmdir()
        shutil.copytree(folder, copy, copy_function=shutil.copy2)
        shutil.copystat(folder, copy)
        theirs = Repo(plain.home).commit(bytes.fromhex(str(_commit(plain, "same")["id"])))
        assert second.commit.subdots[sub].tree == theirs.subdots["__default__"].tree, sub


def test_with_a_writer_running_changed_pages_come_from_the_snapshot(
        btrfs_mount: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The working files' pages are read only when no writer is known to run: a writer's
    pages would mostly be refused, and the flush would be paid by its file."""
    from dotmesh import api
    from dotmesh.workdir import snapshot as scan

    monkeypatch.setenv("DM_AUTHOR", "test")
    tried: list[str] = []
    patch_live = scan._patch_live
    monkeypatch.setattr(scan, "_patch_live",
                        lambda live, *a: tried.append(live) or patch_live(live, *a))
    home = btrfs_mount / uuid.uuid4().hex / "home"
    with api.Repo.open(home) as repo:
        dot = repo.init("app")
        db = dot.path()
        _paged_file(db / "table", 512)
        time.sleep(0.2)
        dot.commit("one")
        changed = _rewrite_pages(db / "table", every=40)
        writer = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                                   f"f = open({str(db / 'table')!r}, 'r+b')\n"
                                   "print('ready', flush=True)\ntime.sleep(60)\n"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
            assert dot.commit("two, live").bytes_read == changed
        finally:
            writer.kill()
            writer.wait()
        assert not tried
        changed = _rewrite_pages(db / "table", every=40, start=3)
        assert dot.commit("three, quiet").bytes_read == changed
        assert tried == [str(db / "table")]


def _walked_tree(home: Path, commit: str, sub: str = "db") -> object:
    """The tree a whole walk (no stat cache, nothing stored) gives of ``commit``'s kept
    state of ``sub``: what its commit must hold."""
    from dotmesh.workdir import snapshot as scan

    state = home / "dots" / "app" / "snaps" / commit / "subdots" / sub
    return scan.snapshot(state, Repo(home).packs, None, {}).root


def _root_of(home: Path, commit: str, sub: str = "db") -> object:
    return Repo(home).commit(bytes.fromhex(commit)).subdots[sub]


def _keep_mtime(path: Path, change: Callable[[], None]) -> None:
    st = path.stat()
    change()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_folder(db: Path) -> None:
    shutil.rmtree(db / "sub" / "deeper")
    (db / "moved").mkdir()
    (db / "moved" / "inside").write_text("a folder moved in under an old name")
    os.rename(db / "moved", db / "sub" / "deeper")


def _mmap_write(path: Path) -> None:
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[5 * PAGE:5 * PAGE + 4] = b"mmap"


def _hole(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        _punch(fd, 3)
    finally:
        os.close(fd)


# Each change, as a commit after it must see it; none may pass for no change.
_CHANGES: list[tuple[str, Callable[[Path], None]]] = [
    # never stored, but listed: the commits after this one must not take it for a change
    ("a FIFO beside", lambda db: os.mkfifo(db / "many" / "fifo")),
    ("same size and mtime", lambda db: _keep_mtime(
        db / "many" / "f7", lambda: (db / "many" / "f7").write_text("changed! 7"[:10]))),
    ("file mode", lambda db: os.chmod(db / "many" / "f8", 0o600)),
    ("folder mode", lambda db: os.chmod(db / "sub", 0o700)),
    ("owner of a symlink", lambda db: os.lchown(db / "link", 1234, 1234)),
    ("renamed in its folder", lambda db: os.rename(db / "many" / "f9", db / "many" / "g9")),
    ("moved to another folder", lambda db: os.rename(db / "many" / "f10", db / "sub" / "f10")),
    ("folder renamed", lambda db: os.rename(db / "sub" / "deep", db / "sub" / "deeper")),
    ("folder replaced by another", _replace_folder),
    ("folder replaced by a file", lambda db: (shutil.rmtree(db / "sub" / "deeper"),
                                              (db / "sub" / "deeper").write_text("file"))),
    ("removed", lambda db: os.unlink(db / "many" / "f11")),
    ("new tree", lambda db: (os.makedirs(db / "new" / "er"),
                             (db / "new" / "er" / "x").write_text("x"))),
    ("symlink retargeted", lambda db: (os.unlink(db / "link"),
                                       os.symlink("many/f12", db / "link"))),
    ("written through a second name", lambda db: (db / "hard2").write_text("both names")),
    ("truncated", lambda db: os.truncate(db / "many" / "f13", 1)),
    ("hole punched", lambda db: _hole(db / "table")),
    ("grown", lambda db: (db / "table").open("ab").write(os.urandom(PAGE))),
    ("emptied and a new empty file", lambda db: (os.truncate(db / "many" / "f14", 0),
                                                 (db / "many" / "empty").touch())),
    ("a new name for an unchanged file", lambda db: os.link(db / "many" / "f15",
                                                            db / "sub" / "f15")),
    ("written through a mapping", lambda db: _mmap_write(db / "table")),
    # listed without following it (a loop, or a way out of the snapshot)
    ("folder replaced by a symlink to itself", lambda db: (shutil.rmtree(db / "loop"),
                                                           os.symlink("loop", db / "loop"))),
    ("folder replaced by a symlink out", lambda db: (shutil.rmtree(db / "out"),
                                                     os.symlink("/proc/self", db / "out"))),
]


@pytest.mark.slow
def test_a_commit_looks_only_at_what_btrfs_says_changed_and_gets_a_walks_trees(
        bdm: DM) -> None:
    """After the first commit, a commit asks btrfs which inodes were written since the head's
    kept state and looks only at their names (``entries_looked_at``), not at the 400 files
    of the folder; each change of every kind still gives the trees a whole walk gives."""
    bdm.ok("init", "app")
    db = bdm.path("app.db")
    (db / "many").mkdir()
    for i in range(400):
        (db / "many" / f"f{i}").write_text(f"file {i:5d}")
    os.makedirs(db / "sub" / "deep")
    (db / "sub" / "deep" / "x").write_text("deep")
    for name in ("loop", "out"):
        (db / name).mkdir()
        (db / name / "x").write_text(name)
    os.symlink("many/f1", db / "link")
    (db / "hard1").write_text("one inode")
    os.link(db / "hard1", db / "hard2")
    _paged_file(db / "table", 64)
    time.sleep(0.2)
    first = _commit(bdm, "one")
    assert cast(int, first["entries_looked_at"]) > 400
    same = _commit(bdm, "nothing changed")
    assert cast(int, same["entries_looked_at"]) < 10
    assert _root_of(bdm.home, str(same["id"])) == _root_of(bdm.home, str(first["id"]))
    for what, change in _CHANGES:
        before = _root_of(bdm.home, str(_commit(bdm, f"before {what}")["id"]))
        change(db)
        got = _commit(bdm, what)
        assert cast(int, got["entries_looked_at"]) < 20, what
        root = _root_of(bdm.home, str(got["id"]))
        assert root != before, what
        assert root == _walked_tree(bdm.home, str(got["id"])), what
    # A working set made from a kept state (a reset, a new branch, a checkout) is of the same
    # line as that state.
    for step in (("reset", "--hard", "HEAD^"), ("checkout", "-b", "other"),
                 ("checkout", "master")):
        bdm.ok(*step)
        (db / "many" / "f20").write_text(f"after {step}")
        got = _commit(bdm, f"after {step}")
        assert cast(int, got["entries_looked_at"]) < 20, step
        assert _root_of(bdm.home, str(got["id"])) == _walked_tree(bdm.home, str(got["id"]))


def test_changed_inodes_are_told_only_for_snapshots_of_one_line(btrfs_mount: Path) -> None:
    """What a search by transaction number says holds only between a snapshot and an older,
    unchanged one of the same subvolume (or of the one it was made from)."""
    top = btrfs_mount / uuid.uuid4().hex
    live, other = top / "live", top / "other"
    btrfs.create_subvolume(live)
    btrfs.create_subvolume(other)
    for i in range(3):
        (live / f"f{i}").write_text("x")
    btrfs.snapshot(live, top / "a", read_only=True)
    (live / "f1").write_text("y")
    (live / "new").write_text("z")
    btrfs.snapshot(live, top / "b", read_only=True)
    changed = btrfs.changed_inodes(top / "b", top / "a", live)
    assert changed is not None
    inodes = changed.inodes
    named = {os.lstat(top / "b" / n).st_ino for n in ("f1", "new")}
    assert named <= inodes and os.lstat(top / "b" / "f0").st_ino not in inodes
    assert btrfs.FIRST_SUBVOLUME_INODE in changed.folders  # the folder gained a name
    # the wrong way round, of another subvolume, or against a writable one: not told
    assert btrfs.changed_inodes(top / "a", top / "b", live) is None
    btrfs.snapshot(other, top / "c", read_only=True)
    assert btrfs.changed_inodes(top / "c", top / "a", other) is None
    assert btrfs.changed_inodes(top / "b", top / "a", other) is None
    btrfs.snapshot(live, top / "w", read_only=False)
    assert btrfs.changed_inodes(top / "b", top / "w", live) is None
    # a kept state changed after it was made no longer vouches for anything
    btrfs._set_read_only(top / "a", False)
    (top / "a" / "f2").write_text("changed in the reference")
    btrfs.make_read_only(top / "a")
    assert btrfs.changed_inodes(top / "b", top / "a", live) is None
    # a working set made from a kept state, and its snapshot
    btrfs.snapshot(top / "b", top / "clone", read_only=False)
    (top / "clone" / "f0").write_text("w")
    btrfs.snapshot(top / "clone", top / "d", read_only=True)
    got = btrfs.changed_inodes(top / "d", top / "b", top / "clone")
    assert got is not None and os.lstat(top / "d" / "f0").st_ino in got.inodes
    assert os.lstat(top / "d" / "f1").st_ino not in got.inodes


def test_the_folders_holding_changed_inodes_are_found_without_listing_any(
        btrfs_mount: Path) -> None:
    """Only the folders that hold a changed inode, or are one, and those above them, are
    named: by each inode's names in the tree, under the folder asked about."""
    top = btrfs_mount / uuid.uuid4().hex
    live = top / "live"
    btrfs.create_subvolume(live)
    for sub in ("db", "other"):
        for d in ("a/b", "c", "quiet/deeper"):
            os.makedirs(live / sub / d)
            (live / sub / d / "f").write_text("x")
    (live / "db" / "a" / "b" / "twin").write_text("two names")
    (live / "db" / "many").mkdir()
    (live / "db" / "many" / "0").write_text("a file of 300 names: more than 4 KiB of them")
    for i in range(1, 300):
        os.link(live / "db" / "many" / "0", live / "db" / "many" / f"{i:040d}")
    btrfs.snapshot(live, top / "k", read_only=True)
    (live / "db" / "a" / "b" / "f").write_text("changed")
    os.link(live / "db" / "a" / "b" / "twin", live / "db" / "c" / "twin")  # a name more
    (live / "db" / "new" / "er").mkdir(parents=True)
    (live / "other" / "c" / "f").write_text("another subdot's")
    (live / "db" / "many" / "0").write_text("changed through one of its 300 names")
    btrfs.snapshot(live, top / "s", read_only=True)
    changed = btrfs.changed_inodes(top / "s", top / "k", live)
    assert changed is not None
    assert changed.where(top / "s" / "db") == {"", "a", "a/b", "c", "new", "new/er", "many"}
    assert changed.where(top / "s") == {"", "db", "db/a", "db/a/b", "db/c", "db/new",
                                        "db/new/er", "db/many", "other", "other/c"}
    many = top / "s" / "db" / "quiet"  # a folder with nothing changed beneath it
    assert changed.where(many) == set()
