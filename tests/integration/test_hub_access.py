"""Who may use a hub and what its answers give away: access taken back (collaborators, keys,
accounts) on the very next request; answers that do not depend on other dots' contents; the
same commit pushed twice at once; clients that hang up and hubs killed mid-push. Real
``dm hub serve`` processes on loopback, the real ``dm`` as client."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from dotmesh.model.objects import FILE, KIND_CHUNK, KIND_TREE, encode_tree_rows, object_id
from dotmesh.remote.wire import Record, decode, encode
from dotmesh.store.packs import compress
from tests.conftest import DM, DM_BIN
from tests.integration.remote_env import Hub, free_port
from tests.integration.test_errors import _one_line_error

USERS = ("alice", "bob", "carol", "mallory")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    top = tmp_path_factory.mktemp("hub")
    h = Hub(["--data", str(top / "data")], top)
    h.keys = {u: h.user(u) for u in USERS}
    h.start()
    try:
        yield h
    finally:
        h.stop()


def _dev(tmp_path: Path, name: str, hub: Hub, key: str | None = None,
         home: str | None = None) -> DM:
    dm = DM(tmp_path / (home or name))
    hub.join(dm, name, key or hub.keys[name])
    return dm


def _http(hub: Hub, user: str, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{hub.ports[0]}",
                        auth=(user, key or hub.keys[user]), timeout=60)


def _rec(kind: int, data: bytes) -> Record:
    payload, z = compress(data)
    return Record(kind, object_id(data), len(data), bytes(payload), z)


def _tree(name: str) -> bytes:
    return encode_tree_rows([[name, FILE, 0o644, 0, 0, 1, 4, object_id(b"fine").hex(), 0]])


def _shared_dot(dev: DM, name: str, text: str) -> None:
    dev.ok("init", name)
    dev.ok("switch", name)
    (dev.path(name) / "f").write_text(text)
    dev.ok("commit", "-m", text, "--no-freeze")
    dev.ok("push", "hub", name)


# ------------------------------------------------------------------ what answers give away


def test_answers_do_not_tell_what_other_dots_hold(hub, tmp_path):
    """Mallory sends a chunk alice's private dot holds and one nobody holds: every answer is
    the same for both, so she cannot test guesses of alice's files."""
    alice = _dev(tmp_path, "alice", hub)
    secret = b"salary of bob: 123456 a year\n"
    _shared_dot(alice, "payroll", secret.decode())

    def probe(dot: str, rec: Record) -> list[object]:
        base = f"/api/v1/dots/mallory/{dot}"
        out: list[object] = []
        with _http(hub, "mallory") as c:
            r = c.post(base + "/lacking", content=rec.oid)
            out.append((r.status_code, r.content == rec.oid))
            r = c.post(base + "/fetch", content=bytes([KIND_CHUNK]) + rec.oid)
            out.append((r.status_code, re.sub(r"probe-\w|[0-9a-f]{16}", "X", r.text)))
            for _ in range(2):
                r = c.post(base + "/objects", content=encode([rec]))
                out.append((r.status_code, r.json()))
            r = c.post(base + "/lacking", content=rec.oid)
            out.append((r.status_code, r.content))
            r = c.post(base + "/fetch", content=bytes([KIND_CHUNK]) + rec.oid)
            got = decode(r.content, {rec.oid: KIND_CHUNK}, "the hub")
            out.append((r.status_code, [x.raw() == rec.raw() for x in got]))
            r = c.get(base)
            out.append((r.status_code, {**r.json(), "name": "X"}))
        return out

    held = probe("probe-a", _rec(KIND_CHUNK, secret))
    unheld = probe("probe-b", _rec(KIND_CHUNK, os.urandom(len(secret))))
    assert held == unheld
    assert held[2] == (200, {"received": 1, "new": 1})  # new to this dot
    assert held[3] == (200, {"received": 1, "new": 0})


def test_bytes_held_as_another_kind_elsewhere_are_neither_seen_nor_in_the_way(hub):
    """The hub keeps each object's bytes once, with the kind it first came as: that kind must
    not show through another dot's answers, nor stop a later pusher's reads."""
    with _http(hub, "alice") as alice, _http(hub, "mallory") as mallory:
        held = _rec(KIND_TREE, _tree("held"))
        assert alice.post("/api/v1/dots/alice/vault/objects",
                          content=encode([held])).status_code == 200
        answers = []
        for dot, data in (("kind-a", held.raw()), ("kind-b", _tree("nobody's"))):
            chunk = _rec(KIND_CHUNK, data)
            base = f"/api/v1/dots/mallory/{dot}"
            assert mallory.post(base + "/objects", content=encode([chunk])).json()["new"] == 1
            r = mallory.post(base + "/fetch", content=bytes([KIND_CHUNK]) + chunk.oid)
            answers.append((r.status_code, r.text if r.status_code != 200 else
                            [x.raw() == data for x in decode(r.content, None, "hub")]))
        assert answers[0] == answers[1] == (200, [True])

        early = _rec(KIND_CHUNK, _tree("pushed first by mallory"))  # she guessed alice's tree
        mallory.post("/api/v1/dots/mallory/kind-c/objects", content=encode([early]))
        tree = _rec(KIND_TREE, early.raw())
        alice.post("/api/v1/dots/alice/vault/objects", content=encode([tree]))
        r = alice.post("/api/v1/dots/alice/vault/fetch", content=bytes([KIND_TREE]) + tree.oid)
        assert r.status_code == 200, r.text
        assert [x.kind for x in decode(r.content, {tree.oid: KIND_TREE}, "hub")] == [KIND_TREE]


# ------------------------------------------------------------------ hanging up, dying


def test_a_client_that_hangs_up_leaves_no_traceback(hub):
    """Requests whose client goes away while the hub reads the body, or while it sends the
    answer: the hub says nothing of them."""
    with _http(hub, "mallory") as c:
        big = [_rec(KIND_CHUNK, os.urandom(1 << 20)) for _ in range(24)]
        assert c.post("/api/v1/dots/mallory/hangup/objects",
                      content=encode(big)).status_code == 200
    auth = base64.b64encode(f"mallory:{hub.keys['mallory']}".encode()).decode()
    head = ("POST /api/v1/dots/mallory/hangup/{} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Basic {auth}\r\nContent-Type: application/octet-stream\r\n"
            "Content-Length: {}\r\n\r\n")
    for path in ("objects", "lacking", "fetch"):  # mid-body
        with socket.create_connection(("127.0.0.1", hub.ports[0])) as s:
            s.sendall(head.format(path, 10_000_000).encode() + os.urandom(4096))
            time.sleep(0.3)
    want = b"".join(bytes([KIND_CHUNK]) + r.oid for r in big)
    with socket.create_connection(("127.0.0.1", hub.ports[0])) as s:  # mid-answer
        s.sendall(head.format("fetch", len(want)).encode() + want)
        assert s.recv(1024).startswith(b"HTTP/1.1 200")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
    time.sleep(1)
    with _http(hub, "mallory") as c:  # still serving
        assert c.get("/api/v1/user").status_code == 200
    log = hub.logs()
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")] if folder.exists() else []


def test_a_killed_hub_leaves_no_temporary_files_and_only_one_serves_a_folder(tmp_path):
    h = Hub(["--data", str(tmp_path / "data")], tmp_path)
    key = h.user("alice")
    h.start()
    blobs = tmp_path / "data" / "blobs"
    try:
        alice = _dev(tmp_path, "alice", h, key)
        alice.ok("init", "big")
        for attempt in range(3):  # a push that finished first is tried again with new data
            for i in range(8):
                (alice.path("big") / f"blob{i}.bin").write_bytes(os.urandom(8 << 20))
            alice.ok("commit", "-m", f"big {attempt}", "--no-freeze")
            push = alice.popen("push")
            while not _tmp_files(blobs) and push.poll() is None:
                time.sleep(0.0005)
            if push.poll() is None:
                h.procs[0].send_signal(signal.SIGKILL)
                h.procs[0].wait()
                assert push.wait() != 0  # the hub went away
                break
            assert push.returncode == 0, push.communicate()[1]
        else:
            raise AssertionError("never caught the hub writing a pack")
        assert _tmp_files(blobs)
        h.procs = []
        h.start()
        assert _tmp_files(blobs) == []

        other = subprocess.run([DM_BIN, "hub", *h.args, "serve", "--port", str(free_port())],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=30)
        line = _one_line_error(other)
        assert other.returncode == 6 and f"pid {h.procs[0].pid}" in line, line
        assert json.loads(alice.ok("push", "--json"))["status"] == "pushed"
        bob = DM(tmp_path / "bob")
        h.join(bob, "alice", key)
        bob.ok("clone", "hub", "alice/big")
        assert json.loads(bob.ok("fsck", "--json"))["ok"]
    finally:
        h.stop()
    assert "Traceback" not in h.logs()
