"""Interrupted and failed operations finish or undo, and say so: kill -9 inside a reset's
restore, a damaged object met by a restore, special files where files go, a full disk, a
clone killed while it builds its folders."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dotmesh.meta import index
from tests.conftest import DM, DM_BIN, capture, kill_inside

FILES = 1500


def _journaled(dm: DM) -> bool:
    """Is a restore journaled (the reset is past its checks and changing folders)?"""
    try:
        with sqlite3.connect(f"file:{dm.home / 'meta.db'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM restores").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def _state(d: Path, rng: random.Random, version: int) -> None:
    """Many files (so a restore takes a while), and a paged file written in place."""
    for i in range(FILES):
        (d / f"f{i:04d}").write_bytes(f"v{version} ".encode() * rng.randint(1, 300))
    with open(d / "table", "r+b" if (d / "table").exists() else "wb") as f:
        for _ in range(200):
            f.seek(rng.randrange(256) * 8192)
            f.write(rng.randbytes(8192))
        f.truncate(256 * 8192)


@pytest.mark.slow
def test_a_killed_reset_is_finished_by_the_next_command(tmp_path):
    """kill -9 while the folders change: the next command (here a commit) finishes the reset
    first, so it records the target, never a mix; no file is ever torn."""
    rng = random.Random(7)
    dm = DM(tmp_path / "home")
    dm.ok("init", "app")
    d = dm.path("app.db")
    _state(d, rng, 1)
    dm.ok("commit", "-m", "one")
    one, first = capture(d), json.loads(dm.ok("log", "--json"))[0]["id"]
    finished = 0
    for round_ in range(4):
        _state(d, rng, round_ + 2)
        dm.ok("commit", "-m", f"state {round_}")
        before = capture(d)
        if round_ % 2:  # half at random moments, half once the restore is under way
            proc = dm.popen("reset", "--hard", first)
            time.sleep(rng.uniform(0, 0.8))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            kill_inside(lambda: dm.popen("reset", "--hard", first), lambda: _journaled(dm), 5,
                        "a reset's restore")
        journaled = _journaled(dm)
        listing = json.loads(dm.ok("list", "--json"))[0]
        if journaled:
            finished += 1
            assert listing["state"] == "unfinished reset", listing
        dm.ok("commit", "-m", f"after kill {round_}")
        after = capture(d)
        head = json.loads(dm.ok("log", "-n", "2", "--json"))
        if journaled:  # finished: the target, and the branch moved there first
            assert after == one
            assert head[1]["id"] == first
        else:
            assert after in (one, before)
        assert json.loads(dm.ok("fsck", "--json"))["ok"]
        reflog = json.loads(dm.ok("reflog", "--json"))
        assert all(e["action"] != "reset" or e["new"] == first for e in reflog)
    assert finished >= 2  # the kills did land inside the restore


def _flip_chunk_of(dm: DM, content: bytes) -> None:
    """Damage the stored copy of ``content`` (a single-chunk file) on disk."""
    import blake3

    oid = blake3.blake3(content).digest()
    with sqlite3.connect(dm.home / "meta.db") as db:
        index.merge_recent(db)  # every object's row in ``objects``
        name, offset, stored = db.execute(
            "SELECT p.name, o.offset, o.stored_len FROM objects o JOIN packs p ON p.id = o.pack "
            "WHERE o.id = ?", (oid,)).fetchone()
    with open(dm.home / "packs" / name, "r+b") as f:
        f.seek(offset + stored // 2)
        byte = f.read(1)
        f.seek(offset + stored // 2)
        f.write(bytes([byte[0] ^ 0x55]))


@pytest.mark.slow
def test_a_restore_meeting_a_damaged_object_changes_nothing(dm):
    dm.ok("init", "app")
    d = dm.path("app.db")
    old = os.urandom(30_000)
    (d / "a").write_bytes(old)
    (d / "b").write_bytes(os.urandom(9000) * 3)
    with open(d / "table", "wb") as f:
        f.write(os.urandom(8192 * 40))
    dm.ok("commit", "-m", "old")
    first = json.loads(dm.ok("log", "--json"))[0]["id"]
    (d / "a").write_bytes(b"new a")
    (d / "c").write_text("new file")
    with open(d / "table", "r+b") as f:
        f.seek(8192 * 3)
        f.write(os.urandom(8192))
    dm.ok("commit", "-m", "new")
    (d / "c").write_text("uncommitted")
    _flip_chunk_of(dm, old)
    before, log, reflog = capture(d), dm.ok("log", "--json"), dm.ok("reflog", "--json")
    p = dm("reset", "--hard", first)
    assert p.returncode == 7, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "hash check" in lines[0] and "dm fsck" in lines[0], p.stderr
    assert capture(d) == before  # no file emptied, written or removed
    assert dm.ok("log", "--json") == log and dm.ok("reflog", "--json") == reflog
    assert not list((dm.home / "dots" / "app" / "tmp").glob("*"))  # no staging left
    assert dm.ok("commit", "-m", "still works")


def _loop_device(backing: Path) -> Iterator[str]:
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need root")
def test_special_files_where_files_go_are_replaced_never_written(dm, tmp_path):
    """A FIFO must not make a reset hang, a device node must not receive the file's bytes,
    and a file with another name outside the subdot must not be patched through."""
    dm.ok("init", "app")
    d = dm.path("app.db")
    (d / "pipe").write_bytes(b"was a file")
    (d / "dev").write_bytes(b"X" * 4096)
    (d / "table").write_bytes(os.urandom(8192 * 16))
    dm.ok("commit", "-m", "files")
    with open(d / "table", "r+b") as f:
        f.write(os.urandom(8192))
    dm.ok("commit", "-m", "changed a page")
    (d / "pipe").unlink()
    os.mkfifo(d / "pipe")
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(1 << 20))
    outside = tmp_path / "outside-table"
    os.link(d / "table", outside)  # the same file, named outside the subdot too
    kept = outside.read_bytes()
    with contextmanager(_loop_device)(backing) as dev:
        (d / "dev").unlink()
        st = os.stat(dev)
        os.mknod(d / "dev", stat.S_IFBLK | 0o600, st.st_rdev)
        p = subprocess.run([DM_BIN, "reset", "--hard", "HEAD^"], env=dm.env,
                           capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
    assert backing.read_bytes() == bytes(1 << 20)  # nothing went into the device
    assert (d / "dev").read_bytes() == b"X" * 4096 and (d / "pipe").read_bytes() == b"was a file"
    assert stat.S_ISREG(os.lstat(d / "pipe").st_mode)
    assert outside.read_bytes() == kept  # the other name still has the other content
    assert os.stat(d / "table").st_nlink == 1


@contextmanager
def _small_disk(path: Path, mib: int) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _dot_on(disk: Path) -> tuple[DM, Path]:
    """A store on ``disk`` with dot app, and its subdot db's folder."""
    dm = DM(disk / "home")
    dm.ok("init", "app")
    return dm, dm.path("app.db")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small disk needs root")
def test_a_full_disk_leaves_the_store_usable_once_there_is_room(tmp_path):
    with _small_disk(tmp_path / "disk", 64) as disk:
        dm, d = _dot_on(disk)
        (d / "small").write_text("first")
        dm.ok("commit", "-m", "first")
        dm.ok("checkout", "-b", "side")
        dm.ok("checkout", "master")
        (d / "big").write_bytes(os.urandom(20 << 20))
        ballast = disk / "ballast"
        ballast.write_bytes(bytes(30 << 20))
        for _ in range(2):
            p = dm("commit", "-m", "too big")
            assert p.returncode == 11, p.stderr
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and "no space left" in lines[0] and str(disk) in lines[0]
        packs = sum(f.stat().st_size for f in (dm.home / "packs").iterdir())
        assert packs < 1 << 20  # what the failed commits wrote was given back
        ballast.unlink()  # room again: everything works at once
        dm.ok("commit", "-m", "fits now")
        dm.ok("reset", "--hard", "HEAD^")
        assert not (d / "big").exists()
        dm.ok("reset", "--hard", json.loads(dm.ok("reflog", "--json"))[0]["old"])
        assert (d / "big").stat().st_size == 20 << 20
        dm.ok("checkout", "side")
        dm.ok("checkout", "master")
        assert json.loads(dm.ok("fsck", "--json"))["ok"]


def _one_line_out_of_space(p: subprocess.CompletedProcess[str], disk: Path) -> None:
    assert p.returncode == 11, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left" in lines[0] and str(disk) in lines[0], lines


def _nothing_half_built(dot_dir: Path) -> None:
    scratch = dot_dir / "tmp"
    assert not scratch.exists() or not any(scratch.iterdir()), list(scratch.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small disk needs root")
def test_a_checkout_b_on_a_full_disk_creates_no_branch_and_leaves_nothing_half_built(tmp_path):
    with _small_disk(tmp_path / "disk", 80) as disk:
        dm, d = _dot_on(disk)
        data = os.urandom(16 << 20)
        (d / "big").write_bytes(data)
        dm.ok("commit", "-m", "big")
        ballast = disk / "ballast"
        ballast.write_bytes(bytes(40 << 20))
        _one_line_out_of_space(dm("checkout", "-b", "side"), disk)
        _nothing_half_built(dm.home / "dots" / "app")
        assert dm.ok("branch").split() == ["*", "master"]
        assert not (dm.home / "dots" / "app" / "branches" / "side").exists()
        (d / "big").write_bytes(data[:1000])  # uncommitted: stays on master
        ballast.unlink()
        dm.ok("checkout", "-b", "side")
        assert (d / "big").read_bytes() == data
        dm.ok("checkout", "master")
        assert (d / "big").read_bytes() == data[:1000]
        assert json.loads(dm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small disk needs root")
def test_a_clone_on_a_full_disk_leaves_nothing_half_built_and_resumes(tmp_path):
    from tests.integration.remote_env import Hub

    (tmp_path / "hub").mkdir()
    hub = Hub(["--data", str(tmp_path / "hub" / "data")], tmp_path / "hub")
    key = hub.user("alice")
    hub.start()
    try:
        alice = DM(tmp_path / "alice")
        hub.join(alice, "alice", key)
        alice.ok("init", "app")
        data = os.urandom(16 << 20)
        (alice.path("app.db") / "big").write_bytes(data)
        alice.ok("commit", "-m", "big")
        alice.ok("push")
        with _small_disk(tmp_path / "disk", 80) as disk:
            bob = DM(disk / "home")
            hub.join(bob, "alice", key)
            ballast = disk / "ballast"
            ballast.write_bytes(bytes(50 << 20))  # room for the pack, not for the folder too
            _one_line_out_of_space(bob("clone", "hub", "alice/app"), disk)
            _nothing_half_built(bob.home / "dots" / "app")
            ballast.unlink()
            assert json.loads(bob.ok("clone", "hub", "alice/app", "--json"))["status"] == \
                "cloned"
            assert (bob.path("app.db") / "big").read_bytes() == data
            assert json.loads(bob.ok("fsck", "--json"))["ok"]
    finally:
        hub.stop()


def test_a_link_planted_during_a_restore_redirects_no_write(tmp_path):
    """Between the verified staging and the apply, a folder is swapped for a link to a folder
    outside: the apply refuses, and writes nothing there."""
    from dotmesh.errors import Conflict
    from dotmesh.model.objects import Root
    from dotmesh.store.repo import Repo
    from dotmesh.workdir.restore import prepare
    from dotmesh.workdir.snapshot import snapshot

    home = Repo(tmp_path / "home")
    top = tmp_path / "folder"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "f").write_text("committed")
    try:
        writer = home.packs.writer()
        target: Root = snapshot(top, home.packs, writer, {}).root
        (top / "sub" / "f").write_text("changed")
        current = snapshot(top, home.packs, writer, {}).root
        writer.flush()
        prepared = prepare(top, home.packs, target, current, tmp_path / "staging")
        outside = tmp_path / "outside"
        outside.mkdir()
        (top / "sub").rename(tmp_path / "moved")
        (top / "sub").symlink_to(outside)
        with pytest.raises(Conflict, match="became a link"):
            prepared.apply()
        assert list(outside.iterdir()) == []
    finally:
        home.close()


def test_a_write_during_a_reset_is_never_hidden(tmp_path):
    """A file patched in place must be as the snapshot saw it: a write since (by something
    dm could not see) fails the patch, where patching only the blocks the snapshot knew of
    would keep the write and record the target's content id for it."""
    from dotmesh.errors import Conflict
    from dotmesh.store.repo import Repo
    from dotmesh.workdir.restore import prepare
    from dotmesh.workdir.snapshot import snapshot

    home = Repo(tmp_path / "home")
    top = tmp_path / "folder"
    top.mkdir()
    table = top / "table"
    table.write_bytes(os.urandom(8192 * 32))
    try:
        writer = home.packs.writer()
        target = snapshot(top, home.packs, writer, {}).root
        with open(table, "r+b") as f:
            f.write(os.urandom(8192))
        time.sleep(0.01)
        now = snapshot(top, home.packs, writer, {})
        writer.flush()
        prepared = prepare(top, home.packs, target, now.root, tmp_path / "staging",
                           seen=now.cache)
        with open(table, "r+b") as f:  # unseen: after the snapshot
            f.seek(8192 * 20)
            f.write(b"W" * 8192)
        with pytest.raises(Conflict, match="changed during the reset"):
            prepared.apply()
    finally:
        home.close()
