"""Bad input gets one line, a non-zero exit and no change to the store."""

import json
import os
import signal
import subprocess

import pytest

from tests.conftest import DM, DM_BIN, flip_byte_of_largest_object

SLOW = pytest.mark.slow  # each case runs dm at least once: the fast loop keeps a few


def _one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and lines[0].startswith("dm: error: ")
    return lines[0]


@pytest.mark.parametrize("args,code,needle", [
    (["init", "bad name"], 2, "may only contain"),
    pytest.param(["init", "x" * 65], 2, "longer than 64", marks=SLOW),
    (["path", "app.a.b"], 2, "subdot name"),
    pytest.param(["path", ".x"], 2, "dot name", marks=SLOW),
    (["switch", "nope"], 3, "no dot named"),
    pytest.param(["log"], 2, "no current dot", marks=SLOW),
    pytest.param(["dot", "delete", "nope"], 3, "no dot named", marks=SLOW),
])
def test_bad_names_and_missing_things(dm, args, code, needle):
    dm.ok("init", "seed")  # a store with no dots in it, and no current dot
    dm.ok("dot", "delete", "-f", "seed")
    p = dm(*args)
    assert p.returncode == code
    assert needle in _one_line_error(p)


@pytest.mark.slow
def test_a_mistyped_home_makes_nothing(dm, tmp_path):
    dm.ok("init", "app")
    typo = DM(tmp_path / "hmoe", store=False)
    for args in (["list"], ["log"], ["commit", "-m", "x"], ["gc"],
                 ["remote", "add", "hub", "a@127.0.0.1:9", "--http", "--api-key-file", "/x"],
                 ["clone", "hub", "a/app"], ["pool", "create", "--size", "1G"],
                 ["serve", "--socket", str(tmp_path / "dm.sock")]):
        p = typo(*args)
        assert p.returncode == 3, (args, p.stderr)
        assert f"no dotmesh store at {tmp_path / 'hmoe'} (did you mean {dm.home}? dm init " \
            "makes one there)" in _one_line_error(p)
    assert not (tmp_path / "hmoe").exists()
    assert "Made a dotmesh store at" in typo.ok("init")  # only dm init makes one
    assert json.loads(typo.ok("init", "--json"))["made"] is False  # there now: nothing to do
    assert "Created dot app" in typo.ok("init", "app")


def test_a_mistyped_dot_makes_nothing(dm):
    dm.ok("init", "app")
    p = dm("path", "apq.db")
    assert p.returncode == 3
    assert "no dot named 'apq' (did you mean 'app'?" in _one_line_error(p)
    assert [d["name"] for d in json.loads(dm.ok("list", "--json"))] == ["app"]
    assert dm.path("app.db").is_dir()  # a new subdot of a dot that exists is made


@pytest.mark.slow
def test_bad_refs_and_flags(dm):
    dm.ok("init", "app")
    assert "no commit yet" in _one_line_error(dm("reset", "--hard", "HEAD"))
    (dm.path("app") / "f").write_text("x")
    dm.ok("commit", "-m", "one")
    before = dm.ok("log", "--json")
    for ref, needle in [("HEAD~9", "goes back 9"), ("nope", "unknown ref"),
                        ("HEAD^x", "bad ref"), ("abcdef01", "no commit")]:
        assert needle in _one_line_error(dm("reset", "--hard", ref))
    assert "KEY=VALUE" in _one_line_error(dm("commit", "-m", "x", "-d", "novalue"))
    assert "empty" in _one_line_error(dm("commit", "-m", " "))
    assert "already exists" in _one_line_error(dm("checkout", "-b", "master"))
    assert "reserved" in _one_line_error(dm("checkout", "-b", "HEAD"))
    assert "no branch" in _one_line_error(dm("checkout", "ghost"))
    assert "at most two" in _one_line_error(dm("diff", "HEAD", "HEAD", "HEAD"))
    assert "add -f" in _one_line_error(dm("dot", "delete", "app"))
    assert dm.ok("log", "--json") == before


def test_unusable_home_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a folder")
    p = DM(f / "home", store=False)("init", "app")  # the one command that makes a store
    assert "cannot use" in _one_line_error(p) and p.returncode == 2


def _flip_byte_of_largest_object(dm: DM, delta: int) -> None:
    """Commit a file, then flip one byte at ``delta`` from its largest object's payload."""
    dm.ok("init", "app")
    (dm.path("app") / "f").write_bytes(os.urandom(100_000))
    dm.ok("commit", "-m", "one")
    flip_byte_of_largest_object(dm, delta)


@pytest.mark.slow
def test_corrupted_pack_is_reported_by_fsck(dm):
    _flip_byte_of_largest_object(dm, 100)
    p = dm("fsck")
    assert p.returncode == 7 and "problem:" in p.stdout
    (dm.path("app") / "f").unlink()
    assert "fails its hash check" in _one_line_error(dm("reset", "--hard", "HEAD"))


@pytest.mark.slow
def test_damaged_record_header_is_reported_by_fsck(dm):
    _flip_byte_of_largest_object(dm, -20)  # inside the record's id field
    p = dm("fsck")
    assert p.returncode == 7 and "header" in p.stdout


@pytest.mark.slow
def test_second_process_on_a_dot_is_refused(dm):
    """A dm that holds the lock (stopped mid-commit) makes a second one fail clearly."""
    dm.ok("init", "app")
    d = dm.path("app")
    (d / "big").write_bytes(os.urandom(64 << 20))
    proc = dm.popen("commit", "-m", "slow")
    try:
        lock = dm.home / "locks" / "app.lock"
        for _ in range(500):
            if lock.exists() and lock.read_text().split(" ")[0] == str(proc.pid):
                break
            subprocess.run(["sleep", "0.01"])
        os.kill(proc.pid, signal.SIGSTOP)
        p = dm("commit", "-m", "other")
        assert p.returncode == 6
        assert f"pid {proc.pid}" in _one_line_error(p)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait()
    assert proc.returncode == 0


@pytest.mark.parametrize("args,code,needle", [
    (["remote", "add", "hub", "bad/host"], 2, "USER@HOST"),
    pytest.param(["remote", "add", "pub", "127.0.0.1:1", "--http"], 14, "cannot reach",
                 marks=SLOW),  # no key: checked by listing the hub's public dots
    pytest.param(["remote", "add", "hub", "a@host:99999"], 2, "bad port", marks=SLOW),
    pytest.param(["remote", "add", "bad name", "a@host"], 2, "may only contain", marks=SLOW),
    pytest.param(["remote", "add", "hub", "a@host"], 2, "no API key", marks=SLOW),
    (["s3", "remote", "add", "s3", "nokeys"], 2, "ACCESS_KEY@ENDPOINT/BUCKET"),
    pytest.param(["s3", "remote", "add", "s3", "key@http://127.0.0.1:1/bucket"], 2,
                 "no S3 secret key", marks=SLOW),
    pytest.param(["s3", "remote", "add", "s3", "k:s@ftp://host/bucket"], 2, "scheme",
                 marks=SLOW),
    pytest.param(["s3", "remote", "add", "s3", "k:s@host/B"], 2, "bucket name", marks=SLOW),
    pytest.param(["push"], 2, "no remote yet", marks=SLOW),
    pytest.param(["push", "hub", "app", "a", "--branch", "b"], 2, "two branches to push",
                 marks=SLOW),
    pytest.param(["pull", "nope"], 3, "no remote named", marks=SLOW),
    pytest.param(["clone", "nope", "a/b"], 3, "no remote named", marks=SLOW),
    pytest.param(["remote", "rm", "nope"], 3, "no remote named", marks=SLOW),
    pytest.param(["remote", "switch", "nope"], 3, "no remote named", marks=SLOW),
])
def test_bad_remote_commands(dm, args, code, needle):
    dm.ok("init", "app")
    p = dm(*args)
    assert p.returncode == code, p.stderr
    assert needle in _one_line_error(p)


def test_an_unreachable_hub_is_one_line(dm):
    p = subprocess.run([DM_BIN, "remote", "add", "hub", "a@127.0.0.1:1", "--http"],
                       env={**dm.env, "DM_API_KEY": "k"}, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 14 and "cannot reach" in _one_line_error(p)
    assert dm.ok("remote").startswith("No remotes")


@pytest.mark.parametrize("args,code,needle", [
    (["--db", "nonsense", "user", "add", "x"], 11, "cannot use database"),
    pytest.param(["--db", "postgresql+psycopg://u:secret@127.0.0.1:1/x", "user", "add", "x"],
                 11, "Connection refused", marks=SLOW),
    pytest.param(["--s3", "bad", "user", "add", "x"], 2, "ACCESS_KEY", marks=SLOW),
    pytest.param(["user", "add", "bad name"], 2, "may only contain", marks=SLOW),
    pytest.param(["collaborator", "add", "noslash", "bob"], 2, "NAMESPACE/DOT", marks=SLOW),
    pytest.param(["collaborator", "add", "a/b", "nobody"], 3, "no user named", marks=SLOW),
    pytest.param(["serve", "--cert", "/etc/hostname"], 2, "both --cert and --key", marks=SLOW),
])
def test_bad_hub_commands(dm, tmp_path, args, code, needle):
    p = dm("hub", "--data", str(tmp_path / "hub"), *args)
    assert p.returncode == code, p.stderr
    line = _one_line_error(p)
    assert needle in line and "secret" not in line


@pytest.mark.slow
def test_reads_never_wait_for_a_writer(dm):
    """While another dm works on the dot, reads answer: refs and history as they are, and
    "busy" where the working state is in flux."""
    dm.ok("init", "app")
    d = dm.path("app")
    (d / "f").write_text("one")
    dm.ok("commit", "-m", "one")
    (d / "f").write_text("two")
    dm.ok("commit", "-m", "two")
    (d / "big").write_bytes(os.urandom(64 << 20))
    proc = dm.popen("reset", "--hard", "HEAD^")
    try:
        lock = dm.home / "locks" / "app.lock"
        for _ in range(500):
            if lock.exists() and lock.read_text().startswith(str(proc.pid)):
                break
            subprocess.run(["sleep", "0.01"])
        os.kill(proc.pid, signal.SIGSTOP)
        listing = json.loads(dm.ok("list", "--json"))[0]
        assert listing["state"] == "busy" and listing["dirty"] is None, listing
        assert listing["busy"] == {"pid": proc.pid, "command": "reset"}
        assert "busy (dm reset, pid" in dm.ok("list")
        assert json.loads(dm.ok("dot", "show", "--json"))["state"] == "busy"
        assert [c["message"] for c in json.loads(dm.ok("log", "--json"))] == ["two", "one"]
        assert "* master" in dm.ok("branch") and dm.ok("reflog")
        assert json.loads(dm.ok("diff", "HEAD^", "HEAD", "--json"))[0]["path"] == "f"
        p = dm("diff")  # the working state is being replaced: say so, do not guess
        assert p.returncode == 6 and "dm reset" in _one_line_error(p)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    assert json.loads(dm.ok("list", "--json"))[0]["state"] == "clean"


@pytest.mark.slow
def test_a_subdot_is_given_to_a_service_user_who_can_reach_it(dm, tmp_path):
    import pwd
    import shutil
    import tempfile
    from pathlib import Path

    nobody = pwd.getpwnam("nobody")
    dm.ok("init", "app")
    p = dm("path", "--owner", "nobody", "app.users-db")  # the test's home: in a 0700 folder
    assert p.returncode == 2 and "nobody cannot reach it" in _one_line_error(p)
    assert p.stderr.count("chmod o+x") == 1
    p = dm("path", "--owner", "no-such-user", "app.users-db")
    assert p.returncode == 3 and "no such user" in _one_line_error(p)
    top = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        os.chmod(top, 0o711)
        other = DM(top / "home")
        other.ok("init", "app")
        folder = Path(other.ok("path", "--owner", "nobody", "app.users-db").strip())
        assert (folder.stat().st_uid, folder.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
        reach = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                                "--clear-groups", "touch", str(folder / "made-by-nobody")])
        assert reach.returncode == 0  # the service user writes its folder through the store
    finally:
        shutil.rmtree(top)


def test_roots_default_store_is_the_system_one(monkeypatch, tmp_path):
    from dotmesh.store import repo

    monkeypatch.delenv("DM_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(repo, "SYSTEM_HOME", tmp_path / "var-lib-dotmesh")
    monkeypatch.setattr(repo.os, "geteuid", lambda: 0)
    assert repo.default_home() == tmp_path / "var-lib-dotmesh"
    (tmp_path / ".dotmesh").mkdir()  # root's store from before the default moved
    assert repo.default_home() == tmp_path / ".dotmesh"
    (tmp_path / "var-lib-dotmesh").mkdir()
    assert repo.default_home() == tmp_path / "var-lib-dotmesh"
    monkeypatch.setattr(repo.os, "geteuid", lambda: 1000)
    assert repo.default_home() == tmp_path / ".dotmesh"
    monkeypatch.setenv("DM_HOME", str(tmp_path / "mine"))
    assert repo.default_home() == tmp_path / "mine"
