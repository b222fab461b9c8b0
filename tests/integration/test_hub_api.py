"""The hub's read API and what it lets whom do: lists of dots by who may read them, a dot's
log in pages, a commit with its files changed, read and write collaborators, public dots,
forks that cost no copy, deletes by owners only; and ``dm list/log/branch --remote`` reading
it without cloning. One hub for the whole module (SQLite and a folder)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from dotmesh.server.hub.config import HubConfig
from tests.conftest import DM
from tests.integration.remote_env import Hub

pytestmark = pytest.mark.slow  # a hub process and several dm clients

USERS = ("ann", "ben", "cal", "eve")  # owner, read collaborator, write collaborator, stranger


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ann's dot app (three commits: f added; f changed and d/g added; f removed), shared
    with ben (read) and cal (write); ann's dot pub, public."""
    top = tmp_path_factory.mktemp("hubapi")
    h = Hub(["--data", str(top / "data")], top)
    store = HubConfig({"data": str(top / "data")}).store()  # in-process: no dm hub to start
    h.keys = {u: store.add_user(u).key for u in USERS}
    h.start()
    try:
        ann = dev(top, "ann", h)
        ann.ok("init", "app")
        ann.ok("switch", "app")
        folder = ann.path("app")
        (folder / "f").write_text("one")
        ann.ok("commit", "-m", "first", "--no-freeze")
        (folder / "f").write_text("two, longer")
        (folder / "d").mkdir()
        (folder / "d" / "g").write_text("g")
        ann.ok("commit", "-m", "second", "-d", "ticket=BUG-42", "--no-freeze")
        (folder / "f").unlink()
        ann.ok("commit", "-m", "third", "--no-freeze")
        ann.ok("push", "hub", "app")
        ann.ok("init", "pub")
        ann.ok("switch", "pub")
        (ann.path("pub") / "readme").write_text("for everyone")
        ann.ok("commit", "-m", "public state", "--no-freeze")
        ann.ok("push", "hub", "pub")
        assert "may now read ann/app (not push" in h.dm_hub(
            "collaborator", "add", "ann/app", "ben", "--role", "read")
        store.add_collaborator("ann", "app", "cal", "write")
        assert "now public" in h.dm_hub("dot", "public", "ann/pub")
        yield h, top
    finally:
        h.stop()
        store.close()


def dev(top: Path, name: str, hub: Hub, home: str | None = None) -> DM:
    dm = DM(top / (home or name))
    hub.join(dm, name, hub.keys[name])
    return dm


def http(hub: Hub, user: str | None = None) -> httpx.Client:
    auth = (user, hub.keys[user]) if user else None
    return httpx.Client(base_url=f"http://127.0.0.1:{hub.ports[0]}", auth=auth, timeout=60)


def names(answer: dict) -> list[str]:
    return [f"{d['namespace']}/{d['name']}" for d in answer["dots"]]


def test_each_user_lists_the_dots_they_may_read(world):
    hub, top = world
    seen = {}
    for user in (*USERS, None):
        with http(hub, user) as c:
            r = c.get("/api/v1/dots")
            assert r.status_code == 200, r.text
            seen[user] = r.json()
    assert names(seen["ann"]) == ["ann/app", "ann/pub"]
    assert names(seen["ben"]) == names(seen["cal"]) == ["ann/app", "ann/pub"]
    assert names(seen["eve"]) == names(seen[None]) == ["ann/pub"]
    app = seen["ben"]["dots"][0]
    assert app["access"] == "read" and not app["public"]
    assert seen["cal"]["dots"][0]["access"] == "write"
    assert seen["eve"]["dots"][0]["access"] == "read" and seen["eve"]["dots"][0]["public"]
    assert app["pushers"] == ["ann", "cal"]
    assert app["collaborators"] == {"ben": "read", "cal": "write"}
    assert list(app["branches"]) == ["master"] and app["tags"] == 0
    assert app["stored_bytes"] > 0 and app["raw_bytes"] > 0 and app["objects"] > 0
    assert app["last_commit"]["message"] == "third"
    assert app["last_commit"]["id"] == app["branches"]["master"]
    with http(hub, "ann") as c:  # pages
        first = c.get("/api/v1/dots", params={"limit": 1}).json()
        assert names(first) == ["ann/app"] and first["next"] == "ann/app"
        second = c.get("/api/v1/dots", params={"limit": 1, "after": first["next"]}).json()
        assert names(second) == ["ann/pub"]

    ben = dev(top, "ben", hub, "ben-list")
    out = json.loads(ben.ok("list", "--remote", "hub", "--json"))
    assert [(d["namespace"], d["name"], d["access"]) for d in out] == [
        ("ann", "app", "read"), ("ann", "pub", "read")]
    text = ben.ok("list", "--remote", "hub")
    assert "ann/app" in text and "third" in text and "ann,cal" in text


def test_the_log_comes_in_pages_and_a_commit_with_its_changes(world):
    hub, top = world
    base = "/api/v1/dots/ann/app"
    with http(hub, "ben") as c:
        page = c.get(base + "/log", params={"limit": 2}).json()
        assert [x["message"] for x in page["commits"]] == ["third", "second"]
        assert page["next"] == page["commits"][1]["id"]
        rest = c.get(base + "/log", params={"limit": 2, "after": page["next"]}).json()
        assert [x["message"] for x in rest["commits"]] == ["first"] and rest["next"] is None
        by_tag = c.get(base + "/log", params={"ref": page["commits"][1]["id"]}).json()
        assert [x["message"] for x in by_tag["commits"]] == ["second", "first"]
        assert c.get(base + "/log", params={"ref": "nope"}).status_code == 404

        second = c.get(base + f"/commits/{page['commits'][1]['id']}").json()
        assert second["metadata"]["ticket"] == "BUG-42"
        assert second["parents"] == [rest["commits"][0]["id"]]
        assert second["diff"]["against"] == rest["commits"][0]["id"]
        assert {(ch["status"], ch["path"]) for ch in second["diff"]["changes"]} == {
            ("changed", "f"), ("added", "d/"), ("added", "d/g")}
        changed = next(ch for ch in second["diff"]["changes"] if ch["path"] == "f")
        assert (changed["old_size"], changed["new_size"]) == (3, 11)
        assert second["subdots"] and not second["diff"]["truncated"]
        first = c.get(base + f"/commits/{rest['commits'][0]['id']}").json()
        assert first["diff"] == {"against": None, "changes": [
            {"subdot": next(iter(first["subdots"])), "status": "added", "path": "f",
             "old_size": 0, "new_size": 3}], "truncated": False}
        assert c.get(base + "/commits/" + "0" * 64).status_code == 404

    ben = dev(top, "ben", hub, "ben-log")
    got = json.loads(ben.ok("log", "--remote", "hub", "ann/app", "--json"))
    assert [x["message"] for x in got] == ["third", "second", "first"]
    got = ben.ok("log", "--remote", "hub", "ann/app@master", "-n", "2", "--oneline")
    assert [line.split(" ", 1)[1] for line in got.splitlines()] == ["third", "second"]
    heads = json.loads(ben.ok("branch", "--remote", "hub", "ann/app", "--json"))
    assert [b["name"] for b in heads] == ["master"]


def test_a_read_collaborator_clones_but_may_not_push(world):
    hub, top = world
    ben = dev(top, "ben", hub, "ben-clone")
    ben.ok("clone", "hub", "ann/app")
    assert (ben.path("app") / "d" / "g").read_text() == "g"
    (ben.path("app") / "new").write_text("ben's")
    ben.ok("commit", "-m", "ben was here", "--no-freeze")
    p = ben("push", "hub")
    assert p.returncode != 0 and "may read ann/app but not push" in p.stderr, p.stderr
    tag = {"commit": "0" * 64, "message": "", "tagger": "x", "ts_ns": 0, "old": None}
    with http(hub, "ben") as c:
        assert c.put("/api/v1/dots/ann/app/tags/v1", json=tag).status_code == 403
    with http(hub, "cal") as c:  # a write collaborator gets past the check (to a commit the
        # dot lacks); tests/integration/test_remote.py has collaborators pushing for real
        assert c.put("/api/v1/dots/ann/app/tags/v1", json=tag).status_code == 404
    with http(hub, "ann") as c:  # roles are given over the API too, and checked
        assert c.put("/api/v1/dots/ann/app/collaborators/eve",
                     json={"role": "admin"}).status_code == 400
        assert c.get("/api/v1/dots/ann/app/collaborators").json()["roles"] == {
            "ben": "read", "cal": "write"}


def test_a_public_dot_is_read_without_a_key_but_not_pushed(world):
    hub, _ = world
    with http(hub) as anyone:
        assert anyone.get("/api/v1/dots/ann/pub").json()["public"] is True
        log = anyone.get("/api/v1/dots/ann/pub/log").json()
        assert [x["message"] for x in log["commits"]] == ["public state"]
        assert anyone.get(f"/api/v1/dots/ann/pub/commits/{log['commits'][0]['id']}"
                          ).status_code == 200
        for path in ("/api/v1/dots/ann/app", "/api/v1/dots/ann/app/log",
                     "/api/v1/dots/ann/nothing", "/api/v1/user"):
            assert anyone.get(path).status_code == 401, path
        assert anyone.put("/api/v1/dots/ann/pub/branches/master",
                          json={"new": "0" * 64}).status_code == 401
        assert anyone.post("/api/v1/dots/ann/app/fetch", content=b"").status_code == 401
        assert anyone.post("/api/v1/dots/ann/pub/lacking", content=b"").status_code == 401
        assert anyone.post("/api/v1/dots/ann/pub/objects", content=b"").status_code == 401
    with http(hub, "eve") as eve:  # a key that may read it still may not push
        assert eve.post("/api/v1/dots/ann/pub/objects", content=b"").status_code == 403
        assert eve.put("/api/v1/dots/ann/pub/public", json={"public": False}
                       ).status_code == 403
    with http(hub, "ann") as ann:
        assert ann.put("/api/v1/dots/ann/pub/public", json={"public": "yes"}).status_code == 400


def test_anyone_clones_and_pulls_a_public_dot_without_a_key(world):
    hub, top = world
    anon = DM(top / "anonymous")
    out = anon.ok("remote", "add", "pub", f"127.0.0.1:{hub.ports[0]}", "--http")
    assert "no key: public dots only" in out and "dm clone pub NAMESPACE/DOT" in out
    listed = json.loads(anon.ok("remote", "--json"))
    assert listed[0]["name"] == "pub" and listed[0]["user"] is None
    assert [d["name"] for d in json.loads(anon.ok("list", "--remote", "pub", "--json"))] == [
        "pub"]  # ann/app is not public: not even its name shows

    anon.ok("clone", "pub", "ann/pub")
    assert (anon.path("pub") / "readme").read_text() == "for everyone"
    ann = DM(top / "ann")  # joined the hub in world()
    (ann.path("pub") / "readme").write_text("for everyone, again")
    ann.ok("commit", "-m", "second public state", "--no-freeze")
    ann.ok("push", "hub", "pub")
    anon.ok("pull", "pub", "pub")
    assert (anon.path("pub") / "readme").read_text() == "for everyone, again"
    assert "second public state" in anon.ok("log", "--remote", "pub", "ann/pub")

    before = hub.packs()
    anon.ok("commit", "-m", "mine", "--no-freeze")
    p = anon("push", "pub", "pub")
    assert p.returncode != 0 and "remote pub has no key" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and hub.packs() == before
    p = anon("clone", "pub", "ann/app")  # private: as if it were not there
    assert p.returncode != 0 and "needs an API key" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = anon("clone", "pub", "app")  # whose app? an anonymous remote has no namespace
    assert p.returncode != 0 and "name the dot NAMESPACE/app" in p.stderr, p.stderr


def test_a_fork_shares_objects_and_is_its_forkers_to_push(world):
    hub, top = world
    packs = hub.packs()
    with http(hub, "eve") as c:
        assert c.post("/api/v1/dots/ann/app/fork", json={}).status_code == 403  # cannot read
        r = c.post("/api/v1/dots/ann/pub/fork", json={"name": "mine"})
        assert r.status_code == 201, r.text
        assert r.json() == {"dot": "eve/mine", "forked_from": "ann/pub"}
        assert c.post("/api/v1/dots/ann/pub/fork", json={"name": "mine"}).status_code == 409
        assert c.post("/api/v1/dots/ann/pub/fork", json={"name": "../x"}).status_code == 400
        fork = c.get("/api/v1/dots/eve/mine").json()
        source = c.get("/api/v1/dots/ann/pub").json()
        assert fork["branches"] == source["branches"] and fork["forked_from"] == "ann/pub"
        assert not fork["public"] and fork["pushers"] == ["eve"]
    assert hub.packs() == packs  # no bytes copied
    eve = dev(top, "eve", hub, "eve-fork")
    eve.ok("clone", "hub", "eve/mine")
    (eve.path("mine") / "readme").write_text("eve's now")
    eve.ok("commit", "-m", "eve's change", "--no-freeze")
    eve.ok("push", "hub")
    with http(hub) as anyone:  # the source did not move
        assert anyone.get("/api/v1/dots/ann/pub").json()["branches"] == source["branches"]


def test_only_the_owner_deletes_a_dot(world):
    hub, _ = world
    with http(hub, "ann") as ann:
        assert ann.post("/api/v1/dots/ann/pub/fork", json={"name": "scratch"}
                        ).status_code == 201
        ann.put("/api/v1/dots/ann/scratch/collaborators/cal", json={"role": "write"})
        ann.put("/api/v1/dots/ann/scratch/public", json={"public": True})
        for user in ("ben", "cal", "eve"):
            with http(hub, user) as other:
                assert other.delete("/api/v1/dots/ann/scratch").status_code == 403, user
        assert ann.delete("/api/v1/dots/ann/scratch").status_code == 200
        assert ann.get("/api/v1/dots/ann/scratch").status_code == 404
        assert "ann/scratch" not in names(ann.get("/api/v1/dots").json())
