"""Real servers for the remote tests, on loopback: SeaweedFS (an S3 server), PostgreSQL for
a scaled-out hub, and ``dm hub serve`` processes."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import DM, DM_BIN
from tests.integration.servers import Postgres, shared_tmp

WEED = str(Path(sys.executable).parent / "weed")
S3_KEY, S3_SECRET = "AKDMTEST", "secret-dm-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check, what: str, proc: subprocess.Popen[bytes] | None, log: Path | None,
          timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what} did not start:\n{tail}")
        time.sleep(0.1)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class S3Server:
    endpoint: str

    def spec(self, bucket: str) -> str:
        return f"{S3_KEY}:{S3_SECRET}@{self.endpoint}/{bucket}"

    @functools.cached_property
    def _s3(self) -> Any:
        """One client for every question: making one takes 40 ms, and a test that polls
        ``count`` to catch a push midway (``kill_inside``) missed it when each poll made its
        own (a push's last batch can land between two slow polls)."""
        import boto3  # noqa: PLC0415

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def count(self, bucket: str, prefix: str) -> int:
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                  Prefix=prefix)
        return sum(len(p.get("Contents", [])) for p in pages)

    def bucket(self, name: str) -> None:
        self._s3.create_bucket(Bucket=name)


@contextmanager
def seaweedfs() -> Iterator[S3Server]:
    """``weed server`` with its S3 gateway, every port on 127.0.0.1; killed with SIGKILL (it
    takes long to stop otherwise). A start that fails is tried again on new ports, once:
    a port found free can be taken by another process before weed binds it."""
    for attempt in (1, 2):
        try:
            started = _seaweedfs()
            server = next(started)
        except Exception:  # noqa: BLE001 - whatever failed, once more on new ports
            if attempt == 2:
                raise
            continue
        try:
            yield server
        finally:
            started.close()
        return


def _seaweedfs() -> Iterator[S3Server]:
    top = Path(tempfile.mkdtemp(prefix="dm-weed-", dir="/var/tmp"))
    (top / "data").mkdir()
    cfg = top / "s3.json"
    cfg.write_text(json.dumps({"identities": [{
        "name": "dm", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {k: free_port() for k in ("master", "volume", "filer", "s3")}
    grpc = {k: free_port() for k in ports}
    log = top / "weed.log"
    # Newer releases also serve Iceberg and Lance catalogs on fixed ports: two servers at
    # once (two test runs on one machine) would collide there.
    extra = [f"-s3.port.{k}=0" for k in ("iceberg", "lance") if f"-s3.port.{k}" in _weed_flags()]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [WEED, "server", f"-dir={top / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
             f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
             "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
             "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={grpc['s3']}",
             f"-s3.config={cfg}", "-master.volumeSizeLimitMB=64", "-volume.max=50", *extra],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        server = S3Server(f"http://127.0.0.1:{ports['s3']}")
        _wait(lambda: _answers(ports["s3"]), "SeaweedFS", proc, log)
        deadline = time.monotonic() + 60
        while True:  # the gateway answers before the filer is ready for writes
            try:
                server.bucket("dm-probe")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(top, ignore_errors=True)


@functools.cache
def _weed_flags() -> str:
    return subprocess.run([WEED, "server", "-h"], capture_output=True, text=True).stderr


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A PostgreSQL server for the hubs of a whole run (the ``postgres`` fixture): initdb and
    start once, each hub in a database of its own (:func:`postgres_db`)."""
    with shared_tmp() as top:
        data = top / "pgdata"
        data.mkdir()
        pg = Postgres(data, top / "pgsock", free_port())
        pg.initdb()
        pg.start()
        try:
            yield pg
        finally:
            pg.stop()


_databases = itertools.count()


@contextmanager
def postgres_db(pg: Postgres) -> Iterator[str]:
    """A fresh database on ``pg``, dropped afterwards; yields a SQLAlchemy URL (unix socket,
    trust). What a hub keeps in PostgreSQL (rows, row locks, its gc's advisory lock) is all
    per database, so hubs on one server see nothing of each other."""
    name = f"hub{next(_databases)}"
    pg.sql(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@/{name}?host={pg.sock}&port={pg.port}"
    finally:
        pg.sql(f"DROP DATABASE {name} WITH (FORCE)")


class Hub:
    """One or more ``dm hub serve`` processes over the same storage."""

    def __init__(self, args: list[str], top: Path, processes: int = 1,
                 tls: tuple[Path, ...] | None = None) -> None:
        self.args, self.top, self.tls = args, top, tls
        self.ports = [free_port() for _ in range(processes)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.keys: dict[str, str] = {}
        self.s3: S3Server | None = None
        self.bucket = ""

    def packs(self) -> int:
        """How many pack blobs the hub holds (a sign that a push is under way)."""
        if self.s3 is not None:
            return self.s3.count(self.bucket, "hub/packs/")
        folder = self.top / "data" / "blobs" / "packs"
        return len(list(folder.iterdir())) if folder.exists() else 0

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``dm hub ARGS`` on this hub's storage, whatever its exit code."""
        return subprocess.run([DM_BIN, "hub", *self.args, *args], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=120)

    def dm_hub(self, *args: str) -> str:
        p = self.run(*args)
        assert p.returncode == 0, p.stderr
        return p.stdout

    def logs(self) -> str:
        """What every hub process printed (each writes hub-PORT.log)."""
        return "".join(p.read_text() for p in sorted(self.top.glob("hub-*.log")))

    def user(self, name: str) -> str:
        return str(json.loads(self.dm_hub("user", "add", name, "--json"))["api_key"])

    def start(self) -> None:
        for port in self.ports:
            extra = ["--cert", str(self.tls[0]), "--key", str(self.tls[1])] if self.tls else []
            log = self.top / f"hub-{port}.log"
            with open(log, "ab") as out:
                proc = subprocess.Popen([DM_BIN, "hub", *self.args, "serve", "--port",
                                         str(port), *extra], stdout=out, stderr=out,
                                        stdin=subprocess.DEVNULL)
            self.procs.append(proc)
            _wait(lambda port=port: _answers(port), "dm hub serve", proc, log)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def address(self, user: str, i: int = 0) -> str:
        return f"{user}@127.0.0.1:{self.ports[i % len(self.ports)]}"

    def join(self, dm: DM, user: str, key: str, i: int = 0, name: str = "hub") -> None:
        """Add this hub as ``name`` to ``dm``'s remotes (process ``i`` of the hub)."""
        flags = ["--ca-cert", str(self.tls[2])] if self.tls and len(self.tls) > 2 else (
            [] if self.tls else ["--http"])
        p = subprocess.run([DM_BIN, "remote", "add", name, self.address(user, i), *flags],
                           env={**dm.env, "DM_API_KEY": key}, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
