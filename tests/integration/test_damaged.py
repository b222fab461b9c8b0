"""A damaged store is diagnosed and repaired, never made worse; and what a store keeps is its
owner's alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dotmesh.meta import index
from tests.conftest import DM, capture


def _one_line(p: subprocess.CompletedProcess[str], code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def _db(dm: DM) -> sqlite3.Connection:
    """The store's database with every object row in ``objects`` (a commit's rows go to
    ``recent_objects`` first), for damaging rows by hand."""
    db = sqlite3.connect(dm.home / "meta.db", isolation_level=None)
    index.merge_recent(db)
    return db


def _two_commits(dm: DM) -> tuple[str, str, Path]:
    dm.ok("init", "app")
    d = dm.path("app.db")
    for i in range(20):
        (d / f"f{i}").write_bytes(os.urandom(3000))
    dm.ok("commit", "-m", "one")
    (d / "f0").write_bytes(b"changed")
    dm.ok("commit", "-m", "two")
    ids = [c["id"] for c in json.loads(dm.ok("log", "--json"))]
    return ids[1], ids[0], d


@pytest.fixture(scope="module")
def _two(tmp_path_factory) -> Path:
    """The home of a store made by :func:`_two_commits`, made once for the cases that each
    damage a copy of their own (a home holds its dots' folders and names no absolute
    path); the stat cache tests make their own, since a copy's files are new to it."""
    dm = DM(tmp_path_factory.mktemp("two") / "home")
    _two_commits(dm)
    return dm.home


@pytest.fixture(scope="module")
def _two_and_side(_two, tmp_path_factory) -> Path:
    """:func:`_two` with a branch ``side`` at its head, master checked out."""
    dm = DM(tmp_path_factory.mktemp("two-and-side") / "home")
    shutil.copytree(_two, dm.home, symlinks=True)
    dm.ok("checkout", "-b", "side")
    dm.ok("checkout", "master")
    return dm.home


@pytest.mark.slow
def test_a_flipped_byte_in_the_stat_cache_is_caught(dm):
    first, second, d = _two_commits(dm)
    with _db(dm) as db:
        (blob,) = db.execute("SELECT data FROM statcache").fetchone()
        damaged = bytearray(blob)
        damaged[-10] ^= 0x01  # inside the last entry's content id
        db.execute("UPDATE statcache SET data=?", (bytes(damaged),))
    p = dm("fsck")
    assert p.returncode == 7 and "stat cache of app@master:db is damaged" in p.stdout, p.stdout
    dm.ok("commit", "-m", "three")  # the cache is not trusted: every file is read again
    assert json.loads(dm.ok("fsck", "--json"))["ok"]
    state, three = capture(d), json.loads(dm.ok("log", "--json"))[0]["id"]
    dm.ok("reset", "--hard", first)
    dm.ok("reset", "--hard", three)
    assert capture(d) == state


@pytest.mark.slow
def test_fsck_reports_every_bad_row_and_repair_keeps_what_it_can(dm):
    first, second, d = _two_commits(dm)
    dm.ok("checkout", "-b", "side")
    dm.ok("checkout", "master")
    with _db(dm) as db:
        db.execute("UPDATE branches SET head=? WHERE name='master'", (os.urandom(32),))
        db.execute("UPDATE branches SET head='garbage' WHERE name='side'")
        db.execute("INSERT INTO subdots VALUES ('app', '../escape')")
        db.execute("INSERT INTO reflog (dot, branch, ts_ns, action, old, new, saved, message) "
                   "VALUES ('app', 'master', 1, 'commit', 'x', NULL, NULL, 'bad')")
        db.execute("INSERT INTO packs (name) VALUES ('../../etc/passwd')")
        db.execute("INSERT INTO objects VALUES (?, 0, 1, 100, 10, ?, 0)",
                   (os.urandom(32), 1 << 40))
    p = dm("fsck", "--json")
    assert p.returncode == 7 and "Traceback" not in p.stderr, p.stderr
    problems = json.loads(p.stdout)["problems"]
    for needle in ("branch master of app points to", "branch side of app points to",
                   "subdot with a bad name", "reflog entry of app is damaged",
                   "names no pack file", "index entry of object"):
        assert any(needle in x for x in problems), (needle, problems)
    line = _one_line(dm("commit", "-m", "on a lost head"), 7)
    assert "cannot be read" in line and "dm fsck --repair" in line
    out = json.loads(dm("fsck", "--repair", "--json").stdout)
    assert out["ok"] and out["remaining"] == [], out
    assert any("branch master of app moved back to " + second[:12] in x
               for x in out["repaired"]), out["repaired"]
    assert json.loads(dm.ok("log", "--json"))[0]["id"] == second  # the newest whole commit
    dm.ok("commit", "-m", "works again")
    assert json.loads(dm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
def test_an_unreadable_index_is_rebuilt_from_the_packs(dm):
    first, second, d = _two_commits(dm)
    dm.ok("init", "other")
    (dm.path("other.x") / "y").write_text("y")
    dm.ok("switch", "other")
    dm.ok("commit", "-m", "other's")
    before = capture(d)
    db = dm.home / "meta.db"
    data = bytearray(db.read_bytes())
    data[:100] = os.urandom(100)  # the header: not a database any more
    db.write_bytes(bytes(data))
    for wal in (dm.home / "meta.db-wal", dm.home / "meta.db-shm"):
        wal.unlink(missing_ok=True)
    for args in (["list"], ["log"], ["commit", "-m", "x"], ["fsck"]):
        line = _one_line(dm(*args), 7)
        assert "dm fsck --repair" in line, line
    out = json.loads(dm("fsck", "--repair", "--json").stdout)
    assert out["ok"], out
    said = "\n".join(out["repaired"])
    assert "kept the damaged index as meta.db.damaged-" in said
    assert "indexed" in said and "dot app was lost from the index" in said
    assert "branches of dot lost-found" in said
    assert capture(d) == before  # the working folders were never touched
    dm.ok("switch", "lost-found")
    branches = json.loads(dm.ok("branch", "--json"))
    assert second in [b["head"] for b in branches]  # the lost history is reachable again
    assert json.loads(dm.ok("fsck", "--json"))["ok"]


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A folder other users can pass through (pytest's own is its owner's alone)."""
    top = Path(tempfile.mkdtemp(prefix="dm-perm-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs another user to try")
def test_what_a_store_keeps_is_its_owners_alone(public_tmp):
    top = public_tmp
    dm = DM(top / "home")
    dm.ok("init", "app")
    d = dm.path("app.db")
    os.chmod(d, 0o755)
    (d / "public").write_text("for the service")
    os.chmod(d / "public", 0o644)
    (d / "secret").write_text("token")
    os.chmod(d / "secret", 0o600)
    dm.ok("commit", "-m", "one")
    home = dm.home
    pack = next((home / "packs").iterdir())

    def as_nobody(*cmd: str) -> int:
        return subprocess.run(["runuser", "-u", "nobody", "--", *cmd],
                              capture_output=True).returncode

    (d / "big").write_bytes(os.urandom(64 << 20))
    proc = dm.popen("commit", "-m", "two")  # caught while its index is open (a WAL exists)
    try:
        # SQLite makes the -wal file, then the -shm file: wait for both
        while not ((home / "meta.db-wal").exists() and (home / "meta.db-shm").exists()) \
                and proc.poll() is None:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGSTOP)
        assert stat.S_IMODE(home.stat().st_mode) == 0o711
        for f in (home / "meta.db", home / "meta.db-wal", home / "meta.db-shm", pack):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
            assert as_nobody("cat", str(f)) != 0, f
        for folder in ("packs", "locks"):
            assert stat.S_IMODE((home / folder).stat().st_mode) == 0o700
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait()
    assert as_nobody("ls", str(home)) != 0
    assert as_nobody("cat", str(d / "public")) == 0  # a service reaches its data folder
    assert as_nobody("cat", str(d / "secret")) != 0
    # A store made by an older dm (readable by all) is closed by the next command.
    os.chmod(home, 0o755)
    os.chmod(home / "meta.db", 0o644)
    os.chmod(home / "packs", 0o755)
    dm.ok("list")
    assert stat.S_IMODE(home.stat().st_mode) == 0o711
    assert stat.S_IMODE((home / "meta.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "packs").stat().st_mode) == 0o700


@pytest.mark.slow
def test_damaged_index_rows_are_rebuilt_from_the_packs(dm):
    first, second, d = _two_commits(dm)
    before = capture(d)
    with _db(dm) as db:  # every commit's index row damaged, and one row lost
        db.execute("UPDATE objects SET id=hex(id) WHERE kind=3")
        db.execute("DELETE FROM objects WHERE kind=2")  # the trees' rows are gone
    assert dm("fsck").returncode == 7
    out = json.loads(dm("fsck", "--repair", "--json").stdout)
    assert out["ok"] and out["remaining"] == [], out
    assert any("indexed" in x and "the packs hold" in x for x in out["repaired"]), out
    assert [c["id"] for c in json.loads(dm.ok("log", "--json"))] == [second, first]
    dm.ok("reset", "--hard", first)
    dm.ok("reset", "--hard", second)
    assert capture(d) == before


def _zero_page(db: Path, page: int) -> None:
    data = bytearray(db.read_bytes())
    size = int.from_bytes(data[16:18], "big") or 65536
    data[page * size:(page + 1) * size] = bytes(size)
    db.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def _long_history(tmp_path_factory) -> tuple[Path, str, str]:
    """A store with 32 commits, made once for the three kinds of damage below (each damages
    a copy of its own: a store's home moves with its folders)."""
    dm = DM(tmp_path_factory.mktemp("long-history") / "home")
    first, second, _ = _two_commits(dm)
    for i in range(30):  # enough rows that the index spans several pages
        dm.ok("commit", "-m", f"more {i}")
    return dm.home, first, second


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["a zeroed page", "an empty file", "no file"])
def test_an_index_lost_in_part_or_whole_is_rebuilt(dm, _long_history, damage):
    """Whatever happened to meta.db, commands say so in one line, and --repair gives back
    the dots, their folders and every commit the packs hold."""
    home, first, second = _long_history
    shutil.copytree(home, dm.home, symlinks=True)
    d = dm.path("app.db")
    assert d.is_relative_to(dm.home) and len(json.loads(dm.ok("log", "--json"))) == 32
    before = capture(d)
    db = dm.home / "meta.db"
    assert not (dm.home / "meta.db-wal").exists()
    if damage == "a zeroed page":
        _zero_page(db, 3)
    elif damage == "an empty file":
        db.write_bytes(b"")
    else:
        db.unlink()
    p = dm("list")
    if damage != "a zeroed page" or p.returncode:  # a page no read touches may go unseen
        assert "dm fsck --repair" in _one_line(p, 7)
    assert dm("fsck").returncode == 7
    out = json.loads(dm("fsck", "--repair", "--json").stdout)
    assert out["ok"] and out["remaining"] == [], out
    assert capture(d) == before  # the working folders were never touched
    from dotmesh.store.repo import Repo

    home = Repo(dm.home)
    try:
        reachable = {c.hex() for dot in home.dots() for c in home.all_commits(dot)}
    finally:
        home.close()
    assert {first, second} <= reachable  # by a branch or reflog kept, or in lost-found
    dm.ok("switch", "app")
    dm.ok("commit", "-m", "after the repair")
    assert json.loads(dm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("sql", [
    "UPDATE branches SET name='../../../../outbr' WHERE name='side'",
    "UPDATE dots SET branch='../../../../outbr'",
    "INSERT INTO subdots VALUES ('app', '../../../../escapee')",
    "UPDATE reflog SET ts_ns='soon', old=x'00'",
    "UPDATE packs SET name='' WHERE id=(SELECT min(id) FROM packs)",
    "UPDATE meta SET value='abc' WHERE key='format'",
])
def test_damaged_rows_never_lead_out_of_the_store(dm, tmp_path, _two_and_side, sql):
    shutil.copytree(_two_and_side, dm.home, symlinks=True)
    with _db(dm) as db:
        db.execute(sql)
    outside = dm.home.parent
    before = sorted(p.name for p in outside.iterdir())
    for args in (["list"], ["log"], ["reflog"], ["diff"], ["commit", "-m", "x"],
                 ["checkout", "side"], ["reset", "--hard", "HEAD"], ["dot", "show"]):
        p = dm(*args)
        assert p.returncode != 70 and "Traceback" not in p.stderr, (args, p.stderr)
        assert sorted(p.name for p in outside.iterdir()) == before, args
    out = json.loads(dm("fsck", "--repair", "--json").stdout)
    assert out["ok"], out
    assert sorted(p.name for p in outside.iterdir()) == before
    dm.ok("commit", "-m", "after the repair")
    assert json.loads(dm.ok("fsck", "--json"))["ok"]


@pytest.mark.parametrize("bad_id", [
    pytest.param(-1, id="negative"), pytest.param(10**12, id="huge", marks=pytest.mark.slow),
    pytest.param(3, id="small", marks=pytest.mark.slow),
    pytest.param("abc", id="text", marks=pytest.mark.slow)])
def test_an_index_row_whose_id_is_not_bytes_is_a_problem_not_a_crash(dm, _two, bad_id):
    shutil.copytree(_two, dm.home, symlinks=True)
    with _db(dm) as db:
        db.execute("INSERT INTO objects SELECT ?, kind, pack, offset, stored_len, raw_len, zstd "
                   "FROM objects LIMIT 1", (bad_id,))
    p = dm("fsck")
    assert p.returncode == 7, p.stderr
    assert "internal error" not in p.stderr and "damaged" in p.stdout, p.stdout
    repaired = dm("fsck", "--repair")
    assert repaired.returncode == 0, repaired.stderr
