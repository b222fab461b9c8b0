"""The seed's journey, driven through the real dm command."""

import json
import os
import subprocess
import time

import pytest

from tests.conftest import capture


@pytest.mark.slow
def test_seed_journey(dm):
    dm.ok("init", "app")
    clicks, users, uploads = (dm.path(f"app.{s}") for s in ("clicks-db", "users-db", "uploads"))
    (clicks / "dump.rdb").write_bytes(b"clicks:1")
    (users / "users.tbl").write_bytes(os.urandom(8192 * 20))
    (uploads / "logo.png").write_bytes(b"\x89PNG" + os.urandom(500))
    out = dm.ok("commit", "-m", "first state", "-d", "ticket=BUG-1")
    assert "first state" in out
    first = capture(clicks), capture(users), capture(uploads)

    listing = json.loads(dm.ok("list", "--json"))
    assert listing[0]["name"] == "app" and listing[0]["current"] and not listing[0]["dirty"]
    assert set(listing[0]["subdots"]) == {"clicks-db", "users-db", "uploads"}

    (clicks / "dump.rdb").write_bytes(b"clicks:2")
    (uploads / "new.png").write_bytes(b"new")
    (uploads / "logo.png").unlink()
    assert json.loads(dm.ok("list", "--json"))[0]["dirty"]
    changes = json.loads(dm.ok("diff", "--json"))
    assert {(c["subdot"], c["status"], c["path"]) for c in changes} == {
        ("clicks-db", "changed", "dump.rdb"), ("uploads", "added", "new.png"),
        ("uploads", "removed", "logo.png")}
    dm.ok("commit", "-m", "second state")

    log = json.loads(dm.ok("log", "--json"))
    assert [c["message"] for c in log] == ["second state", "first state"]
    assert log[1]["metadata"] == {"ticket": "BUG-1"}
    assert log[0]["parents"] == [log[1]["id"]] and log[0]["author"] == "tester"
    assert len(json.loads(dm.ok("log", "-n", "1", "--json"))) == 1
    stat = json.loads(dm.ok("diff", "HEAD^", "HEAD", "--stat", "--json"))["stat"]
    assert stat["uploads"] == {"added": 1, "removed": 1, "changed": 0}

    dm.ok("checkout", "-b", "experiment")
    assert "* experiment" in dm.ok("branch")
    (users / "users.tbl").write_bytes(b"broken")
    dm.ok("commit", "-m", "broke it")
    dm.ok("checkout", "master")
    assert (users / "users.tbl").stat().st_size == 8192 * 20
    dm.ok("checkout", "experiment")
    assert (users / "users.tbl").read_bytes() == b"broken"
    dm.ok("checkout", "master")

    dm.ok("reset", "--hard", "HEAD^")
    assert (capture(clicks), capture(users), capture(uploads)) == first
    assert json.loads(dm.ok("log", "--json"))[0]["id"] == log[1]["id"]
    dm.ok("reset", log[0]["id"][:10])  # back again, by id prefix; no --hard, as in Dotmesh
    assert (clicks / "dump.rdb").read_bytes() == b"clicks:2"
    assert "no problems" in dm.ok("fsck")


@pytest.mark.slow
def test_reset_saves_the_discarded_working_state(dm):
    dm.ok("init", "app")
    d = dm.path("app")
    (d / "f").write_text("committed")
    dm.ok("commit", "-m", "c1")
    (d / "f").write_text("precious uncommitted work")
    r = json.loads(dm.ok("reset", "--hard", "HEAD", "--json"))
    assert (d / "f").read_text() == "committed"
    assert r["saved"]
    entry = json.loads(dm.ok("reflog", "--json"))[0]
    assert entry["action"] == "reset" and entry["saved"] == r["saved"]
    dm.ok("reset", "--hard", r["saved"])
    assert (d / "f").read_text() == "precious uncommitted work"


@pytest.mark.slow
def test_uncommitted_changes_stay_on_their_branch(dm):
    dm.ok("init", "app")
    d = dm.path("app.db")
    (d / "f").write_text("v1")
    dm.ok("commit", "-m", "c1")
    (d / "f").write_text("master wip")
    dm.ok("checkout", "-b", "other")
    assert (d / "f").read_text() == "v1"
    (d / "g").write_text("other wip")
    dm.ok("checkout", "master")
    assert (d / "f").read_text() == "master wip" and not (d / "g").exists()
    dm.ok("checkout", "other")
    assert (d / "g").read_text() == "other wip"


@pytest.mark.slow
def test_unchanged_files_are_not_read_again(dm, tmp_path):
    dm.ok("init", "app")
    d = dm.path("app")
    for i in range(50):
        (d / f"f{i}").write_bytes(os.urandom(1000))
    time.sleep(1.1)  # files changed within the last second are re-read (racy stat)
    r1 = json.loads(dm.ok("commit", "-m", "one", "--json"))
    assert r1["files_read"] == 50
    r2 = json.loads(dm.ok("commit", "-m", "two", "--json"))
    assert r2["files_read"] == 0 and r2["bytes_stored"] < 2000
    (d / "f3").write_bytes(b"changed")
    r3 = json.loads(dm.ok("commit", "-m", "three", "--json"))
    assert r3["files_read"] == 1


@pytest.mark.slow
def test_page_write_stores_about_one_page(dm):
    dm.ok("init", "app")
    d = dm.path("app.pg")
    (d / "heap").write_bytes(os.urandom(8192 * 512))  # 4 MiB of incompressible pages
    dm.ok("commit", "-m", "one")
    with open(d / "heap", "r+b") as f:
        f.seek(8192 * 100)
        f.write(os.urandom(8192))
    r = json.loads(dm.ok("commit", "-m", "two", "--json"))
    file_list = 512 * 36  # one (id, length) per block; rewritten when the file changes
    assert r["bytes_stored"] < 8192 + file_list + 4096


@pytest.mark.slow
def test_dm_version_and_help(dm):
    assert json.loads(dm.ok("version", "--json"))["format"] == 2
    for cmd in ("init", "list", "switch", "path", "commit", "log", "branch", "checkout",
                "reset", "diff", "reflog", "fsck", "version"):
        assert "Example" in dm.ok(cmd, "--help"), cmd
    assert "Example" in dm.ok("dot", "show", "--help")
    assert "Example" in dm.ok("dot", "delete", "--help")


@pytest.mark.slow
def test_switch_and_dot_show_and_delete(dm):
    dm.ok("init", "a")
    dm.ok("init", "b")
    assert json.loads(dm.ok("dot", "show", "--json"))["name"] == "a"
    dm.ok("switch", "b")
    assert json.loads(dm.ok("dot", "show", "--json"))["name"] == "b"
    dm.path("a.x")
    assert "x" in json.loads(dm.ok("dot", "show", "a", "--json"))["subdots"]
    dm.ok("dot", "delete", "-f", "a")
    assert [d["name"] for d in json.loads(dm.ok("list", "--json"))] == ["b"]
    assert dm("dot", "show", "a").returncode == 3


@pytest.mark.slow
def test_list_and_show_count_commits_and_uncommitted_bytes(dm):
    dm.ok("init", "app")
    folder = dm.path("app.db")
    (folder / "keep.bin").write_bytes(b"k" * 5000)
    dm.ok("commit", "-m", "one")
    (folder / "keep.bin").write_bytes(b"K" * 5000)
    dm.ok("commit", "-m", "two")
    [row] = json.loads(dm.ok("list", "--json"))
    assert (row["commits"], row["uncommitted"], row["state"]) == (2, 0, "clean")
    (folder / "new.bin").write_bytes(b"n" * 3000)  # added: counts
    (folder / "keep.bin").write_bytes(b"x" * 7000)  # changed: counts at its new size
    (folder / "sub").mkdir()
    (folder / "sub" / "f").write_bytes(b"f" * 100)
    show = json.loads(dm.ok("dot", "show", "--json"))
    assert (show["commits"], show["uncommitted"]) == (2, 10_100)
    (folder / "keep.bin").unlink()  # removed: nothing left to commit of it
    assert json.loads(dm.ok("dot", "show", "--json"))["uncommitted"] == 3100
    text = dm.ok("list")
    assert "COMMITS" in text.splitlines()[0] and "UNCOMMITTED" in text.splitlines()[0]
    assert "3.0 KiB" in text and "  2  " in text
    assert "commits:  2" in dm.ok("dot", "show")


@pytest.mark.slow
def test_a_dot_in_use_is_not_deleted(dm):
    dm.ok("init", "app")
    d = dm.path("app.db")
    (d / "f").write_text("data")
    user = subprocess.Popen(["sleep", "300"], cwd=d)
    try:
        p = dm("dot", "delete", "-f", "app")
        assert p.returncode == 5 and "sleep" in p.stderr and "--stop-writers" in p.stderr
        assert (d / "f").read_text() == "data"
        out = dm.ok("dot", "delete", "-f", "app", "--stop-writers")
        assert "Stopped process sleep" in out or "sleep" in out
        assert user.wait(timeout=30) != 0
    finally:
        user.kill()
        user.wait()
    assert not d.exists() and dm.ok("list").startswith("No dots")


@pytest.mark.slow
def test_a_deleted_dot_is_forgotten(dm):
    """A new dot of a deleted dot's name starts empty: no history, no reflog, no old ids."""
    dm.ok("init", "app")
    (dm.path("app") / "f").write_text("old")
    dm.ok("commit", "-m", "old")
    old = json.loads(dm.ok("log", "--json"))[0]["id"]
    dm.ok("dot", "delete", "-f", "app")
    dm.ok("init", "app")
    assert json.loads(dm.ok("log", "--json")) == []
    assert json.loads(dm.ok("reflog", "--json")) == []
    p = dm("reset", "--hard", old[:12])
    assert p.returncode == 3 and "no commit" in p.stderr
    assert not (dm.path("app") / "f").exists()
