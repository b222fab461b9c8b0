"""Live capture of a running polyglot app: Redis, PostgreSQL and an uploads folder, committed
while an app writes to all three, restore to states that start cleanly and agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.miniapp import upload_bytes
from tests.conftest import DM, kill_inside
from tests.integration.servers import Postgres, Redis, shared_tmp

pytestmark = pytest.mark.slow  # real servers and frozen writers: each test takes seconds

APP = Path(__file__).resolve().parents[2] / "demo" / "miniapp.py"
ROOT = Path(__file__).resolve().parents[2]


def _page_writer(big: Path) -> subprocess.Popen[bytes]:
    """A process that rewrites random 8 KiB pages of ``big`` without pause, working in its
    folder (so dm finds it as a writer)."""
    pages = big.stat().st_size // 8192
    return subprocess.Popen(
        [sys.executable, "-c", (
            "import os, random\n"
            f"fd = os.open({str(big)!r}, os.O_WRONLY)\n"
            "while True:\n"
            f"    os.pwrite(fd, os.urandom(8192), random.randrange({pages}) * 8192)\n")],
        cwd=big.parent, stdin=subprocess.DEVNULL)


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_commits_of_a_running_app_are_consistent():
    with shared_tmp() as top:
        dm = DM(top / "home")
        dm.ok("init", "app")
        clicks, users, uploads = (dm.path(f"app.{s}")
                                  for s in ("clicks-db", "users-db", "uploads"))
        os.chmod(top / "home", 0o755)
        pg = Postgres(users, top / "pgsock", 54331)
        pg.initdb()
        redis = Redis(clicks, top / "redis.sock")
        pg.start()
        redis.start()
        app = None
        try:
            pg.sql("CREATE TABLE steps (n int PRIMARY KEY, payload text)")
            pg.sql("CREATE INDEX ON steps (payload)")
            pg.sql("CREATE EXTENSION amcheck")
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            app = subprocess.Popen([sys.executable, str(APP), str(pg.sock), str(pg.port),
                                    str(redis.sock), str(uploads)], env=env,
                                   stdin=subprocess.DEVNULL)
            time.sleep(1.0)
            shown = json.loads(dm.ok("dot", "show", "--json"))
            names = {w["name"] for w in shown["writers"]}
            assert {"redis-server", "postgres"} <= names and app.pid in {
                w["pid"] for w in shown["writers"]}
            ids = []
            for i in range(5):
                out = json.loads(dm.ok("commit", "-m", f"live {i}", "--json"))
                assert out["freeze_ms"] is not None
                ids.append(out["id"])
                time.sleep(0.05)
            assert app.poll() is None, "the app died while being committed"
            log = json.loads(dm.ok("log", "--json"))
            assert all("dm.freeze_ms" in c["metadata"] for c in log[:5])
            refused = dm("reset", "--hard", ids[0])
            assert refused.returncode == 5 and "--stop-writers" in refused.stderr
        finally:
            if app is not None:
                app.kill()
                app.wait()
            redis.stop()
            pg.stop()

        last_counter = 0
        for oid in ids:
            dm.ok("reset", "--hard", oid)
            pg.start()
            redis.start()
            try:
                counter = int(redis.cli("GET", "counter") or 0)
                max_n = int(pg.sql("SELECT coalesce(max(n), 0) FROM steps"))
                rows = int(pg.sql("SELECT count(*) FROM steps"))
                pg.amcheck()
            finally:
                redis.stop()
                pg.stop()
            assert counter <= max_n <= counter + 1, (oid, counter, max_n)
            assert rows == max_n
            assert counter >= last_counter  # commits are taken in order
            last_counter = counter
            # The app writes upload n after setting the counter to n, so a consistent state has
            # every upload below the counter whole, and upload n absent or half written.
            for n in range(1, counter):
                assert (uploads / f"{n}.bin").read_bytes() == upload_bytes(n), (oid, n)
            current = uploads / f"{counter}.bin"
            if counter and current.exists():
                assert upload_bytes(counter).startswith(current.read_bytes()), oid
            assert not (uploads / f"{counter + 1}.bin").exists(), oid
            aof = clicks / "appendonlydir" / "appendonly.aof.manifest"
            check = subprocess.run(["redis-check-aof", str(aof)], capture_output=True,
                                   text=True, stdin=subprocess.DEVNULL)
            assert check.returncode == 0 and "is valid" in check.stdout, check.stdout
        assert last_counter > 0


def test_kill_during_the_freeze_leaves_no_writer_stopped(dm):
    """kill -9 of dm while writers are frozen: the watchdog thaws them."""
    dm.ok("init", "app")
    d = dm.path("app.db")
    big = d / "big.db"
    big.write_bytes(os.urandom(96 << 20))
    writer = _page_writer(big)
    try:
        kill_inside(lambda: dm.popen("commit", "-m", "killed in the freeze"),
                    lambda: _proc_state(writer.pid) in "Tt", 5, "a freeze", wait=30)
        deadline = time.monotonic() + 5
        while _proc_state(writer.pid) in "Tt" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _proc_state(writer.pid) not in "Tt", "the writer was left stopped"
        assert json.loads(dm.ok("fsck", "--json"))["ok"]
    finally:
        writer.kill()
        writer.wait()


def test_a_live_commit_counts_what_every_pass_read(dm):
    """With a writer present, the changed files are read before the freeze: the commit's
    summary counts them (it said "read 0 changed files" when the last pass read nothing)."""
    dm.ok("init", "app")
    d = dm.path("app.db")
    (d / "a").write_bytes(b"x" * 5000)
    (d / "b").write_bytes(b"y" * 3000)
    idle = subprocess.Popen(["sleep", "60"], cwd=d, stdin=subprocess.DEVNULL)
    try:
        r = json.loads(dm.ok("commit", "-m", "live", "--json"))
    finally:
        idle.kill()
        idle.wait()
    assert (r["files_read"], r["bytes_read"]) == (2, 8000)
    assert "dm.freeze_ms" in json.loads(dm.ok("log", "--json"))[0]["metadata"]


def test_hooks_run_around_the_freeze(dm, tmp_path):
    dm.ok("init", "app")
    d = dm.path("app.db")
    (d / "f").write_text("x")
    trace = tmp_path / "trace"
    dm.ok("hook", "add", "pre-freeze", "--subdot", "db", f'echo "pre $DM_DOT $DM_PATH" >> {trace}')
    dm.ok("hook", "add", "post-thaw", f"echo post >> {trace}")
    dm.ok("commit", "-m", "with hooks")
    assert trace.read_text().splitlines() == [f"pre app {d}", "post"]
    hooks = json.loads(dm.ok("hook", "list", "--json"))
    assert [h["stage"] for h in hooks] == ["pre-freeze", "post-thaw"]
    dm.ok("hook", "add", "pre-freeze", "--timeout", "0.5", "sleep 5")
    p = dm("commit", "-m", "slow hook")
    assert p.returncode == 9 and "timeout" in p.stderr
    dm.ok("hook", "rm", str(hooks[0]["id"] + 2))
    dm.ok("hook", "add", "pre-freeze", "echo broken >&2; exit 4")
    p = dm("commit", "-m", "failing hook")
    assert p.returncode == 9 and "exit 4" in p.stderr and "broken" in p.stderr
    assert len(json.loads(dm.ok("log", "--json"))) == 1  # nothing committed by failures
    assert dm("hook", "add", "sometime", "true").returncode == 2
    assert dm("hook", "rm", "99").returncode == 3


def test_a_writers_supervisor_is_not_left_stopped(dm):
    """runuser (like su) stops itself when its child stops; the thaw must continue it too."""
    dm.ok("init", "app")
    d = dm.path("app.db")
    sup = subprocess.Popen(  # only the child works in the dot, like a server under su
        ["runuser", "-u", "root", "--", "sh", "-c", f"cd {d} && exec sleep 1000"], cwd="/",
        stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        child = None
        while child is None and time.monotonic() < deadline:
            kids = Path(f"/proc/{sup.pid}/task/{sup.pid}/children").read_text().split()
            child = int(kids[0]) if kids else None
            time.sleep(0.01)
        assert child is not None
        out = json.loads(dm.ok("commit", "-m", "supervised", "--json"))
        assert out["freeze_ms"] is not None
        time.sleep(0.2)
        assert _proc_state(child) not in "Tt"
        assert _proc_state(sup.pid) not in "Tt", "runuser was left stopped"
    finally:
        sup.kill()
        sup.wait()
        subprocess.run(["pkill", "-f", "sleep 1000"])


def test_freeze_timeout_thaws_and_commits_nothing(dm):
    dm.ok("init", "app")
    d = dm.path("app.db")
    big = d / "big.db"
    big.write_bytes(os.urandom(64 << 20))
    writer = _page_writer(big)
    try:
        time.sleep(0.2)
        p = dm("commit", "-m", "too slow", "--freeze-timeout", "0.001")
        assert p.returncode == 8, p.stderr
        assert "freeze timeout" in p.stderr and "thawed" in p.stderr
        assert _proc_state(writer.pid) not in "Tt"
        assert json.loads(dm.ok("log", "--json")) == []
        quiet = json.loads(dm.ok("commit", "-m", "no freeze", "--no-freeze", "--json"))
        assert quiet["freeze_ms"] is None
        assert dm("commit", "-m", "x", "--freeze-timeout", "0").returncode == 2
    finally:
        writer.kill()
        writer.wait()


def test_restores_refuse_or_stop_writers(dm):
    dm.ok("init", "app")
    d = dm.path("app.db")
    (d / "f").write_bytes(b"v1")
    dm.ok("commit", "-m", "one", "--no-freeze")
    sleeper = subprocess.Popen(["sleep", "1000"], cwd=d, stdin=subprocess.DEVNULL)
    try:
        p = dm("checkout", "-b", "master", "--stop-writers")  # a bad request stops nothing
        assert p.returncode == 4 and sleeper.poll() is None
        p = dm("checkout", "-b", "other")
        assert p.returncode == 5 and f"sleep (pid {sleeper.pid})" in p.stderr
        out = dm.ok("checkout", "-b", "other", "--stop-writers")
        assert f"Stopped sleep (pid {sleeper.pid})" in out and "does not restart" in out
        assert sleeper.wait(timeout=15) is not None
    finally:
        sleeper.kill()
        sleeper.wait()


MMAP_WRITER = """
import mmap, os, sys, time
log, mapped = sys.argv[1], sys.argv[2]
fd = os.open(mapped, os.O_RDWR)
m = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
n = 0
with open(log, "ab", buffering=0) as out:
    while True:
        n += 1
        out.write(b"%d\\n" % n)           # a write call: inotify sees it
        m[0:16] = b"%016d" % n          # a store to shared memory: no event, no new mtime
        time.sleep(0.001)
"""


def test_writes_through_a_shared_mapping_are_captured(dm):
    """inotify and mtime miss stores to a shared mmap; the freeze must read such files again."""
    dm.ok("init", "app")
    d = dm.path("app.db")
    (d / "mapped.bin").write_bytes(bytes(8192))
    app = subprocess.Popen([sys.executable, "-c", MMAP_WRITER, str(d / "log"),
                            str(d / "mapped.bin")], cwd=d, stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        for i in range(5):
            dm.ok("commit", "-m", f"mapped {i}")
            time.sleep(0.1)
    finally:
        app.kill()
        app.wait()
    for i, c in enumerate(json.loads(dm.ok("log", "--json"))):
        dm.ok("reset", "--hard", c["id"])
        logged = int((d / "log").read_bytes().split()[-1])
        mapped = int((d / "mapped.bin").read_bytes()[:16])
        assert logged - 1 <= mapped <= logged, (i, logged, mapped)


PAGE_SEQ_WRITER = """
import os, sys, time
big, log = sys.argv[1], sys.argv[2]
fd = os.open(big, os.O_WRONLY)
pages = os.fstat(fd).st_size // 8192
out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
n = 0
while True:
    n += 1
    os.pwrite(fd, (b"%016d" % n) * 512, (n * 7919 % pages) * 8192)  # a page of a database
    os.write(out, b"%d\\n" % n)  # then its log
    time.sleep(0.0002)
"""


def _newest_page(big: Path) -> int:
    data = big.read_bytes()
    return max(int(data[i:i + 16].strip(b"\0") or 0) for i in range(0, len(data), 8192))


def test_big_files_written_all_over_are_captured_at_the_freeze(dm):
    """A page written anywhere in a big file just before the freeze is in the commit."""
    dm.ok("init", "app")
    d = dm.path("app.db")
    (d / "big.db").write_bytes(bytes(48 << 20))
    dm.ok("commit", "-m", "before")
    app = subprocess.Popen([sys.executable, "-c", PAGE_SEQ_WRITER, str(d / "big.db"),
                            str(d / "log")], cwd=d, stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        outs = [json.loads(dm.ok("commit", "-m", f"live {i}", "--json")) for i in range(3)]
    finally:
        app.kill()
        app.wait()
    assert all(o["freeze_bytes_read"] >= 48 << 20 for o in outs)  # written all over
    for o in outs:
        dm.ok("reset", "--hard", o["id"])
        logged = int((d / "log").read_bytes().split()[-1])
        assert _newest_page(d / "big.db") in (logged, logged + 1), o
    assert json.loads(dm.ok("fsck", "--json"))["ok"]
