"""``dm diff --data``: what changed inside the data stores, in their own terms.

"base/16384/2619 changed" says nothing to a person; "key clicks: 10 -> 12" does. Each side is
exported to a temporary folder (never the dot's own folders), and read the way its store
reads it: a Redis folder by a throwaway redis-server on a private socket (as nobody when dm
runs as root), a PostgreSQL data directory by a throwaway postmaster run as its owner with
settings of dm's own (the copy's may come from a stranger and can name commands and
libraries), SQLite files with sqlite3 (on the copy, so a WAL a live commit caught is
replayed there). Any other folder gets
the file-level diff, with a unified diff of small text files. What a subdot holds is told by
its files (see :func:`kind_of`). Servers started here are always stopped, on Ctrl-C too.
"""

from __future__ import annotations

import difflib
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import sql

from dotmesh.capture.freeze import frozen
from dotmesh.capture.stop import running_containers
from dotmesh.capture.writers import find_writers
from dotmesh.errors import DotmeshError, NotFound, UsageError
from dotmesh.meta import config
from dotmesh.meta.db import Tx
from dotmesh.ops import browse, history
from dotmesh.store.repo import Repo

SQLITE_MAGIC = b"SQLite format 3\x00"
SHOWN = 5  # rows or keys shown per kind of change (all are counted)
TEXT_LIMIT = 64 << 10  # files this small that decode as UTF-8 get a unified diff
VALUE_LIMIT = 80  # characters of a value shown
REDIS_START = 30.0  # seconds for a throwaway redis-server to load a side
PG_START = 120.0  # seconds for a throwaway postgres to recover and open a side


@dataclass
class Report:
    """What changed in one subdot, in its store's terms."""

    subdot: str
    kind: str  # redis, sqlite, postgres, files
    note: str = ""
    keys: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # redis
    databases: list[dict[str, Any]] = field(default_factory=list)  # sqlite, one per file
    files: list[dict[str, Any]] = field(default_factory=list)  # the file-level changes
    text: dict[str, str] = field(default_factory=dict)  # path -> unified diff
    frozen_ms: float | None = None  # the working state's writers were stopped this long

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"subdot": self.subdot, "kind": self.kind, "files": self.files}
        if self.note:
            out["note"] = self.note
        if self.frozen_ms is not None:
            out["frozen_ms"] = round(self.frozen_ms, 1)
        if self.kind == "redis":
            out["keys"] = self.keys
        if self.kind in ("sqlite", "postgres"):
            out["databases"] = self.databases
        if self.text:
            out["text"] = self.text
        return out


def _regular(path: Path) -> bool:
    """A regular file, not through a symlink (a commit's symlinks may point anywhere)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_small(path: Path, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of a regular file, never through a symlink; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


REDIS_FILES = ("appendonlydir", "appendonly.aof", "dump.rdb")
KINDS = ("postgres", "redis", "sqlite", "files")  # what dm subdot set-kind may say
LIVE_COPY_FREEZE = 10.0  # seconds the writers may stay stopped while a copy catches up


def _kind_key(subdot: str) -> str:
    return f"kind.{subdot}"


def set_kind(home: Repo, dot: str, subdot: str, kind: str) -> None:
    """Say what a subdot holds, where detection would guess wrong (a PostgreSQL data folder
    in a subfolder, a Redis dump under another name); ``auto``: detect again."""
    home.require_dot(dot)
    if subdot not in home.subdots(dot):
        raise NotFound(f"dot {dot!r} has no subdot {subdot!r} (it has: "
                       f"{', '.join(home.subdots(dot)) or 'none'})")
    if kind != "auto" and kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r}: one of {', '.join(KINDS)} or auto")
    with Tx(home.conn) as tx:
        if kind == "auto":
            config.drop_dot_option(tx, dot, _kind_key(subdot))
        else:
            config.set_dot_option(tx, dot, _kind_key(subdot), kind)


def kind_set(home: Repo, dot: str, subdot: str) -> str | None:
    """The kind ``dm subdot set-kind`` gave the subdot, if any."""
    kind = home.dot_option(dot, _kind_key(subdot))
    return kind if kind in KINDS else None


@dataclass(frozen=True)
class SubdotKind:
    """What ``dm diff --data`` reads a subdot as: the kind set for it, else the one detected
    in its folder (``kind_set`` False)."""

    subdot: str
    folder: Path
    kind: str
    kind_set: bool


def subdot_kinds(home: Repo, dot: str) -> list[SubdotKind]:
    """``dm subdot list``: each subdot of ``dot`` with its folder and kind."""
    home.require_dot(dot)
    out = []
    for sub in home.subdots(dot):
        folder = home.stable(dot, sub)
        kind = kind_set(home, dot, sub)
        detected = kind_of(folder) if folder.is_dir() else "files"
        out.append(SubdotKind(sub, folder, kind or detected, kind is not None))
    return out


def kind_of(folder: Path) -> str:
    """What a subdot folder holds: PostgreSQL (PG_VERSION), Redis (an AOF or dump.rdb),
    SQLite (a file with its header), or plain files."""
    if _regular(folder / "PG_VERSION"):
        return "postgres"
    if any(os.path.lexists(folder / n) for n in REDIS_FILES):
        return "redis"
    if _sqlite_files(folder):
        return "sqlite"
    return "files"


def _sqlite_files(folder: Path) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(dirpath, name)
            if _read_small(Path(p), 16) == SQLITE_MAGIC:
                found.append(os.path.relpath(p, folder))
    return sorted(found)


def diff_data(home: Repo, dot: str, a: str | None, b: str | None,
              subdot: str | None = None) -> list[Report]:
    """Reports per subdot from ref ``a`` (default HEAD) to ref ``b`` (default: the working
    state), for ``subdot`` or every subdot either side has."""
    changes = history.diff(home, dot, a, b)
    old = home.commit(home.resolve(dot, a or "HEAD")).subdots
    new = home.commit(home.resolve(dot, b)).subdots if b is not None else {
        s: None for s in home.subdots(dot)}
    names = sorted(old.keys() | new.keys())
    if subdot is not None:
        if subdot not in names:
            raise NotFound(f"no subdot {subdot!r} on either side (there are: "
                           f"{', '.join(names) or 'none'})")
        names = [subdot]
    reports = []
    with tempfile.TemporaryDirectory(prefix="dm-diff-") as tmp:
        for sub in names:
            left, right = Path(tmp) / sub / "a", Path(tmp) / sub / "b"
            left.parent.mkdir()
            _side(home, dot, a or "HEAD", sub, left, sub in old)
            live = _side(home, dot, b, sub, right, sub in new)
            report = Report(sub, kind_set(home, dot, sub) or (
                kind_of(right) if right.is_dir() and any(right.iterdir()) else kind_of(left)))
            if live is not None:
                report.frozen_ms = live.ms
                report.note = (f"the working state was read live: {', '.join(live.stopped)} "
                               f"stopped for {live.ms:.1f} ms")
            report.files = [c.__dict__ for c in changes if c.subdot == sub]
            if report.kind == "redis":
                report.keys = _redis_diff(left, right)
            elif report.kind == "sqlite":
                report.databases = _sqlite_diff(left, right)
            elif report.kind == "postgres":
                report.databases = _postgres_diff(left, right)
            report.text = _text_diffs(left, right, report.files)
            reports.append(report)
    return reports


def _side(home: Repo, dot: str, ref: str | None, sub: str, dest: Path,
          present: bool) -> LiveCopy | None:
    """One side of a subdot in ``dest``: a commit's, exported; the working state's, copied
    as a live commit reads it (its store may be running: the copy is what is read). Absent:
    an empty folder."""
    if not present:
        dest.mkdir()
    elif ref is not None:
        browse.export(home, dot, ref, dest, sub)
    else:
        return copy_live(home.stable(dot, sub), dest, dot)
    return None


Seen = dict[str, tuple[int, int, int, int]]  # relative path: (mode, size, mtime, ctime)


@dataclass(frozen=True)
class LiveCopy:
    """Who was stopped for a live copy's last pass, and how long."""

    stopped: list[str]
    ms: float


def copy_live(src: Path, dest: Path, dot: str) -> LiveCopy | None:
    """A copy of a folder that running processes may be writing, as consistent as a live
    commit's: copied while they run, then, with them stopped (as ``dm commit`` stops them,
    for a moment), what changed meanwhile is copied again and what went is removed. A
    database then finds in the copy what a crash would have left, and recovers from it.
    None: nobody was using the folder."""
    seen: Seen = {}
    _sync(src, dest, seen)
    writers = find_writers([src])
    containers = running_containers(dot) if writers else []
    if not (writers or containers):
        return None
    with frozen(writers, LIVE_COPY_FREEZE, containers) as fz:
        _sync(src, dest, seen)
    return LiveCopy([str(w) for w in [*writers, *containers]], fz.ms)


def _sync(src: Path, dest: Path, seen: Seen) -> None:
    """Make ``dest`` hold what ``src`` holds, copying only the entries whose stat differs
    from ``seen`` (updated); symlinks are copied as links, never followed. Entries that
    vanish during the walk (a server's temporary files) are skipped."""
    now: set[str] = set()
    dest.mkdir(exist_ok=True)
    dest.chmod(stat.S_IMODE(src.stat().st_mode))  # PostgreSQL wants its folder 0700
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            s, d = os.path.join(src, rel), os.path.join(dest, rel)
            try:
                st = os.lstat(s)
            except FileNotFoundError:
                continue
            now.add(rel)
            key = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if seen.get(rel) == key:
                continue
            try:
                if stat.S_ISDIR(st.st_mode):
                    if not os.path.isdir(d) or os.path.islink(d):
                        _remove(d)
                        os.mkdir(d)
                    os.chmod(d, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
                else:
                    _remove(d)
                    if stat.S_ISLNK(st.st_mode):
                        os.symlink(os.readlink(s), d)
                    elif stat.S_ISREG(st.st_mode):
                        shutil.copyfile(s, d, follow_symlinks=False)
                        os.chmod(d, stat.S_IMODE(st.st_mode) | stat.S_IRUSR)
                    else:
                        continue  # sockets, fifos: no data to diff
            except FileNotFoundError:
                now.discard(rel)
                continue
            seen[rel] = key
    for rel in sorted(set(seen) - now, reverse=True):  # gone meanwhile: deepest first
        _remove(os.path.join(dest, rel))
        del seen[rel]


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _no_symlinks(folder: Path, store: str) -> None:
    """A server reading a copy follows its symlinks: a stranger's could lead it to any file
    its user may read (another cluster's data), and the diff would show it. A data folder
    with one (a tablespace or pg_wal elsewhere, which a subdot cannot hold anyway) is not
    read."""
    for dirpath, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            if os.path.islink(os.path.join(dirpath, name)):
                rel = os.path.relpath(os.path.join(dirpath, name), folder.parent)
                raise DotmeshError(f"the {store} data holds a symlink ({rel}): a server "
                                   "reading it could be led out of it, so it is not read")


# ------------------------------------------------------------------ Redis


@contextmanager
def _redis(folder: Path) -> Iterator[Any]:
    """A throwaway redis-server on ``folder`` (a copy), on a private socket; None for a side
    with no data. Stopped on the way out, whatever happens."""
    import redis

    if not any(os.path.lexists(folder / n) for n in REDIS_FILES):
        yield None
        return
    _no_symlinks(folder, "Redis")
    sock = folder / "dm-diff.sock"
    aof = (folder / "appendonlydir").exists() or (folder / "appendonly.aof").exists()
    user = group = None
    if os.geteuid() == 0:  # a stranger's data is not parsed as root: as nobody, on the copy
        import pwd

        nobody = pwd.getpwnam("nobody")
        user, group = nobody.pw_uid, nobody.pw_gid
        for dirpath, dirs, files in os.walk(folder):
            for name in (".", *dirs, *files):
                os.lchown(os.path.join(dirpath, name), user, group)
        for p in (folder.parent.parent, folder.parent):  # nobody must reach the copy
            p.chmod(p.stat().st_mode | 0o711)
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--dir", str(folder), "--appendonly", "yes" if aof else "no", "--save", "",
         "--aof-load-truncated", "yes", "--daemonize", "no", "--logfile", ""],
        user=user, group=group, extra_groups=[] if user is not None else None,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = redis.Redis(unix_socket_path=str(sock))
        deadline = time.monotonic() + REDIS_START
        while True:
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                raise DotmeshError(f"redis-server could not load {folder.parent.name}'s data: "
                                   f"{err.strip().splitlines()[-1:] or 'it exited'}")
            try:
                if sock.exists() and client.ping():
                    break
            except (redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise DotmeshError(f"redis-server did not load the data within {REDIS_START}s")
            time.sleep(0.02)
        yield client
        client.close()
    except FileNotFoundError:
        raise DotmeshError("dm diff --data needs redis-server for a Redis subdot") from None
    finally:
        proc.kill()
        proc.wait()


def _redis_value(client: Any, key: bytes, kind: str) -> str:
    if kind == "string":
        v: Any = client.get(key)
    elif kind == "list":
        v = client.lrange(key, 0, 9)
    elif kind == "hash":
        v = dict(list(client.hscan_iter(key, count=10))[:10])
    elif kind == "set":
        v = sorted(client.sscan_iter(key, count=10))[:10]
    elif kind == "zset":
        v = client.zrange(key, 0, 9, withscores=True)
    else:
        v = f"{kind} of {client.memory_usage(key) or 0} bytes"
    return _short(v)


def _short(v: Any) -> str:
    if isinstance(v, bytes):
        v = v.decode(errors="backslashreplace")
    text = v if isinstance(v, str) else repr(v)
    return text if len(text) <= VALUE_LIMIT else text[:VALUE_LIMIT - 3] + "..."


def _redis_diff(left: Path, right: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"added": [], "removed": [], "changed": []}
    with _redis(left) as a, _redis(right) as b:
        keys_a = set(a.scan_iter(count=1000)) if a is not None else set()
        keys_b = set(b.scan_iter(count=1000)) if b is not None else set()
        for key in sorted(keys_b - keys_a):
            kind = b.type(key).decode()
            out["added"].append({"key": _short(key), "type": kind,
                                 "value": _redis_value(b, key, kind)})
        for key in sorted(keys_a - keys_b):
            kind = a.type(key).decode()
            out["removed"].append({"key": _short(key), "type": kind,
                                   "value": _redis_value(a, key, kind)})
        for key in sorted(keys_a & keys_b):
            if a.dump(key) != b.dump(key):  # the value's serialized form, type included
                ka, kb = a.type(key).decode(), b.type(key).decode()
                out["changed"].append({"key": _short(key), "type": kb,
                                       "old": _redis_value(a, key, ka),
                                       "new": _redis_value(b, key, kb)})
    return out


# ------------------------------------------------------------------ SQLite


def _sqlite_diff(left: Path, right: Path) -> list[dict[str, Any]]:
    out = []
    for rel in sorted(set(_sqlite_files(left)) | set(_sqlite_files(right))):
        a, b = _sqlite_read(left / rel), _sqlite_read(right / rel)
        entry: dict[str, Any] = {"path": rel, "tables": {}, "schema": []}
        for name in sorted(a["schema"].keys() | b["schema"].keys()):
            was, now = a["schema"].get(name), b["schema"].get(name)
            if was != now:
                entry["schema"].append({"name": name, "old": was, "new": now})
        for table in sorted(a["rows"].keys() | b["rows"].keys()):
            ra, rb = a["rows"].get(table, {}), b["rows"].get(table, {})
            if table in a["keyless"] or table in b["keyless"]:  # multisets of whole rows
                added = [row for k, (row, n) in rb.items() for _ in range(n - ra.get(k, (0, 0))[1])]
                removed = [row for k, (row, n) in ra.items()
                           for _ in range(n - rb.get(k, (0, 0))[1])]
                changed = []
            else:
                added = [rb[k] for k in rb.keys() - ra.keys()]
                removed = [ra[k] for k in ra.keys() - rb.keys()]
                changed = [{"old": ra[k], "new": rb[k]} for k in ra.keys() & rb.keys()
                           if ra[k] != rb[k]]
            if added or removed or changed:
                entry["tables"][table] = {
                    "added": len(added), "removed": len(removed), "changed": len(changed),
                    "first": {"added": sorted(added, key=repr)[:SHOWN],
                              "removed": sorted(removed, key=repr)[:SHOWN],
                              "changed": sorted(changed, key=repr)[:SHOWN]}}
        if entry["tables"] or entry["schema"]:
            out.append(entry)
    return out


def _sqlite_read(path: Path) -> dict[str, Any]:
    """A database's schema (name -> SQL) and its tables' rows by primary key (the whole row
    where there is none). Read on the export, so its WAL is replayed there."""
    if not _regular(path):
        return {"schema": {}, "rows": {}, "keyless": set()}
    try:
        conn = sqlite3.connect(path)
    except sqlite3.Error as e:
        raise DotmeshError(f"{path.name} cannot be read as SQLite: {e}") from None
    try:
        conn.execute("PRAGMA trusted_schema = OFF")  # a stranger's views and triggers run nothing
        schema = {str(n): str(text) for n, text in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
            "AND sql IS NOT NULL")}
        rows: dict[str, dict[Any, Any]] = {}
        keyless: set[str] = set()
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND "
                                     "name NOT LIKE 'sqlite\\_%' ESCAPE '\\'").fetchall():
            cols = conn.execute(f"PRAGMA table_info({_quoted(table)})").fetchall()
            names = [c[1] for c in cols]
            pk = [c[1] for c in sorted(cols, key=lambda c: c[5]) if c[5]]
            columns = ", ".join(_quoted(n) for n in names)
            got: dict[Any, Any] = {}
            for r in conn.execute(f"SELECT {columns} FROM {_quoted(table)}"):
                row = {n: _cell(v) for n, v in zip(names, r, strict=True)}
                if pk:
                    got[tuple(row[k] for k in pk)] = row
                else:  # no key: a multiset of whole rows (a second identical row counts)
                    key = repr(sorted(row.items()))
                    got[key] = (row, got.get(key, (row, 0))[1] + 1)
            if not pk:
                keyless.add(str(table))
            rows[str(table)] = got
        return {"schema": schema, "rows": rows, "keyless": keyless}
    except sqlite3.Error as e:
        raise DotmeshError(f"{path.name} cannot be read as SQLite: {e}") from None
    finally:
        conn.close()


def _quoted(name: object) -> str:
    """An SQLite identifier from the data (a stranger's), quoted: it can only be a name."""
    return '"' + str(name).replace('"', '""') + '"'


def _cell(v: object) -> object:
    return v.hex() if isinstance(v, bytes) else v


# ------------------------------------------------------------------ PostgreSQL


@contextmanager
def _postgres(folder: Path) -> Iterator[Any]:
    """A throwaway postmaster on ``folder`` (a copy of a data directory, recovered here if a
    live commit caught it mid-write), on a private socket with its own pg_hba (trust, local
    only), run as the folder's owner; yields a connect(dbname) function, or None for a side
    with no data. Stopped on the way out, whatever happens."""
    import psycopg

    if not _regular(folder / "PG_VERSION"):
        yield None
        return
    _no_symlinks(folder, "PostgreSQL")
    version = (_read_small(folder / "PG_VERSION", 64) or b"").decode(errors="replace").strip()
    if not version.isascii() or not version.isdigit() or len(version) > 3:
        raise DotmeshError(f"PG_VERSION says {version[:20]!r}, not a PostgreSQL version")
    binary = Path(f"/usr/lib/postgresql/{version}/bin/postgres")
    if not binary.is_file():
        raise DotmeshError(f"dm diff --data needs PostgreSQL {version} (no {binary})")
    owner, group = folder.stat().st_uid, folder.stat().st_gid
    if os.geteuid() == 0:  # the copy is read by the postgres service user, whoever owned it
        import pwd

        try:
            service = pwd.getpwnam("postgres")
        except KeyError:
            service = None
        if service is not None:
            owner, group = service.pw_uid, service.pw_gid
            for dirpath, dirs, files in os.walk(folder):
                for name in (".", *dirs, *files):
                    os.lchown(os.path.join(dirpath, name), owner, group)
    if owner == 0:
        raise DotmeshError("the data directory is owned by root, and postgres refuses to run "
                           "as root")
    if os.geteuid() not in (0, owner):
        raise DotmeshError("the data directory is someone else's: run dm diff --data as its "
                           "owner or as root")
    work = folder.parent / f"{folder.name}.pg"
    work.mkdir(mode=0o700)
    os.chown(work, owner, -1)
    # The commit's own settings are never read: they may come from a stranger, and settings
    # can name commands (restore_command, archive_command) and libraries to load.
    for name, text in (("hba.conf", "local all all trust\n"), ("ident.conf", ""),
                       ("postgresql.conf", _PG_CONF.format(work=work))):
        (work / name).write_text(text)
        os.chown(work / name, owner, -1)
    for name in ("postmaster.pid", "postgresql.auto.conf", "recovery.signal",
                 "standby.signal"):  # the copy's server is not running; crash recovery only
        (folder / name).unlink(missing_ok=True)
    for p in (folder.parent.parent, folder.parent):  # the owner must reach its folders
        p.chmod(p.stat().st_mode | 0o711)
    log = open(work / "log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [str(binary), "-D", str(folder), "-c", f"config_file={work / 'postgresql.conf'}"],
        user=owner if os.geteuid() == 0 else None,
        group=group if os.geteuid() == 0 else None,
        extra_groups=[] if os.geteuid() == 0 else None, stdout=log, stderr=log,
        stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    try:
        import pwd

        try:
            user = pwd.getpwuid(owner).pw_name
        except KeyError:
            user = "postgres"

        def connect(dbname: str, role: str | None = None) -> Any:
            return psycopg.connect(host=str(work), port=5432, dbname=dbname,
                                   user=role or user, autocommit=True)

        deadline = time.monotonic() + PG_START
        while True:
            if proc.poll() is not None:
                tail = (work / "log").read_text(errors="replace").strip().splitlines()[-1:]
                raise DotmeshError(f"postgres could not start on the copy: {tail}")
            try:
                connect("postgres", "postgres").close()
                user = "postgres"
                break
            except psycopg.OperationalError as e:
                if "does not exist" in str(e) and "role" in str(e):
                    try:
                        connect("postgres").close()
                        break
                    except psycopg.OperationalError:
                        pass
            if time.monotonic() > deadline:
                raise DotmeshError(f"postgres did not start on the copy within {PG_START} s")
            time.sleep(0.05)
        yield connect
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # a fast shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_PG_CONF = """# dm diff --data: a throwaway server on a copy, reachable only through its socket
listen_addresses = ''
port = 5432
unix_socket_directories = '{work}'
unix_socket_permissions = 0700
hba_file = '{work}/hba.conf'
ident_file = '{work}/ident.conf'
fsync = off
full_page_writes = off
logging_collector = off
archive_mode = off
max_wal_senders = 0
wal_level = minimal
shared_preload_libraries = ''
session_preload_libraries = ''
local_preload_libraries = ''
jit = off
"""

_TABLES = """
SELECT n.nspname, c.relname,
       coalesce((SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%'
"""
_SCHEMA = """
SELECT 'column ' || table_schema || '.' || table_name || '.' || column_name,
       data_type || CASE WHEN is_nullable = 'NO' THEN ' not null' ELSE '' END
FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
UNION ALL
SELECT 'index ' || schemaname || '.' || indexname, indexdef FROM pg_indexes
WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
"""


BUCKETS = 1 << 16  # a table's rows, by a hash of their key: compared a bucket at a time


def _pg_side(connect: Any, dbname: str) -> dict[str, Any]:
    """A database's schema and, per table, a digest of each bucket of its rows (a bucket:
    the rows whose key hashes to it; its digest: their count and the sum of a 64-bit hash
    of each row's key and contents, which no order changes, so nothing is sorted).
    Computed by the server: only the rows of buckets that differ come out (_pg_rows_in)."""
    with connect(dbname) as conn:
        schema = {str(k): str(v) for k, v in conn.execute(_SCHEMA)}
        tables: dict[str, dict[str, Any]] = {}
        for nsp, rel, pk in conn.execute(_TABLES).fetchall():
            table: dict[str, Any] = {"pk": list(pk), "ident": sql.Identifier(nsp, rel)}
            key = _pg_key(table)
            table["buckets"] = {b: (n, total) for b, n, total in conn.execute(sql.SQL(
                "SELECT hashtext({key}) & {mask}, count(*), sum(hashtextextended({key} || ' ' "
                "|| md5(t::text), 0)::numeric) FROM {ident} t GROUP BY 1").format(
                key=key, mask=sql.Literal(BUCKETS - 1), ident=table["ident"]))}
            tables[f"{nsp}.{rel}"] = table
        return {"schema": schema, "tables": tables}


def _pg_rows_in(connect: Any, dbname: str, table: dict[str, Any],
                buckets: list[int] | None) -> dict[str, Any]:
    """Each row's key and a digest of the row (a count of each content, for a table with
    no key: its rows are a multiset), for the rows in ``buckets`` (None: all rows)."""
    rows: dict[str, Any] = {}
    if buckets == [] or table["ident"] is None:
        return rows
    key = _pg_key(table)
    query = sql.SQL("SELECT {key}, md5(t::text) FROM {ident} t").format(
        key=key, ident=table["ident"])
    if buckets is not None:  # a constant array: the server looks each row's bucket up in a
        query = query + sql.SQL(" WHERE hashtext({key}) & {mask} = ANY({want})").format(
            key=key, mask=sql.Literal(BUCKETS - 1),  # hash of it, not along the array
            want=sql.SQL("'{{{}}}'::int[]").format(sql.SQL(",".join(map(str, buckets)))))
    with connect(dbname) as conn:
        for k, digest in conn.execute(query):
            if table["pk"]:
                rows[k] = digest
            else:
                rows[k] = rows.get(k, 0) + 1
    return rows


def _pg_key(table: dict[str, Any]) -> Any:
    """A row's key as text: its primary key's columns, or a digest of the whole row. Names
    come from the data (a stranger's): they only ever go in as quoted identifiers."""
    if not table["pk"]:
        return sql.SQL("md5(t::text)")
    return sql.SQL("row({})::text").format(
        sql.SQL(", ").join(sql.Identifier("t", c) for c in table["pk"]))


def _pg_rows(connect: Any, dbname: str, table: dict[str, Any], keys: list[str]) -> list[Any]:
    """The rows of ``table`` whose keys are ``keys`` (the first few shown), as JSON objects."""
    if not keys:
        return []
    key = _pg_key(table)
    with connect(dbname) as conn:
        got = conn.execute(sql.SQL("SELECT {}, to_jsonb(t) FROM {} t WHERE {} = ANY(%s)").format(
            key, table["ident"], key), (keys,)).fetchall()
    by_key = {k: row for k, row in got}
    return [by_key[k] for k in keys if k in by_key]


def _postgres_diff(left: Path, right: Path) -> list[dict[str, Any]]:
    import psycopg

    try:
        return _postgres_compare(left, right)
    except psycopg.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DotmeshError(f"reading the PostgreSQL data failed: {first}") from None


def _postgres_compare(left: Path, right: Path) -> list[dict[str, Any]]:
    out = []
    with _postgres(left) as a, _postgres(right) as b:
        dbs_a = _pg_databases(a)
        dbs_b = _pg_databases(b)
        for db in sorted(dbs_a | dbs_b):
            sa = _pg_side(a, db) if db in dbs_a else {"schema": {}, "tables": {}}
            sb = _pg_side(b, db) if db in dbs_b else {"schema": {}, "tables": {}}
            entry: dict[str, Any] = {"path": db, "tables": {}, "schema": []}
            for name in sorted(sa["schema"].keys() | sb["schema"].keys()):
                was, now = sa["schema"].get(name), sb["schema"].get(name)
                if was != now:
                    entry["schema"].append({"name": name, "old": was, "new": now})
            for name in sorted(sa["tables"].keys() | sb["tables"].keys()):
                ta = sa["tables"].get(name, {"pk": [], "buckets": {}, "ident": None})
                tb = sb["tables"].get(name, {"pk": [], "buckets": {}, "ident": None})
                ba, bb = ta["buckets"], tb["buckets"]
                differ: list[int] | None = sorted(
                    x for x in ba.keys() | bb.keys() if ba.get(x) != bb.get(x))
                if not differ:
                    continue
                if ta["pk"] != tb["pk"]:  # keyed differently: rows as multisets, all of them
                    ta, tb, differ = {**ta, "pk": []}, {**tb, "pk": []}, None
                ra = _pg_rows_in(a, db, ta, differ)
                rb = _pg_rows_in(b, db, tb, differ)
                if ta["pk"] and ta["pk"] == tb["pk"]:
                    added = sorted(rb.keys() - ra.keys())
                    removed = sorted(ra.keys() - rb.keys())
                    changed = sorted(k for k in ra.keys() & rb.keys() if ra[k] != rb[k])
                else:  # no key: what one side has more of
                    added = sorted(k for k in rb if rb[k] > ra.get(k, 0))
                    removed = sorted(k for k in ra if ra[k] > rb.get(k, 0))
                    changed = []
                if not (added or removed or changed):
                    continue
                olds = _pg_rows(a, db, ta, changed[:SHOWN]) if changed else []
                news = _pg_rows(b, db, tb, changed[:SHOWN]) if changed else []
                entry["tables"][name] = {
                    "added": len(added), "removed": len(removed), "changed": len(changed),
                    "first": {"added": _pg_rows(b, db, tb, added[:SHOWN]),
                              "removed": _pg_rows(a, db, ta, removed[:SHOWN]),
                              "changed": [{"old": o, "new": n}
                                          for o, n in zip(olds, news, strict=False)]}}
            if entry["tables"] or entry["schema"]:
                out.append(entry)
    return out


def _pg_databases(connect: Any) -> set[str]:
    if connect is None:
        return set()
    with connect("postgres") as conn:
        return {str(r[0]) for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate")}


# ------------------------------------------------------------------ text files


def _text_diffs(left: Path, right: Path, files: list[dict[str, Any]]) -> dict[str, str]:
    """Unified diffs of the changed files that are small text on both sides: regular files
    (never read through a symlink), UTF-8, no NUL byte; each diff cut at TEXT_LIMIT."""
    out = {}
    for f in files:
        if f["status"] != "changed" or f["path"].endswith("/"):
            continue
        da = _read_small(left / f["path"], TEXT_LIMIT + 1)
        db = _read_small(right / f["path"], TEXT_LIMIT + 1)
        if da is None or db is None or TEXT_LIMIT < max(len(da), len(db)):
            continue
        if b"\0" in da or b"\0" in db:
            continue  # binary, whatever UTF-8 says
        try:
            ta, tb = da.decode(), db.decode()
        except UnicodeDecodeError:
            continue
        text = "".join(difflib.unified_diff(ta.splitlines(keepends=True),
                                            tb.splitlines(keepends=True),
                                            f"a/{f['path']}", f"b/{f['path']}"))
        out[f["path"]] = text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + "\n...\n"
    return out


__all__ = ["KINDS", "Report", "diff_data", "kind_of", "kind_set", "set_kind"]
