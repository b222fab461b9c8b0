"""A hostile hub (a test double speaking the hub's API) cannot damage the client's store:
whatever it sends wrong, clone and pull fail with one line, and no ref moves."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvicorn
import zstandard
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dotmesh.model.objects import (
    DIR,
    FILE,
    KIND_CHUNK,
    KIND_COMMIT,
    KIND_TREE,
    SYMLINK,
    Commit,
    Root,
    encode_tree_rows,
    object_id,
)
from dotmesh.ops.home import Home
from dotmesh.remote.wire import Record, encode
from dotmesh.store.packs import MAX_OBJECT, PACK_MAGIC, RECORD
from tests.conftest import DM, DM_BIN
from tests.integration.remote_env import free_port

Objects = dict[bytes, tuple[int, bytes]]
Mutate = Callable[[list[Record]], bytes]


def honest(records: list[Record]) -> bytes:
    return encode(records)


class EvilHub:
    """Serves ``objects`` for dot evil/app, passing every answer through ``mutate``."""

    def __init__(self, objects: Objects, head: bytes) -> None:
        self.objects, self.head = objects, head
        self.mutate: Mutate = honest  # answers to fetch
        self.mutate_history: Mutate = honest
        self.port = free_port()

    def records(self, ids: list[bytes]) -> list[Record]:
        return [Record(self.objects[i][0], i, len(self.objects[i][1]), self.objects[i][1],
                       False) for i in ids if i in self.objects]

    def app(self) -> Starlette:
        async def user(request: Request) -> Response:
            return JSONResponse({"name": "mallory"})

        async def dot(request: Request) -> Response:
            return JSONResponse({"namespace": "evil", "name": "app", "owner": "evil",
                                 "branches": {"master": self.head.hex()}, "collaborators": []})

        async def history(request: Request) -> Response:
            commits = [i for i, (k, _) in self.objects.items() if k == KIND_COMMIT]
            return Response(self.mutate_history(self.records(commits)))

        async def fetch(request: Request) -> Response:
            body = await request.body()
            ids = [body[i + 1:i + 33] for i in range(0, len(body), 33)]
            return Response(self.mutate(self.records(ids)))

        base = "/api/v1/dots/{ns}/{dot}"
        return Starlette(routes=[
            Route("/api/v1/user", user), Route(base, dot),
            Route(base + "/history/{commit}", history),
            Route(base + "/fetch", fetch, methods=["POST"])])

    def __enter__(self) -> EvilHub:
        self.server = uvicorn.Server(uvicorn.Config(self.app(), host="127.0.0.1",
                                                    port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()


def _tree(rows: list[list[object]]) -> tuple[bytes, bytes]:
    data = encode_tree_rows(rows)
    return object_id(data), data


def _commit(tree: bytes) -> tuple[bytes, bytes]:
    data = Commit((), {"db": Root(tree, 0o755, 0, 0, 1)}, "evil", "mallory", 1).encode()
    return object_id(data), data


def _dot(rows: list[list[object]], extra: Objects | None = None) -> tuple[Objects, bytes]:
    tid, tdata = _tree(rows)
    cid, cdata = _commit(tid)
    objects: Objects = {tid: (KIND_TREE, tdata), cid: (KIND_COMMIT, cdata)}
    objects.update(extra or {})
    return objects, cid


GOOD = b"honest content"
GOOD_ID = object_id(GOOD)
GOOD_ROWS: list[list[object]] = [["f", FILE, 0o644, 0, 0, 1, len(GOOD), GOOD_ID.hex(), 0]]


def _flip_chunk(records: list[Record]) -> bytes:
    return encode([Record(r.kind, r.oid, r.raw_len, b"X" + bytes(r.payload)[1:], r.zstd)
                   if r.kind == KIND_CHUNK else r for r in records])


def _unasked(records: list[Record]) -> bytes:
    extra = b"never asked for"
    return encode([*records, Record(KIND_CHUNK, object_id(extra), len(extra), extra, False)])


def _oversized(records: list[Record]) -> bytes:
    if all(r.oid != GOOD_ID for r in records):
        return encode(records)
    head = RECORD.pack(KIND_CHUNK, 0, GOOD_ID, MAX_OBJECT + 1, 10)
    return PACK_MAGIC + head + b"0123456789"


def _bomb(records: list[Record]) -> bytes:
    """A chunk that says 14 bytes but decompresses to 64 MiB."""
    if all(r.oid != GOOD_ID for r in records):
        return encode(records)
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    return PACK_MAGIC + RECORD.pack(KIND_CHUNK, 1, GOOD_ID, len(GOOD), len(bomb)) + bomb


def _truncated(records: list[Record]) -> bytes:
    return encode(records)[:-3]


def _not_a_pack(records: list[Record]) -> bytes:
    return b"<html>hello</html>"


def _wrong_kind(records: list[Record]) -> bytes:
    return encode([Record(KIND_TREE if r.kind == KIND_CHUNK else r.kind, r.oid, r.raw_len,
                          r.payload, r.zstd) for r in records])


def _stray_commit(records: list[Record]) -> bytes:
    other = Commit((), {}, "not in the history", "mallory", 2).encode()
    return encode([*records, Record(KIND_COMMIT, object_id(other), len(other), other, False)])


CASES = {
    "a chunk that does not match its id": (GOOD_ROWS, _flip_chunk, "does not match its id"),
    "an object that was not asked for": (GOOD_ROWS, _unasked, "not asked for"),
    "an oversized object": (GOOD_ROWS, _oversized, "over the"),
    "a decompression bomb": (GOOD_ROWS, _bomb, "decompress"),
    "a truncated batch": (GOOD_ROWS, _truncated, "truncated"),
    "something else than objects": (GOOD_ROWS, _not_a_pack, "not a batch"),
    "a chunk sent as a tree": (GOOD_ROWS, _wrong_kind, "where a chunk was expected"),
    "a tree entry named ..": ([["..", FILE, 0o644, 0, 0, 1, 0, None, 0]], honest,
                              "unsafe name"),
    "a tree entry with a slash": ([["a/b", FILE, 0o644, 0, 0, 1, 0, None, 0]], honest,
                                  "unsafe name"),
    "an absolute symlink": ([["l", SYMLINK, 0o777, 0, 0, 1, 0, "/etc/passwd", 0]], honest,
                            "points out of its subdot"),
    "a commit outside the history": (GOOD_ROWS, _stray_commit, "not in"),
    "a symlink climbing out": (
        [["sub", DIR, 0o755, 0, 0, 1, 0,
          _tree([["l", SYMLINK, 0o777, 0, 0, 1, 0, "../../x", 0]])[0].hex(), 0]],
        honest, "points out of its subdot"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_hub_cannot_damage_the_store(tmp_path, case):
    rows, mutate, needle = CASES[case]
    extra: Objects = {GOOD_ID: (KIND_CHUNK, GOOD)}
    inner = _tree([["l", SYMLINK, 0o777, 0, 0, 1, 0, "../../x", 0]])
    extra[inner[0]] = (KIND_TREE, inner[1])
    objects, head = _dot(rows, extra)
    dm = DM(tmp_path / "victim")
    dm.ok("init", "app")
    (dm.path("app.db") / "mine").write_text("precious")
    dm.ok("commit", "-m", "mine")
    before = dm.ok("log", "--json")
    with EvilHub(objects, head) as evil:
        if case == "a commit outside the history":
            evil.mutate_history = mutate
        else:
            evil.mutate = mutate
        p = _add_remote(dm, evil.port)
        assert p.returncode == 0, p.stderr
        p = dm("clone", "evil", "evil/app", "--local-name", "stolen")
        assert p.returncode == 7, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in p.stderr, p.stderr
        home = Home(dm.home)
        try:
            assert home.remote_heads("app") == {}
            assert not home.dot_exists("stolen")
        finally:
            home.close()
        _track(dm, "app", "evil", "evil/app")
        p = dm("pull", "evil", "app")
        assert p.returncode == 7 and needle in p.stderr, p.stderr
    assert dm.ok("log", "--json") == before  # no ref moved
    assert (dm.path("app.db") / "mine").read_text() == "precious"
    assert json.loads(dm.ok("fsck", "--json"))["ok"]


def test_an_honest_double_works(tmp_path):
    """The double itself is right: with nothing corrupted, the clone succeeds."""
    objects, head = _dot(GOOD_ROWS, {GOOD_ID: (KIND_CHUNK, GOOD)})
    dm = DM(tmp_path / "victim")
    with EvilHub(objects, head) as evil:
        assert _add_remote(dm, evil.port).returncode == 0
        dm.ok("clone", "evil", "evil/app")
    assert (dm.path("app.db") / "f").read_bytes() == GOOD


def _add_remote(dm: DM, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DM_BIN, "remote", "add", "evil", f"mallory@127.0.0.1:{port}",
                           "--http"], env={**dm.env, "DM_API_KEY": "k"}, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)


def _track(dm: DM, dot: str, remote: str, remote_dot: str) -> None:
    """Make ``dot`` pull from ``remote_dot`` (as a clone or push would have recorded)."""
    home = Home(Path(dm.home))
    try:
        home.conn.execute("INSERT OR REPLACE INTO dot_remotes VALUES (?, ?, ?)",
                          (dot, remote, remote_dot))
    finally:
        home.close()
