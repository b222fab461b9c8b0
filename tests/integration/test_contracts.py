"""The contracts of docs' small interfaces, run against every implementation: blob stores
(a folder, SeaweedFS's S3) and transports (a hub, an S3 bucket); and the hub's OpenAPI
description against its routes."""

from __future__ import annotations

import os
import re
import time

import pytest
import yaml
from starlette.routing import Route

from dotmesh.errors import Conflict, NotFound, UsageError
from dotmesh.model.ids import object_id
from dotmesh.model.objects import KIND_CHUNK, KIND_COMMIT, Commit
from dotmesh.model.tags import Tag
from dotmesh.remote.blobs import LocalBlobs, S3Blobs
from dotmesh.remote.transport import HubTransport, S3Transport
from dotmesh.remote.wire import Record
from dotmesh.server.hub.app import create_app, openapi
from dotmesh.server.hub.storage import HubStore
from dotmesh.store.packs import compress
from tests.integration.remote_env import S3_KEY, S3_SECRET, Hub


@pytest.fixture(params=["folder", pytest.param("s3", marks=pytest.mark.slow)])
def blobs(request, tmp_path):
    if request.param == "folder":
        return LocalBlobs(tmp_path / "blobs")
    server = request.getfixturevalue("s3")
    bucket = f"dm-blobs-{os.urandom(4).hex()}"
    server.bucket(bucket)
    return S3Blobs(server.endpoint, bucket, S3_KEY, S3_SECRET, prefix="t/")


def test_blob_store_contract(blobs):
    blobs.put("a/one", b"1" * 1000)
    blobs.put("a/one", b"1" * 1000)  # idempotent
    blobs.put("a/two", b"22")
    blobs.put("b/three", b"333")
    assert blobs.get("a/one") == b"1" * 1000
    assert blobs.get_range("a/one", 10, 5) == b"11111"
    assert blobs.list("a/") == ["a/one", "a/two"]
    assert blobs.list("nothing/") == []
    assert [(e.key, e.size) for e in blobs.entries("a/")] == [("a/one", 1000), ("a/two", 2)]
    assert all(abs(e.written_ns - time.time_ns()) < 600e9 for e in blobs.entries("a/"))
    blobs.put("a/gone", b"x")
    blobs.delete("a/gone")
    blobs.delete("a/gone")  # absent already: no error
    assert blobs.list("a/") == ["a/one", "a/two"]
    with pytest.raises(NotFound):
        blobs.get("a/gone")
    with pytest.raises(NotFound):
        blobs.get("a/missing")
    with pytest.raises(NotFound):
        blobs.get_range("a/missing", 0, 1)
    assert blobs.read_versioned("ref") is None
    v1 = blobs.put_if("ref", b"first", None)
    with pytest.raises(Conflict):
        blobs.put_if("ref", b"again", None)
    data, v = blobs.read_versioned("ref")
    assert data == b"first" and v == v1
    blobs.put_if("ref", b"second", v)
    with pytest.raises(Conflict):
        blobs.put_if("ref", b"stale", v)
    assert blobs.get("ref") == b"second"
    for bad in ("../x", "a//b", "/abs", "a/./b", "sp ace"):
        with pytest.raises(UsageError):
            blobs.put(bad, b"")


@pytest.fixture(params=["folder", *(pytest.param(p, marks=pytest.mark.slow)
                                     for p in ("hub", "s3"))])
def transport(request, tmp_path):
    if request.param == "folder":  # a bucket in a folder: what the S3 transport assumes
        yield S3Transport(LocalBlobs(tmp_path / "bucket"), "contract", tmp_path / "cache")
    elif request.param == "hub":
        h = Hub(["--data", str(tmp_path / "hub")], tmp_path)
        key = h.user("tess")
        h.start()
        t = HubTransport(f"http://127.0.0.1:{h.ports[0]}", "tess", key, "tess/contract")
        yield t
        t.close()
        h.stop()
    else:
        server = request.getfixturevalue("s3")
        bucket = f"dm-tr-{os.urandom(4).hex()}"
        server.bucket(bucket)
        yield S3Transport(S3Blobs(server.endpoint, bucket, S3_KEY, S3_SECRET), "contract",
                          tmp_path / "cache")


def _rec(kind: int, data: bytes) -> Record:
    payload, z = compress(data)
    return Record(kind, object_id(data), len(data), bytes(payload), z)


def test_transport_contract(transport):
    assert transport.heads() == {}
    chunk = _rec(KIND_CHUNK, b"contract chunk")
    c1data = Commit((), {}, "first", "t", 1).encode()
    c1 = _rec(KIND_COMMIT, c1data)
    c2data = Commit((c1.oid,), {}, "second", "t", 2).encode()
    c2 = _rec(KIND_COMMIT, c2data)
    ids = [chunk.oid, c1.oid, c2.oid]
    assert transport.lacking(ids) == set(ids)
    transport.send([chunk, c1])
    transport.send([chunk, c1])  # idempotent
    assert transport.lacking(ids) == {c2.oid}
    transport.send([c2])
    got = transport.fetch({chunk.oid: KIND_CHUNK, c1.oid: KIND_COMMIT})
    assert got[chunk.oid].raw() == b"contract chunk"
    with pytest.raises(Exception):  # noqa: B017 - NotFound or BadTransfer, by transport
        transport.fetch({object_id(b"never sent"): KIND_CHUNK})
    transport.set_ref("master", None, c1.oid, False)
    with pytest.raises(Conflict):
        transport.set_ref("master", None, c2.oid, False)  # it is not new any more
    transport.set_ref("master", c1.oid, c2.oid, False)
    assert transport.heads() == {"master": c2.oid}
    assert {r.oid for r in transport.history(c2.oid, [])} == {c1.oid, c2.oid}
    # Without force a branch only moves forward, whatever ``old`` says: not sideways to a
    # commit that lacks the head, nor back to an ancestor.
    c3 = _rec(KIND_COMMIT, Commit((c1.oid,), {}, "sideways", "t", 3).encode())
    transport.send([c3])
    for other in (c3.oid, c1.oid):
        with pytest.raises(Conflict, match=r"does not include \(not a fast-forward\): pull "
                                           "first, or push --force"):
            transport.set_ref("master", c2.oid, other, False)
        assert transport.heads() == {"master": c2.oid}
    transport.set_ref("master", c2.oid, c3.oid, True)  # forced, it moves
    assert transport.heads() == {"master": c3.oid}
    with pytest.raises(Conflict):
        transport.set_ref("master", c1.oid, c1.oid, True)  # stale old, even forced
    transport.set_ref("fix/login", None, c1.oid, False)  # a branch name with parts
    assert transport.heads() == {"master": c3.oid, "fix/login": c1.oid}

    # Tags: made if absent, moved only from the commit the caller saw, only to a commit
    # the dot holds; one already naming the commit is success.
    assert transport.tags() == {}
    v1 = Tag("release/v1", c1.oid, "shipped", "tess", 7)
    transport.set_tag(v1, None)
    transport.set_tag(v1, None)  # already there: two pushes of one tag both succeed
    assert transport.tags() == {"release/v1": v1}
    moved = Tag("release/v1", c2.oid, "again", "tess", 8)
    with pytest.raises(Conflict):
        transport.set_tag(moved, None)  # it exists
    with pytest.raises(Conflict):
        transport.set_tag(moved, c3.oid)  # it does not name c3
    transport.set_tag(moved, c1.oid)
    assert transport.tags() == {"release/v1": moved}
    with pytest.raises(NotFound):
        transport.set_tag(Tag("ghost", object_id(b"never sent"), "", "tess", 9), None)
    assert set(transport.tags()) == {"release/v1"}


def test_the_openapi_description_covers_every_route(tmp_path):
    spec = yaml.safe_load(openapi())
    documented = {(path, m.upper()) for path, ops in spec["paths"].items()
                  for m in ops if m != "parameters"}
    app = create_app(HubStore("sqlite://", LocalBlobs(tmp_path)))
    served = set()
    for route in app.routes:
        if not isinstance(route, Route):
            continue  # the Mount at / is the web UI's pages (server/web), not the API
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
        for m in route.methods or ():
            if m != "HEAD":
                served.add((path, m))
    assert served == documented


@pytest.mark.slow
def test_a_hub_trusts_no_pusher(tmp_path):
    """Corrupt objects are refused, and a branch never moves to a commit whose closure the
    dot lacks; the hub's storage comes from a config file."""
    from dotmesh.model.objects import KIND_TREE, Root
    from dotmesh.remote.wire import BadTransfer

    cfg = tmp_path / "hub.toml"
    cfg.write_text(f'data = "{tmp_path / "data"}"\nworkers = 1\n')
    h = Hub(["--config", str(cfg)], tmp_path)
    key = h.user("pat")
    h.start()
    t = HubTransport(f"http://127.0.0.1:{h.ports[0]}", "pat", key, "pat/app")
    try:
        good = _rec(KIND_CHUNK, b"fine")
        with pytest.raises(BadTransfer, match="does not match its id"):
            t.send([Record(KIND_CHUNK, good.oid, 4, b"evil", False)])
        tree_data = b'DMT1\n[["f","f",420,0,0,1,4,"' + good.oid.hex().encode() + b'",0]]'
        tree = _rec(KIND_TREE, tree_data)
        commit = _rec(KIND_COMMIT, Commit((), {"db": Root(tree.oid, 0o755, 0, 0, 1)}, "m",
                                          "pat", 1).encode())
        t.send([tree, commit])  # the chunk the tree names is missing
        with pytest.raises(Conflict, match="lacks 1 objects"):
            t.set_ref("master", None, commit.oid, False)
        assert t.heads() == {}
        t.send([good])
        t.set_ref("master", None, commit.oid, False)
        assert t.heads() == {"master": commit.oid}
    finally:
        t.close()
        h.stop()
    assert (tmp_path / "data" / "hub.db").exists()  # the config file chose the folder
