"""Deleting dots on a hub and ``dm hub gc``: what only a deleted dot held is freed, what
another dot shares stays; pushes racing gc end with whole dots; a killed gc is finished by
the next; bad input is one line. The store-level tests run in-process on SQLite and a
folder; the rest drive real ``dm hub serve`` processes and the real ``dm`` (folder + SQLite,
and PostgreSQL + SeaweedFS)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dotmesh.errors import NotFound
from dotmesh.model.ids import object_id
from dotmesh.model.objects import KIND_CHUNK
from dotmesh.remote.blobs import LocalBlobs
from dotmesh.remote.wire import Record
from dotmesh.server.hub import gc
from dotmesh.server.hub.storage import HubStore
from dotmesh.store.packs import compress
from tests.integration.remote_env import Hub
from tests.integration.test_errors import _one_line_error


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
    (["gc", "--repack-below", "2"], 2, "--repack-below"),
])
def test_bad_hub_dot_and_gc_commands(local_hub, args, code, needle):
    p = local_hub.run(*args)
    assert p.returncode == code, p.stderr
    assert needle in _one_line_error(p)


def test_gc_dry_run_and_json_on_an_empty_hub(local_hub):
    out = json.loads(local_hub.dm_hub("gc", "--dry-run", "--json"))
    assert out["dry_run"] and out["plan"]["garbage_objects"] == 0
    out = json.loads(local_hub.dm_hub("gc", "--json"))
    assert out["freed"]["objects"] == 0 and out["freed"]["packs_deleted"] == 0
    assert "0 objects in 0 packs" in local_hub.dm_hub("gc")
    for cmd in (["gc"], ["dot", "rm"], ["dot"]):
        assert "Example:" in local_hub.dm_hub(*cmd, "--help")
