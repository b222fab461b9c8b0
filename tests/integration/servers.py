"""Real PostgreSQL and Redis servers for tests, on unix sockets in a test's own folder."""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def as_postgres(*cmd: str, check: bool = True) -> str:
    p = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    if check:
        assert p.returncode == 0, f"{cmd}: {p.stdout}{p.stderr}"
    return p.stdout


@contextmanager
def shared_tmp() -> Iterator[Path]:
    """A folder the postgres user can reach (pytest's tmp_path is private to root)."""
    if not PG_BIN or os.geteuid() != 0:
        raise AssertionError("needs root and PostgreSQL (apt-get install postgresql; "
                             ".ci/run does it)")
    top = Path(tempfile.mkdtemp(prefix="dm-srv-", dir="/tmp"))
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


_templates: dict[str, Path] = {}


def _initdb_template(bin_dir: str) -> Path:
    """A cluster initdb made once per run (removed at exit), for :meth:`Postgres.initdb`."""
    if bin_dir not in _templates:
        top = Path(tempfile.mkdtemp(prefix="dm-initdb-", dir="/tmp"))
        atexit.register(shutil.rmtree, top, ignore_errors=True)
        os.chmod(top, 0o755)
        data = top / "data"
        data.mkdir()
        shutil.chown(data, "postgres", "postgres")
        os.chmod(data, 0o700)
        as_postgres(f"{bin_dir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
        _templates[bin_dir] = data
    return _templates[bin_dir]


class Postgres:
    def __init__(self, data: Path, sock: Path, port: int) -> None:
        self.data, self.sock, self.port, self.bin = data, sock, port, PG_BIN[-1]
        self.proc: subprocess.Popen[bytes] | None = None
        sock.mkdir(exist_ok=True)
        shutil.chown(sock, "postgres", "postgres")

    def initdb(self) -> None:
        """What ``initdb -A trust -U postgres`` makes, copied from the one it made for the
        first server of the run (initdb takes seconds; a copy of its ~40 MB, a fraction)."""
        shutil.chown(self.data, "postgres", "postgres")
        os.chmod(self.data, 0o700)
        subprocess.run(["cp", "-a", f"{_initdb_template(self.bin)}/.", str(self.data)],
                       check=True, stdin=subprocess.DEVNULL)

    def start(self) -> None:
        """Run the postmaster as our own child (not daemonized by pg_ctl), so that we reap it:
        an orphaned postmaster that nobody reaps stays a zombie, and a restored
        postmaster.pid naming it would then look like a live server."""
        log = open(self.sock / "pg.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [f"{self.bin}/postgres", "-D", str(self.data), "-k", str(self.sock),
             "-c", "listen_addresses=", "-p", str(self.port)],
            user="postgres", group="postgres", stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        for _ in range(3000):
            if self.proc.poll() is not None:
                tail = (self.sock / "pg.log").read_text()[-2000:]
                raise AssertionError(f"postgres exited ({self.proc.returncode}):\n{tail}")
            ready = subprocess.run([f"{self.bin}/pg_isready", "-q", "-h", str(self.sock), "-p",
                                    str(self.port)], stdin=subprocess.DEVNULL)
            if ready.returncode == 0:
                return
            time.sleep(0.02)
        raise AssertionError("postgres did not become ready in 60 s")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` (SIGINT) or ``immediate`` (SIGQUIT, like a crash)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        self.proc.wait(timeout=60)
        self.proc = None

    def sql(self, query: str) -> str:
        return as_postgres(f"{self.bin}/psql", "-h", str(self.sock), "-p", str(self.port),
                           "-U", "postgres", "-d", "postgres", "-tAc", query).strip()

    def amcheck(self) -> None:
        as_postgres(f"{self.bin}/pg_amcheck", "-h", str(self.sock), "-p", str(self.port),
                    "-U", "postgres", "-d", "postgres", "--heapallindexed")


class Redis:
    def __init__(self, data: Path, sock: Path) -> None:
        self.data, self.sock = data, sock
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.sock), "--dir",
             str(self.data), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "no", "--logfile", ""],
            cwd=self.data, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL)
        for _ in range(500):
            if self.sock.exists() and self.cli("PING") == "PONG":
                return
            time.sleep(0.01)
        raise AssertionError("redis-server did not start")

    def cli(self, *args: str) -> str:
        p = subprocess.run(["redis-cli", "-s", str(self.sock), *args], capture_output=True,
                           text=True, timeout=30, stdin=subprocess.DEVNULL)
        return p.stdout.strip()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None
