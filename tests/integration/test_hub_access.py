"""Who may use a hub and what its answers give away: access taken back (collaborators, keys,
accounts) on the very next request; answers that do not depend on other dots' contents; the
same commit pushed twice at once; clients that hang up and hubs killed mid-push. Real
``dm hub serve`` processes on loopback, the real ``dm`` as client."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from dotmesh.errors import NotFound
from dotmesh.model.ids import object_id
from dotmesh.model.objects import FILE, KIND_CHUNK, KIND_TREE, encode_tree_rows
from dotmesh.remote.blobs import LocalBlobs
from dotmesh.remote.wire import Record, decode, encode
from dotmesh.server.hub.storage import HubStore
from dotmesh.store.packs import compress
from tests.conftest import DM, DM_BIN
from tests.integration.remote_env import Hub, _answers, free_port
from tests.integration.test_errors import _one_line_error

pytestmark = pytest.mark.slow  # hub processes and big pushes: minutes

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


# ------------------------------------------------------------------ taking access back


def test_a_removed_collaborator_is_refused_at_once(hub, tmp_path):
    alice = _dev(tmp_path, "alice", hub)
    bob = _dev(tmp_path, "bob", hub)
    _shared_dot(alice, "team", "v1")
    hub.dm_hub("collaborator", "add", "alice/team", "bob")
    hub.dm_hub("collaborator", "add", "alice/team", "carol")
    assert json.loads(hub.dm_hub("collaborator", "list", "alice/team", "--json")) == {
        "dot": "alice/team", "owner": "alice", "collaborators": ["bob", "carol"],
        "roles": {"bob": "write", "carol": "write"}}  # write: the role when none is given
    assert "bob" in hub.dm_hub("collaborator", "list", "alice/team")
    bob.ok("clone", "hub", "alice/team")
    with _http(hub, "bob") as c:
        r = c.get("/api/v1/dots/alice/team/collaborators")
        assert r.status_code == 200 and r.json()["collaborators"] == ["bob", "carol"]
        assert c.delete("/api/v1/dots/alice/team/collaborators/carol").status_code == 403

    hub.dm_hub("collaborator", "rm", "alice/team", "bob")
    (bob.path("team") / "f").write_text("bob's")
    bob.ok("commit", "-m", "bob's", "--no-freeze")
    assert bob("push").returncode == 13
    assert bob("pull").returncode == 13
    p = bob("clone", "hub", "alice/team", "--local-name", "again")
    assert p.returncode == 13 and "only its owner and collaborators" in _one_line_error(p)
    with _http(hub, "bob") as c:
        assert c.get("/api/v1/dots/alice/team/collaborators").status_code == 403

    with _http(hub, "alice") as c:  # the owner takes carol off over HTTP
        r = c.delete("/api/v1/dots/alice/team/collaborators/carol")
        assert r.status_code == 200 and r.json() == {"removed": "carol"}
        r = c.delete("/api/v1/dots/alice/team/collaborators/carol")
        assert r.status_code == 404 and "not a collaborator" in r.json()["error"]
        assert c.get("/api/v1/dots/alice/team/collaborators").json()["collaborators"] == []
    assert json.loads(hub.dm_hub("collaborator", "list", "alice/team", "--json"))[
        "collaborators"] == []
    assert alice.ok("pull", "hub", "team").count("up to date") == 1  # bob's push never landed


def test_keys_are_listed_made_and_revoked_taking_effect_at_once(hub, tmp_path):
    first = hub.keys["carol"]
    listed = json.loads(hub.dm_hub("key", "list", "carol", "--json"))
    assert [set(k) for k in listed] == [{"id", "created"}]
    assert first not in hub.dm_hub("key", "list", "carol", "--json")
    with _http(hub, "carol") as c:
        assert c.get("/api/v1/user/keys").json() == {"keys": listed}
        r = c.post("/api/v1/user/keys")
        assert r.status_code == 201
        made = r.json()
        assert set(made) == {"id", "created", "api_key"}
    ids = [k["id"] for k in json.loads(hub.dm_hub("key", "list", "carol", "--json"))]
    assert sorted(ids) == sorted([listed[0]["id"], made["id"]])
    with _http(hub, "carol", made["api_key"]) as c:
        assert c.get("/api/v1/user").json() == {"name": "carol"}
        r = c.delete(f"/api/v1/user/keys/{made['id']}")  # the key in use
        assert r.status_code == 200 and r.json() == {"revoked": made["id"]}
        r = c.get("/api/v1/user")
        assert r.status_code == 401 and "does not know this API key" in r.json()["error"]
    with _http(hub, "mallory") as c:  # nobody revokes another user's key
        r = c.delete(f"/api/v1/user/keys/{listed[0]['id']}")
        assert r.status_code == 404

    carol = _dev(tmp_path, "carol", hub)
    _shared_dot(carol, "notes", "v1")
    hub.dm_hub("key", "revoke", listed[0]["id"])
    (carol.path("notes") / "f").write_text("v2")
    carol.ok("commit", "-m", "v2", "--no-freeze")
    p = carol("push")
    assert p.returncode == 12 and "does not know this API key" in _one_line_error(p)
    hub.keys["carol"] = json.loads(hub.dm_hub("user", "key", "carol", "--json"))["api_key"]
    assert json.loads(hub.dm_hub("key", "list", "carol", "--json"))[0]["id"] not in ids


def test_a_disabled_user_is_refused_until_enabled(hub, tmp_path):
    key = hub.user("dora")
    dora = _dev(tmp_path, "dora", hub, key)
    _shared_dot(dora, "diary", "v1")
    hub.dm_hub("user", "disable", "dora")
    p = dora("pull")
    assert p.returncode == 12 and "disabled" in _one_line_error(p)
    with _http(hub, "dora", key) as c:
        r = c.get("/api/v1/user")
        assert r.status_code == 401 and "disabled" in r.json()["error"]
    with _http(hub, "dora", "dmk_wrong") as c:  # a wrong key learns nothing of the account
        assert "disabled" not in c.get("/api/v1/user").json()["error"]
    with _http(hub, "döra", key) as c:  # another name with her key, not ASCII
        assert c.get("/api/v1/user").status_code == 401
    users = {u["name"]: u for u in json.loads(hub.dm_hub("user", "list", "--json"))}
    assert users["dora"]["disabled"] and users["dora"]["dots"] == ["dora/diary"]
    assert users["dora"]["keys"] == 1 and not users["alice"]["disabled"]
    assert "disabled" in hub.dm_hub("user", "list")
    hub.dm_hub("user", "enable", "dora")
    assert "up to date" in dora.ok("pull")


def test_a_removed_user_leaves_nothing_to_a_namesake(hub, tmp_path):
    key = hub.user("erin")
    erin = _dev(tmp_path, "erin", hub, key)
    _shared_dot(erin, "app", "erin's")
    _shared_dot(erin, "web", "erin's web")
    alice = _dev(tmp_path, "alice", hub)
    _shared_dot(alice, "lab", "alice's")
    hub.dm_hub("collaborator", "add", "alice/lab", "erin")
    hub.dm_hub("collaborator", "add", "erin/app", "bob")

    p = hub.run("user", "rm", "erin")
    assert p.returncode == 5 and "--with-dots" in _one_line_error(p)
    assert "erin" in [u["name"] for u in json.loads(hub.dm_hub("user", "list", "--json"))]
    assert "erin/app" in hub.dm_hub("user", "rm", "erin", "--with-dots")
    assert "erin" not in [u["name"] for u in json.loads(hub.dm_hub("user", "list", "--json"))]
    assert erin("pull").returncode == 12
    assert "erin" not in json.loads(hub.dm_hub("collaborator", "list", "alice/lab",
                                               "--json"))["collaborators"]
    with _http(hub, "bob") as c:
        assert c.get("/api/v1/dots/erin/app").status_code == 403

    again = hub.user("erin")  # a namesake: owns nothing, collaborates on nothing
    namesake = _dev(tmp_path, "erin", hub, again, home="erin2")
    users = {u["name"]: u for u in json.loads(hub.dm_hub("user", "list", "--json"))}
    assert users["erin"]["dots"] == [] and users["erin"]["keys"] == 1
    assert namesake("clone", "hub", "erin/app").returncode == 3
    assert namesake("clone", "hub", "alice/lab").returncode == 13
    with _http(hub, "erin", again) as c:
        assert c.get("/api/v1/dots/erin/web").status_code == 404
    with _http(hub, "bob") as c:  # bob's old access to erin/app did not come back
        assert c.get("/api/v1/dots/erin/app").status_code == 403


def test_a_push_under_way_when_its_dot_is_removed_leaves_nothing(tmp_path):
    """dm hub user rm --with-dots while the owner pushes: what the push adds once the dot is
    gone must not stay under its id, which SQLite gives to the next dot made."""
    store = HubStore(f"sqlite:///{tmp_path / 'hub.db'}", LocalBlobs(tmp_path / "blobs"))
    try:
        store.add_user("zed")
        dot = store.dot_for("zed", "zed", "app", create=True)  # as a request under way has it
        store.remove_user("zed", with_dots=True)
        late = _rec(KIND_CHUNK, b"zed's last batch")
        with pytest.raises(NotFound):
            store.receive(dot, [late])
        store.add_user("yan")
        later = store.dot_for("yan", "yan", "app", create=True)
        assert later.id == dot.id  # why it matters
        assert store.lacking(later, [late.oid]) == {late.oid}
    finally:
        store.close()


@pytest.mark.parametrize("args,code,needle", [
    (["collaborator", "rm", "noslash", "bob"], 2, "NAMESPACE/DOT"),
    (["collaborator", "rm", "alice/nodot", "bob"], 3, "no dot alice/nodot"),
    (["collaborator", "rm", "alice/bad name", "bob"], 2, "may only contain"),
    (["collaborator", "list", "alice/nodot"], 3, "no dot alice/nodot"),
    (["collaborator", "add", "ghost/app", "bob"], 3, "no user named 'ghost'"),
    (["user", "disable", "ghost"], 3, "no user named"),
    (["user", "enable", "ghost"], 3, "no user named"),
    (["user", "rm", "ghost"], 3, "no user named"),
    (["user", "rm", "bad name"], 2, "may only contain"),
    (["key", "list", "ghost"], 3, "no user named"),
    (["key", "revoke", "xyz"], 2, "12 hex digits"),
    (["key", "revoke", "0123456789ab"], 3, "no API key"),
])
def test_bad_access_commands(hub, args, code, needle):
    p = hub.run(*args)
    assert p.returncode == code, p.stderr
    assert needle in _one_line_error(p)


def test_a_collaborator_not_there_is_one_line(hub, tmp_path):
    _shared_dot(_dev(tmp_path, "alice", hub), "solo", "v1")
    p = hub.run("collaborator", "rm", "alice/solo", "bob")
    assert p.returncode == 3 and "bob is not a collaborator" in _one_line_error(p)


def test_the_openapi_description_says_what_it_means(hub):
    """Every route is described elsewhere; here, no YAML flow mapping split a description
    at a comma into a stray key."""
    spec = yaml.safe_load(httpx.get(f"http://127.0.0.1:{hub.ports[0]}/api/v1/openapi.yaml",
                                    timeout=30).text)
    stray: list[str] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if v is None and " " in str(k):
                    stray.append(f"{where}: {k!r}")
                walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}")

    walk(spec, "")
    assert stray == []
    assert "/api/v1/user/keys/{id}" in spec["paths"]


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


# ------------------------------------------------------------------ hanging up, dying


def test_a_client_that_hangs_up_leaves_no_traceback(hub):
    """Requests whose client goes away while the hub reads the body, or while it sends the
    answer: the hub says nothing of them."""
    with _http(hub, "mallory") as c:
        big = [_rec(KIND_CHUNK, os.urandom(256 << 10)) for _ in range(96)]
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
            for i in range(4):  # 32 MiB: two batches, each a pack the hub writes as it reads
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


def test_the_workers_of_a_killed_hub_end_with_it(tmp_path):
    """kill -9 of a dm hub serve with --workers: its workers must not serve on (the next
    serve, finding the folder's lock free, would delete their temporary files)."""
    cfg = tmp_path / "hub.toml"
    cfg.write_text(f'data = "{tmp_path / "data"}"\nworkers = 2\n')
    h = Hub(["--config", str(cfg)], tmp_path)
    h.start()
    try:
        h.procs[0].send_signal(signal.SIGKILL)
        h.procs[0].wait()
        deadline = time.monotonic() + 10
        while _answers(h.ports[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _answers(h.ports[0]), "a worker still serves"
        h.procs = []
        h.start()  # the same folder and port
    finally:
        h.stop()
