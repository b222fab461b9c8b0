"""The browse, tag, mount and diff --data commands attacked (a review's findings, each a
failure before its fix): what a commit holds must never lead a command out of it."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from tests.conftest import DM


@pytest.mark.slow
def test_diff_data_does_not_follow_a_symlink_out_of_the_export(dm: DM) -> None:
    dm.ok("init", "app")
    files = dm.path("app.files")
    (files / "leak").symlink_to("/etc/hostname")
    dm.ok("commit", "-m", "one")
    (files / "leak").unlink()
    (files / "leak").symlink_to("/etc/passwd")
    dm.ok("commit", "-m", "two")
    out = dm.ok("diff", "--data", "HEAD^", "HEAD")
    assert "root:" not in out  # /etc/passwd is the host's, not the commit's


@pytest.mark.slow
def test_sqlite_table_whose_name_starts_with_sqlite_is_compared(dm: DM) -> None:
    dm.ok("init", "app")
    db = dm.path("app.db") / "app.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE sqlitestats (id INTEGER PRIMARY KEY, v TEXT)")
    dm.ok("commit", "-m", "one")
    with sqlite3.connect(db) as c:
        c.execute("INSERT INTO sqlitestats VALUES (1, 'new')")
    dm.ok("commit", "-m", "two")
    reports = json.loads(dm.ok("diff", "--data", "HEAD^", "HEAD", "--json"))
    text = json.dumps(reports)
    assert "sqlitestats" in text  # LIKE 'sqlite_%': '_' is a wildcard


@pytest.mark.slow
def test_sqlite_names_with_quotes_are_compared(dm: DM) -> None:
    dm.ok("init", "app")
    db = dm.path("app.db") / "app.db"
    with sqlite3.connect(db) as c:
        c.execute('CREATE TABLE "we""ird" (id INTEGER PRIMARY KEY, "co""l" TEXT)')
    dm.ok("commit", "-m", "one")
    with sqlite3.connect(db) as c:
        c.execute('INSERT INTO "we""ird" VALUES (1, \'x\')')
    dm.ok("commit", "-m", "two")
    got = json.loads(dm.ok("diff", "--data", "HEAD^", "HEAD", "--json"))
    [db] = got[0]["databases"]
    assert db["tables"]['we"ird']["first"]["added"] == [{"id": 1, 'co"l': "x"}]


@pytest.mark.slow
def test_sqlite_duplicate_row_without_key_is_a_change(dm: DM) -> None:
    dm.ok("init", "app")
    db = dm.path("app.db") / "app.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE log (v TEXT)")
        c.execute("INSERT INTO log VALUES ('dup')")
    dm.ok("commit", "-m", "one")
    with sqlite3.connect(db) as c:
        c.execute("INSERT INTO log VALUES ('dup')")
    dm.ok("commit", "-m", "two")
    [report] = json.loads(dm.ok("diff", "--data", "HEAD^", "HEAD", "--json"))
    t = report["databases"][0]["tables"]["log"]
    assert (t["added"], t["removed"]) == (1, 0) and t["first"]["added"] == [{"v": "dup"}]


@pytest.mark.slow
def test_binary_file_with_nuls_gets_no_text_diff(dm: DM) -> None:
    dm.ok("init", "app")
    f = dm.path("app.files") / "blob"
    f.write_bytes(b"U" * 10 + bytes(8000))
    dm.ok("commit", "-m", "one")
    f.write_bytes(b"V" * 10 + bytes(8000))
    dm.ok("commit", "-m", "two")
    out = dm.ok("diff", "--data", "HEAD^", "HEAD")
    assert "\\x00" not in out


@pytest.mark.slow
def test_a_tag_cannot_shadow_a_commit_id_prefix(dm: DM) -> None:
    dm.ok("init", "app")
    (dm.path("app.files") / "a").write_text("1")
    dm.ok("commit", "-m", "one")
    (dm.path("app.files") / "a").write_text("2")
    dm.ok("commit", "-m", "two")
    first = json.loads(dm.ok("log", "--json"))[1]["id"]
    made = dm("tag", first[:8], "HEAD")
    assert made.returncode == 2 and "looks like a commit id" in made.stderr
    assert json.loads(dm.ok("show", first[:8], "--json"))["id"] == first



@pytest.mark.slow
def test_ctrl_c_in_an_export_leaves_nothing_half_written(dm: DM, tmp_path) -> None:
    import signal
    import subprocess
    import time

    from tests.conftest import DM_BIN

    dm.ok("init", "app")
    db = dm.path("app.db")
    for d in range(20):  # many files in many folders, as a database's are
        (db / f"d{d}").mkdir()
        for i in range(150):
            (db / f"d{d}" / f"f{i}").write_bytes(os.urandom(12_000))
    dm.ok("commit", "-m", "big", "--no-freeze")
    for attempt in range(5):
        dest = tmp_path / f"out{attempt}"
        proc = subprocess.Popen(  # Ctrl-C as a terminal sends it, also when the suite
            # runs with SIGINT ignored (a background job of a script, as on CI)
            [DM_BIN, "export", "HEAD", str(dest)], env=dm.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 30
        while not any(".dm-export-" in p.name for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(0.02 * attempt)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # it finished first
        assert proc.returncode == 130 and ("aborted" in err or "interrupted" in err), err
        assert len(err.strip().splitlines()) == 1, err  # (click starts a new line first)
        assert not dest.exists()
        assert not [p for p in tmp_path.iterdir() if ".dm-export-" in p.name]
        return
    raise AssertionError("every export finished before Ctrl-C reached it")


@pytest.mark.slow
def test_mount_refuses_a_folder_another_user_could_swap(dm: DM, tmp_path) -> None:
    import shutil

    _one_commit(dm)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "m").mkdir()
    shutil.chown(theirs, "nobody")  # they could put a symlink where m is, once it is checked
    p = dm("mount", "HEAD", str(theirs / "m"))
    assert p.returncode == 2 and "another user" in p.stderr, p.stderr
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    (open_dir / "m").mkdir()
    open_dir.chmod(0o777)  # writable by all and not sticky
    p = dm("mount", "HEAD", str(open_dir / "m"))
    assert p.returncode == 2 and "another user" in p.stderr, p.stderr
    assert json.loads(dm.ok("mount", "--json")) == []


def _one_commit(dm: DM) -> None:
    dm.ok("init", "app")
    (dm.path("app.files") / "a").write_text("1")
    dm.ok("commit", "-m", "one")
