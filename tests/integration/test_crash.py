"""kill -9 at random moments: fsck stays clean and every earlier commit restores exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import DM, capture

pytestmark = pytest.mark.slow  # kill -9 at random moments

BIG_FILES, BIG_SIZE, SMALL_FILES = 4, 8 << 20, 200


def _populate(d: Path, rng: random.Random) -> None:
    for i in range(BIG_FILES):
        (d / f"heap{i}").write_bytes(rng.randbytes(BIG_SIZE))
    (d / "uploads").mkdir()
    for i in range(SMALL_FILES):
        (d / "uploads" / f"u{i}.bin").write_bytes(rng.randbytes(rng.randint(1, 90_000)))


def _mutate(d: Path, rng: random.Random) -> None:
    """Database-like writes to every big file, plus small edits, adds and removes."""
    for i in range(BIG_FILES):
        with open(d / f"heap{i}", "r+b") as f:
            for _ in range(40):
                f.seek(rng.randrange(BIG_SIZE // 8192) * 8192)
                f.write(rng.randbytes(8192))
    for _ in range(10):
        (d / "uploads" / f"u{rng.randrange(SMALL_FILES)}.bin").write_bytes(rng.randbytes(500))
    (d / "uploads" / f"new{rng.random()}").write_bytes(rng.randbytes(3000))
    victims = sorted((d / "uploads").iterdir())
    victims[rng.randrange(len(victims))].unlink()


def _kill_at_random(dm: DM, rng: random.Random, seconds: float, *args: str) -> int | None:
    proc = dm.popen(*args)
    time.sleep(rng.uniform(0, seconds))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def _fsck_clean(dm: DM) -> None:
    r = json.loads(dm.ok("fsck", "--json"))
    assert r["ok"], r["problems"]


def _head(dm: DM) -> str:
    return json.loads(dm.ok("log", "-n", "1", "--json"))[0]["id"]


def test_kill_during_commit_reset_and_checkout(tmp_path):
    rng = random.Random(20261125)
    dm = DM(tmp_path / "home")
    dm.ok("init", "app")
    d = dm.path("app.db")
    _populate(d, rng)
    t0 = time.monotonic()
    dm.ok("commit", "-m", "c1")
    first_commit_s = time.monotonic() - t0
    states = {_head(dm): capture(d)}
    _mutate(d, rng)
    dm.ok("commit", "-m", "c2")
    states[_head(dm)] = capture(d)

    # Commits killed part way; some may finish, and then they are just more commits.
    for i in range(5):
        _mutate(d, rng)
        _kill_at_random(dm, rng, first_commit_s, "commit", "-m", f"killed {i}")
        _fsck_clean(dm)
    dm.ok("commit", "-m", "after the kills")
    states[_head(dm)] = capture(d)

    ids = list(states)
    # Resets killed part way; rerunning the reset completes it.
    for i in range(4):
        _mutate(d, rng)
        target = ids[i % len(ids)]
        _kill_at_random(dm, rng, first_commit_s * 1.5, "reset", "--hard", target)
        _fsck_clean(dm)
        dm.ok("reset", "--hard", target)
        assert capture(d) == states[target]

    # Checkouts killed part way; the next command finishes the switch.
    for i in range(3):
        _kill_at_random(dm, rng, first_commit_s, "checkout", "-b", f"b{i}")
        _fsck_clean(dm)
        branches = json.loads(dm.ok("branch", "--json"))
        current = next(b for b in branches if b["current"])
        if current["name"] != "master":
            assert capture(d) == states[current["head"]]
            dm.ok("checkout", "master")
    for oid, state in states.items():
        dm.ok("reset", "--hard", oid)
        assert capture(d) == state, oid
    _fsck_clean(dm)
    assert os.path.isdir(d)
