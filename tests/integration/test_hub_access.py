"""Who may use a hub and what its answers give away: access taken back (collaborators, keys,
accounts) on the very next request; answers that do not depend on other dots' contents; the
same commit pushed twice at once; clients that hang up and hubs killed mid-push. Real
``dm hub serve`` processes on loopback, the real ``dm`` as client."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from dotmesh.model.objects import FILE, KIND_CHUNK, KIND_TREE, encode_tree_rows, object_id
from dotmesh.remote.wire import Record, decode, encode
from dotmesh.store.packs import compress
from tests.conftest import DM
from tests.integration.remote_env import Hub

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


# ------------------------------------------------------------------ the same push twice


def _twin_pushes(tmp_path: Path, first: DM, remote: str, dot: str, rounds: int = 10) -> None:
    """Commit in ``first``, copy its store, and push the same commit from both copies at
    the same moment, ``rounds`` times: both must succeed every time."""
    first.ok("init", dot)
    for i in range(rounds):
        (first.path(dot) / "f").write_bytes(os.urandom(2 << 20))
        first.ok("commit", "-m", f"round {i}", "--no-freeze")
        twin = DM(tmp_path / f"twin{i}")
        shutil.copytree(first.home, twin.home, symlinks=True)
        procs = [d.popen("push", remote, dot) for d in (first, twin)]
        results = [(p.wait(), p.communicate()[1]) for p in procs]
        assert [code for code, _ in results] == [0, 0], (i, results)


def test_the_same_commit_pushed_twice_at_once_to_a_hub(hub, tmp_path):
    _twin_pushes(tmp_path, _dev(tmp_path, "alice", hub), "hub", "twins")


def test_the_same_commit_pushed_twice_at_once_to_a_bucket(s3, tmp_path):
    s3.bucket("dm-twins")
    first = DM(tmp_path / "first")
    first.ok("s3", "remote", "add", "bucket", s3.spec("dm-twins"))
    _twin_pushes(tmp_path, first, "bucket", "twins")
