"""The reflink backend on a real XFS filesystem (``reflink=1``, a loop device): commits copy
the subdots as reflinked trees in the freeze and read only the blocks that changed; resets and
branches at kept states are reflinked copies. Content ids stay those of plain folders."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import DM, capture
from tests.integration.test_btrfs import _commit, _kept, _paged_file, _rewrite_pages, _same_as_plain

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
    first = _commit(xdm, "one")
    assert _kept(xdm.home) == {first["id"]}
    changed = _rewrite_pages(db / "table", every=50, start=3)
    (db / "up" / "f7").write_bytes(b"seven")
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
