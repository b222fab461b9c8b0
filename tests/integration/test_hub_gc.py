"""Deleting dots on a hub and ``dm hub gc``: what only a deleted dot held is freed, what
another dot shares stays; pushes racing gc end with whole dots; a killed gc is finished by
the next; bad input is one line. The store-level tests run in-process on SQLite and a
folder; the rest drive real ``dm hub serve`` processes and the real ``dm`` (folder + SQLite,
and PostgreSQL + SeaweedFS)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from dotmesh.errors import NotFound
from dotmesh.model.ids import object_id
from dotmesh.model.objects import KIND_CHUNK
from dotmesh.remote.blobs import LocalBlobs
from dotmesh.remote.wire import Record
from dotmesh.server.hub import gc
from dotmesh.server.hub.storage import HubStore
from dotmesh.store.packs import compress
from tests.conftest import DM, DM_BIN
from tests.integration.remote_env import Hub, postgres_db
from tests.integration.test_errors import _one_line_error
from tests.integration.test_remote import _running


def _rec(data: bytes) -> Record:
    payload, z = compress(data)
    return Record(KIND_CHUNK, object_id(data), len(data), bytes(payload), z)


def _store(tmp_path: Path) -> HubStore:
    store = HubStore(f"sqlite:///{tmp_path / 'hub.db'}", LocalBlobs(tmp_path / "blobs"))
    store.add_user("ann")
    return store


def _read(store: HubStore, ns: str, name: str, recs: list[Record]) -> None:
    dot = store.dot_for(ns, ns, name)
    got = {r.oid: r.raw() for r in store.read(dot, {r.oid: KIND_CHUNK for r in recs}, 1 << 30)}
    assert got == {r.oid: r.raw() for r in recs}


def _blob_bytes(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in (tmp_path / "blobs").rglob("*") if p.is_file())


# ------------------------------------------------------------------ the store, in-process


def test_gc_frees_a_deleted_dots_own_objects_and_keeps_shared_ones(tmp_path):
    store = _store(tmp_path)
    try:
        shared = [_rec(os.urandom(3000)) for _ in range(5)]
        own = [_rec(os.urandom(50_000)) for _ in range(20)]
        keep = [_rec(os.urandom(2000)) for _ in range(3)]
        app = store.dot_for("ann", "ann", "app", create=True)
        store.receive(app, shared + own)  # one pack holding both
        web = store.dot_for("ann", "ann", "web", create=True)
        store.receive(web, shared + keep)  # joins the shared ones: no new bytes for them
        before = _blob_bytes(tmp_path)

        assert gc.plan(store).garbage_objects == 0
        store.remove_dot("ann", "app")
        with pytest.raises(NotFound):
            store.remove_dot("ann", "app")
        p = gc.plan(store)
        assert p.garbage_objects == len(own) and p.repack == [next(iter(
            {v.pack for v in store._locs(web, [shared[0].oid]).values()}))]
        freed = gc.apply(store, p)  # the default grace: the old pack waits
        assert freed.objects == len(own) and freed.packs_doomed == 1
        assert freed.packs_repacked == 1 and freed.packs_written == 1
        _read(store, "ann", "web", shared + keep)
        assert _blob_bytes(tmp_path) > before  # the new pack is there, the old one too

        again = gc.apply(store, gc.plan(store, grace=0))
        assert again.objects == 0 and again.packs_deleted == 1
        _read(store, "ann", "web", shared + keep)
        assert _blob_bytes(tmp_path) < before - 20 * 50_000 * 0.9
        p = gc.plan(store, grace=0)
        assert (p.garbage_objects, p.drop, p.repack, p.due, p.orphans) == (0, [], [], [], [])
    finally:
        store.close()


def test_a_push_that_counted_on_objects_gc_took_stores_them_again(tmp_path):
    """The race a hub's gc must survive: a push reads that the hub has an object (so it
    keeps no bytes for it), gc deletes that object (no dot holds it at that moment), then
    the push makes it a member. The push must end holding the bytes."""
    store = _store(tmp_path)
    try:
        recs = [_rec(os.urandom(5000)) for _ in range(4)]
        old = store.dot_for("ann", "ann", "old", create=True)
        store.receive(old, recs)
        store.remove_dot("ann", "old")
        new = store.dot_for("ann", "ann", "new", create=True)
        present = store._present
        ran = []

        def racing(table, ids, dot):
            found = present(table, ids, dot)
            if table.name == "objects" and not ran:  # the push has read what the hub has
                ran.append(gc.apply(store, gc.plan(store, grace=0)))
            return found
        store._present = racing  # type: ignore[method-assign]
        store.receive(new, recs)
        assert ran[0].objects == len(recs) and ran[0].packs_deleted == 1
        _read(store, "ann", "new", recs)
        assert gc.plan(store, grace=0).garbage_objects == 0
    finally:
        store.close()


def test_unindexed_packs_go_only_after_the_grace_period(tmp_path):
    store = _store(tmp_path)
    try:
        store.blobs.put("packs/" + "ab" * 16 + ".pack", b"DMPACK1\nkilled push")
        p = gc.plan(store, grace=60)
        assert not p.orphans and len(p.young) == 1
        assert gc.apply(store, p).packs_deleted == 0
        p = gc.plan(store, grace=0)
        assert len(p.orphans) == 1
        assert gc.apply(store, p).packs_deleted == 1
        assert store.blobs.list("packs/") == []
    finally:
        store.close()


def test_one_gc_at_a_time(tmp_path):
    store = _store(tmp_path)
    try:
        with gc.running(store):
            with pytest.raises(Exception, match="another dm hub gc"):
                gc.apply(store, gc.plan(store))
    finally:
        store.close()


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    top = tmp_path_factory.mktemp("hub")
    h = Hub(["--data", str(top / "data")], top)
    h.dm_hub("user", "add", "alice")
    return h


@pytest.mark.parametrize("args,code,needle", [
    (["dot", "rm", "noslash"], 2, "NAMESPACE/DOT"),
    (["dot", "rm", "alice/bad name"], 2, "may only contain"),
    (["dot", "rm", "../x"], 2, "namespace"),
    (["dot", "rm", "alice/nodot"], 3, "no dot alice/nodot"),
    (["gc", "--grace", "-1"], 2, "--grace"),
    (["gc", "--repack-below", "101"], 2, "--repack-below"),
])
def test_bad_hub_dot_and_gc_commands(local_hub, args, code, needle):
    p = local_hub.run(*args)
    assert p.returncode == code, p.stderr
    assert needle in _one_line_error(p)


@pytest.mark.slow
def test_gc_dry_run_and_json_on_an_empty_hub(local_hub):
    out = json.loads(local_hub.dm_hub("gc", "--dry-run", "--json"))
    assert out["dry_run"] and out["plan"]["garbage_objects"] == 0
    out = json.loads(local_hub.dm_hub("gc", "--json"))
    assert out["freed"]["objects"] == 0 and out["freed"]["packs_deleted"] == 0
    assert "0 objects in 0 packs" in local_hub.dm_hub("gc")
    for cmd in (["gc"], ["dot", "rm"], ["dot"]):
        assert "Example:" in local_hub.dm_hub(*cmd, "--help")


# ------------------------------------------------------------------ real hubs, real clients


@pytest.fixture(scope="module", params=["embedded", "scale-out"])
def hub(request, tmp_path_factory):
    """A hub over SQLite and a folder; or two processes over PostgreSQL and SeaweedFS."""
    top = tmp_path_factory.mktemp("hub")
    if request.param == "embedded":
        yield from _running(Hub(["--data", str(top / "data")], top))
    else:
        server = request.getfixturevalue("s3")
        server.bucket("dm-hub-gc")
        with postgres_db(request.getfixturevalue("postgres")) as url:
            h = Hub(["--db", url, "--s3", server.spec("dm-hub-gc"), "--data", str(top / "d")],
                    top, processes=2)
            h.s3, h.bucket = server, "dm-hub-gc"
            yield from _running(h)


def _dev(tmp_path: Path, hub: Hub, user: str, home: str, i: int = 0) -> DM:
    dm = DM(tmp_path / home)
    hub.join(dm, user, hub.keys[user], i)
    return dm


def _http(hub: Hub, user: str) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{hub.ports[-1]}",
                        auth=(user, hub.keys[user]), timeout=60)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _dot(dm: DM, name: str, files: dict[str, bytes]) -> None:
    dm.ok("init", name)
    dm.ok("switch", name)
    top = dm.path(name)
    for rel, data in files.items():
        (top / rel).write_bytes(data)
    dm.ok("commit", "-m", name, "--no-freeze")


def _clones_exactly(tmp_path: Path, hub: Hub, remote_dot: str, want: dict[str, bytes]) -> None:
    _all_clone_exactly(tmp_path, hub, {remote_dot: want})


def _all_clone_exactly(tmp_path: Path, hub: Hub, dots: dict[str, dict[str, bytes]]) -> None:
    """Clone each of ``dots`` (one owner's) into one fresh store, side by side: each holds
    exactly its files, and fsck finds the store whole."""
    home = f"check-{os.urandom(4).hex()}"
    dm = _dev(tmp_path, hub, next(iter(dots)).split("/")[0], home, 1)
    for i, (remote_dot, want) in enumerate(dots.items()):
        dm.ok("clone", "hub", remote_dot, "--local-name", f"c{i}")
        assert _files(dm.path(f"c{i}")) == want
    assert json.loads(dm.ok("fsck", "--json"))["ok"]


def _gc(hub: Hub, *args: str) -> dict:
    return json.loads(hub.dm_hub("gc", "--json", *args))


@pytest.mark.slow
@pytest.mark.parametrize("hub", ["embedded"], indirect=True)  # the scale-out hub's deletes:
def test_a_deleted_dots_own_bytes_are_freed_and_shared_ones_kept(hub, tmp_path):  # below
    alice = _dev(tmp_path, hub, "alice", "alice")
    shared = {"shared.bin": os.urandom(700 << 10)}
    own = {f"own{i}.bin": os.urandom(1 << 20) for i in range(4)}
    _dot(alice, "doomed", {**shared, **own})
    _dot(alice, "kept", {**shared, "small": b"kept's own"})
    alice.ok("push", "hub", "doomed")
    alice.ok("push", "hub", "kept")
    hub.dm_hub("collaborator", "add", "alice/doomed", "bob")

    with _http(hub, "bob") as c:  # a collaborator may not delete; bad names; a stranger
        r = c.delete("/api/v1/dots/alice/doomed")
        assert r.status_code == 403 and "only alice may delete" in r.json()["error"]
        assert c.delete("/api/v1/dots/alice/bad%20name").status_code == 400
    with _http(hub, "carol") as c:
        assert c.delete("/api/v1/dots/alice/doomed").status_code == 403
    with _http(hub, "alice") as c:
        assert c.delete("/api/v1/dots/alice/nothing").status_code == 404
    assert _gc(hub, "--dry-run")["plan"]["garbage_objects"] == 0

    with _http(hub, "alice") as c:
        assert c.delete("/api/v1/dots/alice/doomed").json() == {"deleted": "alice/doomed"}
        assert c.get("/api/v1/dots/alice/doomed").status_code == 404
    packs = hub.packs()
    dry = _gc(hub, "--dry-run", "--grace", "0")
    assert dry == _gc(hub, "--dry-run", "--grace", "0")  # changed nothing
    assert hub.packs() == packs
    plan = dry["plan"]
    assert plan["garbage_objects"] > 0 and plan["garbage_bytes"] >= 4 << 20
    assert plan["free_now"]["bytes"] >= 0.9 * (4 << 20)

    out = _gc(hub, "--grace", "0")
    assert out["freed"]["objects"] == plan["garbage_objects"]
    assert out["freed"]["bytes_deleted"] >= 4 << 20
    after = _gc(hub, "--dry-run", "--grace", "0")["plan"]
    assert after["stored_bytes"] <= plan["stored_bytes"] - 0.9 * (4 << 20)
    assert after["garbage_objects"] == 0 and after["free_now"]["packs"] == 0
    _clones_exactly(tmp_path, hub, "alice/kept", {**shared, "small": b"kept's own"})

    # dm hub dot rm: the same, from the hub's side; the owner may push it again afterwards.
    hub.dm_hub("dot", "rm", "alice/kept")
    assert alice("pull", "hub", "kept").returncode == 3
    text = hub.dm_hub("gc", "--grace", "0")
    assert "Freed" in text and "objects" in text
    alice.ok("push", "hub", "kept")
    _clones_exactly(tmp_path, hub, "alice/kept", {**shared, "small": b"kept's own"})


@pytest.mark.slow
def test_pushes_racing_gc_end_with_whole_dots(hub, tmp_path):
    """Each round: a dot is pushed and deleted, so the hub holds its objects for no dot;
    then a second dot with the same files is pushed while gc runs again and again. The
    push counts on objects gc is deleting: it must end with a dot that clones exactly."""
    alice = _dev(tmp_path, hub, "alice", "alice")
    for i in range(1):
        files = {f"f{j}.bin": os.urandom(2000) for j in range(3000)}
        _dot(alice, f"src{i}", files)
        _dot(alice, f"dst{i}", {**files, "extra": b"%d" % i})
        alice.ok("push", "hub", f"src{i}")
        hub.dm_hub("dot", "rm", f"alice/src{i}")
        gc_run = subprocess.Popen([DM_BIN, "hub", *hub.args, "gc", "--grace", "5"])
        push = alice.popen("push", "hub", f"dst{i}")
        assert gc_run.wait() == 0
        runs = 0
        while push.poll() is None or runs < 2:
            p = hub.run("gc", "--grace", "5")
            assert p.returncode == 0, p.stderr
            runs += 1
        assert push.wait() == 0, push.stderr.read() if push.stderr else ""
        _clones_exactly(tmp_path, hub, f"alice/dst{i}", {**files, "extra": b"%d" % i})
    _gc(hub, "--grace", "0")  # what the runs above doomed goes now, as 5 s later with 5
    for i in range(1):
        assert alice("pull", "hub", f"dst{i}").returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("hub", ["scale-out"], indirect=True)  # S3 and PostgreSQL: the
def test_a_killed_gc_loses_nothing_and_a_rerun_finishes(hub, tmp_path):  # slow deletes
    alice = _dev(tmp_path, hub, "alice", "alice")
    kept: dict[str, dict[str, bytes]] = {}
    for i in range(4):
        shared = {"common.bin": os.urandom(400 << 10)}
        files = {**shared, **{f"f{j}.bin": os.urandom(512 << 10) for j in range(4)}}
        _dot(alice, f"k{i}", files)
        alice.ok("push", "hub", f"k{i}")
        if i % 2:
            kept[f"alice/k{i}"] = files
        else:
            _dot(alice, f"keep{i}", shared)  # shares one file with the dot deleted below
            alice.ok("push", "hub", f"keep{i}")
            kept[f"alice/keep{i}"] = shared
            hub.dm_hub("dot", "rm", f"alice/k{i}")
    plan = _gc(hub, "--dry-run", "--grace", "0")["plan"]
    assert plan["garbage_objects"] > 0
    for delay in (0.7, 1.5):  # (at 2.5 s gc had finished: a kill then proved nothing)
        proc = subprocess.Popen([DM_BIN, "hub", *hub.args, "gc", "--grace", "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _all_clone_exactly(tmp_path, hub, dict(list(kept.items())[:2]))  # whole while half done
    _gc(hub, "--grace", "0")
    left = _gc(hub, "--dry-run", "--grace", "0")["plan"]
    assert (left["garbage_objects"], left["packs_emptied"], left["packs_repacked"],
            left["unindexed_packs"], left["free_now"]["packs"]) == (0, 0, 0, 0, 0)
    assert left["stored_bytes"] <= plan["stored_bytes"] - 0.9 * 2 * 4 * (512 << 10)
    _all_clone_exactly(tmp_path, hub, kept)


@pytest.fixture
def db_store(request, tmp_path):
    """A hub's store on SQLite, or on a PostgreSQL database of its own."""
    def make(url: str) -> HubStore:
        store = HubStore(url, LocalBlobs(tmp_path / "blobs"))
        store.add_user("ann")
        return store
    if request.param == "sqlite":
        store = make(f"sqlite:///{tmp_path / 'hub.db'}")
        yield store
        store.close()
    else:
        with postgres_db(request.getfixturevalue("postgres")) as url:
            store = make(url)
            yield store
            store.close()


@pytest.mark.parametrize("db_store,gc_first", [
    ("sqlite", False),  # (SQLite's one writer cannot let gc in first)
    pytest.param("postgresql", False, marks=pytest.mark.slow),
    pytest.param("postgresql", True, marks=pytest.mark.slow),
], indirect=["db_store"])
def test_gc_inside_a_push_transaction_either_waits_or_is_seen(db_store, gc_first):
    """gc runs while a push's transaction has added its members: with ``gc_first`` before
    the push re-reads its rows (PostgreSQL only: SQLite's one writer cannot interleave so),
    else after it did. Either way the push ends holding its objects."""
    store = db_store
    recs = [_rec(os.urandom(3000)) for _ in range(30)]
    old = store.dot_for("ann", "ann", "old", create=True)
    store.receive(old, recs)
    store.remove_dot("ann", "old")
    new = store.dot_for("ann", "ann", "new", create=True)
    unindexed = store._unindexed
    runs: list[gc.Freed] = []

    def during(c, ids):
        if runs:
            return unindexed(c, ids)
        worker = threading.Thread(target=lambda: runs.append(
            gc.apply(store, gc.plan(store, grace=3600))))
        if gc_first:  # gc sees no member yet (not committed): it takes the rows
            worker.start()
            worker.join()
            return unindexed(c, ids)
        gone = unindexed(c, ids)  # holds the rows: gc waits for this commit, then sees them
        worker.start()
        time.sleep(1)
        assert worker.is_alive()  # waiting for this transaction's row locks (or SQLite's)
        return gone
    store._unindexed = during  # type: ignore[method-assign]
    store.receive(new, recs)
    store._unindexed = unindexed  # type: ignore[method-assign]
    deadline = time.monotonic() + 60
    while not runs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runs and runs[0].objects == (len(recs) if gc_first else 0)
    _read(store, "ann", "new", recs)
    assert gc.plan(store, grace=0).garbage_objects == 0
