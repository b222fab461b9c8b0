"""dm gc, dm reflog expire and dm branch -d/-D through the real command: space comes back,
nothing reachable goes, kill -9 at any moment leaves a clean store that a rerun finishes, and
gc and commands that change dots never run at once."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import DM, capture


def _packs(dm: DM) -> int:
    return sum(p.stat().st_size for p in (dm.home / "packs").glob("*.pack"))


def _fsck_clean(dm: DM) -> None:
    r = json.loads(dm.ok("fsck", "--json"))
    assert r["ok"], r["problems"]


def _head(dm: DM) -> str:
    return json.loads(dm.ok("log", "-n", "1", "--json"))[0]["id"]


@pytest.mark.slow
def test_dot_delete_then_gc_gives_the_space_back(dm: DM) -> None:
    dm.ok("init", "app")
    (dm.path("app.db") / "a").write_bytes(os.urandom(200_000))
    dm.ok("commit", "-m", "app")
    base = _packs(dm)
    dm.ok("init", "big")
    (dm.path("big.db") / "own").write_bytes(os.urandom(4 << 20))
    dm.ok("--home", str(dm.home), "switch", "big")
    dm.ok("commit", "-m", "big")
    dm.ok("switch", "app")
    assert _packs(dm) > base + (4 << 20)
    dm.ok("dot", "delete", "-f", "big")
    dry = json.loads(dm.ok("gc", "--dry-run", "--json"))
    assert dry["dry_run"] and dry["bytes"]["freed"] > 4 << 20
    assert _packs(dm) > base + (4 << 20)  # a dry run changes nothing
    out = dm.ok("gc")
    assert out.startswith("Will free") and "Freed" in out
    assert _packs(dm) <= base + 1024
    _fsck_clean(dm)
    again = json.loads(dm.ok("gc", "--json"))
    assert again["bytes"]["freed"] == 0 and again["objects"]["unreachable"] == 0


@pytest.mark.slow
def test_retention_commands(dm: DM) -> None:
    dm.ok("init", "app")
    d = dm.path("app.db")
    (d / "a").write_text("one")
    dm.ok("commit", "-m", "one")
    dm.ok("checkout", "-b", "spike")
    (d / "big").write_bytes(os.urandom(1 << 20))
    dm.ok("commit", "-m", "spike")
    p = dm("branch", "-d", "spike")
    assert p.returncode == 5 and p.stderr.count("\n") == 1  # current branch: one line
    dm.ok("checkout", "master")
    p = dm("branch", "-d", "spike")
    assert p.returncode == 5 and "no other branch" in p.stderr
    assert "Deleted branch spike" in dm.ok("branch", "-D", "spike")
    assert json.loads(dm.ok("branch", "--json")) == [
        {"name": "master", "current": True, "head": _head(dm)}]
    assert "branch delete" in dm.ok("reflog")
    assert dm("branch", "-D", "nope").returncode == 3
    assert json.loads(dm.ok("reflog", "expire", "--json")) == {"expired": 0, "dry_run": False}
    assert dm.ok("config", "gc.reflog-expire-days").strip() == "30"
    dm.ok("config", "gc.reflog-expire-days", "0")
    before = _packs(dm)
    assert "Forgot" in dm.ok("reflog", "expire")
    assert dm.ok("reflog").strip() == ""
    dm.ok("gc")
    assert _packs(dm) < before - (1 << 20)
    p = dm("gc", "--repack-below", "150")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    for cmd in (["gc"], ["reflog", "expire"], ["branch"], ["reflog"]):
        assert "Example" in dm.ok(*cmd, "--help"), cmd
    _fsck_clean(dm)


def _store_with_garbage(dm: DM, rng: random.Random) -> dict[str, dict[str, tuple[object, ...]]]:
    """A dot whose history holds a dropped branch and discarded states; returns the states
    of the commits that stay."""
    dm.ok("init", "app")
    d = dm.path("app.db")
    states = {}
    for i in range(3):
        (d / f"keep{i}").write_bytes(rng.randbytes(50_000))
        (d / "churn").write_bytes(rng.randbytes(400_000))
        dm.ok("commit", "-m", f"c{i}")
        states[_head(dm)] = capture(d)
    dm.ok("checkout", "-b", "gone")
    shared = rng.randbytes(60_000)
    (d / "gone").write_bytes(rng.randbytes(1 << 20))
    (d / "shared").write_bytes(shared)  # first stored in gone's pack
    dm.ok("commit", "-m", "gone")
    dm.ok("checkout", "master")
    (d / "shared").write_bytes(shared)  # ... and reached from master: gone's pack is repacked
    dm.ok("commit", "-m", "shared")
    states[_head(dm)] = capture(d)
    dm.ok("branch", "-D", "gone")
    (d / "discarded").write_bytes(rng.randbytes(300_000))
    dm.ok("reset", "--hard", "HEAD")
    dm.ok("reflog", "expire", "--days", "0")
    return states


States = dict[str, dict[str, tuple[object, ...]]]


@pytest.fixture(scope="module")
def _garbage(tmp_path_factory) -> tuple[Path, States]:
    """A store made by :func:`_store_with_garbage`, made once: each kill test below runs
    its gc on a copy of its own (a home holds its dots' folders and names no absolute
    path; the copy keeps every file's times, so the captured states hold for it)."""
    dm = DM(tmp_path_factory.mktemp("garbage") / "home")
    return dm.home, _store_with_garbage(dm, random.Random(7))


def _copy_of(garbage: tuple[Path, States], dm: DM) -> States:
    shutil.copytree(garbage[0], dm.home, symlinks=True)
    return garbage[1]


def _check_states(dm: DM, states: dict[str, dict[str, tuple[object, ...]]]) -> None:
    d = dm.path("app.db")
    for oid, state in states.items():
        dm.ok("reset", "--hard", oid)
        assert capture(d) == state, oid


@pytest.mark.slow
def test_kill_9_inside_gc_loses_nothing_and_a_rerun_finishes(dm: DM, _garbage) -> None:
    states = _copy_of(_garbage, dm)
    dm.env["DM_GC_KILL_AT"] = "repack-indexed"
    p = dm("gc")
    assert p.returncode == -signal.SIGKILL
    del dm.env["DM_GC_KILL_AT"]
    _fsck_clean(dm)
    dm.ok("gc")
    left = json.loads(dm.ok("gc", "--dry-run", "--json"))
    assert left["bytes"]["freed"] == 0
    _check_states(dm, states)
    _fsck_clean(dm)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["rows-dropped", "delete-row", "repack-written"])
def test_kill_9_at_each_step(dm: DM, _garbage, point: str) -> None:
    states = _copy_of(_garbage, dm)
    dm.env["DM_GC_KILL_AT"] = point
    assert dm("gc").returncode == -signal.SIGKILL
    del dm.env["DM_GC_KILL_AT"]
    _fsck_clean(dm)
    dm.ok("gc")
    assert json.loads(dm.ok("gc", "--dry-run", "--json"))["bytes"]["freed"] == 0
    _check_states(dm, states)


@pytest.mark.slow
def test_kill_9_at_random_moments(dm: DM, _garbage) -> None:
    rng = random.Random(20260101)
    states = _copy_of(_garbage, dm)
    d = dm.path("app.db")
    lock = dm.home / "locks" / "store.lock"
    # More garbage each round, and a gc killed somewhere in it: once it holds the store lock
    # (it plans and applies holding it, some 30-100 ms after 0.1-0.3 s of start-up), at
    # moments spread over that span (test_kill_9_at_each_step stops it at each step).
    for delay in (0.0, 0.01, 0.02, 0.035, 0.05):
        (d / "churn").write_bytes(rng.randbytes(2 << 20))
        dm.ok("commit", "-m", "churn")
        dm.ok("reset", "--hard", "HEAD^")
        dm.ok("reflog", "expire", "--days", "0")
        t0 = time.monotonic()
        proc = dm.popen("gc")
        holder = f"{proc.pid} gc".encode()
        while proc.poll() is None and time.monotonic() - t0 < 30 and not (
                lock.exists() and lock.read_bytes() == holder):
            time.sleep(0.0005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert time.monotonic() - t0 < 60
        _fsck_clean(dm)
    dm.ok("gc")
    assert json.loads(dm.ok("gc", "--dry-run", "--json"))["bytes"]["freed"] == 0
    _check_states(dm, states)
    _fsck_clean(dm)


@pytest.mark.slow
def test_gc_and_a_commit_never_run_at_once(dm: DM) -> None:
    """A commit in progress refuses gc (its objects are indexed before its ref moves); gc in
    progress refuses the commit; both leave the store whole."""
    dm.ok("init", "app")
    d = dm.path("app.db")
    for i in range(40):
        (d / f"f{i}").write_bytes(os.urandom(1 << 20))
    lock = dm.home / "locks" / "app.lock"
    proc = dm.popen("commit", "-m", "big")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None and not (
            lock.exists() and b"commit" in lock.read_bytes()):
        time.sleep(0.005)
    p = dm("gc")
    overlapped = proc.poll() is None  # the commit ran all along gc's run
    proc.wait()
    if overlapped or p.returncode != 0:  # the commit held the store: refused, in one line
        assert p.returncode == 6 and "other dm commands" in p.stderr, p.stderr
    assert proc.returncode == 0
    _fsck_clean(dm)
    dm.ok("gc")
    state = capture(d)
    dm.ok("reset", "--hard", "HEAD")
    assert capture(d) == state
    _fsck_clean(dm)


@pytest.mark.slow
def test_du_says_what_each_dot_branch_and_subdot_holds(dm: DM) -> None:
    common = os.urandom(200_000)
    dm.ok("init", "a")
    dm.ok("init", "b")
    (dm.path("a.db") / "common").write_bytes(common)
    (dm.path("a.files") / "only-a").write_bytes(os.urandom(300_000))
    dm.ok("commit", "-m", "a one")
    dm.ok("checkout", "-b", "side")
    (dm.path("a.db") / "only-side").write_bytes(os.urandom(100_000))
    dm.ok("commit", "-m", "side")
    dm.ok("checkout", "master")
    dm.ok("switch", "b")
    (dm.path("b.db") / "common").write_bytes(common)
    dm.ok("commit", "-m", "b one")
    report = json.loads(dm.ok("du", "--json"))
    a, b = report["dots"]
    assert (a["name"], b["name"]) == ("a", "b")
    # random bytes do not compress: stored sizes are the data plus small objects
    assert 600_000 <= a["stored"] < 640_000 and 200_000 <= b["stored"] < 215_000
    assert 200_000 <= a["shared"] < 205_000 and b["shared"] == a["shared"]
    assert a["unique"] == a["stored"] - a["shared"] and b["unique"] < 10_000
    branches = {x["name"]: x for x in a["branches"]}
    assert branches["master"]["logical"] == 500_000
    assert branches["side"]["logical"] == 600_000
    assert 100_000 <= branches["side"]["unique"] < 105_000  # only its own commit's file
    assert branches["master"]["unique"] == 0  # side's history holds all of master's
    subdots = {x["name"]: x for x in a["subdots"]}
    assert subdots["db"]["logical"] == 200_000 and subdots["files"]["logical"] == 300_000
    assert 300_000 <= subdots["files"]["unique"] < 305_000
    assert report["packs"] >= a["stored"] + b["unique"]
    assert report["reclaimable"] == 0  # (a checkout -b once stored an empty tree for nothing)
    text = dm.ok("du", "a")
    assert "branch side" in text and "subdot files" in text and "dm gc would free" in text
    dm.ok("dot", "delete", "-f", "a")
    after = json.loads(dm.ok("du", "--json"))
    assert [d["name"] for d in after["dots"]] == ["b"]
    assert after["dots"][0]["shared"] == 0 and after["reclaimable"] >= 400_000
    assert dm("du", "nope").returncode == 3
