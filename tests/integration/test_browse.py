"""Looking at old states without moving (issue 15): dm show, dm ls, dm cat, dm log REF
--oneline and dm checkout -b NEW START, through the real dm command."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import DM, DM_BIN, capture


def _two_commits(dm: DM) -> tuple[str, str, bytes]:
    dm.ok("init", "app")
    db, up = dm.path("app.db"), dm.path("app.uploads")
    (db / "base").mkdir()
    big = os.urandom(3 << 20)  # many chunks: the stream goes through several batches
    (db / "base" / "table").write_bytes(big)
    (db / "PG_VERSION").write_text("15\n")
    (db / "link").symlink_to("PG_VERSION")
    (up / "logo.png").write_bytes(b"\x89PNG" + bytes(5000) + b"end")  # a hole in the middle
    dm.ok("commit", "-m", "first state\n\nwith a body", "--metadata", "ticket=BUG-42")
    (db / "base" / "table").write_bytes(big[:1000] + b"changed" + big[1007:])
    (db / "new").write_text("row")
    (up / "logo.png").unlink()
    dm.ok("commit", "-m", "second")
    log = json.loads(dm.ok("log", "--json"))
    return log[1]["id"], log[0]["id"], big


@pytest.mark.slow
def test_show_ls_and_cat_read_any_commit_without_moving(dm: DM) -> None:
    first, second, big = _two_commits(dm)
    before = capture(dm.path("app.db"))

    shown = json.loads(dm.ok("show", "HEAD^", "--json"))
    assert shown["id"] == first and shown["parents"] == []
    assert shown["metadata"] == {"ticket": "BUG-42"} and shown["message"].startswith("first")
    assert shown["subdots"] == {"db": {"files": 2, "bytes": len(big) + 3},
                                "uploads": {"files": 1, "bytes": 5007}}
    assert shown["changes"]["added"] == 4 and shown["changes"]["removed"] == 0  # link too
    now = json.loads(dm.ok("show", "--json"))
    assert now["id"] == second and now["parents"] == [first]
    assert (now["changes"]["added"], now["changes"]["removed"], now["changes"]["changed"]) == (
        1, 1, 1)
    text = dm.ok("show", first[:8])
    assert "ticket=BUG-42" in text and "SUBDOT" in text and "4 added" in text

    assert "uploads" in dm.ok("ls", "HEAD^") and "uploads" in dm.ok("ls", "HEAD")
    assert dm.ok("ls") == dm.ok("list") and dm.ok("ls", "--json") == dm.ok("list", "--json")
    top = {e["path"]: e for e in json.loads(dm.ok("ls", "HEAD^:db", "--json"))}
    assert set(top) == {"base", "PG_VERSION", "link"}
    assert top["link"]["kind"] == "symlink" and top["link"]["target"] == "PG_VERSION"
    assert top["base"]["kind"] == "folder"
    deep = [e["path"] for e in json.loads(dm.ok("ls", "-r", "HEAD^:db", "--json"))]
    assert deep == ["PG_VERSION", "base", "base/table", "link"]
    one = json.loads(dm.ok("ls", f"{first}:db/base/table", "--json"))
    assert [(e["path"], e["size"]) for e in one] == [("base/table", len(big))]
    assert "link -> PG_VERSION" in dm.ok("ls", "HEAD^:db")

    got = subprocess.run([DM_BIN, "cat", "HEAD^:db/base/table"], env=dm.env,
                         capture_output=True, check=True, stdin=subprocess.DEVNULL).stdout
    assert got == big
    logo = subprocess.run([DM_BIN, "cat", "HEAD~1:uploads/logo.png"], env=dm.env,
                          capture_output=True, check=True, stdin=subprocess.DEVNULL).stdout
    assert logo == b"\x89PNG" + bytes(5000) + b"end"
    # A reader that stops early is no error.
    head = subprocess.run(f"{DM_BIN} cat HEAD^:db/base/table | head -c 10", shell=True,
                          env=dm.env, capture_output=True, stdin=subprocess.DEVNULL)
    assert head.stdout == big[:10] and head.stderr == b""

    assert capture(dm.path("app.db")) == before  # nothing moved
    assert json.loads(dm.ok("log", "--json"))[0]["id"] == second


@pytest.mark.slow
def test_bad_places_are_one_line_errors(dm: DM) -> None:
    _two_commits(dm)
    for args, code, words in [
        (("cat", "HEAD:db/base"), 2, "is a folder"),
        (("cat", "HEAD:db/link"), 2, "symlink to 'PG_VERSION'"),
        (("cat", "HEAD:uploads/logo.png"), 3, "no logo.png"),
        (("cat", "HEAD:db/PG_VERSION/x"), 3, "not a folder"),
        (("cat", "db/PG_VERSION"), 2, "REF:SUBDOT/PATH"),
        (("cat", "HEAD:nope/x"), 3, "no subdot 'nope' (it has: db, uploads)"),
        (("ls", "HEAD:db/../../etc"), 2, "no . or .."),
        (("ls", "HEAD:"), 2, "names no subdot"),
        (("ls", "nosuchref"), 3, "unknown ref"),
        (("show", "HEAD~5"), 3, "goes back 5 commits"),
    ]:
        p = dm(*args)
        assert p.returncode == code, (args, p.returncode, p.stderr)
        assert words in p.stderr and len(p.stderr.splitlines()) == 1, (args, p.stderr)


@pytest.mark.slow  # checkouts
def test_log_of_a_ref_and_a_branch_started_at_an_old_commit(dm: DM) -> None:
    first, second, big = _two_commits(dm)
    lines = dm.ok("log", "--oneline").splitlines()
    assert lines == [f"{second[:12]} second", f"{first[:12]} first state"]
    dm.ok("checkout", "-b", "bug-42", "HEAD^")
    assert dm.ok("log", "--oneline").splitlines() == [f"{first[:12]} first state"]
    assert (dm.path("app.db") / "base" / "table").read_bytes() == big
    assert not (dm.path("app.db") / "new").exists()
    assert (dm.path("app.uploads") / "logo.png").exists()
    dm.ok("checkout", "master")
    assert (dm.path("app.db") / "new").read_text() == "row"
    assert dm.ok("log", "--oneline", "bug-42").splitlines() == [f"{first[:12]} first state"]
    reflog = json.loads(dm.ok("reflog", "--json"))
    assert any(e["message"] == "branched from HEAD^" for e in reflog)
    p = dm("checkout", "bug-42", first)
    assert p.returncode == 2 and "for a new branch" in p.stderr
    p = dm("checkout", "-b", "other", "nope")
    assert p.returncode == 3 and "unknown ref" in p.stderr
    assert "other" not in dm.ok("branch")


@pytest.mark.slow
def test_status_tells_the_head_the_changes_and_the_writers(dm: DM) -> None:
    dm.ok("init", "app")
    db = dm.path("app.db")
    assert "No commits yet" in dm.ok("status")
    (db / "keep").write_text("k")
    dm.ok("commit", "-m", "base state")
    head = json.loads(dm.ok("log", "--json"))[0]["id"]
    text = dm.ok("status")
    assert text.splitlines()[:3] == [
        "On dot app, branch master", text.splitlines()[1],
        "Nothing to commit: the working state is the head's"]
    assert text.splitlines()[1].startswith(f"HEAD {head[:12]} base state (")
    for i in range(25):
        (db / f"f{i:02d}").write_text("x" * i)
    (db / "keep").unlink()
    tails = [subprocess.Popen(["tail", "-f", str(db / "f00")], stdout=subprocess.DEVNULL)
             for _ in range(2)]
    try:
        text = dm.ok("status")
        assert "  db: 25 added, 1 removed, 0 changed" in text
        assert "    + f00" in text and "    + f19" in text and "    + f20" not in text
        assert "... and 6 more (dm diff)" in text  # f20-f24 and keep
        assert "Writers: tail (2 processes)" in text
        out = json.loads(dm.ok("status", "--json"))
        assert out["head"] == head and out["state"] == "dirty" and len(out["changes"]) == 26
        assert {"subdot": "db", "status": "removed", "path": "keep", "old_size": 1,
                "new_size": 0} in out["changes"]
        assert out["uncommitted"] == sum(range(25))
        assert sorted(w["pid"] for w in out["writers"]) == sorted(t.pid for t in tails)
    finally:
        for t in tails:
            t.kill()
            t.wait()


@pytest.mark.slow  # branches, a gc
def test_tags_name_states_anywhere_a_ref_goes_and_keep_them_from_gc(dm: DM) -> None:
    first, second, big = _two_commits(dm)
    assert "No tags yet" in dm.ok("tag")
    dm.ok("tag", "bug-42", "HEAD^", "-m", "the table before the change")
    tags = json.loads(dm.ok("tag", "--json"))
    assert [(t["name"], t["commit"], t["message"], t["tagger"]) for t in tags] == [
        ("bug-42", first, "the table before the change", "tester")]
    assert json.loads(dm.ok("show", "bug-42", "--json"))["id"] == first
    assert json.loads(dm.ok("log", "bug-42", "--json"))[0]["id"] == first
    for args, code, words in [
        (("tag", "bug-42"), 4, "already exists (dm tag -f moves it)"),
        (("tag", "master"), 4, "is a branch"),
        (("checkout", "-b", "bug-42"), 4, "is a tag"),
        (("tag", "HEAD"), 2, "reserved"),
        (("tag", "a//b"), 2, "tag name 'a//b' may only contain"),
        (("tag", "x", "nope"), 3, "unknown ref 'nope': not HEAD, a branch, a tag or a commit"),
        (("tag", "-d", "nope"), 3, "no tag 'nope'"),
        (("tag", "-m", "why"), 2, "for making a tag"),
    ]:
        p = dm(*args)
        assert p.returncode == code and words in p.stderr, (args, p.returncode, p.stderr)
    dm.ok("tag", "-f", "bug-42", "HEAD")
    assert json.loads(dm.ok("tag", "--json"))[0]["commit"] == second

    # A state only a tag reaches survives branch deletion, reflog expiry and gc.
    dm.ok("checkout", "-b", "spike")
    (dm.path("app.db") / "spike-only").write_bytes(b"s" * 70_000)
    dm.ok("commit", "-m", "spike state")
    spike = json.loads(dm.ok("log", "--json"))[0]["id"]
    dm.ok("tag", "spike-state")
    dm.ok("checkout", "master")
    dm.ok("branch", "-D", "spike")
    dm.ok("reflog", "expire", "--days", "0")
    dm.ok("gc")
    assert json.loads(dm.ok("fsck", "--json"))["ok"]
    got = subprocess.run([DM_BIN, "cat", "spike-state:db/spike-only"], env=dm.env,
                         capture_output=True, check=True, stdin=subprocess.DEVNULL).stdout
    assert got == b"s" * 70_000
    dm.ok("checkout", "-b", "back", "spike-state")
    assert (dm.path("app.db") / "spike-only").read_bytes() == got
    assert json.loads(dm.ok("log", "--json"))[0]["id"] == spike
    deleted = json.loads(dm.ok("tag", "-d", "bug-42", "--json"))
    assert deleted == {"deleted": "bug-42", "commit": second}
    assert [t["name"] for t in json.loads(dm.ok("tag", "--json"))] == ["spike-state"]


@pytest.mark.slow
def test_fsck_finds_a_tag_whose_commit_is_gone_and_repair_drops_it(dm: DM) -> None:
    import sqlite3

    _two_commits(dm)
    dm.ok("tag", "good")
    dm.ok("tag", "bad")
    with sqlite3.connect(dm.home / "meta.db") as db:
        db.execute("UPDATE tags SET commit_id=? WHERE name='bad'", (b"\x01" * 32,))
    report = json.loads(dm("fsck", "--json").stdout)
    assert not report["ok"] and any("tag bad of app" in p for p in report["problems"]), report
    dm.ok("fsck", "--repair")
    assert [t["name"] for t in json.loads(dm.ok("tag", "--json"))] == ["good"]
    assert json.loads(dm.ok("fsck", "--json"))["ok"]


@pytest.mark.slow  # three exports
def test_export_writes_any_state_byte_exact_into_a_new_folder_or_a_tar_stream(
        dm: DM, tmp_path) -> None:
    import tarfile

    dm.ok("init", "app")
    db, up = dm.path("app.db"), dm.path("app.uploads")
    with open(db / "sparse", "wb") as f:  # 16 MiB with 5 bytes at the end: a hole
        f.truncate(16 << 20)
        f.seek((16 << 20) - 5)
        f.write(b"tail!")
    (db / "sub").mkdir(mode=0o750)
    (db / "sub" / "rows").write_bytes(os.urandom(100_000))
    (db / "sub" / "rows").chmod(0o600)
    (db / "link").symlink_to("sub/rows")
    (up / "a.txt").write_text("a")
    dm.ok("commit", "-m", "to export")
    wanted = {s: capture(dm.path(f"app.{s}")) for s in ("db", "uploads")}
    (db / "sub" / "rows").write_bytes(b"changed")  # exports read the commit, not the folder
    dm.ok("commit", "-m", "later")

    out = tmp_path / "export"
    assert "Exported HEAD^ (db, uploads)" in dm.ok("export", "HEAD^", str(out))
    assert {s: capture(out / s) for s in ("db", "uploads")} == wanted
    assert os.lstat(out / "db" / "sparse").st_blocks * 512 < (1 << 20)  # the hole stays one
    one = tmp_path / "one"
    one.mkdir()  # an empty folder will do
    got = json.loads(dm.ok("export", "HEAD^", str(one), "--subdot", "db", "--json"))
    assert got["subdots"] == ["db"] and capture(one) == wanted["db"]

    tar_bytes = subprocess.run([DM_BIN, "export", "HEAD^", "--tar"], env=dm.env,
                               capture_output=True, check=True, stdin=subprocess.DEVNULL).stdout
    untar = tmp_path / "untar"
    untar.mkdir()
    tar = tmp_path / "state.tar"
    tar.write_bytes(tar_bytes)
    with tarfile.open(tar) as t:
        assert sorted(t.getnames()) == ["db", "db/link", "db/sparse", "db/sub", "db/sub/rows",
                                        "uploads", "uploads/a.txt"]
        t.extractall(untar, filter="fully_trusted")
    for s in ("db", "uploads"):  # tar keeps times as floats (and tar sets none on symlinks)
        got_s = capture(untar / s)
        assert {k: v[:4] + v[5:] for k, v in got_s.items() if v[0] != "l"} == {
            k: v[:4] + v[5:] for k, v in wanted[s].items() if v[0] != "l"}
        assert all(abs(int(got_s[k][4]) - int(v[4])) < 1000 for k, v in wanted[s].items()
                   if v[0] != "l")  # within a microsecond
        assert {k: v[1] for k, v in got_s.items() if v[0] == "l"} == {
            k: v[1] for k, v in wanted[s].items() if v[0] == "l"}

    for args, code, words in [
        (("export", "HEAD", str(out)), 4, "exists and is not an empty folder"),
        (("export", "HEAD", str(tmp_path / "x"), "--subdot", "nope"), 3, "no subdot 'nope'"),
        (("export", "HEAD", str(tmp_path / "no" / "such")), 3, "is not a folder"),
        (("export", "HEAD", str(tmp_path / "y"), "--tar"), 2, "give no DEST"),
        (("export", "HEAD"), 2, "give a DEST"),
    ]:
        p = dm(*args)
        assert p.returncode == code and words in p.stderr, (args, p.returncode, p.stderr)
    assert not [p for p in tmp_path.iterdir() if "dm-export" in p.name]  # nothing half-made


@pytest.mark.slow  # three FUSE servers, a gc
def test_mount_shows_any_commit_read_only_and_keeps_it_from_gc(dm: DM, tmp_path) -> None:
    first, second, big = _two_commits(dm)
    wanted = capture(dm.path("app.db"))
    at_first, at_second = tmp_path / "first", tmp_path / "second"
    at_first.mkdir()
    at_second.mkdir()
    out = json.loads(dm.ok("mount", "HEAD^", str(at_first), "--json"))
    assert out["commit"] == first
    try:
        dm.ok("mount", "HEAD", str(at_second))  # several at once
        assert sorted(os.listdir(at_first)) == ["db", "uploads"]
        assert (at_first / "db" / "base" / "table").read_bytes() == big
        with open(at_first / "db" / "base" / "table", "rb") as f:  # a read in the middle
            f.seek(2 << 20)
            assert f.read(10) == big[(2 << 20):(2 << 20) + 10]
        assert os.readlink(at_first / "db" / "link") == "PG_VERSION"
        assert (at_first / "uploads" / "logo.png").read_bytes() == (
            b"\x89PNG" + bytes(5000) + b"end")
        assert capture(at_second / "db") == {k: v for k, v in wanted.items() if k != "."} | {
            ".": capture(at_second / "db")["."]}
        st = os.lstat(at_second / "db" / "new")
        assert st.st_mtime_ns == os.lstat(dm.path("app.db") / "new").st_mtime_ns
        try:
            (at_second / "db" / "new").write_text("no")
            raise AssertionError("a mounted commit was written to")
        except OSError as e:
            assert e.errno == 30  # EROFS
        listed = json.loads(dm.ok("mount", "--json"))
        assert [(m["folder"], m["commit"], m["serving"]) for m in listed] == sorted(
            [(str(at_first), first, True), (str(at_second), second, True)])

        # gc keeps a mounted commit that nothing else reaches any more
        dm.ok("checkout", "-b", "spike")
        (dm.path("app.db") / "spike").write_bytes(os.urandom(50_000))
        dm.ok("commit", "-m", "spike")
        at_spike = tmp_path / "spike"
        at_spike.mkdir()
        dm.ok("mount", "spike", str(at_spike))
        spike_bytes = (dm.path("app.db") / "spike").read_bytes()
        dm.ok("checkout", "master")
        dm.ok("branch", "-D", "spike")
        dm.ok("reflog", "expire", "--days", "0")
        dm.ok("gc")
        assert (at_spike / "db" / "spike").read_bytes() == spike_bytes
        p = dm("dot", "delete", "-f", "app")
        assert p.returncode == 5 and "dm umount" in p.stderr
        dm.ok("umount", str(at_spike))
        assert os.listdir(at_spike) == []

        for args, code, words in [
            (("mount", "HEAD", str(at_first)), 4, "not empty"),
            (("mount", "HEAD", str(tmp_path / "nope")), 3, "is not a folder"),
            (("mount", "HEAD"), 2, "give the FOLDER"),
            (("mount", "nosuch", str(at_spike)), 3, "unknown ref"),
            (("umount", str(at_spike)), 3, "no commit is mounted"),
        ]:
            p = dm(*args)
            assert p.returncode == code and words in p.stderr, (args, p.returncode, p.stderr)
    finally:
        for folder in (at_first, at_second):
            dm("umount", str(folder))
    assert os.listdir(at_first) == [] and json.loads(dm.ok("mount", "--json")) == []
    assert json.loads(dm.ok("fsck", "--json"))["ok"]
