"""Restores preserve everything: bytes, holes, modes, owners, mtimes, links, empty folders."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dotmesh.cli.main import run
from tests.conftest import capture


@pytest.mark.slow
def test_special_attributes_survive_reset(dm):
    dm.ok("init", "app")
    d = dm.path("app.pg")
    os.chmod(d, 0o700)
    (d / "empty-dir" / "nested-empty").mkdir(parents=True)
    sparse = d / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    (d / "exec.sh").write_text("#!/bin/sh\n")
    os.chmod(d / "exec.sh", 0o4755)
    os.symlink("/nonexistent/absolute", d / "dangling")
    os.symlink("exec.sh", d / "rel")
    (d / "owned").write_text("by nobody")
    os.chown(d / "owned", 65534, 65534)
    os.lchown(d / "rel", 65534, 65534)
    os.utime(d / "exec.sh", ns=(1, 123_456_789_123_456_789))
    dm.ok("commit", "-m", "one")
    before = capture(d)

    shutil.rmtree(d / "empty-dir")
    os.chmod(d, 0o755)
    sparse.write_bytes(b"dense now")
    os.chmod(d / "exec.sh", 0o600)
    os.chown(d / "owned", 0, 0)
    (d / "rel").unlink()
    os.mkdir(d / "rel")  # a folder where a link was
    dm.ok("reset", "--hard", "HEAD")
    assert capture(d) == before
    assert os.stat(sparse).st_blocks * 512 < 1 << 20, "the sparse file was filled in"

    # And the same state rebuilt from nothing, on a new branch.
    dm.ok("checkout", "-b", "copy")
    assert capture(d) == before
    assert os.stat(sparse).st_blocks * 512 < 1 << 20


# ---------------------------------------------------------------- property test

NAMES = st.sampled_from(["a", "b", "c", "d.txt", "caf\u00e9", "x y"])
SIZES = st.sampled_from([0, 1, 100, 8192 * 9, 8192 * 10 + 5, 70_000, 200_000])


@st.composite
def contents(draw: st.DrawFn) -> bytes:
    size = draw(SIZES)
    seed = draw(st.integers(0, 3))
    rng = random.Random(seed * 1000 + size)
    data = bytearray(rng.randbytes(size))
    if size > 16384 and draw(st.booleans()):
        start = draw(st.sampled_from([0, 8192]))
        data[start:start + 8192] = bytes(8192)  # a zero page, stored as a hole
    return bytes(data)


@st.composite
def ops(draw: st.DrawFn) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for _ in range(draw(st.integers(1, 12))):
        path = "/".join(draw(st.lists(NAMES, min_size=1, max_size=3)))
        kind = draw(st.sampled_from(["file", "file", "dir", "link", "rm", "chmod", "touch"]))
        if kind == "file":
            out.append((kind, path, draw(contents()), draw(st.sampled_from([0o644, 0o600,
                                                                              0o755]))))
        elif kind == "link":
            out.append((kind, path, draw(st.sampled_from(["a", "../b", "/etc/x", "c/d"]))))
        elif kind == "chmod":
            out.append((kind, path, draw(st.sampled_from([0o700, 0o640, 0o777]))))
        elif kind == "touch":
            out.append((kind, path, draw(st.integers(0, 2**62))))
        else:
            out.append((kind, path))
    return out


def apply(top: Path, operations: list[tuple[object, ...]]) -> None:
    for op in operations:
        kind, rel = op[0], str(op[1])
        p = top / rel
        try:
            if kind in ("file", "dir", "link"):
                p.parent.mkdir(parents=True, exist_ok=True)
                if p.is_symlink() or p.is_file():
                    p.unlink()
                elif p.is_dir():
                    shutil.rmtree(p)
            if kind == "file":
                p.write_bytes(op[2])  # type: ignore[arg-type]
                os.chmod(p, op[3])  # type: ignore[arg-type]
            elif kind == "dir":
                p.mkdir()
            elif kind == "link":
                os.symlink(str(op[2]), p)
            elif kind == "rm":
                if p.is_symlink() or p.is_file():
                    p.unlink()
                elif p.is_dir():
                    shutil.rmtree(p)
            elif kind == "chmod" and p.exists() and not p.is_symlink():
                os.chmod(p, op[2])  # type: ignore[arg-type]
            elif kind == "touch" and os.path.lexists(p):
                os.utime(p, ns=(1, op[2]), follow_symlinks=False)  # type: ignore[arg-type]
        except OSError:
            pass  # a path through a file or a link loop: skip this operation


def dm_run(home: Path, *args: str) -> None:
    assert run(["--home", str(home), *args]) == 0, args


def _fresh_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=ops(), second=ops(), third=ops())
@pytest.mark.slow
def test_commit_mutate_reset_restores_exactly(tmp_path_factory, first, second, third):
    """Random trees and mutations: a reset gives back each committed tree exactly."""
    home = _fresh_home(tmp_path_factory)
    dm_run(home, "init", "app")
    top = home / "dots" / "app" / "subdots" / "s"
    dm_run(home, "path", "app.s")
    apply(top, first)
    dm_run(home, "commit", "-m", "one")
    state_one = capture(top)
    apply(top, second)
    dm_run(home, "commit", "-m", "two")
    two = _master_head(home)
    state_two = capture(top)
    apply(top, third)  # uncommitted changes, discarded by the reset
    dm_run(home, "reset", "--hard", "HEAD^")
    assert capture(top) == state_one
    dm_run(home, "reset", "--hard", two)
    assert capture(top) == state_two
    shutil.rmtree(home)


def _master_head(home: Path) -> str:
    with sqlite3.connect(home / "meta.db") as db:
        row = db.execute("SELECT head FROM branches WHERE dot='app' AND name='master'").fetchone()
    return str(row[0].hex())

