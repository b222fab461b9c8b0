"""dm diff --data (issue 15): what changed inside Redis, SQLite and text files, with a real
redis-server writing the data and dm reading each side on a throwaway server of its own."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from tests.conftest import DM
from tests.integration.servers import Postgres, Redis, shared_tmp


@pytest.mark.slow
def test_diff_data_names_the_keys_rows_and_lines_that_changed(dm: DM, tmp_path) -> None:
    dm.ok("init", "app")
    clicks, app, notes = (dm.path(f"app.{s}") for s in ("clicks-db", "app-db", "notes"))
    redis = Redis(clicks, tmp_path / "redis.sock")
    redis.start()
    try:
        redis.cli("SET", "clicks", "10")
        redis.cli("SET", "banner", "hello")
        redis.cli("RPUSH", "queue", "a", "b")
        db = sqlite3.connect(app / "app.sqlite")
        db.execute("PRAGMA journal_mode=WAL")  # a live commit catches the WAL: it is replayed
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("CREATE TABLE log (line TEXT)")  # no primary key: rows by their contents
        db.executemany("INSERT INTO users VALUES (?, ?)", [(1, "ann"), (2, "bob"), (3, "cy")])
        db.executemany("INSERT INTO log VALUES (?)", [("boot",)])
        db.commit()
        (notes / "todo.txt").write_text("one\ntwo\nthree\n")
        (notes / "image.bin").write_bytes(bytes(range(256)))
        dm.ok("commit", "-m", "before")

        redis.cli("INCRBY", "clicks", "2")
        redis.cli("DEL", "banner")
        redis.cli("HSET", "session:9", "user", "bob")
        db.execute("UPDATE users SET name='robert' WHERE id=2")
        db.execute("DELETE FROM users WHERE id=3")
        db.execute("INSERT INTO users VALUES (4, 'dee')")
        db.execute("INSERT INTO log VALUES ('login bob')")
        db.execute("CREATE INDEX users_name ON users (name)")
        db.commit()
        (notes / "todo.txt").write_text("one\n2\nthree\n")
        dm.ok("commit", "-m", "after")
        db.close()
    finally:
        redis.stop()

    reports = {r["subdot"]: r for r in json.loads(dm.ok("diff", "--data", "HEAD^", "HEAD",
                                                        "--json"))}
    assert {k: r["kind"] for k, r in reports.items()} == {
        "clicks-db": "redis", "app-db": "sqlite", "notes": "files"}
    keys = reports["clicks-db"]["keys"]
    assert [(k["key"], k["type"], k["value"]) for k in keys["added"]] == [
        ("session:9", "hash", "{b'user': b'bob'}")]
    assert [(k["key"], k["value"]) for k in keys["removed"]] == [("banner", "hello")]
    assert [(k["key"], k["old"], k["new"]) for k in keys["changed"]] == [("clicks", "10", "12")]

    [sq] = reports["app-db"]["databases"]
    assert sq["path"] == "app.sqlite"
    users = sq["tables"]["users"]
    assert (users["added"], users["removed"], users["changed"]) == (1, 1, 1)
    assert users["first"]["added"] == [{"id": 4, "name": "dee"}]
    assert users["first"]["removed"] == [{"id": 3, "name": "cy"}]
    assert users["first"]["changed"] == [{"old": {"id": 2, "name": "bob"},
                                          "new": {"id": 2, "name": "robert"}}]
    assert sq["tables"]["log"]["added"] == 1 and sq["tables"]["log"]["removed"] == 0
    assert [(s["name"], s["old"]) for s in sq["schema"]] == [("users_name", None)]

    notes_report = reports["notes"]
    assert [(f["status"], f["path"]) for f in notes_report["files"]] == [("changed", "todo.txt")]
    assert "-two\n+2\n" in notes_report["text"]["todo.txt"]

    text = dm.ok("diff", "--data", "HEAD^", "HEAD")
    assert "clicks-db (redis)" in text and "M key clicks (string): 10 -> 12" in text
    assert "table users: 1 added, 1 removed, 1 changed" in text and "-two" in text
    only = json.loads(dm.ok("diff", "--data", "HEAD^", "HEAD", "--subdot", "notes", "--json"))
    assert [r["subdot"] for r in only] == ["notes"]
    # What a subdot holds can be said where detection would guess otherwise:
    kinds = {r["subdot"]: (r["kind"], r["kind_set"]) for r in json.loads(
        dm.ok("subdot", "list", "--json"))}
    assert kinds["app-db"] == ("sqlite", False) and kinds["notes"] == ("files", False)
    dm.ok("subdot", "set-kind", "app.app-db", "files")
    [as_files] = json.loads(dm.ok("diff", "--data", "HEAD^", "HEAD", "--subdot", "app-db",
                                  "--json"))
    assert as_files["kind"] == "files" and "databases" not in as_files
    assert "app.sqlite-wal" in [f["path"] for f in as_files["files"]]  # the WAL took the rows
    assert "files" in dm.ok("subdot", "list") and "(detected)" in dm.ok("subdot", "list")
    dm.ok("subdot", "set-kind", "app.app-db", "auto")
    [again] = json.loads(dm.ok("diff", "--data", "HEAD^", "HEAD", "--subdot", "app-db",
                               "--json"))
    assert again["kind"] == "sqlite" and again["databases"]
    # The working state against HEAD (the servers' shutdown wrote their files since):
    dm.ok("commit", "-m", "settled")
    clean = json.loads(dm.ok("diff", "--data", "--json"))
    assert all(not r["files"] and not r.get("databases") for r in clean)
    assert all(not any(r.get("keys", {}).values()) for r in clean)
    for args, code, words in [
        (("diff", "--data", "--subdot", "nope"), 3, "no subdot 'nope'"),
        (("diff", "--subdot", "notes"), 2, "--subdot goes with --data"),
        (("diff", "--data", "--stat"), 2, "do not go together"),
        (("subdot", "set-kind", "app.nope", "redis"), 3, "no subdot 'nope'"),
        (("subdot", "set-kind", "app.notes", "oracle"), 2, "'oracle' is not one of"),
    ]:
        p = dm(*args)
        assert p.returncode == code and words in p.stderr, (args, p.returncode, p.stderr)


@pytest.mark.slow  # PostgreSQL three times
def test_diff_data_names_the_rows_and_schema_a_live_postgres_changed() -> None:
    """Both commits are made while PostgreSQL runs (frozen mid-write): each side recovers on
    its own export, never in the store."""
    with shared_tmp() as top:
        dm = DM(top / "home")
        dm.ok("init", "app")
        users = dm.path("app.users-db")
        os.chmod(top / "home", 0o755)
        pg = Postgres(users, top / "pgsock", 54341)
        pg.initdb()
        pg.start()
        try:
            pg.sql("CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL)")
            pg.sql("CREATE TABLE visits (page text)")  # no primary key
            pg.sql("INSERT INTO users VALUES (1, 'ann'), (2, 'bob'), (3, 'cy')")
            pg.sql("INSERT INTO visits VALUES ('/'), ('/')")
            pg.sql("CREATE TABLE labels (name text)")  # a key comes later
            pg.sql("INSERT INTO labels VALUES ('red'), ('blue')")
            sneaky = f"a\" (id int); COPY (SELECT 1) TO PROGRAM 'touch {top / 'ran-sql'}'; --"
            pg.sql(f'CREATE TABLE "{sneaky.replace(chr(34), chr(34) * 2)}" (id int PRIMARY KEY)')
            dm.ok("commit", "-m", "three users")
            pg.sql(f'INSERT INTO "{sneaky.replace(chr(34), chr(34) * 2)}" VALUES (7)')
            pg.sql("UPDATE users SET name = 'robert' WHERE id = 2")
            pg.sql("DELETE FROM users WHERE id = 3")
            pg.sql("INSERT INTO users VALUES (4, 'dee')")
            pg.sql("INSERT INTO visits VALUES ('/login')")
            pg.sql("ALTER TABLE users ADD COLUMN email text")
            pg.sql("CREATE INDEX users_name ON users (name)")
            pg.sql("ALTER TABLE labels ADD PRIMARY KEY (name)")
            dm.ok("commit", "-m", "changed users")
            files_before = json.loads(dm.ok("diff", "HEAD^", "HEAD", "--json"))
            # The working state while the server runs: copied as a live commit reads it
            # (the server stopped for the last pass), recovered on the copy.
            pg.sql("INSERT INTO users VALUES (5, 'eve')")
            [live] = json.loads(dm.ok("diff", "--data", "--subdot", "users-db", "--json"))
            assert live["frozen_ms"] > 0 and "read live" in live["note"], live
            [live_db] = [d for d in live["databases"] if d["path"] == "postgres"]
            assert live_db["tables"]["public.users"]["first"]["added"] == [
                {"id": 5, "name": "eve", "email": None}]
            assert pg.sql("SELECT count(*) FROM users") == "4"  # it serves on
        finally:
            pg.stop()

        [report] = json.loads(dm.ok("diff", "--data", "HEAD^", "HEAD", "--subdot",
                                    "users-db", "--json"))
        assert report["kind"] == "postgres"
        [db] = [d for d in report["databases"] if d["path"] == "postgres"]
        t = db["tables"]["public.users"]
        assert (t["added"], t["removed"], t["changed"]) == (1, 1, 2)  # email: a new column
        assert t["first"]["added"] == [{"id": 4, "name": "dee", "email": None}]
        assert t["first"]["removed"] == [{"id": 3, "name": "cy"}]
        assert {"old": {"id": 2, "name": "bob"},
                "new": {"id": 2, "name": "robert", "email": None}} in t["first"]["changed"]
        odd = next(k for k in db["tables"] if k.startswith('public.a"'))  # cut at 63 bytes
        assert db["tables"][odd]["first"]["added"] == [{"id": 7}]
        assert not (top / "ran-sql").exists()  # a name from the data is only ever a name
        v = db["tables"]["public.visits"]
        assert (v["added"], v["removed"]) == (1, 0)
        assert v["first"]["added"] == [{"page": "/login"}]
        schema = {s["name"]: (s["old"], s["new"]) for s in db["schema"]}
        assert schema["column public.users.email"] == (None, "text")
        assert schema["index public.labels_pkey"][0] is None  # keyed now, the same rows:
        assert "public.labels" not in db["tables"]  # compared as multisets, nothing changed
        assert schema["index public.users_name"][0] is None
        assert report["files"] == [f for f in files_before if f["subdot"] == "users-db"]
        text = dm.ok("diff", "--data", "HEAD^", "HEAD")
        assert "table public.users: 1 added, 1 removed, 2 changed" in text

        # A stranger's settings in the data directory are never read: they can name
        # commands and libraries.
        marker = top / "ran"
        with open(users / "postgresql.conf", "a") as f:
            f.write(f"\nrestore_command = 'touch {marker}'\narchive_mode = on\n"
                    f"archive_command = 'touch {marker}'\n")
        (users / "postgresql.auto.conf").write_text("shared_preload_libraries = 'evil'\n")
        (users / "recovery.signal").touch()
        dm.ok("commit", "-m", "hostile settings")
        [again] = json.loads(dm.ok("diff", "--data", "HEAD~2", "HEAD", "--subdot",
                                   "users-db", "--json"))
        assert "public.users" in again["databases"][0]["tables"] and not marker.exists()
        (users / "PG_VERSION").write_text("15/../../../../tmp/x\n")  # a path to a binary
        dm.ok("commit", "-m", "a version that is a path")
        p = dm("diff", "--data", "HEAD^", "HEAD", "--subdot", "users-db")
        assert p.returncode != 0 and "not a PostgreSQL version" in p.stderr, p.stderr
        assert len(p.stderr.splitlines()) == 1
        assert json.loads(dm.ok("fsck", "--json"))["ok"]  # the store was only read
