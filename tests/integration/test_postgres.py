"""A reset PostgreSQL data folder starts and holds exactly the committed rows."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import DM

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _as_postgres(*cmd: str) -> str:
    p = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"{cmd}: {p.stdout}{p.stderr}"
    return p.stdout


@pytest.fixture
def pg_env():
    if not PG_BIN or os.geteuid() != 0:
        pytest.fail("needs root and PostgreSQL (apt-get install postgresql; .ci/run does it)")
    top = Path(tempfile.mkdtemp(prefix="dm-pg-", dir="/tmp"))
    os.chmod(top, 0o755)  # postgres must reach the data folder inside the home
    sock = top / "sock"
    sock.mkdir()
    shutil.chown(sock, "postgres", "postgres")
    yield top, sock
    shutil.rmtree(top, ignore_errors=True)


def test_reset_postgres_data_dir(pg_env):
    top, sock = pg_env
    bindir = PG_BIN[-1]
    dm = DM(top / "home")
    dm.ok("init", "app")
    data = dm.path("app.users-db")
    os.chmod(top / "home", 0o755)
    shutil.chown(data, "postgres", "postgres")
    os.chmod(data, 0o700)
    _as_postgres(f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
    opts = f"-k {sock} -c listen_addresses='' -p 54329"

    def pg(action: str, *extra: str) -> None:
        _as_postgres(f"{bindir}/pg_ctl", "-D", str(data), "-w", "-o", opts,
                     "-l", str(sock / "pg.log"), action, *extra)

    def sql(query: str) -> str:
        return _as_postgres(f"{bindir}/psql", "-h", str(sock), "-p", "54329", "-U", "postgres",
                            "-d", "postgres", "-tAc", query).strip()

    pg("start")
    try:
        sql("CREATE TABLE users (n int PRIMARY KEY, name text)")
        sql("INSERT INTO users SELECT g, 'user' || g FROM generate_series(1, 1000) g")
        sql("CREATE EXTENSION amcheck")
    finally:
        pg("stop", "-m", "fast")
    dm.ok("commit", "-m", "1000 users")

    pg("start")
    try:
        sql("INSERT INTO users SELECT g, 'late' || g FROM generate_series(1001, 5000) g")
        sql("UPDATE users SET name = 'renamed' WHERE n < 10")
        sql("CHECKPOINT")
    finally:
        pg("stop", "-m", "immediate")  # leave the folder as a crash would
    dm.ok("reset", "--hard", "HEAD")
    assert oct(data.stat().st_mode & 0o777) == "0o700"

    pg("start")
    try:
        assert sql("SELECT count(*), max(n), min(name) FROM users") == "1000|1000|user1"
        _as_postgres(f"{bindir}/pg_amcheck", "-h", str(sock), "-p", "54329", "-U", "postgres",
                     "-d", "postgres", "--heapallindexed")
    finally:
        pg("stop", "-m", "fast")
