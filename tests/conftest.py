"""Shared fixtures: a fresh store per test and helpers that run the real ``dm`` command."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

DM_BIN = shutil.which("dm", path=str(Path(sys.executable).parent)) or "dm"

# A dm daemon the developer runs must not serve the tests' commands (tests/integration/
# test_daemon.py starts its own): a socket path in no private folder means "no daemon".
os.environ["DM_DAEMON_SOCKET"] = "/nonexistent/dm-tests/daemon.sock"


class DM:
    """Runs ``dm`` as a subprocess against one home; ``dm.ok(...)`` asserts success."""

    def __init__(self, home: Path, store: bool = True) -> None:
        """``store``: before the first command, if there is nothing at ``home``, make the
        store there, as a user's first ``dm init`` does (the only command that makes one);
        False: leave a missing store missing."""
        self.home = home
        self._env = {**os.environ, "DM_HOME": str(home), "DM_AUTHOR": "tester"}
        self._make_store = store

    @property
    def env(self) -> dict[str, str]:
        """The environment to run dm in (the store is made on first use, as above)."""
        self.ensure_store()
        return self._env

    def ensure_store(self) -> None:
        if self._make_store and not self.home.exists():
            from dotmesh.store.repo import Repo  # what a bare `dm init` does, in-process

            Repo(self.home).close()
        self._make_store = False

    def __call__(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        self.ensure_store()
        p = subprocess.run([DM_BIN, *args], env=self.env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=300)
        if check and p.returncode != 0:
            raise AssertionError(f"dm {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def ok(self, *args: str) -> str:
        return self(*args, check=True).stdout

    def popen(self, *args: str) -> subprocess.Popen[str]:
        self.ensure_store()
        return subprocess.Popen([DM_BIN, *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def path(self, name: str) -> Path:
        return Path(self.ok("path", name).strip())


def kill_inside(start: Callable[[], subprocess.Popen[str]], inside: Callable[[], bool],
                attempts: int, what: str, wait: float = 60) -> None:
    """Start a process (``start``) and kill -9 it as soon as ``inside()`` says it is where
    it should die; start again if it finished first."""
    for _attempt in range(attempts):
        proc = start()
        deadline = time.monotonic() + wait
        while not inside() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        proc.wait()
    raise AssertionError(f"never caught dm inside {what}")


@pytest.fixture
def dm(tmp_path: Path) -> DM:
    return DM(tmp_path / "home")


def capture(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything dotmesh promises to preserve about a folder, for equality checks."""
    out: dict[str, tuple[object, ...]] = {}
    st = os.lstat(top)
    out["."] = ("d", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, top)
            st = os.lstat(p)
            common = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p), st.st_uid, st.st_gid, st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", *common)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("f", *common, f.read())
    return out


def raw_commit(parents: tuple[bytes, ...], subdots: dict[str, object], message: str,
               author: str, timestamp_ns: int, metadata: dict[str, str] | None = None) -> bytes:
    """A commit's bytes as a hostile sender would make them: no check on what it names
    (``Commit.encode`` refuses to write what dm could not read back)."""
    import json

    return b"DMC1\n" + json.dumps({
        "parents": [p.hex() for p in parents],
        "subdots": {k: v.to_json() for k, v in subdots.items()},  # type: ignore[attr-defined]
        "message": message, "author": author, "timestamp_ns": timestamp_ns,
        "metadata": metadata or {}}, sort_keys=True, separators=(",", ":")).encode()


def flip_byte_of_largest_object(dm: DM, delta: int) -> None:
    """Flip the byte at ``delta`` from the start of the largest object's payload in its pack
    (a disk gone bad under the store)."""
    from dotmesh.meta import index

    with sqlite3.connect(dm.home / "meta.db") as db:
        index.merge_recent(db)  # every object's row in ``objects``
        name, offset = db.execute("SELECT p.name, o.offset FROM objects o JOIN packs p "
                                  "ON p.id = o.pack ORDER BY o.stored_len DESC").fetchone()
    pack = dm.home / "packs" / name
    data = bytearray(pack.read_bytes())
    data[offset + delta] ^= 0x55
    pack.write_bytes(bytes(data))
