"""The resident daemon: the real ``dm`` command asks a real ``dm daemon``, which forks per
command. Each test checks that the command ran in the daemon (its ``served`` count) and that
the caller could not tell the difference, or that dm ran the command itself when the daemon
must not be trusted."""

from __future__ import annotations

import json
import os
import pty
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import dotmesh
from dotmesh.server import resident
from tests.conftest import DM, DM_BIN


def _served(dm: DM) -> int:
    return int(json.loads(dm.ok("daemon", "status", "--json"))["served"])


@pytest.fixture
def daemon(dm: DM, tmp_path: Path) -> Iterator[DM]:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    dm.env["DM_DAEMON_SOCKET"] = str(folder / "daemon.sock")
    dm.ok("daemon", "start")
    try:
        yield dm
    finally:
        dm("daemon", "stop")


def test_commands_run_in_the_daemon_as_they_would_here(daemon: DM) -> None:
    status = json.loads(daemon.ok("daemon", "status", "--json"))
    assert status["failed_imports"] == []
    daemon.ok("init", "app")
    folder = daemon.path("app.db")
    (folder / "f").write_text("one\n")
    out = daemon.ok("commit", "-m", "first")
    assert "read 1 file (" in out
    log = json.loads(daemon.ok("log", "--json"))
    assert [c["message"] for c in log] == ["first"]
    assert _served(daemon) == 4  # init, path, commit and log ("dm daemon" runs here)
    # Errors: the same one line and exit code as in-process, also under --json.
    here = {**daemon.env, "DM_DAEMON": "off"}
    for args in (["checkout", "nosuch"], ["log", "--json", "--bogus"], ["reset", "--hard", "x^"]):
        there = daemon(*args)
        alone = subprocess.run([DM_BIN, *args], env=here, capture_output=True, text=True)
        assert (there.returncode, there.stdout, there.stderr) == (
            alone.returncode, alone.stdout, alone.stderr)
        assert there.returncode != 0 and there.stderr.count("\n") == 1
    assert _served(daemon) == 7


def test_the_callers_folder_environment_and_umask_are_the_commands(daemon: DM,
                                                                    tmp_path: Path) -> None:
    daemon.ok("init", "app")
    folder = daemon.path("app.db")
    (folder / "f").write_text("x")
    # Run from inside the subdot, with an author only the environment names: the caller's
    # working folder is dm's own, not a writer to freeze.
    env = {**daemon.env, "DM_AUTHOR": "carol"}
    p = subprocess.run([DM_BIN, "commit", "-m", "inside"], cwd=folder, env=env,
                       capture_output=True, text=True, check=True)
    assert "froze" not in p.stdout
    assert json.loads(daemon.ok("log", "--json"))[0]["author"] == "carol"
    assert _served(daemon) == 4
    # A relative --home is the caller's folder's.
    p = subprocess.run([DM_BIN, "--home", "rel-store", "init", "other"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, check=True)
    assert (tmp_path / "rel-store").is_dir()


@pytest.mark.slow  # seconds of waiting on purpose
def test_interrupt_reaches_the_command_and_a_killed_caller_kills_it(daemon: DM,
                                                                    tmp_path: Path) -> None:
    daemon.ok("init", "app")
    (daemon.path("app.db") / "f").write_text("x")
    marker = tmp_path / "hook-parent"
    daemon.ok("hook", "add", "pre-freeze", f"echo $PPID > {marker}; exec sleep 60")

    def started() -> tuple[subprocess.Popen[str], int]:
        marker.unlink(missing_ok=True)
        caller = subprocess.Popen(  # Ctrl-C as a terminal's foreground job gets it, even when
            [DM_BIN, "commit", "-m", "slow"], env=daemon.env,  # the tests run with it ignored
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text().strip()):
            assert time.monotonic() < deadline and caller.poll() is None, caller.stderr
            time.sleep(0.02)
        return caller, int(marker.read_text())

    caller, command = started()
    assert command != caller.pid  # the hook's parent is the daemon's child, not the caller
    caller.send_signal(signal.SIGINT)
    out, err = caller.communicate(timeout=60)
    assert caller.returncode == 130, err
    assert "dm: error: aborted" in err  # as click reports Ctrl-C in-process
    assert json.loads(daemon.ok("log", "--json")) == []

    caller, command = started()
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{command}").exists() and _state(command) != "Z":
        assert time.monotonic() < deadline, "the command outlived its killed caller"
        time.sleep(0.02)
    assert json.loads(daemon.ok("log", "--json")) == []
    daemon.ok("fsck")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_a_secret_is_asked_on_the_callers_terminal_without_echo(daemon: DM) -> None:
    daemon.ok("init", "app")
    before = _served(daemon)
    pid, terminal = pty.fork()
    if pid == 0:  # the caller, on a terminal of its own
        os.execve(DM_BIN, [DM_BIN, "remote", "add", "hub", "alice@127.0.0.1:9", "--http"],
                  {k: v for k, v in daemon.env.items() if k != "DM_API_KEY"})
    seen = b""
    try:
        seen += _read_until(terminal, b"API key")
        os.write(terminal, b"s3cr3t-key\n")
        seen += _read_until(terminal, b"error")
    finally:
        status = _reap(pid)
        os.close(terminal)
    assert b"s3cr3t-key" not in seen  # not echoed
    assert os.waitstatus_to_exitcode(status) != 0  # nobody listens on port 9
    assert _served(daemon) == before + 1


def _reap(pid: int, timeout: float = 30) -> int:
    """The child's wait status; a child still running after ``timeout`` is killed (so that a
    hang fails the test instead of stopping the suite)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _read_until(fd: int, wanted: bytes, timeout: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {wanted!r} in {seen!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.mark.slow
def test_changed_code_makes_the_daemon_start_again_on_it(daemon: DM) -> None:
    daemon.ok("init", "app")
    before = json.loads(daemon.ok("daemon", "status", "--json"))
    source = Path(dotmesh.__file__).with_name("version.py")
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        p = daemon("list")  # runs here; the daemon starts again on the code as it is now
        assert p.returncode == 0 and "app" in p.stdout, p.stderr
        deadline = time.monotonic() + 30
        while True:
            status = daemon("daemon", "status", "--json")
            if status.returncode == 0 and json.loads(status.stdout)["started"] > before["started"]:
                break
            assert time.monotonic() < deadline, status.stderr
            time.sleep(0.1)
        again = json.loads(status.stdout)
        assert again["pid"] == before["pid"] and again["served"] == 0
        assert "app" in daemon.ok("list")
        assert _served(daemon) == 1  # that one ran in the new daemon
    finally:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.slow  # seconds of waiting on purpose
def test_a_socket_others_could_reach_or_own_is_not_used(dm: DM, tmp_path: Path) -> None:
    """An open folder, or a socket that another user listens on, would give that user the
    caller's environment (keys) and terminal: dm runs the command itself."""
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o700)
    dm.env["DM_DAEMON_SOCKET"] = str(open_folder / "daemon.sock")
    dm.ok("daemon", "start")
    try:
        open_folder.chmod(0o755)
        dm.ok("init", "app")
        assert dm("daemon", "status").returncode == 3  # not trusted, so not even asked
        open_folder.chmod(0o700)
        assert _served(dm) == 0
    finally:
        open_folder.chmod(0o700)
        dm("daemon", "stop")

    # An impostor run by nobody, which answers every command with "done, exit 0", its
    # socket moved into a private folder of ours: the kernel says whose it is.
    theirs = Path(tempfile.mkdtemp(prefix="dm-nobody-"))
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    asked_read, asked_write = os.pipe()
    nobody = pwd.getpwnam("nobody")
    shutil.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    theirs.chmod(0o700)
    impostor = os.fork()
    if impostor == 0:
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(theirs / "daemon.sock"))
            listener.listen(8)
            while True:
                conn, _ = listener.accept()
                if conn.recv(65536):  # the caller's request: its environment, its terminal
                    os.write(asked_write, b"!")
                resident.send(conn, {"pid": 1})
                resident.send(conn, {"exit": 0})
                conn.close()
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while not (theirs / "daemon.sock").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.rename(theirs / "daemon.sock", ours / "daemon.sock")
        dm.env["DM_DAEMON_SOCKET"] = str(ours / "daemon.sock")
        dm.ok("init", "other")
        assert "other" in dm.ok("list")  # it ran, here
        os.set_blocking(asked_read, False)
        with pytest.raises(BlockingIOError):
            os.read(asked_read, 1)  # connected to, then dropped unasked: SO_PEERCRED said
    finally:
        os.kill(impostor, signal.SIGKILL)
        os.waitpid(impostor, 0)
        shutil.rmtree(theirs, ignore_errors=True)


def _daemon_pid(dm: DM) -> int:
    return int(json.loads(dm.ok("daemon", "status", "--json"))["pid"])


@pytest.mark.slow
def test_a_caller_with_less_privilege_or_other_limits_runs_its_command_itself(
        daemon: DM) -> None:
    """The daemon's child has the daemon's capabilities, limits and niceness: a caller that
    gave some up must not get them back through it."""
    daemon.ok("init", "app")
    before = _served(daemon)
    for wrapper in (["setpriv", "--no-new-privs"],
                    ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"],
                    ["prlimit", "--nofile=512:512"], ["nice", "-n", "5"]):
        p = subprocess.run([*wrapper, DM_BIN, "list"], env=daemon.env, capture_output=True,
                           text=True, stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and "app" in p.stdout, (wrapper, p.stderr)
    assert _served(daemon) == before
    daemon.ok("list")
    assert _served(daemon) == before + 1


def test_a_background_job_on_a_terminal_runs_its_command_itself(daemon: DM) -> None:
    """In-process, a background job that reads the terminal is stopped by job control; the
    daemon's child is outside the terminal's session and would take the keystrokes."""
    daemon.ok("init", "app")
    before = _served(daemon)
    pid, terminal = pty.fork()
    if pid == 0:  # a session on a terminal; dm runs in a group that is not the foreground
        job = os.fork()
        if job == 0:
            os.setpgid(0, 0)
            os.execve(DM_BIN, [DM_BIN, "list"], daemon.env)
        _, status = os.waitpid(job, 0)
        os._exit(os.waitstatus_to_exitcode(status))
    try:
        seen = _read_until(terminal, b"app")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert _served(daemon) == before


@pytest.mark.slow  # seconds of waiting on purpose
def test_silent_slow_and_malformed_clients_hold_up_nobody_and_leak_nothing(
        daemon: DM) -> None:
    from dotmesh.cli import daemon_server

    daemon.ok("init", "app")
    path = daemon.env["DM_DAEMON_SOCKET"]
    pid = _daemon_pid(daemon)
    # at rest: no command running, a spare readied (its line and pidfd are the daemon's)
    time.sleep(daemon_server.SPARE_AFTER + 2)
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(path)  # connects, then says nothing
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(path)
    slow.send(b"\0\0\4\0")  # a length, then nothing more
    try:
        start = time.monotonic()
        before = _served(daemon)
        daemon.ok("list")
        assert _served(daemon) == before + 1
        assert time.monotonic() - start < 10  # served, not queued behind them for good
    finally:
        silent.close()
        slow.close()
    for frame in (b"\xff\xff\xff\xff", b"\0\0\0\4junk", b"\0\0\0\1" + b"\xe9"):
        for _ in range(5):  # each with three descriptors, which must be closed again
            with socket.socket(socket.AF_UNIX) as bad:
                bad.connect(path)
                socket.send_fds(bad, [frame], [0, 1, 2])
                bad.settimeout(5)
                assert bad.recv(100) == b""  # dropped
    daemon.ok("list")
    deadline = time.monotonic() + 15  # at rest again
    while len(os.listdir(f"/proc/{pid}/fd")) != fds_before:
        assert time.monotonic() < deadline, os.listdir(f"/proc/{pid}/fd")
        time.sleep(0.1)
    assert _daemon_pid(daemon) == pid


@pytest.mark.slow  # seconds of waiting on purpose
def test_one_daemon_per_socket_and_a_stuck_one_is_bypassed(daemon: DM) -> None:
    daemon.ok("init", "app")
    pid = _daemon_pid(daemon)
    again = [daemon.popen("daemon", "start", "--json") for _ in range(3)]
    for p in again:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert json.loads(out)["pid"] == pid and not json.loads(out)["started_now"]
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert "app" in daemon.ok("list")  # runs here after a few seconds
        assert time.monotonic() - start < 30
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.slow  # seconds of waiting on purpose
def test_signals_the_caller_ignores_or_dies_of_are_the_commands(daemon: DM,
                                                                 tmp_path: Path) -> None:
    daemon.ok("init", "app")
    (daemon.path("app.db") / "f").write_text("x")
    marker = tmp_path / "in-hook"
    daemon.ok("hook", "add", "pre-freeze", f"touch {marker}; sleep 2")

    def slow_commit(ignore_hup: bool) -> subprocess.Popen[str]:
        marker.unlink(missing_ok=True)
        p = subprocess.Popen(
            [DM_BIN, "commit", "-m", "slow"], env=daemon.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignore_hup
            else None)
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        return p

    p = slow_commit(ignore_hup=True)  # as under nohup: a hangup changes nothing
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    p = slow_commit(ignore_hup=False)
    p.send_signal(signal.SIGTERM)  # the command dies of it, and so does the caller
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM
    assert len(json.loads(daemon.ok("log", "--json"))) == 1


def test_start_refuses_an_open_folder_and_follows_no_symlink(dm: DM, tmp_path: Path) -> None:
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o777)
    open_folder.chmod(0o777)
    dm.env["DM_DAEMON_SOCKET"] = str(open_folder / "daemon.sock")
    p = dm("daemon", "start")
    assert p.returncode == 2 and "only you may enter" in p.stderr
    assert not (open_folder / "daemon.sock").exists() and not (open_folder / "daemon.log").exists()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (private / "daemon.log").symlink_to(victim)
    dm.env["DM_DAEMON_SOCKET"] = str(private / "daemon.sock")
    p = dm("daemon", "start")
    assert p.returncode != 0 and p.stderr.count("\n") == 1
    assert victim.read_text() == "precious\n"


def test_a_dot_past_the_fork_threshold_goes_through_child_processes_and_back(
        daemon: DM) -> None:
    """A commit that reads, and a branch that writes, more than FORK_MIN bytes do the work
    in child processes of the daemon's command: the same files come back, the store is
    sound, and a second commit after a page change stores what changed."""
    import hashlib
    import random
    import re

    from dotmesh.workdir import restore, snapshot

    assert snapshot.FORK_MIN == restore.FORK_MIN == 64 << 20  # the size chosen below
    rng = random.Random(3)
    daemon.ok("init", "app")
    folder = daemon.path("app.db")
    page = rng.randbytes(8192)
    with open(folder / "heap", "wb") as f:  # paged: 48 MiB, some pages repeated
        for i in range(6144):
            f.write(page if i % 7 == 0 else rng.randbytes(8192))
    (folder / "dump").write_bytes(rng.randbytes(20 << 20))  # cut by CDC
    for i in range(300):  # small and medium files
        (folder / f"u{i}").write_bytes(rng.randbytes(rng.choice((700, 90_000, 300_000))))
    served = _served(daemon)
    out = daemon.ok("commit", "-m", "big")
    assert "read 302 files" in out
    with open(folder / "heap", "r+b") as f:
        f.seek(8192 * 100)
        f.write(rng.randbytes(8192))
    out = daemon.ok("commit", "-m", "a page")
    assert re.search(r"stored \d+(\.\d+)? KiB", out), out  # the page, not the file
    assert [c["message"] for c in json.loads(daemon.ok("log", "--json"))] == ["a page", "big"]
    digests = {p.name: hashlib.sha256(p.read_bytes()).digest() for p in folder.iterdir()}
    daemon.ok("checkout", "-b", "copy")
    built = daemon.path("app.db")
    assert {p.name: hashlib.sha256(p.read_bytes()).digest()
            for p in built.iterdir()} == digests
    assert json.loads(daemon.ok("fsck", "--json"))["ok"]
    assert _served(daemon) >= served + 6


def _readied(dm: DM) -> int:
    return int(json.loads(dm.ok("daemon", "status", "--json"))["readied"])


@pytest.mark.slow  # seconds of waiting on purpose
def test_a_quiet_daemon_readies_a_spare_that_runs_the_next_command_as_a_fork_would(
        daemon: DM, tmp_path: Path) -> None:
    """Once no command has run for a moment, the daemon forks the next command's process
    ahead and readies its memory; that command is the caller's as a fresh fork's is (folder,
    environment, output, exit code), and a spare left over dies with the daemon."""
    from dotmesh.cli import daemon_server

    daemon.ok("init", "app")
    folder = daemon.path("app.db")
    (folder / "f").write_text("x")
    env = {**daemon.env, "DM_AUTHOR": "dave"}

    def quietly() -> None:  # the spare is forked, then readied (tens of ms)
        time.sleep(daemon_server.SPARE_AFTER + 2)

    quietly()
    before = _readied(daemon)
    quietly()
    p = subprocess.run([DM_BIN, "commit", "-m", "by a spare"], cwd=folder, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and "read 1 file (" in p.stdout, p.stderr
    assert json.loads(daemon.ok("log", "--json"))[0]["author"] == "dave"
    quietly()
    bad = daemon("checkout", "nosuch")
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1
    assert _readied(daemon) >= before + 2  # the commit and the checkout (the log came too soon)
    quietly()  # a spare waits now: a process of the daemon's command line, as the daemon
    sock = daemon.env["DM_DAEMON_SOCKET"]

    def spares() -> list[int]:
        found = subprocess.run(["pgrep", "-f", sock], capture_output=True, text=True).stdout
        return [int(p) for p in found.split() if int(p) != _daemon_pid(daemon)]

    [spare] = spares()
    # A stopped spare holds up nothing: a request too big for the socket's buffer is taken
    # back after a second and runs in a fork of its own, in the daemon, not in the caller
    os.kill(spare, signal.SIGSTOP)
    served = _served(daemon)
    big = {**daemon.env, **{f"DM_BIG{i}": "x" * 100_000 for i in range(5)}}
    p = subprocess.run([DM_BIN, "list"], env=big, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "app" in p.stdout, p.stderr
    assert _served(daemon) == served + 1  # by the daemon: not stuck, so not run here
    quietly()
    [spare] = spares()  # (another one: the stopped one was dropped)
    os.kill(spare, signal.SIGKILL)  # one that dies is replaced, and costs no command
    quietly()
    assert "app" in daemon.ok("list")
    quietly()
    assert len(spares()) == 1 and spares() != [spare]
    daemon.ok("daemon", "stop")
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", sock], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a spare outlived its daemon"
        time.sleep(0.1)
