"""A reset PostgreSQL data folder starts and holds exactly the committed rows."""

from __future__ import annotations

import os

import pytest

from tests.conftest import DM
from tests.integration.servers import Postgres, shared_tmp

pytestmark = pytest.mark.slow  # a PostgreSQL server of its own


def test_reset_postgres_data_dir():
    with shared_tmp() as top:
        dm = DM(top / "home")
        dm.ok("init", "app")
        data = dm.path("app.users-db")
        os.chmod(top / "home", 0o755)
        pg = Postgres(data, top / "sock", 54329)
        pg.initdb()
        pg.start()
        try:
            pg.sql("CREATE TABLE users (n int PRIMARY KEY, name text)")
            pg.sql("INSERT INTO users SELECT g, 'user' || g FROM generate_series(1, 1000) g")
            pg.sql("CREATE EXTENSION amcheck")
        finally:
            pg.stop()
        dm.ok("commit", "-m", "1000 users")

        pg.start()
        try:
            pg.sql("INSERT INTO users SELECT g, 'late' || g FROM generate_series(1001, 5000) g")
            pg.sql("UPDATE users SET name = 'renamed' WHERE n < 10")
            pg.sql("CHECKPOINT")
        finally:
            pg.stop("immediate")  # leave the folder as a crash would
        dm.ok("reset", "--hard", "HEAD")
        assert oct(data.stat().st_mode & 0o777) == "0o700"

        pg.start()
        try:
            assert pg.sql("SELECT count(*), max(n), min(name) FROM users") == "1000|1000|user1"
            pg.amcheck()
        finally:
            pg.stop()
