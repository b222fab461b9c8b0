"""The seed's app in miniature ("moby counter"): users in PostgreSQL (subdot ``users-db``),
clicks in Redis (subdot ``clicks-db``). Only what the example needs: the two servers run on
a dot's folders, and the app's three calls (sign up, log in, click)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis

import dotmesh

PG_BIN = Path(os.environ.get("APP_PG_BIN", "/usr/lib/postgresql/15/bin"))
SOCKETS = Path(os.environ.get("APP_SOCKETS", "/tmp/mobycounter"))  # both servers listen here
SCHEMA = "CREATE TABLE IF NOT EXISTS users (id serial PRIMARY KEY, email text NOT NULL)"


@dataclass
class App:
    """Connections to the app's running servers."""

    users: psycopg.Connection[tuple[Any, ...]]
    clicks: redis.Redis


def signup(app: App, email: str) -> int:
    """Register a user. Bug 42: the email is stored as typed, capitals and spaces too."""
    row = app.users.execute("INSERT INTO users (email) VALUES (%s) RETURNING id",
                            (email,)).fetchone()
    assert row is not None
    return int(row[0])


def login(app: App, email: str) -> int | None:
    """The user with this email, however it was typed at sign-up (the fix for bug 42)."""
    row = app.users.execute("SELECT id FROM users WHERE lower(trim(email)) = lower(trim(%s))",
                            (email,)).fetchone()
    return None if row is None else int(row[0])


def click(app: App, user: int) -> int:
    """Count a click of ``user``; returns their clicks so far."""
    return int(app.clicks.incr(f"clicks:{user}"))


def create(repo: dotmesh.Repo, name: str = "app") -> dotmesh.Dot:
    """A new dot for the app: an empty PostgreSQL cluster in ``users-db``, and ``clicks-db``."""
    dot = repo.init(name)
    users = dot.path("users-db")
    dot.path("clicks-db")
    if os.geteuid() == 0:  # PostgreSQL will not run as root: its data is the postgres user's
        shutil.chown(users, "postgres", "postgres")
    users.chmod(0o700)
    subprocess.run([PG_BIN / "initdb", "-D", users, "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, **_as_postgres())
    return dot


@contextmanager
def connect(timeout: float = 30.0) -> Iterator[App]:
    """Connections to the app's servers, waiting for them to accept."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            users = psycopg.connect(host=str(SOCKETS), user="postgres", dbname="postgres",
                                    autocommit=True)
            clicks = redis.Redis(unix_socket_path=str(SOCKETS / "redis.sock"))
            clicks.ping()
            break
        except (psycopg.OperationalError, redis.ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield App(users, clicks)
    finally:
        users.close()
        clicks.close()


@contextmanager
def servers(dot: dotmesh.Dot) -> Iterator[App]:
    """The app's PostgreSQL and Redis, running on the dot's folders for the block."""
    SOCKETS.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(SOCKETS, "postgres", "postgres")
    with open(SOCKETS / "postgres.log", "ab") as log:
        pg = subprocess.Popen(
            [PG_BIN / "postgres", "-D", dot.path("users-db"), "-k", SOCKETS,
             "-c", "listen_addresses="], stdout=log, stderr=log, **_as_postgres())
    rd = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", SOCKETS / "redis.sock",
         "--dir", dot.path("clicks-db"), "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL)
    try:
        with connect() as app:
            app.users.execute(SCHEMA)
            yield app
    finally:
        pg.send_signal(signal.SIGINT)  # a fast shutdown: a clean data directory
        rd.terminate()
        pg.wait(60)
        rd.wait(60)


def _as_postgres() -> dict[str, Any]:
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
