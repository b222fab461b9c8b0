"""A hostile pusher cannot hurt a real hub (or, through it, its other users): what it sends is
held to the rules local input follows, and bombs cost the hub no more memory than the size
caps allow, even several at once."""

from __future__ import annotations

import base64
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import zstandard

from dotmesh.model.ids import ObjectId, object_id
from dotmesh.model.objects import (
    FILE,
    KIND_CHUNK,
    KIND_COMMIT,
    KIND_FILELIST,
    KIND_TREE,
    MAX_CHUNK,
    Root,
    encode_tree_rows,
)
from dotmesh.remote.wire import Record, encode
from dotmesh.store.packs import PACK_MAGIC, RECORD
from tests.conftest import raw_commit
from tests.integration.remote_env import Hub

pytestmark = pytest.mark.slow  # one hub for the module: a service, started once


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    top = tmp_path_factory.mktemp("hub")
    h = Hub(["--data", str(top / "data")], top)
    h.keys = {u: h.user(u) for u in ("mallory", "alice")}
    h.start()
    try:
        yield h
    finally:
        h.stop()


def _post(hub: Hub, body: bytes) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{hub.ports[0]}/api/v1/dots/mallory/app/objects",
                      content=body, auth=("mallory", hub.keys["mallory"]), timeout=120,
                      headers={"content-type": "application/octet-stream"})


def _plain(kind: int, data: bytes) -> Record:
    return Record(kind, object_id(data), len(data), data, False)


def _commit(subdots: dict[str, bytes], metadata: dict[str, str] | None = None) -> bytes:
    return raw_commit((), {k: Root(ObjectId(t), 0o755, 0, 0, 1) for k, t in subdots.items()},
                      "evil", "mallory", 1, metadata)


EMPTY = encode_tree_rows([])


@pytest.mark.parametrize("records, needle", [
    ([_plain(KIND_TREE, EMPTY), _plain(KIND_COMMIT, _commit({"../../x": object_id(EMPTY)}))],
     "subdot name"),
    ([_plain(KIND_TREE, EMPTY), _plain(KIND_COMMIT, _commit({"db": object_id(EMPTY)},
                                                            {"a\nb": "c"}))], "metadata key"),
    ([_plain(KIND_TREE, b"DMT1\n" + json.dumps(
        [["..", FILE, 0o644, 0, 0, 1, 0, None, 0]]).encode().replace(b" ", b""))],
     "unsafe name"),
    ([_plain(KIND_CHUNK, b"x"), _plain(KIND_CHUNK, b"x")], "twice"),
])
def test_the_hub_holds_pushes_to_the_rules_of_local_input(hub, records, needle):
    r = _post(hub, encode(records))
    assert r.status_code == 422 and needle in r.json()["error"], r.text


def _rss_peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def _chunk_claiming_a_gib() -> bytes:
    """The issue's bomb: a frame that does not state its size, under a header claiming 1 GiB
    (an older hub made room for all of it)."""
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    return PACK_MAGIC + RECORD.pack(KIND_CHUNK, 1, object_id(b"?"), 1 << 30, len(frame)) + frame


def _chunk_inflating_past_its_claim() -> bytes:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(256 << 20))
    return PACK_MAGIC + RECORD.pack(KIND_CHUNK, 1, object_id(b"?"), MAX_CHUNK,
                                    len(frame)) + frame


def _tree_of_one_row_repeated() -> bytes:
    """A true 64 MiB tree (its id matches) that repeats one row: zstd makes it a few KiB, and
    parsing it whole would take gigabytes."""
    row = b'["a","f",420,0,0,1,0,null,0]'
    raw = b"DMT1\n[" + b",".join([row] * ((64 << 20) // (len(row) + 1) - 1)) + b"]"
    frame = zstandard.ZstdCompressor(level=3).compress(raw)
    return PACK_MAGIC + RECORD.pack(KIND_TREE, 1, object_id(raw), len(raw), len(frame)) + frame


def _file_lists_claiming_too_much() -> bytes:
    """Many small records each claiming a 64 MiB file list: over a batch's inflated cap."""
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64))
    return PACK_MAGIC + b"".join(
        RECORD.pack(KIND_FILELIST, 1, object_id(bytes([i])), 64 << 20, len(frame)) + frame
        for i in range(8))


@pytest.mark.parametrize("bomb, needle", [
    (_chunk_claiming_a_gib, "over the 262144-byte limit"),
    (_chunk_inflating_past_its_claim, "does not decompress"),
    (_tree_of_one_row_repeated, "not a sorted list"),
    (_file_lists_claiming_too_much, "over the 268435456-byte limit of one batch"),
])
def test_bombs_cost_the_hub_little_even_three_at_once(hub, bomb, needle):
    body = bomb()
    assert len(body) < 1 << 20  # a small push
    before = _rss_peak(hub.procs[0].pid)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: _post(hub, body), range(3)))
    grew = _rss_peak(hub.procs[0].pid) - before
    assert grew < 300 << 20, f"the hub's peak memory grew by {grew >> 20} MiB"
    for r in answers:
        assert r.status_code == 422 and needle in r.json()["error"], r.text


def test_idle_uploads_hold_up_nobody_else(hub):
    """Connections that declare a body and send none take their user's turns only, and are
    dropped once they stall."""
    auth = base64.b64encode(f"mallory:{hub.keys['mallory']}".encode()).decode()
    idle = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", hub.ports[0]))
        s.sendall((f"POST /api/v1/dots/mallory/app/objects HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Basic {auth}\r\nContent-Length: 1000000\r\n\r\n").encode())
        idle.append(s)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        r = httpx.post(f"http://127.0.0.1:{hub.ports[0]}/api/v1/dots/alice/app/lacking",
                       content=object_id(b"x"), auth=("alice", hub.keys["alice"]), timeout=20)
        assert r.status_code == 200 and time.monotonic() - started < 5
    finally:
        for s in idle:
            s.close()


def test_odd_requests_are_answered_without_a_traceback(hub):
    base = f"http://127.0.0.1:{hub.ports[0]}/api/v1"
    with socket.create_connection(("127.0.0.1", hub.ports[0])) as s:  # not ASCII
        s.sendall(b"GET /api/v1/user HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
                  + "ñññ".encode() + b"\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 401")
    r = httpx.put(base + "/dots/mallory/app/branches/master", content=b"[" * 100_000,
                  auth=("mallory", hub.keys["mallory"]))
    assert r.status_code == 400
    assert "Traceback" not in hub.logs()
